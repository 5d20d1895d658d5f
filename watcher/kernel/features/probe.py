"""The one feature probe: which kernel facilities this host lets pymap use.

Why one module: what loads on one host is refused on the next (a lockdown
build refuses every tracing program, iterators included, with ``EPERM``; a
kernel before 5.6 has no batch lookups; a trimmed capability set cannot raise
rlimits).  Each facility is tried here, once per daemon start, by doing the
smallest real thing that needs it (a 4-entry map, a two-instruction program),
and the answer says available or refused, the errno, and what pymap does
instead.  Code that has a choice to make takes a :class:`Features` and asks
it; nothing else probes on its own.  ``pymap doctor`` shows the same table,
``status -o json`` carries it.

The probe must run before the daemon's seccomp filter (it creates maps and
loads programs), and every object it makes is closed before it returns.
Nothing here raises: a probe that crashes is reported as refused with the
exception's text.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
from collections.abc import Callable

import attrs

import watcher.kernel.sys.create as progload
import watcher.kernel.sys.syscall as syscall
from watcher.kernel.asm.assembler import ADD, R0, R1, R2, R3, R4, R10, Asm
from watcher.kernel.asm.helpers import Helper
from watcher.kernel.maps.kinds import TYPE_IDS

# helpers (enum bpf_func_id) the probe programs call
_ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space

BATCH_LOOKUP = "batch_lookup"
MAP_BY_ID = "map_by_id"
BTF_BY_ID = "btf_by_id"
RINGBUF = "ringbuf"
PERF_EVENT_ARRAY = "perf_event_array"
PROG_TEST_RUN = "prog_test_run"
FOR_EACH = "for_each"
MAP_ITER = "map_iter"
TRACEPOINT = "tracepoint"
CAPABILITIES = "capabilities"
RLIMITS = "rlimits"
LOCKDOWN = "lockdown"
UNPRIVILEGED_BPF = "unprivileged_bpf"
INFORMATIONAL = frozenset({LOCKDOWN, UNPRIVILEGED_BPF})


@attrs.frozen
class Facility:
    """One answer: ``available``, or refused with ``error`` (an errno name) and what
    pymap does instead (``degrades``); ``fix`` says how to get it where one exists."""

    name: str
    title: str
    available: bool
    detail: str
    error: str = ""
    degrades: str = ""
    fix: str = ""

    @property
    def state(self) -> str:
        """``available``, ``refused``, or ``info`` for a setting pymap reads but needs no
        particular value of (lockdown, the unprivileged-bpf sysctl)."""
        if self.name in INFORMATIONAL:
            return "info"
        return "available" if self.available else "refused"


@attrs.frozen
class Features:
    """Every facility's answer, probed once (:func:`probe`)."""

    facilities: tuple[Facility, ...]

    def get(self, name: str) -> Facility:
        for f in self.facilities:
            if f.name == name:
                return f
        raise KeyError(name)

    def allows(self, name: str) -> bool:
        return self.get(name).available

    def refused(self) -> list[Facility]:
        return [f for f in self.facilities if not f.available]

    def why_not(self, name: str) -> str:
        """``"<title> refused by this kernel (EPERM)"`` for messages; "" when available."""
        f = self.get(name)
        if f.available:
            return ""
        return f"{f.title} refused by this kernel ({f.error or f.detail})"


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno)) if e.errno else type(e).__name__


def _close(*fds: int) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _tiny_map(type_name: str, key: int = 4, value: int = 8, entries: int = 4) -> int:
    """A probe's map, known as pymap's own (never reported as the host's)."""
    return progload.create_map(TYPE_IDS[type_name], key, value, entries, "pymap_probe")


# --- the probes: each returns (detail) or raises OSError / progload.Unsupported ---------


def _batch_lookup() -> str:
    fd = _tiny_map("hash")
    try:
        syscall.map_update_elem(fd, (7).to_bytes(4, "little"), (42).to_bytes(8, "little"))
        cursor = syscall.BatchCursor(fd, 4)
        keys, values = ctypes.create_string_buffer(16), ctypes.create_string_buffer(32)
        found = 0
        while not cursor.done:
            found += syscall.map_lookup_batch(cursor, keys, values, 4)
        if found != 1 or keys.raw[:4] != (7).to_bytes(4, "little"):
            raise OSError(errno.EIO, f"BPF_MAP_LOOKUP_BATCH returned {found} entries for 1")
        return "BPF_MAP_LOOKUP_BATCH reads a hash map"
    finally:
        os.close(fd)


def _map_by_id() -> str:
    first = syscall.map_get_next_id(0)
    if first is None:
        return "BPF_MAP_GET_NEXT_ID works (no maps yet)"
    try:
        os.close(syscall.map_get_fd_by_id(first))
    except OSError as e:
        if e.errno != errno.ENOENT:  # gone meanwhile: the command itself ran
            raise
    return "BPF_MAP_GET_NEXT_ID and BPF_MAP_GET_FD_BY_ID work"


def _btf_by_id() -> str:
    try:
        os.close(syscall.btf_get_fd_by_id(1))  # id 1 is the kernel's own BTF where it has one
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
        return "BPF_BTF_GET_FD_BY_ID works (no BTF object 1)"
    return "BPF_BTF_GET_FD_BY_ID works"


def _ringbuf() -> str:
    os.close(_tiny_map("ringbuf", 0, 0, 4096))
    return "a BPF_MAP_TYPE_RINGBUF map can be made"


def _perf_event_array() -> str:
    import watcher.kernel.sys.perfevent as perfevent

    fd = _tiny_map("perf_event_array", 4, 4, 1)
    try:
        os.close(perfevent.open_bpf_output(0))
    finally:
        os.close(fd)
    return "perf event arrays and perf_event_open(PERF_COUNT_SW_BPF_OUTPUT) work"


def _nop() -> bytes:
    a = Asm()
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


def _prog_test_run() -> str:
    prog = progload.load_program(_nop(), "pymap_probe", progload.BPF_PROG_TYPE_SOCKET_FILTER)
    try:
        syscall.prog_test_run(prog, bytes(64))
    finally:
        os.close(prog)
    return "socket filters load and BPF_PROG_TEST_RUN runs them"


def for_each_program(map_fd: int) -> Asm:
    """``bpf_for_each_map_elem`` over ``map_fd`` with an empty callback (its BTF
    ``func_info`` from :meth:`.Asm.func_info`)."""
    a = Asm()
    a.ld_map_fd(R1, map_fd)
    a.ld_func(R2, "pymap_probe_cb")
    a.movi(R3, 0)
    a.movi(R4, 0)
    a.call(Helper.FOR_EACH_MAP_ELEM)
    a.exit()  # R0: the number of elements walked
    a.function("pymap_probe_cb")
    a.movi(R0, 0)
    a.exit()
    return a


def _for_each() -> str:
    fd = _tiny_map("array", 4, 8, 3)
    prog = btf = -1
    try:
        program = for_each_program(fd)
        insns = program.assemble()
        blob, info = program.func_info("pymap_probe")
        btf = progload.load_btf(blob)
        prog = progload.load_program(insns, "pymap_probe", progload.BPF_PROG_TYPE_SOCKET_FILTER,
                                     btf_fd=btf, func_info=info)
        walked, _ = syscall.prog_test_run(prog, bytes(64))
        if walked != 3:
            raise OSError(errno.EIO, f"bpf_for_each_map_elem walked {walked} of 3 elements")
    finally:
        _close(prog, btf, fd)
    return "bpf_for_each_map_elem walks a map in a socket filter (Linux 5.13+)"


def _map_iter() -> str:
    btf_id = progload.map_elem_iter_btf_id()
    prog = fd = link = -1
    try:
        prog = progload.load_program(_nop(), "pymap_probe", progload.BPF_PROG_TYPE_TRACING,
                                     progload.BPF_TRACE_ITER, attach_btf_id=btf_id)
        fd = _tiny_map("hash")
        link = progload.attach_map_iter(prog, fd)
        it = progload.iter_create(link)
        try:
            while os.read(it, 4096):
                pass
        finally:
            os.close(it)
    finally:
        _close(link, fd, prog)
    return "bpf_map_elem iterators load, attach and run (Linux 5.9+)"


def _tracepoint() -> str:
    a = Asm()  # bpf_probe_read_kernel(&stack, 8, 0): what map discovery's programs call
    a.mov(R1, R10)
    a.alu64(ADD, R1, -8)
    a.movi(R2, 8)
    a.movi(R3, 0)
    a.call(Helper.PROBE_READ_KERNEL)
    a.movi(R0, 0)
    a.exit()
    os.close(progload.load_program(a.assemble(), "pymap_probe",
                                   progload.BPF_PROG_TYPE_TRACEPOINT))
    return "tracepoint programs calling bpf_probe_read_kernel load"


def _capabilities(status_path: str = "/proc/self/status") -> str:
    from watcher.kernel.features.checks import parse_capeff
    from watcher.kernel.sys.capabilities import CAPABILITIES as CAPS

    with open(status_path) as f:
        capeff = parse_capeff(f.read())
    if capeff is None:
        raise OSError(errno.EPERM, f"no CapEff line in {status_path}")
    held = [c.name for c in CAPS if capeff >> c.number & 1]
    if "CAP_SYS_ADMIN" not in held:
        raise OSError(errno.EPERM, f"CapEff {capeff:x}: no CAP_SYS_ADMIN (held: "
                      f"{', '.join(held) or 'none'})")
    resource_cap = "with" if capeff >> 24 & 1 else "without"
    return f"CapEff {capeff:x}: {', '.join(held)}; {resource_cap} CAP_SYS_RESOURCE"


def _rlimits() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if hard == resource.RLIM_INFINITY:
        return "RLIMIT_MEMLOCK is unlimited already"
    try:  # raising a hard limit needs CAP_SYS_RESOURCE; Python says EPERM as ValueError
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard + 4096))
    except ValueError as e:
        raise OSError(errno.EPERM, f"setrlimit(RLIMIT_MEMLOCK): {e}") from None
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))  # lowering is always allowed
    return f"RLIMIT_MEMLOCK can be raised (now {hard // 1024} KiB)"


def _lockdown(path: str = "/sys/kernel/security/lockdown") -> str:
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return "unknown (securityfs not mounted)"
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    if mode != "none":
        # Not a refusal by itself: which programs lockdown refuses is probed above.
        return f"lockdown={mode}: kprobes, fentry and LSM programs are refused"
    return "lockdown=none"


def _unprivileged_bpf(path: str = "/proc/sys/kernel/unprivileged_bpf_disabled") -> str:
    try:
        with open(path) as f:
            value = f.read().strip()
    except FileNotFoundError:
        return "unknown (no sysctl)"
    meaning = {"0": "unprivileged users may use bpf()", "1": "bpf() needs privileges (fixed)",
               "2": "bpf() needs privileges"}.get(value, "")
    return f"kernel.unprivileged_bpf_disabled={value}" + (f": {meaning}" if meaning else "")


# name, title, probe; what degrades and the fix when refused
_PROBES: list[tuple[str, str, Callable[[], str]]] = [
    (CAPABILITIES, "capabilities", _capabilities),
    (MAP_BY_ID, "maps by id", _map_by_id),
    (BATCH_LOOKUP, "batch lookups", _batch_lookup),
    (BTF_BY_ID, "BTF by id", _btf_by_id),
    (RINGBUF, "ring buffers", _ringbuf),
    (PERF_EVENT_ARRAY, "perf event arrays", _perf_event_array),
    (PROG_TEST_RUN, "BPF_PROG_TEST_RUN", _prog_test_run),
    (FOR_EACH, "bpf_for_each_map_elem", _for_each),
    (MAP_ITER, "map-element iterators", _map_iter),
    (TRACEPOINT, "tracepoint programs", _tracepoint),
    (RLIMITS, "raising rlimits", _rlimits),
    (LOCKDOWN, "lockdown", _lockdown),
    (UNPRIVILEGED_BPF, "unprivileged bpf", _unprivileged_bpf),
]

DEGRADES = {
    CAPABILITIES: ("the daemon cannot list every map by id and refuses to start",
                   "run the daemon as root, or with CAP_SYS_ADMIN, CAP_BPF and CAP_PERFMON"),
    MAP_BY_ID: ("no map can be listed or watched", "run as root (CAP_SYS_ADMIN)"),
    BATCH_LOOKUP: ("dumps read one key at a time (BPF_MAP_GET_NEXT_KEY + LOOKUP_ELEM), "
                   "about 10x slower", "use Linux 5.6 or newer"),
    BTF_BY_ID: ("maps are shown in hex or by a configured layout, not decoded from BTF",
                "run as root (CAP_SYS_ADMIN); with lockdown, check the kernel's BPF policy"),
    RINGBUF: ("ring buffer event sources cannot be read; the in-kernel engine is off",
              "use Linux 5.8 or newer"),
    PERF_EVENT_ARRAY: ("perf buffer event sources cannot be read",
                       "grant CAP_PERFMON or lower kernel.perf_event_paranoid"),
    PROG_TEST_RUN: ("the in-kernel engine is off: maps are diffed in user space",
                    "use Linux 5.13 or newer without a BPF lockdown policy"),
    FOR_EACH: ("the in-kernel engine walks with map-element iterators only, or is off",
               "use Linux 5.13 or newer"),
    MAP_ITER: ("per-CPU maps are diffed in user space; hash, LRU hash and array maps use "
               "the for_each route", "a kernel that allows BPF_PROG_TYPE_TRACING programs "
               "(no lockdown policy refusing them), Linux 5.9 or newer"),
    TRACEPOINT: ("map discovery polls map ids instead of hearing of creations at once",
                 "a kernel with tracepoints whose lockdown allows bpf_probe_read_kernel"),
    RLIMITS: ("nothing on Linux 5.11+ (BPF memory is charged to the cgroup); before 5.11 "
              "maps and programs count against RLIMIT_MEMLOCK, which stays as it is",
              "grant CAP_SYS_RESOURCE, or raise LimitMEMLOCK in the unit"),
    LOCKDOWN: ("", ""),
    UNPRIVILEGED_BPF: ("", ""),
}


def _run(name: str, title: str, fn: Callable[[], str]) -> Facility:
    degrades, fix = DEGRADES[name]
    try:
        return Facility(name, title, True, fn())
    except (OSError, progload.Unsupported, ValueError) as e:
        err = _errname(e) if isinstance(e, OSError) else "unsupported"
        text = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        return Facility(name, title, False, text, err, degrades, fix)
    except Exception as e:  # noqa: BLE001 - a crashing probe is reported, never raised
        return Facility(name, title, False, f"the probe itself failed: {type(e).__name__}: {e}",
                        type(e).__name__, degrades, "report this as a pymap bug")


def probe() -> Features:
    """Probe every facility (about 20 ms); call once, before the seccomp filter."""
    return Features(tuple(_run(name, title, fn) for name, title, fn in _PROBES))


def main() -> None:
    """``python -m watcher.kernel.features.probe``: the probe's answers as one JSON object per
    facility, one per line (make test-kernels reads it inside each kernel it boots)."""
    import json

    for f in probe().facilities:
        print(json.dumps(dict(attrs.asdict(f), state=f.state)))


if __name__ == "__main__":
    main()
