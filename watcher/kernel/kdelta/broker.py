"""The objects broker: the process that creates the in-kernel engine's BPF objects.

Why a process of its own: a program loaded by a process may write any map it
names, whatever the fd's mode, and a ``BPF_PROG_TYPE_SYSCALL`` program can even
issue ``BPF_MAP_UPDATE_ELEM`` from inside the kernel, unseen by seccomp
(tests/test_seccomp.py measures both).  So the daemon's own seccomp filter
refuses ``BPF_MAP_CREATE``, ``BPF_BTF_LOAD`` and ``BPF_PROG_LOAD``; the daemon
asks this process instead, over one ``AF_UNIX`` ``SOCK_SEQPACKET`` socket, and
gets the new object's fd back (``SCM_RIGHTS``).  Before loading a program the
broker itself checks it (:func:`..asm.readonly.check_read_only`): writes only to
maps the broker created for the same engine, helpers from an allow-list, only
socket filters and map element iterators.  A bug or an injected request in the
daemon can therefore not get a writing program into the kernel.

The daemon starts it (``python -m watcher.kernel.kdelta.broker FD``, see
:class:`.objects.Broker`) before installing its own filter.  The broker then
installs its own (:func:`..sys.seccomp.install_allow_list`): only the syscalls it
serves its socket with, and of ``bpf()`` only the creating commands plus
``BPF_OBJ_GET_INFO_BY_FD``; no update, delete or pin, no new sockets, no
``open``.  It keeps no object: each fd goes to the daemon and is closed here,
so it holds nothing the daemon does not; it remembers only the ids of the maps
it made, per engine, to know which maps a program may write.  It exits when
its socket closes, so a daemon killed with SIGKILL leaves nothing behind; it
ignores SIGINT, SIGTERM and SIGHUP, which a terminal or service manager sends to
the daemon's whole process group, so it is never gone before the daemon.

Protocol (one request, one reply; :data:`REQUEST` header, then a payload):

* ``MAP``: create a map (``a`` type, ``b`` key size, ``c`` value size, ``d``
  max entries, ``e`` flags) for engine ``engine``; reply: its fd.
* ``BTF``: load the payload as BTF (func_info for callbacks); reply: its fd.
* ``PROG``: load a program (``a`` program type, ``b`` attach type, ``c`` index
  + 1 of the BTF fd among the passed fds or 0, ``d`` func_info length); the
  payload is func_info then the instructions, whose ``ld_imm64`` map
  references are indices into the passed fds; reply: the program's fd.
* ``RELEASE``: forget the maps of the engines whose numbers (u32) are the payload.

A reply is :data:`REPLY` (0 or an errno) and, on error, one line of text.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

import watcher.kernel.asm.readonly as progcheck
import watcher.kernel.sys.create as progload
import watcher.kernel.sys.seccomp as seccomp
import watcher.kernel.sys.syscall as syscall
from watcher.kernel.asm.instruction import SLOT, LoadSource, decode_ld_imm64

OP_MAP, OP_BTF, OP_PROG, OP_RELEASE = 1, 2, 3, 4
# op, engine, a..e, name (NUL-padded)
REQUEST = struct.Struct("<IIIIIII16s")
REPLY = struct.Struct("<i")
MAX_REQUEST = 160 << 10  # within one AF_UNIX datagram's default send buffer (~208 KiB)
MAX_FDS = 8  # maps one program names, and its BTF
MAX_BTF = 16 << 10
MAX_FUNC_INFO = 1 << 10
MAX_REMEMBERED = 1 << 17  # map ids of live engines: bounds the broker's memory
NAME_PREFIX = b"pymap_"
# What the engine creates (maptypes: hash, array, ringbuf) and the limits it stays within.
MAP_TYPES = {1: "hash", 2: "array", 27: "ringbuf"}
MAX_KEY, MAX_VALUE, MAX_ENTRIES = 512, 1 << 16, 1 << 26
ENGINE_BPF_COMMANDS = ("BPF_MAP_CREATE", "BPF_BTF_LOAD", "BPF_PROG_LOAD",
                       "BPF_OBJ_GET_INFO_BY_FD")
# What CPython needs to serve this socket after start-up (strace of the broker under a
# full engine workload, CPython 3.11, Linux 6.18); everything else fails with EPERM.
SERVE_SYSCALLS = (
    "recvmsg", "sendmsg", "close", "read", "write", "mmap", "munmap", "mremap", "brk",
    "madvise", "futex", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "sigaltstack",
    "getpid", "gettid", "clock_gettime", "newfstatat", "fstat", "lseek", "getrandom",
    "exit", "exit_group",
)


class Refused(Exception):
    """A request the broker will not serve; its errno goes back with the message."""

    def __init__(self, err: int, message: str):
        super().__init__(message)
        self.errno = err


def _name(raw: bytes) -> str:
    name = raw.rstrip(b"\0")
    if not name.startswith(NAME_PREFIX) or not name.replace(b"_", b"").isalnum():
        raise Refused(22, f"object name {name!r} is not pymap_[a-z0-9_]*")
    return name.decode()


class Server:
    """The broker's state: the maps it made, per engine (ids, not fds)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.engines: dict[int, set[int]] = {}
        self.remembered = 0
        try:
            self.iter_btf_id: int | None = progload.map_elem_iter_btf_id()
        except (OSError, progload.Unsupported):
            self.iter_btf_id = None

    def serve(self) -> None:
        """Answer requests until the daemon closes its end."""
        while True:
            try:
                msg, fds, flags, _ = socket.recv_fds(self.sock, MAX_REQUEST + 1, MAX_FDS)
            except OSError:
                return
            if not msg and not fds:
                return  # the daemon is gone
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise Refused(7, f"request over {MAX_REQUEST} bytes or {MAX_FDS} fds")
                fd = self.handle(msg, fds)
                reply, out = REPLY.pack(0), [fd] if fd >= 0 else []
            except Refused as e:
                reply, out = REPLY.pack(e.errno) + _line(str(e)), []
            except OSError as e:
                reply, out = REPLY.pack(e.errno or 5) + _line(e.strerror or str(e)), []
            except Exception as e:  # never die on a request: say what went wrong
                reply, out = REPLY.pack(22) + _line(f"{type(e).__name__}: {e}"), []
            finally:
                for received in fds:
                    os.close(received)
            try:
                socket.send_fds(self.sock, [reply], out)
            except OSError:
                return
            finally:
                for fd_ in out:
                    os.close(fd_)

    def handle(self, msg: bytes, fds: list[int]) -> int:
        if len(msg) < REQUEST.size:
            raise Refused(22, f"request of {len(msg)} bytes, shorter than its header")
        op, engine, a, b, c, d, e, raw_name = REQUEST.unpack_from(msg)
        payload = msg[REQUEST.size:]
        if op == OP_RELEASE:
            if len(payload) % 4:
                raise Refused(22, f"release list of {len(payload)} bytes")
            for (gone,) in struct.iter_unpack("<I", payload):
                self.remembered -= len(self.engines.pop(gone, ()))
            return -1
        if op == OP_PROG:
            return self.load_program(engine, a, b, c, d, _name(raw_name), payload, fds)
        if fds:
            raise Refused(22, "only a program request carries fds")
        if op == OP_MAP:
            return self.create_map(engine, a, b, c, d, e, _name(raw_name))
        if op == OP_BTF:
            if not 0 < len(payload) <= MAX_BTF:
                raise Refused(22, f"BTF blob of {len(payload)} bytes (at most {MAX_BTF})")
            return progload.load_btf(payload)
        raise Refused(22, f"unknown request {op}")

    def create_map(self, engine: int, map_type: int, key_size: int, value_size: int,
                   max_entries: int, flags: int, name: str) -> int:
        if map_type not in MAP_TYPES:
            raise Refused(22, f"map type {map_type}: the engine makes only "
                          f"{', '.join(MAP_TYPES.values())}")
        if key_size > MAX_KEY or value_size > MAX_VALUE or not 0 < max_entries <= MAX_ENTRIES \
                or flags & ~progload.BPF_F_NO_PREALLOC:
            raise Refused(22, f"map {key_size}/{value_size}/{max_entries} flags {flags:#x} "
                          "out of the engine's bounds")
        if self.remembered >= MAX_REMEMBERED:
            raise Refused(28, f"{self.remembered} maps of unreleased engines remembered")
        fd = progload.create_map(map_type, key_size, value_size, max_entries, name, flags)
        try:
            self.engines.setdefault(engine, set()).add(syscall.map_info(fd).id)
        except BaseException:
            os.close(fd)
            raise
        self.remembered += 1
        return fd

    def load_program(self, engine: int, prog_type: int, attach_type: int, btf_index: int,
                     finfo_len: int, name: str, payload: bytes, fds: list[int]) -> int:
        if not finfo_len <= min(len(payload), MAX_FUNC_INFO) or finfo_len % 8:
            raise Refused(22, f"func_info of {finfo_len} bytes")
        func_info, insns = payload[:finfo_len], payload[finfo_len:]
        if not insns or len(insns) % 8:
            raise Refused(22, f"{len(insns)} bytes of instructions")
        btf_fd = 0
        maps = list(fds)
        if btf_index:
            if not (func_info and btf_index == len(fds)):
                raise Refused(22, "the BTF fd comes last, with func_info")
            btf_fd = maps.pop()
        elif func_info:
            raise Refused(22, "func_info without a BTF fd")
        attach_btf_id = 0
        if prog_type == progload.BPF_PROG_TYPE_TRACING:
            if self.iter_btf_id is None:
                raise Refused(95, "this kernel has no map element iterators")
            attach_btf_id = self.iter_btf_id
        program = relocate(insns, maps)
        mine = self.engines.get(engine, set())
        own = [fd for fd in maps if _map_id(fd) in mine]
        try:
            progcheck.check_type(prog_type, attach_type, name)
            progcheck.check_read_only(program, own)
        except AssertionError as e:
            raise Refused(1, f"{name} refused: {e}") from None
        return progload.load_program(program, name, prog_type, attach_type, attach_btf_id,
                                     btf_fd, func_info)


def map_references(insns: bytes) -> list[int]:
    """Offsets of the map fds in ``insns`` (the imm of each ``ld_imm64`` of a map or a
    map value)."""
    return [insn.imm_at for insn in decode_ld_imm64(insns)
            if insn.src in (LoadSource.MAP_FD, LoadSource.MAP_VALUE)]


def relocate(insns: bytes, fds: list[int]) -> bytes:
    """``insns`` with each map reference, an index into ``fds``, replaced by that fd
    (what :func:`.objects.indexed` did, undone)."""
    out = bytearray(insns)
    try:
        references = map_references(insns)
    except ValueError as e:
        raise Refused(22, str(e)) from None
    for at in references:
        index = struct.unpack_from("<i", out, at)[0]
        if not 0 <= index < len(fds):
            raise Refused(22, f"map reference {index} at instruction {at // SLOT} "
                          f"(of {len(fds)} maps passed)")
        struct.pack_into("<i", out, at, fds[index])
    return bytes(out)


def _map_id(fd: int) -> int | None:
    try:
        return syscall.map_info(fd).id
    except OSError:
        return None


def _line(text: str) -> bytes:
    return " ".join(text.split()).encode(errors="replace")[:2000]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m watcher.kernel.kdelta.broker FD (started by the pymap daemon)",
              file=sys.stderr)
        return 2
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group:
    # the broker leaves when the daemon does (its socket closes), not before it.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    with socket.socket(fileno=int(args[0])) as sock:
        server = Server(sock)
        try:
            seccomp.install_allow_list(SERVE_SYSCALLS, ENGINE_BPF_COMMANDS)
            hello = b"filtered"
        except (seccomp.SeccompUnavailable, OSError) as e:
            hello = b"unfiltered: " + _line(str(e))
        try:
            sock.sendmsg([REPLY.pack(0) + hello])
        except OSError:
            return 1
        server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
