"""The seccomp wall (watcher/kernel/sys/seccomp.py, watcher/daemon/privileges.py), for real.

* The daemon's own filter installation (``privileges.harden``, the function
  the daemon calls after start-up) runs in a child process that then tries to
  write a real map through a read-write fd, create, pin and delete: each fails
  with EPERM, while every read command still works, also in a thread started
  before the filter and with a command smuggled in the register's high bits.
* A real daemon is audited with a BPF program on the ``syscalls:sys_enter_bpf``
  and ``sys_exit_bpf`` tracepoints (kernel evidence, no ptrace), filtered by the
  daemon's pid, under list, get, events with snapshots, and event sources: only
  read commands appear after start-up, and none is refused.
* With the in-kernel engine on, the daemon's pid creates and loads nothing; the
  objects broker's pid (watcher/kernel/kdelta/broker.py) does, only that, and refuses
  programs that could write what they did not make; neither leaves anything
  behind when the daemon stops or is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import cast

import pytest
from conftest import REPO, need_bcc, need_kernel, require
from support.events import Follower, status, wait_ready, wait_until, watch_of
from support.kernel import bpftool, host_features, lpm_key, made_up_features, token

from watcher.daemon import privileges
from watcher.kernel.features import probe as kf
from watcher.kernel.kdelta import broker as broker_module
from watcher.kernel.sys import seccomp, syscall

pytestmark = pytest.mark.kernel

EXECSNOOP = str(REPO / "examples/execsnoop-ringbuf/execsnoop.c")
TCPCONNECT = str(REPO / "examples/tcpconnect-perf/tcpconnect.c")


def need_binding() -> None:
    try:
        seccomp._binding()  # noqa: SLF001 (loads the binding as the daemon does)
    except seccomp.SeccompUnavailable as e:
        require(str(e))


# Runs in a child: a filter cannot be removed, and the test process must keep writing maps.
CHILD = r"""
import ctypes, errno, json, logging, os, sys, threading
from watcher.daemon import privileges
from watcher.daemon.config import Config
from watcher.kernel.features import probe as features
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall as s

def attempt(fn):
    try:
        r = fn()
        return "ok" if r is None or isinstance(r, (int, bytes)) else "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

logging.basicConfig(level="INFO")
profile = sys.argv[1]
fd = s.map_create(1, 4, 8, 16, name="pymap_sc_test")   # hash, made before the filter
s.map_update_elem(fd, b"\0" * 4, b"\1" * 8)
map_id = s.map_info(fd).id
rw = s.map_get_fd_by_id(map_id, flags=0)            # read-write: only seccomp stands in the way
pin = sys.argv[2]

go, done, from_thread = threading.Event(), threading.Event(), {}
def early_thread():                                  # started before the filter
    go.wait()
    from_thread["update"] = attempt(lambda: s.map_update_elem(rw, b"\0" * 4, b"\3" * 8))
    from_thread["lookup"] = attempt(lambda: s.map_lookup_elem(rw, b"\0" * 4, 8))
    done.set()
threading.Thread(target=early_thread).start()

config = Config()
if profile == "kernel_delta":
    # The in-kernel engine on a map of its own: a first walk, then adds, changes and
    # more removals than one packet of the delete program holds, all before the filter.
    from watcher.kernel.maps import find as kmaps
    from watcher.kernel.kdelta.walker import IterDelta
    from watcher.kernel.kdelta.objects import Broker
    import struct
    broker = Broker()                                # as the daemon: before its filter
    broker.start()
    watched = s.map_create(1, 8, 8, 4096, name="pymap_sc_kd")
    for i in range(2000):
        s.map_update_elem(watched, struct.pack("<Q", i), struct.pack("<Q", i))
    ro = kmaps.open_map(map_id=s.map_info(watched).id)
    engine = IterDelta(kmaps.record_from_fd(watched), 8, objects=broker.engine(),
                       iterators=features.probe().allows(features.MAP_ITER))
    first = engine.walk(ro)
    for i in range(900):
        s.map_delete_elem(watched, struct.pack("<Q", i))
    for i in range(900, 1000):
        s.map_update_elem(watched, struct.pack("<Q", i), struct.pack("<Q", 7))
    for i in range(5000, 5050):
        s.map_update_elem(watched, struct.pack("<Q", i), struct.pack("<Q", i))
else:
    config.watch.kernel_delta = "off"
privileges.harden(config, features.probe())          # exactly what the daemon calls

libc = ctypes.CDLL(None, use_errno=True)
raw = libc.syscall
raw.restype = ctypes.c_long
raw.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_uint]
def smuggled_update():
    # BPF_MAP_UPDATE_ELEM with high bits set: the kernel reads only the low 32 bits.
    attr = (ctypes.c_uint8 * 128)()
    key, value = ctypes.create_string_buffer(b"\0" * 4), ctypes.create_string_buffer(b"\4" * 8)
    ctypes.c_uint32.from_buffer(attr, 0).value = rw
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(key)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(value)
    if raw(s._NR_BPF, (1 << 32) | 2, ctypes.addressof(attr), 128) < 0:
        raise OSError(ctypes.get_errno(), "bpf")

def batch():
    cur = s.BatchCursor(rw, 4)
    keys, values = ctypes.create_string_buffer(64), ctypes.create_string_buffer(128)
    try:
        return s.map_lookup_batch(cur, keys, values, 16)
    except s.BpfError as e:
        if e.errno == errno.ENOENT:  # end of the map: the command ran
            return None
        raise

out = {
    "update": attempt(lambda: s.map_update_elem(rw, b"\0" * 4, b"\2" * 8)),
    "update_batch": attempt(lambda: s.map_update_batch(rw, b"\5" * 4, b"\5" * 8, 1)),
    "delete": attempt(lambda: s.map_delete_elem(rw, b"\0" * 4)),
    "smuggled_update": attempt(smuggled_update),
    "create": attempt(lambda: os.close(s.map_create(1, 4, 8, 4, name="pymap_sc_new"))),
    "prog_load": attempt(lambda: os.close(progload.load_program(
        bytes.fromhex("b700000000000000 9500000000000000".replace(" ", "")), "pymap_sc_nop",
        progload.BPF_PROG_TYPE_SOCKET_FILTER))),
    "pin": attempt(lambda: s.obj_pin(rw, pin)),
    "ptrace": "ok" if libc.ptrace(16, os.getppid(), 0, 0) == 0 else errno.errorcode[ctypes.get_errno()],
    "get_next_id": attempt(lambda: s.map_get_next_id(0)),
    "get_fd_by_id": attempt(lambda: os.close(s.map_get_fd_by_id(map_id))),
    "info": attempt(lambda: s.map_info(rw)),
    "lookup": attempt(lambda: s.map_lookup_elem(rw, b"\0" * 4, 8)),
    "next_key": attempt(lambda: s.map_get_next_key(rw, None, 4)),
    "batch": attempt(batch),
    "btf": attempt(lambda: os.close(s.btf_get_fd_by_id(1))),
    "obj_get": attempt(lambda: os.close(s.obj_get(sys.argv[3]))),
}
def raw_bpf(cmd):
    # Any command on the read-write fd, attr mostly zeros: the filter answers before the
    # kernel looks (the kernel itself would say EINVAL, EFAULT or ENOENT here).
    attr = (ctypes.c_uint8 * 128)()
    ctypes.c_uint32.from_buffer(attr, 0).value = rw
    if raw(s._NR_BPF, cmd, ctypes.addressof(attr), 128) < 0:
        raise OSError(ctypes.get_errno(), "bpf")
out["never"] = {name: attempt(lambda: raw_bpf(privileges.seccomp.command_number(name)))
                for name in privileges.WRITE_COMMANDS}
if profile == "kernel_delta":
    # Under the filter: the engine's walks, its state resets and shadow deletions included.
    second, third = engine.walk(ro), engine.walk(ro)
    shadow_keys, key = 0, None
    while (key := s.map_get_next_key(engine.shadow_fd, key, 8)) is not None:  # a read
        shadow_keys += 1
    out["engine"] = {"first": first.nchanged, "changed": second.nchanged,
                     "removed": second.nremoved, "swept": second.swept,
                     "again": [third.nchanged, third.nremoved], "shadow_keys": shadow_keys}
    engine.close()
    out["broker_filtered"] = broker.filtered
    broker.close()
go.set()
done.wait(30)
out["thread"] = from_thread
out["value"] = s.map_lookup_elem(rw, b"\0" * 4, 8).hex()
print(json.dumps(out))
"""


def run_child(profile: str, tmp_pin: str, readable_pin: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", CHILD, profile, tmp_pin, readable_pin],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_after_harden_writes_fail_with_eperm_and_reads_work(maps, bpffs_dir):
    need_binding()
    _fd, _id = maps.create("hash", 4, 4, 4, name=f"sc_{token()}", pin=bpffs_dir / "readable")
    out, log = run_child("read", str(bpffs_dir / "pin_attempt"), str(bpffs_dir / "readable"))
    assert "seccomp filter installed" in log
    refused = ("update", "update_batch", "delete", "smuggled_update", "create", "prog_load",
               "pin", "ptrace")
    assert {k: out[k] for k in refused} == {k: "EPERM" for k in refused}
    reads = ("get_next_id", "get_fd_by_id", "info", "lookup", "next_key", "batch", "btf",
             "obj_get")
    assert {k: out[k] for k in reads} == {k: "ok" for k in reads}
    # TSYNC: a thread that existed before the filter is under it too.
    assert out["thread"] == {"update": "EPERM", "lookup": "ok"}
    assert out["value"] == "01" * 8  # nothing got through
    assert not (bpffs_dir / "pin_attempt").exists()


def test_kernel_delta_profile_neither_creates_nor_writes(maps, bpffs_dir):
    """With the in-kernel engine on (the default), the daemon's filter refuses creating a
    map or loading a program as well as every update and delete; the engine still walks,
    resets its state and clears removed keys from its shadow map under it: the objects
    broker, started before the filter, made its objects, and its own programs (run by
    BPF_PROG_TEST_RUN) do those writes."""
    need_binding()
    maps.create("hash", 4, 4, 4, name=f"sc_{token()}", pin=bpffs_dir / "readable")
    out, log = run_child("kernel_delta", str(bpffs_dir / "pin_attempt"),
                         str(bpffs_dir / "readable"))
    assert "never an update, delete, create or load (the in-kernel engine's objects come " \
        "from the objects broker)" in log
    assert out["broker_filtered"] is True
    for k in ("update", "update_batch", "delete", "smuggled_update", "create", "prog_load",
              "pin", "ptrace"):
        assert out[k] == "EPERM", (k, out)
    assert out["never"] == {name: "EPERM" for name in privileges.WRITE_COMMANDS}
    assert out["thread"] == {"update": "EPERM", "lookup": "ok"}
    assert out["value"] == "01" * 8
    assert out["lookup"] == "ok" and out["batch"] == "ok"
    # 2,000 keys; then 900 removed (more than one delete packet), 100 changed, 50 added
    assert out["engine"] == {"first": 2000, "changed": 150, "removed": 900, "swept": True,
                             "again": [0, 0], "shadow_keys": 1150}


def test_write_commands_are_refused_in_every_profile():
    """No configuration lets the daemon's process update or delete a map entry."""
    from watcher.daemon.config import Config

    for kernel_delta in ("auto", "off"):
        config = Config()
        config.watch.kernel_delta = kernel_delta
        allowed = set(privileges.allowed_bpf_commands(config, host_features()))
        assert not allowed & set(privileges.WRITE_COMMANDS), kernel_delta


@pytest.mark.parametrize("refused, absent", [
    ((), ()),
    ((kf.MAP_ITER,), privileges.ITERATOR_COMMANDS),  # the for_each only route
    ((kf.FOR_EACH,), ()),  # the iterator route
    ((kf.MAP_ITER, kf.FOR_EACH), privileges.KERNEL_DELTA_COMMANDS),  # no engine
    ((kf.PROG_TEST_RUN,), privileges.KERNEL_DELTA_COMMANDS),
])
def test_the_filter_keeps_only_what_the_hosts_routes_run(refused, absent):
    """The fewest privileges: the engine's commands only for the routes this host allows
    (the probe's answers here made up; the refusals themselves: test_degrade.py)."""
    from watcher.daemon.config import Config

    host = made_up_features(dict.fromkeys(refused, "EPERM"), others=True)
    allowed = set(privileges.allowed_bpf_commands(Config(), host))
    assert allowed == set(privileges.READ_COMMANDS + privileges.KERNEL_DELTA_COMMANDS) - \
        set(absent), refused
    off = Config()
    off.watch.kernel_delta = "off"
    assert set(privileges.allowed_bpf_commands(off, host)) == set(privileges.READ_COMMANDS)


# What PROG_LOAD still allows, measured: a child installs the daemon's filter, then loads
# programs that write a map it holds only read-only (or no fd to at all).
WRITER_CHILD = r"""
import ctypes, errno, json, logging, os, struct, sys
from watcher.daemon import privileges
from watcher.daemon.config import Config
from watcher.kernel.features import probe as features
from watcher.kernel.maps import find as kmaps
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall as s
from watcher.kernel.asm.assembler import ADD, R0, R1, R2, R3, R4, R6, R10, Asm
from watcher.kernel.kdelta.objects import Broker

logging.basicConfig(level="INFO")
fd = s.map_create(1, 8, 8, 4, name="pymap_sc_victim")   # made before the filter
for k in (1, 2):
    s.map_update_elem(fd, struct.pack("<Q", k), struct.pack("<Q", 7))
map_id = s.map_info(fd).id
ro = kmaps.open_map(map_id=map_id)                       # BPF_F_RDONLY, as for every watched map
config = Config()
config.watch.kernel_delta = "off" if sys.argv[1] == "off" else "auto"
broker = Broker() if sys.argv[1] == "auto" else None
if broker:
    broker.start()                                       # as the daemon: before its filter
if sys.argv[1] != "unfiltered":                          # the kernel alone: what it allows
    privileges.harden(config, features.probe())

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def helper_program(helper, target=ro):
    # bpf_map_update_elem(map, &1, &99) or bpf_map_delete_elem(map, &2), the map named by ro
    a = Asm()
    a.ld_imm64(R1, 1 if helper == 2 else 2)
    a.stx(8, R10, -8, R1)
    a.ld_imm64(R1, 99)
    a.stx(8, R10, -16, R1)
    a.ld_map_fd(R1, target)
    a.mov(R2, R10)
    a.alu64(ADD, R2, -8)
    a.mov(R3, R10)
    a.alu64(ADD, R3, -16)
    a.movi(R4, 0)
    a.call(helper)
    a.exit()
    return a.assemble()

def run_helper(helper):
    prog = progload.load_program(helper_program(helper), "pymap_sc_w",
                                 progload.BPF_PROG_TYPE_SOCKET_FILTER)
    s.prog_test_run(prog, bytes(64))
    os.close(prog)

class TestRunCtx(ctypes.Structure):  # union bpf_attr, test: up to ctx_in
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
                ("pad0", ctypes.c_uint32 * 2), ("pad1", ctypes.c_uint64 * 2),
                ("pad2", ctypes.c_uint32 * 2), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64),
                ("ctx_out", ctypes.c_uint64), ("pad3", ctypes.c_uint8 * 72)]

def sys_bpf_program():
    # A BPF_PROG_TYPE_SYSCALL program: bpf_sys_bpf(BPF_MAP_GET_FD_BY_ID) for a read-write
    # fd of the map (id from its context), then bpf_sys_bpf(BPF_MAP_UPDATE_ELEM) key 1 = 1234.
    a = Asm()
    def stack(reg, off):                                 # reg = the stack + off
        a.mov(reg, R10)
        a.alu64(ADD, reg, off)
    a.mov(R6, R1)
    for off in range(-64, 0, 8):
        a.st(8, R10, off, 0)
    a.ldx(4, R1, R6, 0)
    a.stx(4, R10, -16, R1)                               # get-fd attr at -16: map_id
    a.movi(R1, 14)
    stack(R2, -16)
    a.movi(R3, 12)
    a.call(166)
    a.stx(4, R10, -48, R0)                               # update attr at -48: map_fd,
    a.st(8, R10, -56, 1)                                 # key at -56,
    a.st(8, R10, -64, 1234)                              # value at -64
    stack(R2, -56)
    a.stx(8, R10, -40, R2)
    stack(R2, -64)
    a.stx(8, R10, -32, R2)
    a.movi(R1, 2)
    stack(R2, -48)
    a.movi(R3, 32)
    a.call(166)
    a.exit()
    return a.assemble()

def sys_bpf_update():
    insns, license_ = sys_bpf_program(), ctypes.create_string_buffer(b"GPL")
    code = ctypes.create_string_buffer(insns, len(insns))
    attr = progload._ProgLoadAttr(prog_type=31, insn_cnt=len(insns) // 8,
                                  insns=ctypes.addressof(code),
                                  license=ctypes.addressof(license_), prog_flags=1 << 4)
    prog = s.bpf(progload.BPF_PROG_LOAD, attr, "BPF_PROG_LOAD")
    ctx = ctypes.create_string_buffer(struct.pack("<I", map_id), 4)
    run = TestRunCtx(prog_fd=prog, ctx_size_in=4, ctx_in=ctypes.addressof(ctx))
    s.bpf(10, run, "BPF_PROG_TEST_RUN")
    if run.retval:
        raise OSError(-ctypes.c_int32(run.retval).value, "bpf_sys_bpf")

out = {"update_syscall": attempt(lambda: s.map_update_elem(ro, struct.pack("<Q", 1), bytes(8))),
       "helper_update": attempt(lambda: run_helper(2)),
       "helper_delete": attempt(lambda: run_helper(3)),
       "after_helpers": [(v or b"").hex() for v in (s.map_lookup_elem(fd, struct.pack("<Q", k), 8)
                                                     for k in (1, 2))]}
out["sys_bpf_update"] = attempt(sys_bpf_update)
out["after_sys_bpf"] = (s.map_lookup_elem(fd, struct.pack("<Q", 1), 8) or b"").hex()
if broker:
    # What the daemon can still ask for: programs through the broker, which checks them.
    mine, other = broker.engine(), broker.engine()
    own = mine.create_map(1, 8, 8, 4, "pymap_sc_own")
    elsewhere = other.create_map(1, 8, 8, 4, "pymap_sc_other")
    def through_broker(insns, prog_type=progload.BPF_PROG_TYPE_SOCKET_FILTER, run=True):
        prog = mine.load_program(insns, "pymap_sc_b", prog_type)
        if run:
            s.prog_test_run(prog, bytes(64))
        os.close(prog)
    def sys_bpf_socket_filter():
        a = Asm()
        a.movi(R1, 2)
        a.mov(R2, R10)
        a.movi(R3, 0)
        a.call(166)
        a.exit()
        return a.assemble()
    refusals = {}
    def refused(key, fn):
        try:
            fn()
            out[key] = "ok"
        except OSError as e:
            out[key] = errno.errorcode.get(e.errno, str(e.errno))
            refusals[key] = str(e)
    refused("broker_own_update", lambda: through_broker(helper_program(2, own)))
    refused("broker_watched_update", lambda: through_broker(helper_program(2)))
    refused("broker_watched_delete", lambda: through_broker(helper_program(3)))
    refused("broker_other_engine", lambda: through_broker(helper_program(2, elsewhere)))
    refused("broker_syscall_type", lambda: through_broker(sys_bpf_program(), 31, run=False))
    refused("broker_sys_bpf_helper", lambda: through_broker(sys_bpf_socket_filter()))
    out["own_after"] = (s.map_lookup_elem(own, struct.pack("<Q", 1), 8) or b"").hex()
    out["victim_after_broker"] = [(s.map_lookup_elem(fd, struct.pack("<Q", k), 8) or b"").hex()
                                  for k in (1, 2)]
    out["refusals"] = refusals
    broker.close()
print(json.dumps(out))
"""


def test_what_a_filtered_daemon_can_load_and_what_the_broker_refuses(maps):
    """Measured on this kernel without a filter: a program may write any map it names,
    whatever the fd's mode, and a BPF_PROG_TYPE_SYSCALL program can even issue
    BPF_MAP_UPDATE_ELEM (bpf_sys_bpf), which seccomp would never see.  So the daemon's
    filter refuses BPF_PROG_LOAD (and BPF_MAP_CREATE) in every profile: none of those
    writers loads.  With the engine on, programs come from
    the objects broker, which loads one that writes a map it made for the same engine,
    and refuses (EPERM, with the reason) one that writes the watched map or another
    engine's map, a syscall program, and bpf_sys_bpf in a socket filter."""
    need_binding()
    results = {}
    for profile in ("unfiltered", "auto", "off"):
        proc = subprocess.run([sys.executable, "-c", WRITER_CHILD, profile],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        results[profile] = json.loads(proc.stdout.splitlines()[-1])
    print("writes from a filtered process:", results)
    seven, ninety_nine = struct.pack("<Q", 7).hex(), struct.pack("<Q", 99).hex()
    assert results["unfiltered"] == {
        "update_syscall": "EPERM",  # the command checks the fd's mode: BPF_F_RDONLY
        "helper_update": "ok", "helper_delete": "ok",  # through the read-only fd
        "after_helpers": [ninety_nine, ""],
        "sys_bpf_update": "ok",  # no fd at all: by id, from inside the kernel
        "after_sys_bpf": struct.pack("<Q", 1234).hex()}
    refused_here = {
        "update_syscall": "EPERM", "helper_update": "EPERM", "helper_delete": "EPERM",
        "after_helpers": [seven, seven], "sys_bpf_update": "EPERM", "after_sys_bpf": seven}
    assert results["off"] == refused_here
    auto = results["auto"]
    assert {k: auto[k] for k in refused_here} == refused_here
    assert auto["broker_own_update"] == "ok" and auto["own_after"] == ninety_nine
    for k in ("broker_watched_update", "broker_watched_delete", "broker_other_engine",
              "broker_syscall_type", "broker_sys_bpf_helper"):
        assert auto[k] == "EPERM", (k, auto)
        assert "objects broker: pymap_sc_b refused" in auto["refusals"][k] \
            or "not program type 31" in auto["refusals"][k], auto["refusals"][k]
    assert "helper 166" in auto["refusals"]["broker_sys_bpf_helper"]
    assert "not pymap's own" in auto["refusals"]["broker_other_engine"]
    assert auto["victim_after_broker"] == [seven, seven]


def test_every_command_in_the_profiles_is_known():
    for name in privileges.READ_COMMANDS + privileges.KERNEL_DELTA_COMMANDS:
        assert seccomp.command_number(name) >= 0
    writes = {"BPF_MAP_UPDATE_ELEM", "BPF_MAP_DELETE_ELEM", "BPF_MAP_CREATE", "BPF_OBJ_PIN",
              "BPF_PROG_LOAD", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_FREEZE",
              "BPF_MAP_LOOKUP_AND_DELETE_ELEM", "BPF_MAP_LOOKUP_AND_DELETE_BATCH"}
    assert not writes & set(privileges.READ_COMMANDS)
    with pytest.raises(ValueError):
        seccomp.command_number("BPF_NOPE")


# --- audit of a real daemon -----------------------------------------------------------------

AUDIT = r"""
BPF_HASH(pending, u32, u32);      // thread id -> command of the bpf() it is in
BPF_HASH(calls, u32, u64);        // command -> calls
BPF_HASH(refused, u32, u64);      // command -> calls that returned -EPERM

TRACEPOINT_PROBE(syscalls, sys_enter_bpf) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TGID)
        return 0;
    u32 tid = id, cmd = args->cmd;
    pending.update(&tid, &cmd);
    calls.increment(cmd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_bpf) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) != TGID)
        return 0;
    u32 tid = id;
    u32 *cmd = pending.lookup(&tid);
    if (!cmd)
        return 0;
    if (args->ret == -1)   // -EPERM
        refused.increment(*cmd);
    pending.delete(&tid);
    return 0;
}
"""


def _by_name(table) -> dict[str, int]:
    return {seccomp.BPF_COMMANDS[k.value]: v.value for k, v in table.items()}


@contextlib.contextmanager
def audit(bcc, pid: int) -> Iterator[Callable[[], tuple[dict[str, int], dict[str, int]]]]:
    """Count ``pid``'s bpf() calls by command, and those refused, from now until the end."""
    tracer = bcc.BPF(text=AUDIT.replace("TGID", str(pid)).encode())
    try:
        yield lambda: (_by_name(tracer[b"calls"]), _by_name(tracer[b"refused"]))
    finally:
        tracer.cleanup()


def held_ids(pid: int, kind: str = "map") -> set[int]:
    """Ids of the maps (or ``kind="prog"``: programs) process ``pid`` holds fds to
    (pymap leaves itself out of map holders, so /proc it is)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == f"anon_inode:bpf-{kind}":
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    ids |= {int(ln.split()[1]) for ln in f if ln.startswith(f"{kind}_id:")}
    return ids


def test_daemon_uses_only_read_commands_after_start_up(daemon_factory, maps, bpffs_dir):
    bcc = need_bcc()
    need_kernel()
    need_binding()
    tag = token()
    fd, map_id = maps.create("hash", 4, 8, 64, name=f"au_{tag}", pin=bpffs_dir / f"au_{tag}")

    for i in range(8):
        syscall.map_update_elem(fd, struct.pack("<I", i), struct.pack("<Q", i))
    lpm, _ = maps.create("lpm_trie", 8, 8, 16, name=f"al_{tag}", flags=1)  # no batch: per key
    syscall.map_update_elem(lpm, lpm_key(24, bytes([10, 1, 2, 0])), bytes(8))
    d = daemon_factory("--source", f"{EXECSNOOP}:execs,drops=dropped", "--source", TCPCONNECT,
                       "--interval", "0.2", "--set", 'watch.kernel_delta="off"')
    assert "seccomp filter installed: bpf() allows only MAP_GET_NEXT_ID, " in d.log.read_text()
    with audit(bcc, d.proc.pid) as tables:
        listed = d.cli("list", "-o", "json", check=True)
        assert f"au_{tag}" in listed.stdout
        got = d.cli("get", f"au_{tag}", "-o", "json", check=True)
        assert json.loads(got.stdout)["count"] == 8
        # A bcc map, decoded with its BTF: this daemon's (other tests may load execsnoop too).
        held = held_ids(d.proc.pid)
        (dropped,) = [m["id"] for m in json.loads(listed.stdout)
                      if m["name"] == "dropped" and m["id"] in held]
        d.cli("get", f"id:{dropped}", check=True)
        assert json.loads(d.cli("get", f"al_{tag}", "-o", "json", check=True).stdout)["count"] == 1
        with Follower(d, f"au_{tag}", "-f", "--snapshot") as f, Follower(d, "execs", "-f") as ex:
            f.wait_count(8)  # the snapshot
            wait_until(lambda: status(d)["subscriptions"], "subscriptions")
            for i in range(8, 16):
                syscall.map_update_elem(fd, struct.pack("<I", i), struct.pack("<Q", i))
            syscall.map_delete_elem(fd, struct.pack("<I", 0))
            f.wait_count(8 + 9)
            deadline = time.monotonic() + 30
            while not ex.snapshot() and time.monotonic() < deadline:
                subprocess.run(["/bin/true"], check=True)
                time.sleep(0.2)
            assert ex.snapshot(), f"no exec record: {ex.stderr}"
        d.cli("events", f"au_{tag}", check=True)  # recent events
        d.cli("events", f"au_{tag}", "--snapshot", check=True)
        d.cli("status", check=True)
        calls, refused = tables()
    print("daemon bpf() after start-up:", calls, "refused:", refused)
    assert calls.get("BPF_MAP_GET_NEXT_ID", 0) > 0 and calls.get("BPF_MAP_LOOKUP_BATCH", 0) > 0
    assert calls.get("BPF_BTF_GET_FD_BY_ID", 0) > 0 and calls.get("BPF_OBJ_GET", 0) > 0
    assert calls.get("BPF_MAP_GET_NEXT_KEY", 0) > 0 and calls.get("BPF_MAP_LOOKUP_ELEM", 0) > 0
    assert set(calls) <= set(privileges.READ_COMMANDS), calls
    assert refused == {}
    assert d.stop() == 0


def test_without_the_binding_the_daemon_says_so_and_serves(daemon_factory):
    """A missing python3-seccomp is one clear log line, not a failed start."""
    proc = subprocess.run([sys.executable, "-c", (
        "import logging, sys; sys.modules['seccomp'] = None; logging.basicConfig(level='INFO')\n"
        "from watcher.daemon import privileges; from watcher.daemon.config import Config\n"
        "from watcher.kernel.features.probe import probe\n"
        "privileges.harden(Config(), probe())")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "seccomp filter NOT installed: libseccomp's Python binding does not import" in proc.stderr
    assert "python3-seccomp" in proc.stderr
    d = daemon_factory("--set", "daemon.seccomp=false")
    assert "seccomp filter off (daemon.seccomp = false)" in d.log.read_text()


def broker_pid(log: str) -> int:
    """The objects broker's pid, from the daemon's log line about it."""
    (pid,) = re.findall(r"objects broker \(pid (\d+)\) serving the in-kernel engine", log)
    return int(pid)


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return False


def loaded_prog_ids() -> set[int]:
    return {p["id"] for p in bpftool("prog", "show")}


def test_in_kernel_engine_works_under_its_profile_and_uses_nothing_else(daemon_factory, maps,
                                                                       bpffs_dir):
    """With watch.kernel_delta on, adds, changes and removals (more than one delete packet)
    arrive as events that replay to what bpftool shows.  The daemon's pid issues no create,
    load, update or delete command at all: the objects broker's pid creates the maps and
    loads the programs (and issues nothing else), and the daemon runs them.  When the
    daemon stops, the broker is gone and no program of theirs is left."""
    bcc = need_bcc()
    need_binding()
    from support.events import replay_lines
    from support.kernel import bpftool_entries

    name = f"ak_{token()}"
    fd, map_id = maps.create("hash", 4, 8, 4096, name=name, pin=bpffs_dir / name)
    d = daemon_factory("--interval", "0.2", "--set", "watch.kernel_delta_min_entries=0",
                       "--set", 'watch.kernel_delta_types=["hash"]')
    log = d.log.read_text()
    assert "never an update, delete, create or load (the in-kernel engine's objects come " \
        "from the objects broker)" in log
    broker = broker_pid(log)

    def put(i: int, v: int) -> None:
        syscall.map_update_elem(fd, struct.pack("<I", i), struct.pack("<Q", v))

    with audit(bcc, d.proc.pid) as tables, audit(bcc, broker) as broker_tables:
        with Follower(d, name, "-f") as f:
            wait_ready(d, name)
            watch = watch_of(status(d), name)
            assert watch is not None
            assert watch["engine"].startswith("in-kernel:"), watch
            for i in range(2000):
                put(i, i)
            f.wait_count(2000)
            for i in range(1200):  # 4-byte keys: over 761, one delete packet's worth
                syscall.map_delete_elem(fd, struct.pack("<I", i))
            for i in range(1200, 1300):
                put(i, 7)
            for i in range(3000, 3010):
                put(i, i)
            lines = f.wait_count(2000 + 1200 + 100 + 10)
            assert replay_lines(lines) == bpftool_entries(map_id)
            actions = [ln["action"] for ln in lines[2000:]]
            assert (actions.count("removed"), actions.count("updated"),
                    actions.count("added")) == (1200, 100, 10)
            progs = held_ids(d.proc.pid, "prog")
        calls, refused = tables()
        broker_calls, broker_refused = broker_tables()
    print("daemon bpf() with the in-kernel engine:", calls, "refused:", refused)
    print("objects broker bpf():", broker_calls, "refused:", broker_refused)
    assert calls.get("BPF_PROG_TEST_RUN", 0) > 0 and calls.get("BPF_MAP_LOOKUP_ELEM", 0) > 0
    assert set(calls) <= set(privileges.READ_COMMANDS + privileges.KERNEL_DELTA_COMMANDS)
    assert not set(calls) & {"BPF_MAP_CREATE", "BPF_PROG_LOAD", "BPF_BTF_LOAD",
                             *privileges.WRITE_COMMANDS}, calls
    assert refused == {}
    assert broker_calls.get("BPF_MAP_CREATE", 0) > 0 and broker_calls.get("BPF_PROG_LOAD", 0) > 0
    assert set(broker_calls) <= set(broker_module.ENGINE_BPF_COMMANDS), broker_calls
    assert broker_refused == {}
    assert "in-kernel walk failed" not in d.log.read_text()
    assert progs and progs <= loaded_prog_ids()
    assert d.stop() == 0
    wait_until(lambda: not running(broker), "the broker's exit")
    assert not progs & loaded_prog_ids()


def test_a_killed_daemon_leaves_no_broker_and_no_program(daemon_factory, maps):
    """SIGKILL gives the daemon no chance to clean up: the broker sees its socket close and
    exits, and the kernel frees every object of theirs."""
    need_binding()
    name = f"ax_{token()}"
    maps.create("hash", 4, 8, 64, name=name)
    d = daemon_factory("--interval", "0.2", "--set", "watch.kernel_delta_min_entries=0",
                       "--set", 'watch.kernel_delta_types=["hash"]')
    broker = broker_pid(d.log.read_text())
    with Follower(d, name, "-f"):
        wait_ready(d, name)
        assert cast(dict, watch_of(status(d), name))["engine"].startswith("in-kernel:")
        progs = held_ids(d.proc.pid, "prog")
    assert progs and running(broker)
    d.proc.kill()
    d.proc.wait(30)
    wait_until(lambda: not running(broker), "the broker's exit")
    assert not progs & loaded_prog_ids()


def test_reload_keeps_the_engine_the_filter_was_made_for(tmp_path, daemon_factory, maps):
    """The filter cannot widen: turning the in-kernel engine on by SIGHUP waits for a
    restart, said in one warning, instead of failing under the strict filter."""
    need_binding()
    conf = tmp_path / "pymap.toml"
    conf.write_text('[watch]\nkernel_delta = "off"\n')
    d = daemon_factory("-c", str(conf))
    conf.write_text('[watch]\nkernel_delta = "auto"\nkernel_delta_min_entries = 0\n'
                    'kernel_delta_types = ["hash"]\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reloaded" in d.log.read_text(), "the reload")
    (warning,) = [ln for ln in d.log.read_text().splitlines() if "next restart" in ln]
    assert "watch.kernel_delta" in warning
    name = f"rk_{token()}"
    maps.create("hash", 4, 8, 64, name=name)
    with Follower(d, name, "-f"):
        wait_ready(d, name)
        engine = cast(dict, watch_of(status(d), name))["engine"]
    assert engine.startswith("user-space"), engine  # still the engine the filter is for
