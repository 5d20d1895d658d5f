// execsnoop over a BPF ring buffer: one record per successful exec(), for pymap.
//
//   pymap daemon --source examples/execsnoop-ringbuf/execsnoop.c:execs,drops=dropped
//   pymap events execs -f
//
// Attached to the sched:sched_process_exec tracepoint (no kprobes needed).
// A ring buffer reports no loss to its reader: when it is full,
// ringbuf_reserve() fails inside this program and the record is gone. So the
// program counts those failures in `dropped`, a map pymap reads beside the
// buffer (drops_map) and reports as `lost` events and in `pymap status`.

#define FILENAME_LEN 128

struct exec_event {
    u64 ts;          // bpf_ktime_get_ns(): CLOCK_MONOTONIC, in ns
    u32 pid;         // the process that exec'd (tgid)
    u32 old_pid;     // its thread id before exec (differs when a thread exec'd)
    u32 uid;
    u32 gid;
    char comm[16];   // the new command name
    char filename[FILENAME_LEN];  // the path given to execve()
};

BPF_RINGBUF_OUTPUT(execs, 64);    // 64 pages: 256 KiB
BPF_ARRAY(dropped, u64, 1);       // failed reserves: records lost because the ring was full

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct exec_event *e = execs.ringbuf_reserve(sizeof(struct exec_event));
    if (!e) {
        int zero = 0;
        u64 *count = dropped.lookup(&zero);
        if (count)
            __sync_fetch_and_add(count, 1);
        return 0;
    }
    u64 ids = bpf_get_current_uid_gid();
    e->ts = bpf_ktime_get_ns();
    e->pid = args->pid;
    e->old_pid = args->old_pid;
    e->uid = ids;
    e->gid = ids >> 32;
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    unsigned short off = args->data_loc_filename & 0xFFFF;
    bpf_probe_read_kernel_str(&e->filename, sizeof(e->filename), (void *)args + off);
    execs.ringbuf_submit(e, 0);
    return 0;
}
