"""Where the in-kernel engine's objects are made: in the objects broker, or here.

:class:`~.walker.IterDelta` asks an :class:`EngineObjects` for its maps,
BTF and programs, one per engine:

* :class:`BrokerObjects`, what the daemon uses: the :class:`Broker` process
  (:mod:`.broker`) creates them and checks every program, so the daemon's own
  seccomp filter can refuse ``BPF_MAP_CREATE``, ``BPF_BTF_LOAD`` and
  ``BPF_PROG_LOAD`` (docs/operations.md, "bpf() commands");
* :class:`LocalObjects`: the same check, in the calling process (tests,
  benchmarks, ``pymap`` without a daemon).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from typing import Protocol

import watcher.kernel.asm.readonly as progcheck
import watcher.kernel.kdelta.broker as broker
import watcher.kernel.sys.create as progload

log = logging.getLogger("pymap.kernel.broker")

START_TIMEOUT = 30.0  # the broker's Python start-up, on a loaded machine
REQUEST_TIMEOUT = 60.0  # one program's verification, on a loaded machine


class EngineObjects(Protocol):
    """The objects of ONE engine; programs may write only maps made here."""

    def create_map(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                   name: str, flags: int = 0) -> int: ...

    def load_btf(self, blob: bytes) -> int: ...

    def load_program(self, insns: bytes, name: str, prog_type: int, attach_type: int = 0,
                     btf_fd: int = 0, func_info: bytes = b"") -> int: ...

    def release(self) -> None: ...


class LocalObjects:
    """Made by this process, each program checked against the maps made here."""

    def __init__(self) -> None:
        self.own: list[int] = []

    def create_map(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                   name: str, flags: int = 0) -> int:
        fd = progload.create_map(map_type, key_size, value_size, max_entries, name, flags)
        self.own.append(fd)
        return fd

    def load_btf(self, blob: bytes) -> int:
        return progload.load_btf(blob)

    def load_program(self, insns: bytes, name: str, prog_type: int, attach_type: int = 0,
                     btf_fd: int = 0, func_info: bytes = b"") -> int:
        progcheck.check_type(prog_type, attach_type, name)
        progcheck.check_read_only(insns, self.own)
        attach_btf_id = (progload.map_elem_iter_btf_id()
                         if prog_type == progload.BPF_PROG_TYPE_TRACING else 0)
        return progload.load_program(insns, name, prog_type, attach_type, attach_btf_id,
                                     btf_fd, func_info)

    def release(self) -> None:
        self.own.clear()


class BrokerError(OSError):
    """The broker refused a request, or is gone (then the engine is unavailable)."""


class Broker:
    """The objects broker process and the daemon's end of its socket.

    :meth:`start` before the daemon installs its seccomp filter; :meth:`close`
    at shutdown (the broker also exits by itself when the socket closes).
    Requests are one at a time (a lock), from the event loop or worker threads.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.gone: str | None = "not started"
        self.filtered = False
        self._lock = threading.Lock()
        self._engines = itertools.count(1)
        self._released: list[int] = []  # engines closed since the last request

    def start(self) -> None:
        """Start the broker and wait for its hello (sent once its own filter is in)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # room for the longest request in one datagram (the kernel caps it at wmem_max)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * broker.MAX_REQUEST)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.sock = ours
        try:
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "watcher.kernel.kdelta.broker", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
            finally:
                theirs.close()  # the broker's end is the broker's alone: its exit is EOF here
            ours.settimeout(START_TIMEOUT)
            hello = ours.recv(4096)
            if len(hello) < broker.REPLY.size:
                raise BrokerError(errno.EIO, "it exited at start")
        except OSError as e:
            self.gone = f"the objects broker did not start: {e.strerror or e}"
            self._stop()
            raise BrokerError(e.errno or errno.EIO, self.gone) from None
        ours.settimeout(REQUEST_TIMEOUT)
        self.gone = None
        status = hello[broker.REPLY.size:].decode(errors="replace")
        self.filtered = status == "filtered"
        if self.filtered:
            log.info("objects broker (pid %d) serving the in-kernel engine: bpf() there "
                     "allows only %s", self.proc.pid,
                     ", ".join(c.removeprefix("BPF_") for c in broker.ENGINE_BPF_COMMANDS))
        else:
            log.warning("objects broker (pid %d): its seccomp filter is NOT installed: %s",
                        self.proc.pid, status.removeprefix("unfiltered: "))

    def engine(self) -> BrokerObjects:
        return BrokerObjects(self, next(self._engines))

    def request(self, op: int, engine: int = 0, fields: tuple[int, ...] = (), name: str = "",
                payload: bytes = b"", fds: list[int] | None = None) -> int:
        """One request; the fd it made (or -1).  Raises :class:`BrokerError`."""
        head = broker.REQUEST.pack(op, engine, *(fields + (0,) * (5 - len(fields))),
                                   name.encode()[:15])
        with self._lock:
            if self._released:
                released, self._released[:] = self._released[:], []
                self._exchange(broker.REQUEST.pack(broker.OP_RELEASE, *(0,) * 6, b"")
                               + struct.pack(f"<{len(released)}I", *released), [])
            reply, got = self._exchange(head + payload, fds or [])
        err = broker.REPLY.unpack_from(reply)[0]
        if err:
            for fd in got:
                os.close(fd)
            raise BrokerError(err, "objects broker: "
                              + reply[broker.REPLY.size:].decode(errors="replace"))
        return got[0] if got else -1

    def _exchange(self, request: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        if self.gone is not None or self.sock is None:
            raise BrokerError(errno.ENXIO, f"objects broker unavailable: {self.gone}")
        try:
            socket.send_fds(self.sock, [request], fds)
            reply, got, _flags, _ = socket.recv_fds(self.sock, 4096, 1)
        except OSError as e:
            self._fail(f"objects broker: {e.strerror or e}")
            raise BrokerError(e.errno or errno.EIO, self.gone) from None
        if len(reply) < broker.REPLY.size:
            self._fail("objects broker exited")
            raise BrokerError(errno.EIO, self.gone)
        return reply, got

    def release(self, engine: int) -> None:
        """Engine ``engine`` is closed: told with the next request (never blocks, so an
        engine's finalizer may call it from any thread)."""
        self._released.append(engine)

    def _fail(self, why: str) -> None:
        """Called with the lock held: the protocol is out of step or the broker is gone."""
        if self.gone is None:
            log.warning("%s; the in-kernel engine is unavailable, maps are polled in user "
                        "space", why)
        self.gone = why
        self._stop()

    def died(self, code: int | None) -> None:
        """The broker process exited (seen by the daemon's watcher task)."""
        with self._lock:
            self._fail(f"objects broker exited (code {code})")

    def close(self) -> None:
        with self._lock:
            if self.gone is None:
                self.gone = "closed"
            self._stop()

    def _stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(5)  # it exits once the socket closes
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class BrokerObjects:
    """One engine's objects, made by the broker: it alone decides which maps are its own."""

    def __init__(self, owner: Broker, engine: int):
        self.owner = owner
        self.engine = engine

    def create_map(self, map_type: int, key_size: int, value_size: int, max_entries: int,
                   name: str, flags: int = 0) -> int:
        return progload.note_own_map(self.owner.request(
            broker.OP_MAP, self.engine, (map_type, key_size, value_size, max_entries, flags),
            name))

    def load_btf(self, blob: bytes) -> int:
        return self.owner.request(broker.OP_BTF, payload=blob)

    def load_program(self, insns: bytes, name: str, prog_type: int, attach_type: int = 0,
                     btf_fd: int = 0, func_info: bytes = b"") -> int:
        program, fds = indexed(insns)
        if len(program) + len(func_info) + broker.REQUEST.size > broker.MAX_REQUEST:
            raise BrokerError(errno.E2BIG, f"{name}: {len(program) // 8} instructions, over "
                              "what one request to the objects broker holds")
        btf_index = 0
        if func_info:
            fds.append(btf_fd)
            btf_index = len(fds)
        return self.owner.request(broker.OP_PROG, self.engine,
                                  (prog_type, attach_type, btf_index, len(func_info)), name,
                                  func_info + program, fds)

    def release(self) -> None:
        self.owner.release(self.engine)


def indexed(insns: bytes) -> tuple[bytes, list[int]]:
    """``insns`` with each map fd of an ``ld_imm64`` replaced by its index in the list
    returned with it (the fds to pass, in order): :func:`.broker.relocate` undoes it."""
    out = bytearray(insns)
    fds: list[int] = []
    for at in broker.map_references(insns):
        fd = struct.unpack_from("<i", out, at)[0]
        if fd not in fds:
            fds.append(fd)
        struct.pack_into("<i", out, at, fds.index(fd))
    return bytes(out), fds


__all__ = ["Broker", "BrokerError", "BrokerObjects", "EngineObjects", "LocalObjects"]
