"""Host checks for ``pymap doctor``: what the daemon needs from this machine.

Each check is a plain function returning one :class:`Check`; none raises
(a check that crashes reports that as its failure), so ``doctor`` can show
every problem at once, each with its fix.  Checks that read files take the
path as a parameter, so tests can point them at a fake ``/proc``.

``required`` says whether the daemon needs it to watch maps.  bcc, its kernel
headers and tracefs only matter for programs loaded with bcc (the examples and
the tests), kernel BTF and batch lookups only make things nicer or faster:
those are warnings, not failures.

This module lives in the kernel layer because a check issues ``bpf()``
(through :mod:`..sys.syscall`, the only module that does).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import attrs

from watcher.kernel.btf.blob import VMLINUX_BTF as KERNEL_BTF
from watcher.kernel.maps.find import DEFAULT_BPFFS
from watcher.kernel.sys.capabilities import CAPABILITIES

DEFAULT_TRACEFS = "/sys/kernel/tracing"

_CAP_NUMBERS = {cap.name: cap.number for cap in CAPABILITIES}
CAP_SYS_ADMIN = _CAP_NUMBERS["CAP_SYS_ADMIN"]
CAP_PERFMON = _CAP_NUMBERS["CAP_PERFMON"]
CAP_BPF = _CAP_NUMBERS["CAP_BPF"]

_ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True


def _guarded(fn: Callable[..., Check], name: str, required: bool) -> Callable[..., Check]:
    """Turn any exception inside a check into a failed check: doctor never tracebacks."""

    def wrapper(*args, **kwargs) -> Check:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - reporting it is the point
            return Check(name, False, f"the check itself failed: {type(e).__name__}: {e}",
                         "report this as a pymap bug", required)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- privileges ----------------------------------------------------------------------


def parse_capeff(status_text: str) -> int | None:
    """The effective capability mask from the text of ``/proc/<pid>/status``."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return None


def _privileges(status_path: str = "/proc/self/status", euid: int | None = None) -> Check:
    name = "privileges"
    euid = os.geteuid() if euid is None else euid
    with open(status_path) as f:
        capeff = parse_capeff(f.read())
    if capeff is None:
        return Check(name, False, f"no CapEff line in {status_path}", "run as root")
    has = {cap.name: bool(capeff >> cap.number & 1) for cap in CAPABILITIES}
    who = "root" if euid == 0 else f"uid {euid}"
    present = [c for c, h in has.items() if h]
    detail = f"{who}: " + (", ".join(present) or f"none of {', '.join(has)} (CapEff {capeff:x})")
    # Enumerating maps by id (BPF_MAP_GET_NEXT_ID, BPF_MAP_GET_FD_BY_ID) and opening BTF by
    # id are CAP_SYS_ADMIN-only in the kernel: CAP_BPF + CAP_PERFMON let a process create and
    # read its own maps, not watch everyone's.
    if has["CAP_SYS_ADMIN"]:
        missing = [c for c, h in has.items() if not h]
        if missing:  # optional ones: the daemon runs, without what they are for
            detail += f"; without {', '.join(missing)} (see docs/operations.md)"
        return Check(name, True, detail)
    if has["CAP_BPF"] and has["CAP_PERFMON"]:
        return Check(name, False, detail + "; listing every map by id also needs CAP_SYS_ADMIN",
                     "run the daemon as root (or add CAP_SYS_ADMIN)")
    return Check(name, False, detail, "run as root: sudo pymap ...")


privileges = _guarded(_privileges, "privileges", True)


# --- the bpf syscall ------------------------------------------------------------------


def _bpf_syscall() -> Check:
    name = "bpf syscall"
    try:
        import watcher.kernel.sys.syscall as syscall
    except ImportError as e:
        return Check(name, False, str(e),
                     "pymap supports x86_64, aarch64, riscv64, armv7l and ppc64le")
    try:
        first = syscall.map_get_next_id(0)
    except OSError as e:
        if e.errno == errno.ENOSYS:
            fix = "use a kernel built with CONFIG_BPF_SYSCALL=y"
        elif e.errno in (errno.EPERM, errno.EACCES):
            fix = "run as root (map ids need CAP_SYS_ADMIN)"
        else:
            fix = "check dmesg and the kernel's BPF settings"
        return Check(name, False, f"BPF_MAP_GET_NEXT_ID failed: {os.strerror(e.errno or 0)}", fix)
    detail = "works (" + (f"first map id {first}" if first is not None else "no maps yet") + ")"
    return Check(name, True, detail)


bpf_syscall = _guarded(_bpf_syscall, "bpf syscall", True)


# --- mounts ---------------------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    """``/proc/mounts`` writes space, tab, newline and backslash as octal escapes."""
    for esc, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(esc, char)
    return field


def parse_mounts(text: str) -> list[tuple[str, str]]:
    """``(mount point, fstype)`` of every line of ``/proc/mounts``, in order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((_unescape_mount_field(parts[1]), parts[2]))
    return out


def _mounted(mounts_path: str, mountpoint: str, fstype: str) -> tuple[bool, str | None]:
    """Whether ``fstype`` is mounted at ``mountpoint``, and what is there otherwise."""
    with open(mounts_path) as f:
        entries = [e for e in parse_mounts(f.read()) if e[0] == mountpoint]
    if any(t == fstype for _, t in entries):
        return True, None
    return False, entries[-1][1] if entries else None


def _bpffs(mounts_path: str = "/proc/mounts", path: str = DEFAULT_BPFFS) -> Check:
    name = "bpffs"
    ok, other = _mounted(mounts_path, path, "bpf")
    if ok:
        return Check(name, True, f"mounted at {path}")
    where = f"{path} holds a {other} filesystem" if other else f"nothing mounted at {path}"
    return Check(name, False, f"{where}: pinned maps (and their full names) are invisible",
                 f"mount -t bpf bpf {path}  (or: make setup)")


bpffs = _guarded(_bpffs, "bpffs", True)


def tracefs_unreadable(path: str = DEFAULT_TRACEFS) -> str | None:
    """Why bcc cannot read tracepoint formats under ``path`` with this process's privileges.

    Tried, not ``os.access``: access(2) drops the capabilities of a non-root user, so it
    would call tracefs unreadable for a daemon that holds CAP_DAC_READ_SEARCH.
    """
    try:
        os.listdir(os.path.join(path, "events"))
    except PermissionError:
        return (f"{path} is not readable by uid {os.geteuid()}: bcc needs it for tracepoints "
                "(grant CAP_DAC_READ_SEARCH, docs/operations.md)")
    except OSError:
        return None  # not mounted: the tracefs check and bcc's own error say so
    return None


def _tracefs(mounts_path: str = "/proc/mounts", path: str = DEFAULT_TRACEFS) -> Check:
    name = "tracefs"
    ok, other = _mounted(mounts_path, path, "tracefs")
    if ok:
        return Check(name, True, f"mounted at {path}", required=False)
    where = f"{path} holds a {other} filesystem" if other else f"nothing mounted at {path}"
    return Check(name, False, f"{where}: bcc cannot attach tracepoints (not needed to watch maps)",
                 f"mount -t tracefs tracefs {path}  (or: make setup)", required=False)


tracefs = _guarded(_tracefs, "tracefs", False)


# --- kernel features --------------------------------------------------------------------


def _kernel_btf(path: str = KERNEL_BTF) -> Check:
    name = "kernel BTF"
    if os.path.exists(path):
        return Check(name, True, path, required=False)
    return Check(name, False, f"no {path}: the kernel was built without CONFIG_DEBUG_INFO_BTF "
                 "(maps still decode with their own BTF)",
                 "use a kernel with CONFIG_DEBUG_INFO_BTF=y", required=False)


kernel_btf = _guarded(_kernel_btf, "kernel BTF", False)


# --- bcc --------------------------------------------------------------------------------


def _bcc() -> Check:
    name = "bcc"
    try:
        import bcc as bcc_module
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a missing libbcc
        return Check(name, False, f"import bcc failed: {type(e).__name__}: {e} "
                     "(only the examples and tests load programs with bcc)",
                     "make setup  (installs python3-bpfcc and links it into .venv)", required=False)
    version = getattr(bcc_module, "__version__", "?")
    return Check(name, True, f"bcc {version} imports", required=False)


bcc = _guarded(_bcc, "bcc", False)


def _kernel_headers(release: str | None = None, modules: str = "/lib/modules") -> Check:
    name = "kernel headers"
    release = release or os.uname().release
    build = os.path.join(modules, release, "build")
    fix = "make setup  (installs linux-headers-amd64 and links them)"
    if os.path.exists(build):
        target = os.path.realpath(build)
        detail = build if target == build else f"{build} -> {target}"
        if release not in target:
            detail += " (another kernel's headers)"
        return Check(name, True, detail, required=False)
    if os.path.islink(build):
        return Check(name, False, f"{build} -> {os.readlink(build)} does not exist: "
                     "bcc cannot compile programs", fix, required=False)
    return Check(name, False, f"no {build}: bcc cannot compile programs (reading maps needs "
                 "no headers)", fix, required=False)


kernel_headers = _guarded(_kernel_headers, "kernel headers", False)


def host_checks() -> list[Check]:
    """Every host check, in the order ``doctor`` shows them."""
    return [privileges(), bpf_syscall(), bpffs(), kernel_btf(), tracefs(), bcc(),
            kernel_headers()]
