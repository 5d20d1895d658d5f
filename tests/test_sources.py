"""Event sources end to end: real BPF programs loaded with bcc by the daemon, pinned
buffers attached by path, records checked field by field at several subscribers,
and loss (perf lost samples, a ring buffer producer's failed writes) accounted exactly."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import cast

import pytest
import trio
from conftest import REPO, need_bcc
from support.events import (
    DEADLINE,
    Follower,
    LibFollower,
    status,
    topic_key,
    wait_until,
)
from support.kernel import one_error_line, token
from support.sources import REC, REC_LAYOUT_TOML, OneCpu, Producer, source_config

from consumers.subscriber import EventStream

pytestmark = pytest.mark.kernel

EXECSNOOP = str(REPO / "examples/execsnoop-ringbuf/execsnoop.c")
TCPCONNECT = str(REPO / "examples/tcpconnect-perf/tcpconnect.c")
SYSCOUNT = str(REPO / "examples/syscount/syscount.c")


def source_of(st: dict, name: str) -> dict | None:
    return next((s for s in st["sources"] if s["name"] == name), None)


def subscribed(daemon, name: str, n: int) -> dict:
    def check():
        st = status(daemon)
        return st if st["subscriptions"].get(topic_key(name), 0) >= n else None

    return wait_until(check, f"{n} subscribers of {name}")


# --- a program loaded with bcc: ring buffer -----------------------------------------


async def test_execsnoop_records_field_by_field_at_three_subscribers(daemon_factory):
    need_bcc()
    d = daemon_factory("--source", f"{EXECSNOOP}:execs,drops=dropped")
    st = status(d)
    src = source_of(st, "execs")
    assert src is not None and src["kind"] == "ringbuf" and src["drops_map"] == "dropped"
    assert src["maps"] == ["dropped"]
    tmp = tempfile.mkdtemp(prefix="pmx")
    path = os.path.join(tmp, f"true-{token()}")
    os.symlink("/bin/true", path)
    lib = LibFollower(d.endpoint, ["execs"])
    try:
        with Follower(d, "execs", "-f") as f1, Follower(d, "execs", "-f") as f2:
            async with trio.open_nursery() as nursery:
                await nursery.start(lib.run)
                await trio.to_thread.run_sync(subscribed, d, "execs", 3)
                t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                pids = await trio.to_thread.run_sync(_exec_pids, path, 3)
                t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)

                def ours(lines):
                    return [x for x in lines if x.get("action") == "record"
                            and x["formatted"]["filename"] == path]

                for f in (f1, f2):
                    await trio.to_thread.run_sync(
                        f.wait_for, lambda ls: len(ours(ls)) >= 3, "3 exec records")
                l1, l2 = ours(f1.snapshot()), ours(f2.snapshot())
                libs = [e for e in await lib.await_count(
                    0, "3 exec records", pred=lambda evs: len(
                        [e for e in evs if e.formatted and e.formatted["filename"] == path]) >= 3)
                        if e.formatted and e.formatted["filename"] == path]
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    comm = os.path.basename(path)[:15]
    for line in l1:
        f = line["formatted"]
        assert line["map"]["name"] == "execs" and line["map"]["id"] == src["map_id"]
        assert f["comm"] == comm and f["uid"] == 0 and f["gid"] == 0
        assert f["pid"] == f["old_pid"]
        assert t0 <= f["ts"] <= t1, "ts is bpf_ktime_get_ns(): CLOCK_MONOTONIC"
        raw = bytes.fromhex(line["value"])
        assert int.from_bytes(raw[:8], "little") == f["ts"]
        assert int.from_bytes(raw[8:12], "little") == f["pid"]
        assert raw[24:40].split(b"\0")[0].decode() == comm
        assert raw[40:].split(b"\0")[0].decode() == path
    # Each exec is one record, every subscriber saw the same ones with the same seqs.
    assert sorted(x["formatted"]["pid"] for x in l1) == sorted(pids)
    def key(x):
        return x["seq"], x["value"], x["formatted"]

    assert [key(x) for x in l1] == [key(x) for x in l2]
    assert [(e.seq, e.value.hex(), e.formatted) for e in libs] == [key(x) for x in l1]
    assert all(e.action == "record" and e.map.name == "execs" for e in libs)
    st = status(d)
    src = source_of(st, "execs")
    assert src is not None
    assert src["records"] >= 3 and src["lost"] == 0 and src["wakeups"] >= 1


def _exec_pids(path: str, n: int) -> list[int]:
    """Exec ``path`` ``n`` times; the pids of the processes (one exec each)."""
    pids = []
    for _ in range(n):
        proc = subprocess.Popen([path])
        pids.append(proc.pid)
        proc.wait()
    return pids


def test_recent_records_and_status_table(daemon_factory):
    need_bcc()
    d = daemon_factory("--source", f"{EXECSNOOP}:execs")
    subprocess.run(["/bin/true"], check=True)
    wait_until(lambda: cast(dict, source_of(status(d), "execs"))["records"] >= 1, "a record")
    proc = d.cli("events", "execs", "-o", "json", check=True)
    assert '"action":"record"' in proc.stdout, proc.stdout
    assert "not being watched" not in proc.stderr
    table = d.cli("status", check=True).stdout
    assert "event sources" in table and "execs" in table and "ringbuf" in table


# --- a program loaded with bcc: perf event array --------------------------------------


async def test_tcpconnect_perf_records(daemon_factory):
    need_bcc()
    d = daemon_factory("--source", TCPCONNECT)
    assert cast(dict, source_of(status(d), "connects"))["kind"] == "perf"
    lib = LibFollower(d.endpoint, ["connects"])
    ports = _closed_ports(3)
    async with trio.open_nursery() as nursery:
        await nursery.start(lib.run)
        await trio.to_thread.run_sync(subscribed, d, "connects", 1)
        for port in ports:
            _connect(socket.AF_INET, "127.0.0.1", port)
        _connect(socket.AF_INET6, "::1", ports[0])

        def mine(evs):
            return [e for e in evs if e.action == "record" and e.formatted["pid"] == os.getpid()]

        await lib.await_count(0, "4 connect records", pred=lambda evs: len(mine(evs)) >= 4)
        nursery.cancel_scope.cancel()
    got = mine(lib.events)
    comm = Path("/proc/self/comm").read_text().strip()
    v4 = [e.formatted for e in got if e.formatted["family"] == 2]
    v6 = [e.formatted for e in got if e.formatted["family"] == 10]
    assert [f["dport"] for f in v4] == ports
    assert all(f["daddr"] == "127.0.0.1" and f["saddr"] == "127.0.0.1" for f in v4)
    assert all(f["comm"] == comm and f["uid"] == os.getuid() for f in v4 + v6)
    assert len(v6) == 1 and v6[0]["daddr6"] == "::1" and v6[0]["dport"] == ports[0]
    # perf pads a record to 8 bytes past its u32 size; the struct itself is 72 bytes.
    assert all(len(e.value) >= 72 for e in got)


def _closed_ports(n: int) -> list[int]:
    ports = []
    for _ in range(n):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def _connect(family, addr: str, port: int) -> None:
    with socket.socket(family) as s:
        s.settimeout(1)
        try:
            s.connect((addr, port))
        except OSError:
            pass  # refused: the SYN was sent, which is what the tracer sees


def test_program_without_buffers_is_loaded_and_its_map_watchable(daemon_factory):
    need_bcc()
    d = daemon_factory("--source", SYSCOUNT, "--interval", "0.2")
    assert status(d)["sources"] == []
    proc = d.cli("events", "syscounts", "-f", "-c", "3", "-o", "json", timeout=60, check=True)
    assert proc.stdout.count('"map":') == 3


# --- attached by pin: ring buffer, declared layout, producer-counted loss ----------------


async def test_pinned_ringbuf_with_layout_and_drops(daemon_factory, bpffs_dir, tmp_path):
    need_bcc()
    tag = int(token(), 16)
    prod = Producer(tag, rb_pages=1)  # one page: about a hundred records fit
    try:
        name = f"rb_{token()}"
        pin = prod.pin("rb", bpffs_dir / name)
        drops = prod.pin("dropped", bpffs_dir / f"drops_{token()}")
        conf = source_config(tmp_path / "pymap.toml", [
            (f'pin = "{pin}"\nkind = "ringbuf"\ndrops_map = "{drops}"\nread_slice = 64\n'
             f"layout = {REC_LAYOUT_TOML}")])
        d = daemon_factory("--config", conf)
        assert "consumes its records" in d.log.read_text()
        doctor = d.cli("doctor")
        assert doctor.returncode == 0, doctor.stdout  # caveats warn, they do not fail
        assert f"source {name}" in doctor.stdout and "consumers" in doctor.stdout
        lib = LibFollower(d.endpoint, [name])
        async with trio.open_nursery() as nursery:
            await nursery.start(lib.run)
            await trio.to_thread.run_sync(subscribed, d, name, 1)
            # Part 1: few records, slowly enough that none is lost; every field checked.
            for _ in range(5):
                prod.run_rb(10)
                await trio.sleep(0.05)
            recs = await lib.await_count(50)
            assert prod.dropped() == 0
            for i, e in enumerate(recs):
                assert e.action == "record" and e.map.name == name
                seq, ts, cpu, rtag = REC.unpack(e.value)
                assert e.formatted == {"seq": seq, "ts": ts, "cpu": cpu, "tag": rtag}
                assert (seq, rtag) == (i, tag)
            assert [e.topic_seq for e in recs] == list(range(1, 51))
            # Part 2: a burst far larger than the ring; the producer counts what failed.
            with OneCpu():
                prod.run_rb(20000)
            produced = prod.produced_rb()
            assert prod.dropped() > 0

            def accounted(evs):
                records = sum(1 for e in evs if e.action == "record")
                lost = sum(e.missed for e in evs if e.action == "lost")
                return records + lost >= produced

            evs = await lib.await_count(0, "records + lost == produced", pred=accounted)
            nursery.cancel_scope.cancel()
        records = [e for e in evs if e.action == "record"]
        lost = [e for e in evs if e.action == "lost"]
        assert all(e.reason == "producer" for e in lost)
        assert sum(e.missed for e in lost) == prod.dropped()
        assert len(records) + prod.dropped() == produced
        seqs = [REC.unpack(e.value)[0] for e in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        st = source_of(status(d), name)
        assert st is not None
        assert (st["records"], st["lost"]) == (len(records), prod.dropped())
        assert st["drops_map"] == drops
    finally:
        prod.close()


# --- attached by pin: perf event array, forced overflow -----------------------------------


async def test_perf_overflow_is_reported_as_lost(daemon_factory, bpffs_dir, tmp_path):
    need_bcc()
    tag = int(token(), 16)
    prod = Producer(tag)
    try:
        name = f"pb_{token()}"
        pin = prod.pin("pb", bpffs_dir / name)
        conf = source_config(tmp_path / "pymap.toml", [
            f'pin = "{pin}"\npage_cnt = 1\nlayout = {REC_LAYOUT_TOML}'])
        d = daemon_factory("--config", conf)
        assert "REPLACES any other reader" in d.log.read_text()
        doctor = d.cli("doctor")
        assert doctor.returncode == 0 and "its own per-CPU" in doctor.stdout, doctor.stdout
        stream = functools.partial(EventStream, record_batches=True)
        lib = LibFollower(d.endpoint, [name], stream_class=stream)
        async with trio.open_nursery() as nursery:
            await nursery.start(lib.run)
            await trio.to_thread.run_sync(subscribed, d, name, 1)
            with OneCpu():
                # One page per CPU: about a hundred records fit.  A daemon on the other CPU
                # may keep up with one burst on a busy machine, so burst until it did not.
                for _ in range(20):
                    prod.run_pb(30000)
                    prod.run_pb(1)  # a CPU's lost count is written with its next record
                    await trio.sleep(0.2)
                    if cast(dict, source_of(status(d), name))["lost"] > 0:
                        break
                # A CPU's lost count is written with its next record that fits:
                # keep producing one at a time until everything is accounted for.
                deadline = trio.current_time() + DEADLINE
                while True:
                    st = source_of(status(d), name)
                    assert st is not None
                    if st["records"] + st["lost"] >= prod.produced_pb():
                        break
                    assert trio.current_time() < deadline, (st, prod.produced_pb())
                    await trio.sleep(0.1)
                    prod.run_pb(1)
            produced = prod.produced_pb()

            def accounted(evs):
                return (sum(len(e.records) for e in evs if e.action == "records")
                        + sum(e.missed for e in evs if e.action == "lost")) >= produced

            evs = await lib.await_count(0, "records + lost == produced", pred=accounted)
            nursery.cancel_scope.cancel()
        records = [raw for e in evs if e.action == "records" for raw in e.records]
        lost = [e for e in evs if e.action == "lost"]
        assert lost and all(e.reason == "perf" and e.missed > 0 for e in lost)
        total_lost = sum(e.missed for e in lost)
        assert total_lost > 0
        assert len(records) + total_lost == produced
        assert (st["records"], st["lost"]) == (len(records), total_lost)
        seqs = [REC.unpack_from(raw)[0] for raw in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(REC.unpack_from(raw)[3] == tag for raw in records)
    finally:
        prod.close()


async def test_daemon_gives_the_perf_array_back_on_exit(daemon_factory, bpffs_dir, tmp_path):
    """pymap removes its rings when it stops: the program's output then fails (ENOENT)
    instead of filling rings nobody reads."""
    need_bcc()
    prod = Producer(1)
    try:
        pin = prod.pin("pb", bpffs_dir / f"pb_{token()}")
        d = daemon_factory("--source", pin)
        with OneCpu():
            prod.run_pb(5)
            wait_until(
                lambda: cast(dict, source_of(status(d), os.path.basename(pin)))["records"] == 5,
                "5 records")
        assert d.stop() == 0
        from watcher.kernel.buffers.perfbuf import PerfBufReader

        # A fresh reader installs rings again and gets records: the slots were free.
        reader = PerfBufReader(prod.fd("pb"), page_cnt=1)
        try:
            with OneCpu(reader.cpus[0]):
                prod.run_pb(3)
            chunk = reader.read(100)
            assert chunk.count == 3
        finally:
            reader.close()
    finally:
        prod.close()


# --- errors: one line, no traceback ----------------------------------------------------------


def _daemon_error(daemon_factory, *args) -> str:
    d = daemon_factory(*args, start=False)
    proc = subprocess.run(d.args, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    return one_error_line(proc.stderr)


def test_source_errors_are_one_line(daemon_factory, bpffs_dir, tmp_path, maps):
    line = _daemon_error(daemon_factory, "--source", "/nonexistent/x.c")
    assert "does not exist" in line
    conf = source_config(tmp_path / "a.toml", ['program = "x.c"\npin = "/sys/fs/bpf/x"'])
    assert "exactly one of" in _daemon_error(daemon_factory, "--config", conf)
    conf = source_config(tmp_path / "b.toml", [f'program = "{EXECSNOOP}"\nbufers = ["x"]'])
    assert "unknown key 'bufers'" in _daemon_error(daemon_factory, "--config", conf)
    conf = source_config(tmp_path / "c.toml", ['pin = "/sys/fs/bpf/x"\npage_cnt = 3'])
    assert "power of two" in _daemon_error(daemon_factory, "--config", conf)
    conf = source_config(tmp_path / "d.toml", [
        'pin = "/sys/fs/bpf/x"\nlayout = [{ name = "a", type = "u33" }]'])
    assert "unknown type 'u33'" in _daemon_error(daemon_factory, "--config", conf)
    # Runtime checks: the pin exists but is not a buffer, or not of the declared kind.
    hpin = bpffs_dir / f"h_{token()}"
    maps.create("hash", 4, 4, 4, pin=hpin)
    assert "not a ring buffer" in _daemon_error(daemon_factory, "--source", str(hpin))
    rpin = bpffs_dir / f"r_{token()}"
    maps.create("ringbuf", 0, 0, 4096, pin=rpin)
    assert "but the map is a ringbuf" in _daemon_error(
        daemon_factory, "--source", f"{rpin}:kind=perf")


def test_bad_program_ends_with_one_error_line(daemon_factory, tmp_path):
    """The compiler's messages go to the daemon's log (stderr) first: they say what is
    wrong with the C.  The daemon's own verdict is one last line, no traceback."""
    need_bcc()
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C;\n")
    d = daemon_factory("--source", str(bad), start=False)
    proc = subprocess.run(d.args, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "unknown type name 'this'" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pymap: error: ") and "bcc could not load it" in last
    d = daemon_factory("--source", f"{EXECSNOOP}:nosuch", start=False)
    proc = subprocess.run(d.args, check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pymap: error: ") and "no table named 'nosuch'" in last


def test_two_signals_while_serving_sources_still_clean_up(daemon_factory):
    """bcc's LLVM installs SIGINT/SIGTERM handlers of its own; the daemon must keep its own,
    so Ctrl-C followed by a service manager's SIGTERM still removes the sockets."""
    import signal

    need_bcc()
    d = daemon_factory("--source", f"{EXECSNOOP}:execs")
    events_socket = d.socket.with_name("events.sock")
    assert d.socket.exists() and events_socket.exists()
    d.proc.send_signal(signal.SIGINT)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(30)
    assert not d.socket.exists() and not events_socket.exists(), d.log.read_text()
    assert "Traceback" not in d.log.read_text()
