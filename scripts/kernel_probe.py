"""What this kernel lets pymap do, as one JSON line (for ``make test-kernels``).

Run as root with the project's venv: ``.venv/bin/python scripts/kernel_probe.py``.
It prints ``KPROBE {...}`` with, for each facility, ``"ok"`` or why it was refused:

* ``lockdown``: the kernel lockdown mode (``/sys/kernel/security/lockdown``);
* ``iter``: a trivial ``BPF_PROG_TYPE_TRACING`` map element iterator
  (``BPF_TRACE_ITER``) loads, attaches to a map and runs (the in-kernel engine's walk);
* ``for_each``: ``bpf_for_each_map_elem`` with a callback, in a socket filter
  run by ``BPF_PROG_TEST_RUN`` (the engine's other walk);
* ``batch``: ``BPF_MAP_LOOKUP_BATCH`` (``pymap doctor``'s check);
* ``ringbuf``: a ``BPF_MAP_TYPE_RINGBUF`` map can be created.

Every object it makes is closed before it exits; nothing is pinned.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.kernel import probe, progload, syscall  # noqa: E402
from watcher.kernel.bpfasm import R0, R1, R2, R3, R4, Asm, func_btf  # noqa: E402
from watcher.kernel.maptypes import TYPE_IDS  # noqa: E402

SECURITYFS = "/sys/kernel/security"
_FOR_EACH_MAP_ELEM = 164  # bpf_for_each_map_elem


def why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return f"{type(e).__name__}: {e}"[:80]


def lockdown() -> str:
    path = os.path.join(SECURITYFS, "lockdown")
    if not os.path.exists(path) and not os.path.ismount(SECURITYFS):
        subprocess.run(["mount", "-t", "securityfs", "securityfs", SECURITYFS],
                       check=False, capture_output=True)
    try:
        text = Path(path).read_text()
    except OSError as e:
        return f"unknown ({why(e)})"
    # "none [integrity] confidentiality": the bracketed word is the mode
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return text.strip()


def _hash_map(entries: int = 4) -> int:
    fd = syscall.map_create(TYPE_IDS["hash"], 4, 8, entries, name="pymap_kprobe")
    for i in range(entries):
        syscall.map_update_elem(fd, i.to_bytes(4, "little"), (i * 3).to_bytes(8, "little"))
    return fd


def iterator() -> str:
    """Load ``r0 = 0; exit`` as a map element iterator, attach it to a map, read it."""
    a = Asm()
    a.movi(R0, 0)
    a.exit()
    try:
        btf_id = progload.map_elem_iter_btf_id()
    except (OSError, progload.Unsupported) as e:
        return f"no BTF id ({why(e)})"
    fds: list[int] = []
    try:
        fds.append(map_fd := _hash_map())
        try:
            fds.append(prog := progload.load_program(
                a.assemble(), "pymap_kprobe", progload.BPF_PROG_TYPE_TRACING,
                progload.BPF_TRACE_ITER, btf_id))
        except OSError as e:
            return f"load {why(e)}"
        try:
            fds.append(link := progload.attach_map_iter(prog, map_fd))
            fds.append(it := progload.iter_create(link))
            while os.read(it, 4096):
                pass
        except OSError as e:
            return f"run {why(e)}"
        return "ok"
    finally:
        for fd in fds:
            os.close(fd)


def for_each() -> str:
    """A socket filter that walks a map with bpf_for_each_map_elem, run once."""
    fds: list[int] = []
    try:
        fds.append(map_fd := _hash_map())
        a = Asm()
        a.ld_map_fd(R1, map_fd)
        a.ld_func(R2, "cb")
        a.movi(R3, 0)
        a.movi(R4, 0)
        a.call(_FOR_EACH_MAP_ELEM)
        a.exit()  # r0: elements walked
        a.label("cb")
        a.movi(R0, 0)
        a.exit()
        cb_at = 8  # ld_imm64 x2 (4 slots), movi x2, call, exit
        blob, info = func_btf([("pymap_kprobe", 0, True), ("pymap_kprobe_cb", cb_at, False)])
        fds.append(btf := progload.load_btf(blob))
        try:
            fds.append(prog := progload.load_program(
                a.assemble(), "pymap_kprobe", progload.BPF_PROG_TYPE_SOCKET_FILTER,
                btf_fd=btf, func_info=info))
        except OSError as e:
            return f"load {why(e)}"
        walked, _ = syscall.prog_test_run(prog, bytes(64))
        return "ok" if walked == 4 else f"walked {walked} of 4"
    except OSError as e:
        return why(e)
    finally:
        for fd in fds:
            os.close(fd)


def ringbuf() -> str:
    try:
        os.close(syscall.map_create(TYPE_IDS["ringbuf"], 0, 0, 4096, name="pymap_kprobe"))
    except OSError as e:
        return why(e)
    return "ok"


def batch() -> str:
    check = probe.batch_lookup()
    return "ok" if check.ok else check.detail[:60]


def main() -> int:
    result = {"kernel": os.uname().release}
    for name, fn in (("lockdown", lockdown), ("iter", iterator), ("for_each", for_each),
                     ("batch", batch), ("ringbuf", ringbuf)):
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - a crash is the finding, not the end
            result[name] = f"probe crashed: {why(e)}"
    print("KPROBE " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
