// tcpconnect over a perf event array: one record per outgoing TCP connect(), for pymap.
//
//   pymap daemon --source examples/tcpconnect-perf/tcpconnect.c:connects
//   pymap events connects -f
//
// No kprobes here: the sock:inet_sock_set_state tracepoint fires in the
// connecting process when a TCP socket moves from CLOSE to SYN_SENT, which is
// what connect() does. The tracepoint already gives ports in host byte order
// and addresses in network byte order.
//
// A perf event array has one ring per CPU; pymap installs its own rings in
// it. When a CPU's ring is full the kernel drops the sample and later writes
// a PERF_RECORD_LOST with the count: pymap publishes it as a `lost` event.
//
// The pymap_* typedefs are layout hints: pymap prints such fields as
// addresses (10.0.0.1, fe80::1) instead of numbers. They are plain C types.

typedef u32 pymap_ipv4;          // network byte order, like the kernel's __be32
typedef u8 pymap_ipv6[16];

#define AF_INET 2
#define IPPROTO_TCP 6
#define TCP_SYN_SENT 2

struct connect_event {
    u64 ts;                // bpf_ktime_get_ns()
    u32 pid;
    u32 uid;
    u16 family;            // 2: IPv4, 10: IPv6
    u16 sport;             // host byte order (0 until the kernel picks one)
    u16 dport;
    u16 _pad;
    pymap_ipv4 saddr;      // IPv4 addresses (zero for IPv6)
    pymap_ipv4 daddr;
    pymap_ipv6 saddr6;     // IPv6 addresses (zero for IPv4)
    pymap_ipv6 daddr6;
    char comm[16];
};

BPF_PERF_OUTPUT(connects);

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP || args->newstate != TCP_SYN_SENT)
        return 0;
    struct connect_event e = {};
    e.ts = bpf_ktime_get_ns();
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.uid = bpf_get_current_uid_gid();
    e.family = args->family;
    e.sport = args->sport;
    e.dport = args->dport;
    if (args->family == AF_INET) {
        __builtin_memcpy(&e.saddr, args->saddr, 4);
        __builtin_memcpy(&e.daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(&e.saddr6, args->saddr_v6, 16);
        __builtin_memcpy(&e.daddr6, args->daddr_v6, 16);
    }
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    connects.perf_submit(args, &e, sizeof(e));
    return 0;
}
