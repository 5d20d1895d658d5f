"""The degradation matrix: the real daemon under a refused kernel facility.

Hosts differ: an older kernel has no batch lookups, a lockdown build refuses
programs or iterators, a trimmed capability set cannot raise rlimits.  Each
case here runs the daemon (and ``doctor``) under a seccomp filter that answers
one facility's calls with the errno such a kernel gives (support/refuse.py),
then checks what every host must give:

* the daemon serves, and no traceback anywhere;
* ``list`` and ``get`` equal bpftool (decoded where the facility allows);
* a follower replays a foreign writer's changes exactly, on every map type;
* the refusal shows, with its errno, in ``status -o json``, in ``status``'s
  table and in ``doctor``; and the route the daemon took instead shows too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
from conftest import PYMAP
from support.events import FAST, Follower, cli_status, status, wait_ready, watch_of
from support.foreign import make_maps, no_traceback, replay_foreign_writes
from support.kernel import (
    bpftool_entries,
    bpftool_formatted,
    bpftool_show,
    facility_rows,
    host_features,
    pymap_entries,
    token,
)

from watcher.kernel.features import probe as kf

pytestmark = pytest.mark.kernel

REFUSE = Path(__file__).parent / "support" / "refuse.py"

# rule for support/refuse.py, the facility it takes away, what the daemon must say instead
CASES = {
    "no batch lookups (before 5.6)": ("bpf:BPF_MAP_LOOKUP_BATCH=EINVAL", kf.BATCH_LOOKUP),
    "programs refused": ("bpf:BPF_PROG_LOAD=EPERM", kf.PROG_TEST_RUN),
    "BTF by id refused": ("bpf:BPF_BTF_GET_FD_BY_ID=EPERM", kf.BTF_BY_ID),
    "perf events refused": ("perf_event_open=EACCES", kf.PERF_EVENT_ARRAY),
    "iterator links refused": ("bpf:BPF_LINK_CREATE=EINVAL", kf.MAP_ITER),
    "rlimits fixed": ("setrlimit=EPERM", kf.RLIMITS),
}


def refused_with(rule: str, facility: str) -> str:
    """The errno the probe reports under ``rule``: the rule's, unless this host refused
    the facility natively at an earlier step (its own errno then stands)."""
    native = host_features().get(facility)
    return native.error if not native.available else rule.rpartition("=")[2]


@pytest.mark.parametrize("case", list(CASES))
def test_the_daemon_serves_under_a_refused_facility(daemon_factory, maps, bpffs_dir, case):
    rule, facility = CASES[case]
    prefix = (sys.executable, str(REFUSE), rule, "--")
    d = daemon_factory(*FAST, prefix=prefix)
    made = make_maps(maps, bpffs_dir, token())
    error = refused_with(rule, facility)

    # the refusal, with its errno, in status -o json and in status's table
    shown = {f["name"]: f for f in cli_status(d)["facilities"]}
    assert shown[facility]["state"] == "refused" and shown[facility]["error"] == error, shown
    assert shown[facility]["degrades"]
    table = d.cli("status", check=True).stdout
    assert "kernel facilities refused" in table and shown[facility]["title"] in table

    # list and get equal bpftool, decoded where BTF may be read
    listed = {m["id"]: m for m in json.loads(d.cli("list", "-o", "json", check=True).stdout)}
    for _fd, map_id in made.values():
        theirs = bpftool_show(map_id)
        assert listed[map_id]["type"] == theirs["type"]
        assert listed[map_id]["btf_id"] == theirs.get("btf_id", 0)
        got = d.cli("get", f"id:{map_id}", "-o", "json", check=True)
        assert pymap_entries(json.loads(got.stdout)) == bpftool_entries(map_id), case
        no_traceback(got.stderr)
    btf_id = made["btf"][1]
    doc = json.loads(d.cli("get", f"id:{btf_id}", "-o", "json", check=True).stdout)
    formatted = {e["key"]: e.get("formatted") for e in doc["entries"]}
    if facility == kf.BTF_BY_ID:
        assert set(formatted.values()) == {None}, "decoded without BTF?"
    else:
        assert formatted == bpftool_formatted(btf_id)

    # a follower replays a foreign writer's changes exactly, whatever engine each map is on
    names = {k: listed[map_id]["name"] for k, (_, map_id) in made.items()}
    with Follower(d, *names.values(), "-f") as f:
        for name in names.values():
            wait_ready(d, name, subscribers=1)
        engines = {k: cast(dict, watch_of(status(d), n))["engine"] for k, n in names.items()}
        replay_foreign_writes(f, made, names)
        follower_err = f.stderr
    if facility == kf.PROG_TEST_RUN:
        assert all(e.startswith("user-space: in-kernel engine unavailable: BPF_PROG_TEST_RUN "
                                "refused by this kernel (EPERM)") for k, e in engines.items()
                   if k in ("hash", "array")), engines
        assert status(d)["discovery"].startswith("poll (tracepoint programs refused")
    elif facility == kf.MAP_ITER:
        for k in ("hash", "array"):
            assert engines[k].startswith("in-kernel: ") and engines[k].endswith(
                f"walked by bpf_for_each_map_elem only (map-element iterators refused by "
                f"this kernel ({error}))"), engines
    else:
        assert all(engines[k].startswith("in-kernel: ") for k in ("hash", "array")), engines

    # doctor, under the same refusal, says the same
    doctor = subprocess.run([*prefix, PYMAP, "doctor", "-e", d.endpoint], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    rows = facility_rows(doctor.stdout)
    assert rows[shown[facility]["title"]][:2] == ("refused", error), doctor.stdout
    assert doctor.returncode == 0, doctor.stdout  # a refusal degrades, it does not fail
    no_traceback(doctor.stdout, doctor.stderr, d.log.read_text(), follower_err)
    assert d.proc.poll() is None, "the daemon must still serve"
