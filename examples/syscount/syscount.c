// syscount: system calls per syscall number, kept in a hash map, for pymap.
//
//   pymap daemon --source examples/syscount/syscount.c
//   pymap events syscounts -f        # map events: added/updated counts
//   pymap get syscounts              # the current counts, decoded with the map's BTF
//
// No buffer here: this program shows that the maps a source creates are
// watched like any other map on the host. pymap polls the map and publishes
// what changed (a new syscall number: added; a count going up: updated).
// Attached to raw_syscalls:sys_enter (every syscall of every process).

BPF_HASH(syscounts, u32, u64, 1024);   // syscall number -> calls since loaded

TRACEPOINT_PROBE(raw_syscalls, sys_enter) {
    u32 nr = args->id;
    syscounts.atomic_increment(nr);
    return 0;
}
