"""The kernel layer: everything that talks to ``bpf(2)``, ``perf_event_open(2)`` and bpffs.

Laid out as cilium/ebpf lays out its Go packages, one owner per kind of kernel object:

* :mod:`.sys` -- the raw syscalls, attr structs, mmap, CPUs, capabilities, seccomp;
* :mod:`.asm` -- eBPF instructions: the assembler, the decoder, the read-only check;
* :mod:`.maps` -- finding maps, their kinds, dumping them, reading counter maps;
* :mod:`.btf` -- BTF objects read from the kernel by id;
* :mod:`.buffers` -- ring buffer and perf event array readers;
* :mod:`.discovery` -- learning of new maps from the ``bpf(2)`` tracepoints;
* :mod:`.kdelta` -- the in-kernel change-detection engine and its objects broker;
* :mod:`.prog` -- event-source programs users hand to pymap (bcc);
* :mod:`.features` -- what this host's kernel allows, probed once, and doctor's checks.

Nothing here imports from :mod:`watcher.decode`, :mod:`watcher.daemon`,
:mod:`watcher.wire` or :mod:`consumers` (``tests/test_kernel_unit.py`` checks: the
kernel ABI facts the layers above share live here, in :mod:`.sys.abi` and
:mod:`.btf.blob`); the layer above decides policy,
this one only does what it is asked and reports what the kernel said.
"""
