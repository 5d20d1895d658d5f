"""`pymap get` against the real kernel, with bpftool as the oracle."""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import PYMAP, need_bcc
from support.kernel import (
    BccMaps,
    bpftool_entries,
    bpftool_formatted,
    build_zoo,
    lpm_key,
    one_error_line,
    pymap_entries,
    token,
    u64,
)

from watcher.kernel.sys import syscall

pytestmark = pytest.mark.kernel


def _get(daemon, selector: str, *args: str) -> dict:
    proc = daemon.cli("get", selector, "-o", "json", *args, check=True)
    doc = json.loads(proc.stdout)
    assert doc["count"] == len(doc["entries"])
    return doc


def test_get_every_type_agrees_with_bpftool(daemon, maps, bpffs_dir):
    zoo = build_zoo(maps, bpffs_dir, token())
    for z in zoo:
        if z.expected is None:
            continue
        doc = _get(daemon, f"id:{z.id}")
        assert doc["map"]["id"] == z.id
        assert doc["map"]["type"] == z.kind
        ours = pymap_entries(doc)
        assert ours == bpftool_entries(z.id), z
        assert ours == z.expected, z
        if z.kind in ("array", "percpu_array"):
            assert doc["count"] == doc["map"]["max_entries"]


def test_get_by_name_and_pin_path(daemon, maps, bpffs_dir):
    zoo = build_zoo(maps, bpffs_dir, token())
    for z in zoo:
        if z.expected is None:
            continue
        selectors = [z.name] + ([str(z.pin)] if z.pin else [])
        for selector in selectors:
            doc = _get(daemon, selector)
            assert doc["map"]["id"] == z.id, selector
            assert pymap_entries(doc) == z.expected, selector


def test_get_not_dumpable(daemon, maps, bpffs_dir):
    zoo = {z.kind: z for z in build_zoo(maps, bpffs_dir, token())}
    cases = [(zoo["ringbuf"].name, "ring buffer"), (str(zoo["ringbuf"].pin), "ring buffer"),
             (f"id:{zoo['perf_event_array'].id}", "perf event array")]
    for selector, words in cases:
        proc = daemon.cli("get", selector, "-o", "json")
        assert proc.returncode == 1, selector
        assert proc.stdout == ""
        assert words in one_error_line(proc.stderr)


def test_get_table(daemon, maps, bpffs_dir):
    zoo = {z.kind: z for z in build_zoo(maps, bpffs_dir, token())}
    h = zoo["hash"]
    proc = daemon.cli("get", h.name, "-n", "5", check=True)
    assert "showing 5 of 300 entries" in proc.stdout
    first_key = next(iter(pymap_entries(_get(daemon, h.name))))
    assert bytes.fromhex(first_key).hex(" ") in proc.stdout
    proc = daemon.cli("get", zoo["percpu_hash"].name, "-n", "0", check=True)
    assert "CPU" in proc.stdout


def test_get_btf_maps(daemon):
    need_bcc()
    bcc = BccMaps(token())
    try:
        for name, map_id in bcc.ids.values():
            doc = _get(daemon, f"id:{map_id}")
            assert doc["map"]["btf_id"] > 0
            assert pymap_entries(doc) == bpftool_entries(map_id), name
            formatted = {e["key"]: e["formatted"] for e in doc["entries"]}
            assert formatted == bpftool_formatted(map_id), name
            raw = _get(daemon, f"id:{map_id}", "--raw")
            assert all("formatted" not in e for e in raw["entries"])
            assert pymap_entries(raw) == pymap_entries(doc)
        # Decoded values in the table, too.
        proc = daemon.cli("get", bcc.ids["s"][0], check=True)
        assert "bash" in proc.stdout and "1234" in proc.stdout
    finally:
        bcc.close()


FLAT_ARRAY = """
struct flat { u64 big; s64 neg; s32 mid; u16 port; u8 proto; u8 flags; };
BPF_ARRAY(NAME, struct flat, ENTRIES);
int NAME_fn(void *ctx) { u32 k = 0; return NAME.lookup(&k) ? 1 : 0; }
"""
FLAT = struct.Struct("<QqiHBB")


def test_get_decodes_many_chunks_as_bpftool(daemon_factory):
    """A BTF map in many chunks whose numbers grow from chunk to chunk, through the
    whole-chunk renderer (watcher/decode/dumptext.py, consumers/cli/dumpjson.py): its
    kept matrix is laid out anew for wider digits, the chunks join into one document,
    and every entry says what bpftool says, decoded and --raw."""
    bcc = need_bcc()
    n = 20_000
    d = daemon_factory("--set", "daemon.chunk_entries=2048")  # 10 chunks
    name = f"fl{token()}"
    b = bcc.BPF(text=FLAT_ARRAY.replace("NAME", name).replace("ENTRIES", str(n)).encode())
    try:
        fd = b[name.encode()].map_fd
        keys = array.array("I", range(n))
        values = b"".join(FLAT.pack(10 ** (1 + i * 18 // n) - 1 - i % 7,  # 1 to 18 digits
                                    (-1) ** i * (i * 7919) ** 2, (-1) ** (i // 3) * i * 1009,
                                    i % 65536, i % 256, i % 3) for i in range(n))
        syscall.map_update_batch(fd, keys.tobytes(), values, n)
        map_id = syscall.map_info(fd).id
        doc = _get(d, f"id:{map_id}")
        assert doc["decoder"]["source"] == "btf"
        assert len(doc["entries"]) == n
        assert pymap_entries(doc) == bpftool_entries(map_id)
        assert {e["key"]: e["formatted"] for e in doc["entries"]} == bpftool_formatted(map_id)
        raw = _get(d, f"id:{map_id}", "--raw")
        assert pymap_entries(raw) == pymap_entries(doc)
    finally:
        b.cleanup()


def test_get_from_a_silent_endpoint(tmp_path):
    """A socket file nobody answers on: get (read without an event loop) waits --timeout,
    then says so in one line, as the other commands do."""
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    for args in ([], ["-o", "json"]):
        proc = subprocess.run([PYMAP, "get", "anything", *args, "-e", f"ipc://{path}",
                               "--timeout", "1"], check=False, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1
        one_error_line(proc.stderr)
        assert proc.stdout == ""


# --- names --------------------------------------------------------------------------


def test_long_pinned_name(daemon, maps, bpffs_dir):
    name = "cilium_lb4_services_v2"
    fd, map_id = maps.create("hash", 8, 16, 100, name=name, pin=bpffs_dir / name)
    for i in range(5):
        syscall.map_update_elem(fd, u64(i), bytes([i]) * 16)
    listed = {m["id"]: m for m in json.loads(daemon.cli("list", "-o", "json", check=True).stdout)}
    assert listed[map_id]["kernel_name"] == "cilium_lb4_serv"
    assert listed[map_id]["name"] == name
    for selector in (name, str(bpffs_dir / name), f"id:{map_id}"):
        doc = _get(daemon, selector)
        assert doc["map"]["id"] == map_id
        assert doc["map"]["name"] == name
        assert pymap_entries(doc) == bpftool_entries(map_id)
    matched = json.loads(daemon.cli("list", "cilium_lb4_services_*", "-o", "json", check=True).stdout)
    assert map_id in [m["id"] for m in matched]


def test_long_unpinned_name(daemon, maps):
    name = f"l{token()}_unpinned_long_name"
    _, map_id = maps.create("hash", 4, 4, 4, name=name)
    doc = _get(daemon, name)  # only the first 15 characters reached the kernel
    assert doc["map"]["id"] == map_id
    assert doc["map"]["kernel_name"] == name[:15]


def test_ambiguous_name(daemon, maps, bpffs_dir):
    name = f"ev{token()}"
    (bpffs_dir / "a").mkdir()
    (bpffs_dir / "b").mkdir()
    _, a = maps.create("array", 4, 4, 4, name=name, pin=bpffs_dir / "a" / name)
    _, b = maps.create("hash", 4, 4, 4, name=name, pin=bpffs_dir / "b" / name)
    _, c = maps.create("hash", 4, 8, 4, name=name)
    proc = daemon.cli("get", name, "-o", "json")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("pymap: error: ")
    for map_id in (a, b, c):
        assert f"id:{map_id}" in proc.stderr
    for map_id in (a, b, c):
        assert _get(daemon, f"id:{map_id}")["map"]["id"] == map_id
    assert _get(daemon, str(bpffs_dir / "a" / name))["map"]["id"] == a
    assert _get(daemon, str(bpffs_dir / "b" / name))["map"]["id"] == b


def test_selector_errors(daemon, maps, bpffs_dir):
    _, map_id = maps.create("hash", 4, 4, 4, name=f"s{token()}", pin=bpffs_dir / "s")
    cases = [
        (f"nosuch{token()}", "no map named"),
        ("id:notanumber", "id:N"),
        ("id:4294967295", "no map"),
        # ids are 32-bit: a larger number must not wrap around to another map.
        (f"id:{(1 << 32) + map_id}", "no map"),
        (str(bpffs_dir / "nosuch"), "no map"),
        ("/etc/passwd", "not under a watched bpffs"),
        (f"{bpffs_dir}/../../../etc/passwd", "not under a watched bpffs"),
    ]
    for selector, words in cases:
        proc = daemon.cli("get", selector, "-o", "json")
        assert proc.returncode == 1, selector
        assert words in one_error_line(proc.stderr), selector


# --- maps changing under a dump -----------------------------------------------------


@pytest.mark.parametrize("when", ["before", "during", 0.3, 1.0])
def test_map_deleted_while_dumping(daemon, maps, bpffs_dir, tmp_path, when):
    """Unpin and close a 200k-entry map around a `get`: whole data or one clean line.

    ``before``: gone before the request, so a clean not-found.  ``during``: as
    soon as entries reach the CLI's stdout, so the daemon is dumping and holds
    the map open; the dump must complete (its fd keeps the map alive).
    Numbers: after that many seconds, whatever the daemon is doing then.
    """
    n = 200_000
    name = f"big{token()}"
    pin = bpffs_dir / name
    fd, map_id = maps.create("hash", 8, 8, n, name=name, pin=pin)
    keys = array.array("Q", range(n))
    values = array.array("Q", (i ^ 0x5A5A5A5A for i in range(n)))
    syscall.map_update_batch(fd, keys.tobytes(), values.tobytes(), n)

    def delete():
        os.unlink(pin)
        maps.close(fd)  # the map is freed once the daemon lets go of it

    if when == "before":
        delete()
    out = tmp_path / "out.json"
    env = {**os.environ, "PYMAP_ENDPOINT": daemon.endpoint}
    seen_open = False  # entries were flowing when the map was deleted
    with open(out, "w") as stdout:
        proc = subprocess.Popen([PYMAP, "get", name, "-o", "json"], stdout=stdout,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            if when == "during":
                deadline = time.monotonic() + 120
                while proc.poll() is None and time.monotonic() < deadline:
                    if out.stat().st_size > 0:
                        seen_open = True
                        break
                    time.sleep(0.002)
                delete()
            elif when != "before":
                time.sleep(when)
                delete()
            _, stderr = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if when == "before":
        assert proc.returncode == 1
        assert "no map named" in one_error_line(stderr)
    if seen_open or when == "during":
        assert proc.returncode == 0, stderr
    if proc.returncode == 0:
        doc = json.loads(out.read_text())
        entries = pymap_entries(doc)  # no key twice
        assert doc["count"] == len(entries) == n
        expected = {struct.pack("<Q", i).hex(): struct.pack("<Q", i ^ 0x5A5A5A5A).hex()
                    for i in range(n)}
        assert entries == expected
    else:
        assert proc.returncode == 1
        one_error_line(stderr)
    assert daemon.proc.poll() is None
    daemon.cli("ping", check=True)
    # Once the daemon lets go, the map is really gone.
    deadline = time.monotonic() + 30
    while _map_exists(map_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _map_exists(map_id)


def _map_exists(map_id: int) -> bool:
    try:
        os.close(syscall.map_get_fd_by_id(map_id))
    except OSError:
        return False
    return True


def test_per_key_walk_with_concurrent_deletes(daemon, maps):
    """An LPM trie dumped while a thread deletes and re-adds half of its keys."""
    n = 8000
    fd, map_id = maps.create("lpm_trie", 8, 8, n, name=f"churn{token()}", flags=1)
    keys = [lpm_key(32, struct.pack(">I", 0x0A000000 + i)) for i in range(n)]
    expected = {k.hex(): u64(i).hex() for i, k in enumerate(keys)}
    for i, k in enumerate(keys):
        syscall.map_update_elem(fd, k, u64(i))
    stable, churn = keys[0::2], list(enumerate(keys))[1::2]

    stop = threading.Event()
    failures: list[BaseException] = []
    cycles = 0

    def churner():
        nonlocal cycles
        try:
            while not stop.is_set():
                for _, k in churn:
                    try:
                        syscall.map_delete_elem(fd, k)
                    except OSError as e:
                        if e.errno != errno.ENOENT:
                            raise
                for i, k in churn:
                    syscall.map_update_elem(fd, k, u64(i))
                cycles += 1
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            failures.append(e)

    thread = threading.Thread(target=churner, daemon=True)
    thread.start()
    try:
        for _ in range(3):
            proc = daemon.cli("get", f"id:{map_id}", "-o", "json", timeout=300)
            assert proc.returncode == 0, proc.stderr
            doc = json.loads(proc.stdout)
            entries = pymap_entries(doc)  # asserts no key appears twice
            assert doc["count"] == len(entries)
            missing = [k.hex() for k in stable if k.hex() not in entries]
            assert not missing, f"{len(missing)} never-deleted keys missing from the dump"
            for key, value in entries.items():
                assert expected[key] == value
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert cycles > 0
    daemon.cli("ping", check=True)
