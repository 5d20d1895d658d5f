"""The objects broker (watcher/kernel/kdelta/broker.py) under bad requests, for real.

Every malformed, oversized or out-of-bounds request gets one line of error with an
errno, and the broker goes on serving: a valid request right after works.  It runs
under its own seccomp filter, and exits when the daemon's end of its socket closes.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct

import pytest
from conftest import need_kernel

from watcher.kernel.asm.assembler import R0, R1, Asm
from watcher.kernel.kdelta import broker as b
from watcher.kernel.kdelta.objects import Broker, BrokerError
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel


@pytest.fixture
def broker():
    need_kernel()
    owner = Broker()
    owner.start()
    yield owner
    owner.close()


def raw(owner: Broker, message: bytes, fds: list[int] | None = None) -> tuple[int, str]:
    """Send ``message`` as is; (errno, text) of the reply."""
    assert owner.sock is not None
    socket.send_fds(owner.sock, [message], fds or [])
    reply, got, _, _ = socket.recv_fds(owner.sock, 4096, 1)
    for fd in got:
        os.close(fd)
    return b.REPLY.unpack_from(reply)[0], reply[b.REPLY.size:].decode()


def head(op: int, *fields: int, name: bytes = b"pymap_t") -> bytes:
    return b.REQUEST.pack(op, 1, *(fields + (0,) * (5 - len(fields))), name)


def nop() -> bytes:
    a = Asm()
    a.movi(R0, 0)
    a.exit()
    return a.assemble()


def test_bad_requests_get_one_line_and_the_broker_serves_on(broker):
    hash_map = head(b.OP_MAP, 1, 8, 8, 4)
    program = head(b.OP_PROG, progload.BPF_PROG_TYPE_SOCKET_FILTER)
    a = Asm()
    a.ld_map_fd(R1, 3)  # map reference 3, with one map passed
    a.movi(R0, 0)
    a.exit()
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        cases = {
            "short": (b"\1\0", None),
            "unknown op": (head(99), None),
            "prog array": (head(b.OP_MAP, 3, 4, 4, 4), None),
            "huge value": (head(b.OP_MAP, 1, 8, 1 << 20, 4), None),
            "no entries": (head(b.OP_MAP, 1, 8, 8, 0), None),
            "bad flags": (head(b.OP_MAP, 1, 8, 8, 4, 1 << 3), None),
            "foreign name": (head(b.OP_MAP, 1, 8, 8, 4, name=b"evil"), None),
            "fds on a map": (hash_map, [null]),
            "empty btf": (head(b.OP_BTF), None),
            "big btf": (head(b.OP_BTF) + bytes(b.MAX_BTF + 1), None),
            "odd program": (program + bytes(12), None),
            "no program": (program, None),
            "bad reference": (program + a.assemble(), [null]),
            "not a map": (program + a.assemble().replace(struct.pack("<i", 3),
                                                         struct.pack("<i", 0), 1), [null]),
            "func_info without btf": (head(b.OP_PROG, 1, 0, 0, 8) + bytes(8) + nop(), None),
            "syscall program": (head(b.OP_PROG, 31) + nop(), None),
            "fentry": (head(b.OP_PROG, 26, 24) + nop(), None),
            "tracepoint": (head(b.OP_PROG, 5) + nop(), None),
            "too long": (program + bytes(b.MAX_REQUEST), None),
            "too many fds": (program + nop(), [null] * (b.MAX_FDS + 1)),
        }
        answers = {name: raw(broker, msg, fds) for name, (msg, fds) in cases.items()}
    finally:
        os.close(null)
    print(answers)
    for name, (err, text) in answers.items():
        assert err, name
        assert text and "\n" not in text, (name, text)
    assert answers["too long"][0] == errno.E2BIG and "request over" in answers["too long"][1]
    for kind in ("syscall program", "fentry", "tracepoint"):
        assert answers[kind][0] == errno.EPERM, kind
        assert "only socket filters and map element iterators" in answers[kind][1], kind
    assert "unknown request 99" in answers["unknown op"][1]
    assert "map reference 3" in answers["bad reference"][1]
    # still serving, and what it made works
    fd = broker.engine().create_map(1, 8, 8, 4, "pymap_t_ok")
    try:
        assert syscall.map_info(fd).max_entries == 4
    finally:
        os.close(fd)
    assert broker.proc is not None and broker.proc.poll() is None


def test_the_broker_runs_under_its_own_filter_and_exits_with_its_socket(broker):
    assert broker.filtered and broker.proc is not None
    with open(f"/proc/{broker.proc.pid}/status") as f:
        assert "Seccomp:\t2" in f.read()  # SECCOMP_MODE_FILTER
    with pytest.raises(BrokerError) as refused:
        broker.engine().create_map(1, 8, 8, 4, "pymap_t_" + "x" * 20)  # cut to 15: fine
        broker.engine().load_program(nop(), "pymap_t_sys", 31)
    assert refused.value.errno == errno.EPERM
    assert broker.sock is not None
    broker.sock.shutdown(socket.SHUT_RDWR)  # as a SIGKILLed daemon's end
    assert broker.proc.wait(30) == 0


def test_signals_to_the_process_group_leave_the_broker_to_the_daemon(broker):
    """Ctrl-C and a service manager's SIGTERM reach every process of the daemon's group:
    the broker stays until the daemon closes its socket, so shutdown is not a failure."""
    assert broker.proc is not None
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(broker.proc.pid, signum)
    fd = broker.engine().create_map(1, 8, 8, 4, "pymap_t_sig")
    os.close(fd)
    assert broker.proc.poll() is None and broker.gone is None
