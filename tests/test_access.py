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

import pytest
from support.curve import as_client, start_tcp_daemon
from support.events import Follower, status, wait_until, watch_of
from support.kernel import token, u32, u64

from watcher.daemon.access import Policy, Principal, View
from watcher.daemon.config import AccessConfig, AccessRule, ConfigError
from watcher.kernel import syscall

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
        wait_until(lambda: watch_of(_status_as_root(d), secret)["events"] >= 1, "secret event")
        recent = d.cli("events", "acl_*", "-o", "json", check=True).stdout
        names = {json.loads(line)["map"]["name"] for line in recent.splitlines() if line.strip()}
        assert secret not in names
        assert public in names
        # events: a restricted client is kept off the event socket (one XPUB serves all,
        # a prefix subscription cannot be cut down to its maps); an unrestricted one follows.
        follow = d.cli("events", "acl_*", "-f", "--max-wait", "2", "-o", "json", timeout=120)
        assert follow.stdout.strip() == "" and follow.returncode != 0
        assert "refused client alice on the event socket" in d.log.read_text()
        for var, value in {**d.client_env, **as_client(d, "ops")}.items():
            monkeypatch.setenv(var, value)
        with Follower(d, public, "-f") as f:
            fd = next(x for x in maps.fds if syscall.map_info(x).id == ids[public])
            deadline = time.monotonic() + 60
            while not f.snapshot() and time.monotonic() < deadline:
                syscall.map_update_elem(fd, u32(3), u64(int(time.monotonic())))
                time.sleep(0.5)
            assert f.snapshot(), f.stderr
        assert "refused client ops" not in d.log.read_text()
    finally:
        d.stop()


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


def test_unix_peers_by_user_over_a_real_socket(daemon_factory, maps, nobody_pymap, tmp_path):
    """SO_PEERCRED through libzmq: nobody sees only what its rule allows; root sees all."""
    tag = token()
    public, secret = f"acl_p_{tag}", f"acl_secret{tag[:4]}"
    for name in (public, secret):
        maps.create("hash", 4, 8, 8, name=name)
    # pytest's temp dirs are private (0700): the socket lives where nobody can reach it.
    base = Path(tempfile.mkdtemp(prefix="pymap-acl-", dir="/tmp"))
    base.chmod(0o711)
    conf = tmp_path / "pymap.toml"
    conf.write_text('[daemon]\nsocket_group = "nogroup"\n\n[[access.rules]]\nusers = ["nobody"]\n'
                    'allow = ["acl_*"]\ndeny = ["acl_secret*"]\n')
    d = daemon_factory("-c", str(conf), start=False)
    d.run_dir = base / "run"
    d.endpoint = f"ipc://{d.run_dir}/pymap.sock"
    d.socket = d.run_dir / "pymap.sock"
    d.args = [*d.args, "--endpoint", d.endpoint]
    try:
        d.start()
        as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        proc = subprocess.run([*as_nobody, nobody_pymap, "list", "-o", "json", "acl_*"],
                              capture_output=True, text=True, timeout=120,
                              env={"PATH": os.environ["PATH"], "PYMAP_ENDPOINT": d.endpoint})
        assert proc.returncode == 0, proc.stderr
        assert {m["name"] for m in json.loads(proc.stdout)} == {public}
        follow = subprocess.run([*as_nobody, nobody_pymap, "events", "acl_*", "-f", "--max-wait",
                                 "2", "-o", "json"], capture_output=True, text=True, timeout=120,
                                env={"PATH": os.environ["PATH"], "PYMAP_ENDPOINT": d.endpoint})
        assert follow.stdout.strip() == "" and follow.returncode != 0
        nobody = pwd.getpwnam("nobody").pw_uid
        assert f"refused uid {nobody} on the event socket" in d.log.read_text()
        mine = json.loads(d.cli("list", "-o", "json", "acl_*", check=True).stdout)
        assert {m["name"] for m in mine} == {public, secret}  # root: no rule, default allow
        assert status(d)["epoch"]
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.kernel
def test_reload_applies_new_keys_and_rules(tmp_path, bpffs_dir, maps):
    """SIGHUP re-reads the allowed keys and the access rules; connected clients stay."""
    tag = token()
    secret = f"acl_secret{tag[:4]}"
    maps.create("hash", 4, 8, 8, name=secret)
    d = start_tcp_daemon(tmp_path, bpffs_dir, RULES)
    try:
        mallory = {"PYMAP_CURVE_CLIENT_CERT": str(d.keys / "mallory" / "mallory.key_secret")}
        assert d.cli("ping", "--timeout", "2", env=mallory).returncode != 0
        listed = {m["name"] for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)}
        assert secret not in listed  # alice's rule denies acl_secret*
        (d.keys / "clients" / "mallory.key").write_bytes(
            (d.keys / "mallory" / "mallory.key").read_bytes())
        config = tmp_path / "pymap.toml"
        config.write_text(config.read_text().replace('deny = ["acl_secret*"]', "deny = []"))
        d.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded" in d.log.read_text(), "the reload")
        assert d.cli("ping", "--timeout", "5", env=mallory).returncode == 0
        listed = {m["name"] for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)}
        assert secret in listed
    finally:
        d.stop()
