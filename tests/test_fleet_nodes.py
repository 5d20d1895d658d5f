"""Simulated nodes on this machine publishing to real NATS: ``pymap export --to nats://``.

Each node is a real daemon (its own bpffs directory and sockets) watching real
kernel maps, with its own ``pymap export`` process; nats-server runs for real
(tests/support/nats.py).  What is proven: an exporter killed with SIGKILL and
restarted from a lagging checkpoint re-sends, and JetStream's message-id
de-duplication leaves every (node, epoch, seq) exactly once; several nodes
publishing at once all show in ``pymap events --fleet``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import trio
from conftest import PYMAP, Daemon, require
from support.events import FAST, wait_ready, wait_until
from support.export import ExportProc
from support.kernel import pattern, token, u32
from support.nats import nats_problem, nats_server

from consumers.fleet.jetstream import FleetError
from consumers.fleet.options import parse_url
from consumers.fleet.subscribe import FleetSubscription
from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel
ENTRY_ACTIONS = ("added", "updated", "removed")


@pytest.fixture
def nats():
    require(nats_problem())
    with nats_server() as server:
        yield server


def stream_entries(url: str, node: str | None = None, seen_twice: list | None = None) -> list:
    """Entry events in the fleet stream (all of it), read by an independent consumer;
    events stored twice (that the reader dropped) are counted into ``seen_twice``."""
    async def read() -> list:
        async with FleetSubscription(parse_url(url), node_glob=node, follow=False) as sub:
            got = [m async for m in sub if m.action in ENTRY_ACTIONS]
        if seen_twice is not None:
            seen_twice.append(sub.duplicates)
        return got

    try:
        return trio.run(read)
    except FleetError:  # the exporter has not created the stream yet
        return []


@pytest.mark.parametrize("batch", [1, 256])
def test_exporter_sigkill_restart_is_deduplicated(daemon_factory, maps, bpffs_dir, tmp_path,
                                                  nats, batch):
    """SIGKILLed after its acks, before its checkpoint caught up, the restarted exporter
    re-sends; every (node, epoch, seq) is in the stream exactly once, whether each event
    is a message or messages pack up to 256 (cut where the re-sends are cut again)."""
    d = daemon_factory(*FAST)
    name = f"fl{token()}_k"
    fd, _ = maps.create("hash", 4, 8, 1024, name=name, pin=bpffs_dir / name)
    url = nats.url + f"?stream=K&batch={batch}"
    state = tmp_path / "export.state"
    args = (name, "--to", url, "--node-name", "node-1", "--state-file", str(state))
    exporter = ExportProc(d, *args, log=tmp_path / "export1.log")
    sentinel = u32(999).hex()

    def entries(**kw) -> list:
        return [m for m in stream_entries(url, **kw)
                if json.loads(m.payload).get("key") != sentinel]

    try:
        wait_ready(d, name)
        # The exporter streams once its sentinel is in (as a snapshot row or an event):
        # the 40 adds are then events with a seq, and checkpointed.
        syscall.map_update_elem(fd, u32(999), pattern(999, 8))
        wait_until(lambda: len(stream_entries(url)) >= 1, "the exporter's first record")
        for i in range(40):
            syscall.map_update_elem(fd, u32(i), pattern(i, 8))
        wait_until(lambda: len(entries()) >= 40, "40 added events in the stream")
        wait_until(lambda: state.exists(), "a checkpoint")
        shutil.copy(state, tmp_path / "early.state")
        for i in range(40):
            syscall.map_update_elem(fd, u32(i), pattern(i + 100, 8))
        wait_until(lambda: len(entries()) >= 80, "40 updated events in the stream")
        exporter.kill()
        # SIGKILL after the acks, before the checkpoint caught up: the restarted
        # exporter resumes from the early position and re-sends the updates.  The
        # message cuts made at pauses since stay: each is written before its message.
        early = json.loads((tmp_path / "early.state").read_bytes())
        early["cuts"] = json.loads(state.read_bytes()).get("cuts", [])
        state.write_text(json.dumps(early))
        for i in range(20):
            syscall.map_delete_elem(fd, u32(i))
        exporter = ExportProc(d, *args, log=tmp_path / "export2.log")
        wait_until(lambda: len(entries()) >= 100, "20 removed events in the stream")
        seen_twice: list[int] = []
        got = entries(seen_twice=seen_twice)
        assert seen_twice == [0], "stored twice in the stream (the reader had to drop them)"
        ids = [(m.node, m.epoch, m.seq) for m in got]
        assert len(ids) == len(set(ids)) == 100, "an event is missing or stored twice"
        assert {m.node for m in got} == {"node-1"}
        if batch > 1:  # several events per JetStream message
            assert len({m.stream_seq for m in got}) < len(got) // 4
        assert sorted(m.action for m in got) == ["added"] * 40 + ["removed"] * 20 + ["updated"] * 40
        seqs = sorted(m.seq for m in got)
        assert seqs == list(range(seqs[0], seqs[0] + 100)), "a hole in the daemon's sequence"
        assert exporter.alive(), exporter.stderr()
    finally:
        exporter.stop()


def test_several_nodes_publish_and_fleet_shows_all(maps, bpffs_dir, tmp_path, nats):
    """Three nodes (daemon + exporter each, own bpffs dir and sockets) publish at once."""
    tag = token()
    url = nats.url + "?stream=NODES"
    nodes = []
    try:
        for i in range(3):
            root = bpffs_dir / f"node{i}"
            root.mkdir()
            d = Daemon(tmp_path / f"node{i}", root, list(FAST))
            d.run_dir.parent.mkdir(parents=True, exist_ok=True)
            d.start()
            name = f"fl{tag}_n{i}"
            fd, _ = maps.create("hash", 4, 8, 256, name=name, pin=root / name)
            exporter = ExportProc(d, name, "--to", url, "--node-name", f"node-{i}",
                                  log=tmp_path / f"export{i}.log")
            nodes.append((d, exporter, name, fd))
        for d, _, name, _ in nodes:
            wait_ready(d, name)
        follower = subprocess.Popen(
            [PYMAP, "events", f"fl{tag}_*", "--fleet", url, "--since", "10m", "-f",
             "-c", "60", "-o", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(20):  # all nodes change at once
            for _, _, _, fd in nodes:
                syscall.map_update_elem(fd, u32(k), pattern(k, 8))
        out, err = follower.communicate(timeout=120)
        assert follower.returncode == 0, err
        lines = [json.loads(x) for x in out.splitlines()]
        per_node = {f"node-{i}": [x for x in lines if x["node"] == f"node-{i}"] for i in range(3)}
        for i, (node, got) in enumerate(per_node.items()):
            assert len(got) == 20, (node, len(got))
            assert {x["map"]["name"] for x in got} == {f"fl{tag}_n{i}"}
            assert sorted(x["key"] for x in got) == sorted(u32(k).hex() for k in range(20))
            assert all(x["action"] == "added" for x in got)
        for _, exporter, _, _ in nodes:
            assert exporter.alive(), exporter.stderr()
    finally:
        for d, exporter, _, _ in nodes:
            exporter.stop()
            d.stop()


def test_broker_down_buffers_then_reports_drops(daemon_factory, maps, bpffs_dir, tmp_path):
    """NATS down: the exporter buffers up to --buffer, drops and counts the rest, the daemon
    keeps serving; when NATS comes up, what was kept arrives with a ``dropped`` record that
    accounts for every event not delivered."""
    from support.nats import NatsServer, free_port

    require(nats_problem())
    d = daemon_factory(*FAST)
    name = f"fl{token()}_d"
    fd, _ = maps.create("hash", 4, 8, 2048, name=name, pin=bpffs_dir / name)
    port = free_port()
    url = f"nats://127.0.0.1:{port}?stream=DOWN&connect_timeout=1"
    exporter = ExportProc(d, name, "--to", url, "--node-name", "node-d", "--buffer", "65536",
                          log=tmp_path / "export.log")
    server = NatsServer("down", tmp_path / "nats")
    server.port = port
    try:
        wait_ready(d, name)
        for i in range(1500):
            syscall.map_update_elem(fd, u32(i), pattern(i, 8))
        wait_until(lambda: json.loads(d.cli("status", "-o", "json", check=True).stdout)
                   ["events_published"] >= 1500, "the daemon to publish the changes")
        assert d.cli("ping").returncode == 0  # never blocked by the exporter
        server.start()
        r = None

        def arrived():
            nonlocal r
            r = subprocess.run([PYMAP, "events", name, "--fleet", url, "-o", "json"],
                               capture_output=True, text=True, timeout=60)
            lines = [json.loads(x) for x in r.stdout.splitlines()]
            return lines if any(x["action"] == "dropped" for x in lines) else None

        lines = wait_until(arrived, "the exporter's dropped record in the stream", timeout=60)
        added = [x for x in lines if x["action"] == "added"]
        dropped = [x for x in lines if x["action"] == "dropped"]
        assert all(x["node"] == "node-d" for x in lines)
        missed = sum(x["missed"] for x in dropped)
        assert 0 < len(added) < 1500 and missed > 0
        wait_until(lambda: len([x for x in (arrived() or []) if x["action"] == "added"])
                   + missed >= 1500, "every event delivered or counted as dropped")
        assert len(added) + missed <= 1500
        assert exporter.alive(), exporter.stderr()
    finally:
        exporter.stop()
        server.stop()
