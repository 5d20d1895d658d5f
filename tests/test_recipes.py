"""docs/recipes/: the configs each recipe shows are the ones these tests check, with the
real tools where they are here (rsyslogd -N1, nats-server -t, pymap's own config
loaders), so that the recipes cannot rot silently."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml
from conftest import REPO, require
from support import manifest
from support.markdown import code_blocks

from consumers.export.config import load as load_exports
from watcher.daemon.config import load_config

RECIPES = REPO / "docs/recipes"


def block(page: str, info: str, named: str | None = None, index: int = 0):
    """The ``index``-th ``info`` block of a recipe, or the one whose first line names
    ``named`` (``# /etc/x.conf``)."""
    blocks = code_blocks(RECIPES / page, info)
    if named is not None:
        blocks = [b for b in blocks if b.first_comment().split(":")[0] == named]
        assert len(blocks) == 1, f"{page}: one {info} block for {named} expected"
        return blocks[0]
    return blocks[index]


def test_cilium_recipe_configmap_and_patch_fit_the_manifest(tmp_path):
    doc = yaml.safe_load(block("cilium-kubernetes.md", "yaml").text)
    ours = manifest.documents()["ConfigMap"]
    assert (doc["kind"], doc["metadata"]) == ("ConfigMap", ours["metadata"])
    text = doc["data"]["pymap.toml"]
    # the socket group of the manifest (its supplementalGroups) and its metrics port hold;
    # the group is the image's, not this host's, so the loader checks the rest without it
    assert tomllib.loads(text)["daemon"]["socket_group"] == "pymap"
    toml = tmp_path / "pymap.toml"
    toml.write_text(text.replace('socket_group = "pymap"\n', ""))
    config = load_config(str(toml))
    assert config.metrics.listen == "0.0.0.0:9435"
    assert [(r.pattern, r.interval) for r in config.watch.intervals] == [("cilium_policy_*", 10.0)]
    # the JSON patch replaces the exporter's command and keeps its state file and metrics
    console = block("cilium-kubernetes.md", "console").text
    patch = yaml.safe_load(console.split("-p '", 1)[1].split("'", 1)[0])
    assert [op["op"] for op in patch] == ["replace"]
    path = patch[0]["path"].split("/")
    assert path[:5] == ["", "spec", "template", "spec", "containers"] and path[6] == "command"
    container = manifest.pod_spec()["containers"][int(path[5])]
    assert container["name"] == "export"
    old, new = container["command"], patch[0]["value"]
    assert new[:2] == ["pymap", "export"]
    for flag in ("--state-file", "--metrics", "--format"):
        assert new[new.index(flag) + 1] == old[old.index(flag) + 1], flag


def test_siem_recipe_rsyslog_config_parses_and_export_toml_loads(tmp_path):
    if shutil.which("rsyslogd") is None:
        require("rsyslogd is missing (Debian package rsyslog; scripts/setup.sh)")
    conf = tmp_path / "pymap.conf"
    conf.write_text(block("siem-ecs.md", "", "/etc/rsyslog.d/pymap.conf").text)
    proc = subprocess.run(["rsyslogd", "-N1", "-f", str(conf)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    exports = tmp_path / "export.toml"
    exports.write_text(block("siem-ecs.md", "toml", "/etc/pymap/export.toml").text)
    (spec,) = load_exports(str(exports))
    assert (spec.name, spec.format) == ("siem", "ecs")


@pytest.fixture
def nats_recipe(tmp_path):
    """The recipe's users script run on three node names (one a dotted FQDN), in
    ``tmp_path``: users.conf and keys/."""
    (tmp_path / "nodes.txt").write_text("node-001\nnode-002\nweb-7.example.org\n")
    script = tmp_path / "make_users.py"
    script.write_text(block("nats-fleet.md", "python", "make_users.py").text)
    subprocess.run([sys.executable, str(script), "nodes.txt"], cwd=tmp_path, check=True,
                   timeout=60)
    return tmp_path


def test_nats_recipe_server_config_passes_nats_server_t(nats_recipe):
    if shutil.which("nats-server") is None:
        require("nats-server is missing (scripts/setup.sh installs it)")
    import trustme

    users = (nats_recipe / "users.conf").read_text()
    assert users.count("nkey:") == 5 and '"pymap.web-7_example_org.>"' in users
    assert sorted(p.name for p in (nats_recipe / "keys").iterdir()) == [
        "admin.nk", "node-001.nk", "node-002.nk", "reader.nk", "web-7.example.org.nk"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in (nats_recipe / "keys").iterdir())
    ca = trustme.CA()
    cert = ca.issue_cert("n1")
    cert.cert_chain_pems[0].write_to_path(str(nats_recipe / "server.pem"))
    cert.private_key_pem.write_to_path(str(nats_recipe / "server.key"))
    text = block("nats-fleet.md", "", "/etc/nats-server.conf").text
    for old, new in (("/etc/nats/server.pem", nats_recipe / "server.pem"),
                     ("/etc/nats/server.key", nats_recipe / "server.key"),
                     ("/var/lib/nats", nats_recipe / "store")):
        assert old in text
        text = text.replace(old, str(new))
    conf = nats_recipe / "nats-server.conf"  # users.conf beside it, as the recipe says
    conf.write_text(text)
    proc = subprocess.run(["nats-server", "-t", "-c", str(conf)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nats_recipe_export_toml_loads(tmp_path):
    exports = tmp_path / "export.toml"
    exports.write_text(block("nats-fleet.md", "toml", "/etc/pymap/export.toml").text)
    (spec,) = load_exports(str(exports))
    assert spec.to.startswith("nats://")


def test_nats_recipe_permissions_hold_on_a_real_server(nats_recipe):
    """The recipe's server config (one server: no cluster block) with its users: the
    operator's key creates the stream with create_stream.py, each node publishes its own
    subjects only (the FQDN's too, as the exporter makes its token), the reader reads."""
    import trio
    import trustme
    from support.nats import nats_problem, nats_server

    from consumers.export.record import ExportRecord
    from consumers.fleet.jetstream import FleetError, FleetUnavailable
    from consumers.fleet.options import parse_url
    from consumers.fleet.publish import FleetPublisher
    from consumers.fleet.subscribe import FleetSubscription

    require(nats_problem())
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem = nats_recipe / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(nats_recipe / "server.pem"))
    cert.private_key_pem.write_to_path(str(nats_recipe / "server.key"))
    text = block("nats-fleet.md", "", "/etc/nats-server.conf").text
    cluster = text[text.index("cluster {"):text.index("authorization {")]
    # the test's server takes its store directory (-sd) and ports from the command line
    text = (text.replace(cluster, "").replace("/etc/nats/", f"{nats_recipe}/")
            .replace("  store_dir: /var/lib/nats\n", ""))
    (nats_recipe / "nats-server.conf").write_text(text)
    with nats_server(["-c", str(nats_recipe / "nats-server.conf")]) as server:
        host = f"127.0.0.1:{server.port}"
        script = block("nats-fleet.md", "python", "create_stream.py").text
        for old, new in (('["tls://n1:4222", "tls://n2:4222", "tls://n3:4222"]', f'["tls://{host}"]'),
                         ("num_replicas=3", "num_replicas=1"),
                         ('nkeys_seed="keys/admin.nk"', 'nkeys_seed="keys/admin.nk", tls=__import__'
                          f'("ssl").create_default_context(cafile="{ca_pem}")')):
            assert old in script, old
            script = script.replace(old, new)
        (nats_recipe / "create_stream.py").write_text(script)
        made = subprocess.run([sys.executable, "create_stream.py"], cwd=nats_recipe,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr

        def url(user: str) -> str:
            return (f"nats://{host}?tls_ca={ca_pem}&nkey={nats_recipe}/keys/{user}.nk"
                    "&create=false&ack_timeout=2s&connect_timeout=2s")

        def events(node: str, n: int, epoch: str = "e1") -> list[ExportRecord]:
            return [ExportRecord(node, epoch, seq, "m1", "added", 0.0, b'{"seq": %d}' % seq)
                    for seq in range(1, n + 1)]

        async def main():
            for node in ("node-001", "web-7.example.org"):
                async with FleetPublisher(parse_url(url(node))) as p:
                    assert (await p.publish(events(node, 5))).stored == 5
            async with FleetPublisher(parse_url(url("node-002"))) as p:
                try:  # another node's subject: refused, so never acknowledged
                    stored = (await p.publish(events("node-001", 1, "e2"))).stored
                except (FleetError, FleetUnavailable):
                    stored = 0
            assert stored == 0
            async with FleetSubscription(parse_url(url("reader")), follow=False) as sub:
                got = [m async for m in sub]
            assert sorted({m.node for m in got}) == ["node-001", "web-7.example.org"]
            assert len(got) == 10

        trio.run(main)
