"""Who sees which maps: [access] rules for CURVE clients and unix socket peers; a denied
map is invisible to list, get, status and recent, and answered exactly as a missing one."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import cast

import pytest
from support.curve import as_client, start_tcp_daemon
from support.events import Follower, status, wait_until, watch_of
from support.kernel import token, u32, u64

from watcher.daemon.access import Policy, Principal, View
from watcher.daemon.config import AccessConfig, AccessRule, ConfigError
from watcher.kernel.sys import syscall

RULES = """
[watch]
always = ["acl_*", "other_*"]
interval = 0.2

[access]
default = "allow"

[[access.rules]]
clients = ["alice"]
allow = ["acl_*"]
deny = ["acl_secret*"]
"""


def _error(proc) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip()


@pytest.mark.kernel
def test_a_denied_map_is_invisible_to_a_curve_client(tmp_path, bpffs_dir, maps, monkeypatch):
    tag = token()
    public, secret, other = f"acl_p_{tag}", f"acl_secret{tag[:4]}", f"other_{tag}"  # <= 15 chars
    ids = {}
    for name in (public, secret, other):
        fd, ids[name] = maps.create("hash", 4, 8, 8, name=name)
        syscall.map_update_elem(fd, u32(1), u64(1))
    d = start_tcp_daemon(tmp_path, bpffs_dir, RULES)
    try:
        listed = {m["name"] for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)}
        assert public in listed
        assert secret not in listed and other not in listed
        # Denied or missing, by name or id: the same answer, word for word.
        for hidden_name, missing in ((secret, f"acl_secret_{token()}"),
                                     (other, f"other_{token()}")):
            assert _error(d.cli("get", hidden_name)) == _error(d.cli("get", missing)).replace(
                missing, hidden_name)
        missing_id = max(ids.values()) + 1_000_000
        assert _error(d.cli("get", f"id:{ids[secret]}")) == _error(
            d.cli("get", f"id:{missing_id}")).replace(str(missing_id), str(ids[secret]))
        doc = json.loads(d.cli("get", public, "-o", "json", check=True).stdout)
        assert len(doc["entries"]) == 1
        # status: the daemon watches all three (always), alice is shown only hers.
        wait_until(lambda: all(watch_of(_status_as_root(d), n) for n in (public, secret, other)),
                   "all three maps watched")
        st = json.loads(d.cli("status", "-o", "json", check=True).stdout)
        shown = {w["name"] for w in st["watched"]}
        assert public in shown and secret not in shown and other not in shown
        # recent: changes of a hidden map are not replayed.
        for name in (public, secret):
            fd = next(f for f in maps.fds if syscall.map_info(f).id == ids[name])
            syscall.map_update_elem(fd, u32(2), u64(2))
        wait_until(lambda: cast(dict, watch_of(_status_as_root(d), secret))["events"] >= 1,
                   "secret event")
        recent = d.cli("events", "acl_*", "-o", "json", check=True).stdout
        names = {json.loads(line)["map"]["name"] for line in recent.splitlines() if line.strip()}
        assert secret not in names
        assert public in names
        # events: alice follows acl_* and gets her view's copies only; ops (no rule) gets all.
        for var, value in d.client_env.items():
            monkeypatch.setenv(var, value)
        with Follower(d, "acl_*", "-f") as alice:
            for var, value in as_client(d, "ops").items():
                monkeypatch.setenv(var, value)
            with Follower(d, "acl_*", "-f") as ops:
                _change_until(maps, [ids[public], ids[secret]], lambda: (
                    _names(alice) >= {public} and _names(ops) >= {public, secret}))
            assert secret not in _names(alice), alice.snapshot()
        assert "refused" not in d.log.read_text()
    finally:
        d.stop()


def _names(follower: Follower) -> set[str]:
    """The map names a ``pymap events -o json`` follower has printed events of."""
    return {line["map"]["name"] for line in follower.snapshot() if line.get("map", {}).get("name")}


def _change_until(maps, map_ids: list[int], done, timeout: float = 60) -> None:
    """Update every map in ``map_ids`` together, every half second, until ``done()``."""
    fds = [next(f for f in maps.fds if syscall.map_info(f).id == i) for i in map_ids]
    deadline = time.monotonic() + timeout
    n = 0
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the followers' events"
        n += 1
        for fd in fds:
            syscall.map_update_elem(fd, u32(n % 8), u64(n))
        time.sleep(0.5)


def _status_as_root(d) -> dict:
    """The daemon's full status, through an unrestricted client (no rule names ops)."""
    proc = d.cli("status", "-o", "json", env=as_client(d, "ops"), check=True)
    return json.loads(proc.stdout)


def test_rules_pick_the_first_naming_the_peer():
    nobody = pwd.getpwnam("nobody")
    policy = Policy(AccessConfig(default="deny", rules=[
        AccessRule(users=["nobody"], allow=["pub_*"], deny=["pub_secret*"]),
        AccessRule(clients=["alice"]),
        AccessRule(groups=["root"], allow=["*"]),
    ]))
    view = policy.view_for(Principal.from_metadata("", f"localhost:{nobody.pw_uid}:"
                                                       f"{nobody.pw_gid}:123"))
    assert isinstance(view, View)
    assert view.sees_name("pub_a") and not view.sees_name("pub_secret") and not view.sees_name("x")
    assert policy.view_for(Principal.from_metadata("alice", "10.0.0.1")) is None  # everything
    root = policy.view_for(Principal.from_metadata("", "localhost:0:0:1"))
    assert root is not None and root.sees_name("anything")
    stranger = policy.view_for(Principal.from_metadata("mallory", "10.0.0.2"))
    assert stranger is not None and not stranger.sees_name("pub_a")  # default deny
    assert Policy(AccessConfig()).view_for(Principal()) is None  # no [access]: no filter
    with pytest.raises(ConfigError):
        AccessRule(allow=["x"])  # names nobody


# A raw subscriber, as nobody: subscribes to the topics given (hex) and prints what it
# gets as JSON lines until it is terminated.
RAW_SUB = r"""
import json, sys, zmq
sub = zmq.Context().socket(zmq.SUB)
sub.connect(sys.argv[1])
for topic in sys.argv[2:]:
    sub.setsockopt(zmq.SUBSCRIBE, bytes.fromhex(topic))
while True:
    frames = sub.recv_multipart()
    print(json.dumps({"topic": frames[0].hex(), "header": json.loads(frames[1])}), flush=True)
"""

# {p}: the test's own prefix, so that maps of another run on the host never match.
UNIX_RULES = """
[daemon]
socket_group = "nogroup"

[[access.rules]]
groups = ["nogroup"]
allow = ["{p}_*"]
deny = ["{p}_secret*"]

[[access.rules]]
clients = ["bob"]
deny = ["{p}_p_*"]
"""


@pytest.mark.kernel
def test_a_restricted_unix_peer_follows_only_its_maps(daemon_factory, maps, nobody_pymap,
                                                      tmp_path):
    """nobody (its group's rule) follows this run's ``a<tag>_*`` and sees its maps' events
    only, also of maps created and removed meanwhile; a denied map changed at the same
    time never shows, not even as map_created or map_removed; root, unrestricted, sees
    both.  A raw SUB as nobody subscribing to everything and to another view's namespace
    gets only its own."""
    tag = token()
    acl = f"a{tag[:4]}"  # this run's prefix: a map name is 15 bytes at most
    public, secret = f"{acl}_p_{tag}", f"{acl}_secret"
    ids = {name: maps.create("hash", 4, 8, 64, name=name)[1] for name in (public, secret)}
    # pytest's temp dirs are private (0700): the socket lives where nobody can reach it.
    base = Path(tempfile.mkdtemp(prefix="pymap-acl-", dir="/tmp"))
    base.chmod(0o711)
    conf = tmp_path / "pymap.toml"
    conf.write_text(UNIX_RULES.format(p=acl))
    d = daemon_factory("-c", str(conf), "--interval", "0.2", start=False)
    d.run_dir = base / "run"
    d.endpoint = f"ipc://{d.run_dir}/pymap.sock"
    d.socket = d.run_dir / "pymap.sock"
    d.args = [*d.args, "--endpoint", d.endpoint]
    events_endpoint = f"ipc://{d.run_dir}/events.sock"
    nobody_env = {"PATH": os.environ["PATH"], "PYMAP_ENDPOINT": d.endpoint}
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    mine = View((f"{acl}_*",), (f"{acl}_secret*",)).namespace
    bobs = View((), (f"{acl}_p_*",)).namespace
    raw = None
    try:
        d.start()
        proc = subprocess.run([*as_nobody, nobody_pymap, "list", "-o", "json", f"{acl}_*"],
                              capture_output=True, text=True, timeout=120, env=nobody_env)
        assert proc.returncode == 0, proc.stderr
        assert {m["name"] for m in json.loads(proc.stdout)} == {public}
        listed = json.loads(d.cli("list", "-o", "json", f"{acl}_*", check=True).stdout)
        assert {m["name"] for m in listed} == {public, secret}  # root: no rule, default allow
        assert status(d)["epoch"]

        topics = [b"", b"map:", b"hb", bobs + b"map:", bobs + b"hb", mine + f"map:{acl}_".encode(),
                  mine + b"hb"]
        raw = subprocess.Popen([*as_nobody, str(Path(nobody_pymap).parent / "python"), "-c",
                                RAW_SUB, events_endpoint, *(t.hex() for t in topics)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nobody_env)
        with Follower(d, f"{acl}_*", "-f", command=[*as_nobody, nobody_pymap],
                      env=nobody_env) as restricted, Follower(d, f"{acl}_*", "-f") as everyone:
            held = mine.decode() + f"map:{acl}_"
            wait_until(lambda: status(d)["subscriptions"].get(held, 0) >= 2
                       and f"map:{acl}_" in status(d)["subscriptions"],
                       "nobody's two subscribers and root's follower")
            wait_until(lambda: all((watch_of(status(d), n) or {}).get("polls", 0) >= 1
                                   for n in (public, secret)), "a baseline of both maps")
            _change_until(maps, [ids[public], ids[secret]], lambda: (
                _names(restricted) >= {public} and _names(everyone) >= {public, secret}))
            # Maps created and removed while followed: nobody hears of its own only.
            born, hidden_born = f"{acl}_n_{tag}", f"{acl}_secretz"
            new = {name: maps.create("hash", 4, 8, 8, name=name) for name in (born, hidden_born)}
            for fd, _ in new.values():
                syscall.map_update_elem(fd, u32(1), u64(1))

            def seen(follower: Follower, name: str, action: str) -> bool:
                return any(line["action"] == action and line["map"]["name"] == name
                           for line in follower.snapshot())

            everyone.wait_for(lambda _: all(seen(everyone, n, "added") for n in new),
                              "both new maps' entries")
            for fd, _ in new.values():
                maps.close(fd)
            everyone.wait_for(lambda _: all(seen(everyone, n, "map_removed") for n in new),
                              "both new maps removed")
            restricted.wait_for(lambda _: seen(restricted, born, "map_removed"),
                                "nobody's new map removed")
            assert seen(restricted, born, "added") and seen(restricted, born, "map_created")
            assert seen(everyone, hidden_born, "map_created")
            restricted_lines = restricted.snapshot()
        assert _names(restricted) == {public, born}, restricted_lines
        assert not any(secret in json.dumps(line) or hidden_born in json.dumps(line)
                       for line in restricted_lines)
        raw.terminate()
        out, err = raw.communicate(timeout=30)
        got = [json.loads(line) for line in out.decode().splitlines()]
        assert got, err.decode()
        assert all(bytes.fromhex(m["topic"]).startswith(mine) for m in got), got[:5]
        names = {m["header"]["map"]["name"] for m in got if "map" in m["header"]}
        assert public in names and secret not in names and hidden_born not in names
        beats = [m["header"] for m in got if m["header"]["kind"] == "heartbeat"]
        assert beats and all(set(b["topics"]) <= {public, born} for b in beats)
        assert "subscription outside its view" in d.log.read_text()
    finally:
        if raw is not None and raw.poll() is None:
            raw.kill()
            raw.wait()
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.kernel
def test_reload_applies_new_keys_and_rules(tmp_path, bpffs_dir, maps, monkeypatch):
    """SIGHUP re-reads the allowed keys and the access rules; connected clients stay.  A
    follower whose view the reload changes is cut, asks for its new namespace and goes on
    in the new view; a follower whose view is unchanged is not touched."""
    tag = token()
    public, secret = f"acl_p_{tag}", f"acl_secret{tag[:4]}"
    ids = {name: maps.create("hash", 4, 8, 8, name=name)[1] for name in (public, secret)}
    d = start_tcp_daemon(tmp_path, bpffs_dir, RULES)
    try:
        mallory = {"PYMAP_CURVE_CLIENT_CERT": str(d.keys / "mallory" / "mallory.key_secret")}
        assert d.cli("ping", "--timeout", "2", env=mallory).returncode != 0
        listed = {m["name"] for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)}
        assert secret not in listed  # alice's rule denies acl_secret*
        for var, value in d.client_env.items():
            monkeypatch.setenv(var, value)
        with Follower(d, "acl_*", "-f") as alice:
            for var, value in as_client(d, "ops").items():
                monkeypatch.setenv(var, value)
            with Follower(d, "acl_*", "-f") as ops:
                _change_until(maps, [ids[public], ids[secret]], lambda: (
                    _names(alice) >= {public} and _names(ops) >= {public, secret}))
                assert secret not in _names(alice)
                (d.keys / "clients" / "mallory.key").write_bytes(
                    (d.keys / "mallory" / "mallory.key").read_bytes())
                config = tmp_path / "pymap.toml"
                config.write_text(config.read_text().replace('deny = ["acl_secret*"]',
                                                             "deny = []"))
                assert d.proc is not None
                d.proc.send_signal(signal.SIGHUP)
                wait_until(lambda: "config reloaded" in d.log.read_text(), "the reload")
                assert d.cli("ping", "--timeout", "5", env=mallory).returncode == 0
                listed = {m["name"] for m in
                          json.loads(d.cli("list", "-o", "json", check=True).stdout)}
                assert secret in listed
                _change_until(maps, [ids[secret]], lambda: secret in _names(alice),
                              timeout=120)
                # Told on stderr: the silence after the cut, and the way back.
                assert "the daemon is back" in alice.stderr, alice.stderr
                assert "the daemon is back" not in ops.stderr  # its view did not change
        assert "cut 1 subscriber connections whose view changed" in d.log.read_text()
    finally:
        d.stop()
