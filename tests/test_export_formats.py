"""Export formats checked by independent parties: ECS output against ECS's own field
definitions (tests/data/ecs/fields.csv, from elastic/ecs v8.17.0, Apache-2.0, see
tests/data/ecs/LICENSE.txt), OCSF output against the OCSF schema shipped by the
``ocsf-json-schema`` package (validated with ``jsonschema``), CEF parsed back by
``pycef``.  The events come from a real daemon watching a real map with a declared
layout, so every format carries decoded key/value beside the raw hex."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path

import pytest
from support.events import FAST, wait_ready, wait_until
from support.export import ExportProc, record_doc
from support.kernel import token, u32, u64

from consumers.events import Event
from consumers.export.formats import FORMATS, facts
from watcher.kernel.sys import syscall
from watcher.wire.schema import MapRef

pytestmark = pytest.mark.kernel
ECS_FIELDS = Path(__file__).parent / "data" / "ecs" / "fields.csv"
ENTRY = ("added", "updated", "removed")
SENTINEL = u32(0xFFFF)
LAYOUT = """
[[layouts]]
match = "exf*"
key = [{ name = "id", type = "u32" }]
value = [{ name = "count", type = "u64" }]
"""


@pytest.fixture(scope="module")
def ecs_types() -> dict[str, str]:
    with open(ECS_FIELDS, newline="") as f:
        return {row["Field"]: row["Type"] for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def ocsf_validator():
    import jsonschema  # the test extra: a missing one fails, it never skips
    import ocsf_json_schema as schema_pkg

    from consumers.export.formats.ocsf import OCSF_VERSION

    schema = schema_pkg.OcsfJsonSchemaEmbedded(schema_pkg.get_ocsf_schema(version=OCSF_VERSION))
    class_schema = schema.get_class_schema("kernel_activity")
    return jsonschema.Draft202012Validator(class_schema)


@pytest.fixture
def exported(daemon_factory, maps, bpffs_dir, tmp_path):
    """The same 35 map changes exported in each format to a file: {format: [lines]}."""
    conf = tmp_path / "pymap.toml"
    conf.write_text(LAYOUT)
    d = daemon_factory(*FAST, "-c", str(conf))
    name = f"exf{token()}"
    fd, _ = maps.create("hash", 4, 8, 64, name=name, pin=bpffs_dir / name)
    files = {fmt: tmp_path / f"out.{fmt}" for fmt in FORMATS}
    procs = [ExportProc(d, name, "--format", fmt, "--to", f"file://{path}",
                        log=tmp_path / f"{fmt}.log") for fmt, path in files.items()]
    try:
        wait_ready(d, name, subscribers=len(procs))
        syscall.map_update_elem(fd, SENTINEL, u64(0))  # every exporter has started once seen
        wait_until(lambda: all(path.exists() and SENTINEL.hex().encode() in path.read_bytes()
                               for path in files.values()), "the sentinel in every file")
        def settle(n: int) -> None:  # the daemon polls: changes within one poll coalesce
            wait_until(lambda: all(len(live(fmt, _lines(path))) >= n
                                   for fmt, path in files.items()),
                       f"{n} events in every format's file")

        for i in range(20):
            syscall.map_update_elem(fd, u32(i), u64(i))
        settle(20)
        for i in range(10):
            syscall.map_update_elem(fd, u32(i), u64(100 + i))
        settle(30)
        for i in range(15, 20):
            syscall.map_delete_elem(fd, u32(i))
        settle(35)
    finally:
        for p in procs:
            p.stop()
    assert all(p.proc.returncode == 0 for p in procs), [p.stderr() for p in procs]
    return name, {fmt: _lines(path) for fmt, path in files.items()}, files


def _lines(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().split(b"\n") if line]


def live(fmt: str, lines: list[bytes]) -> list[bytes]:
    """The lines of live entry events (seq > 0), the sentinel left out."""
    out = []
    for line in lines:
        d = record_doc(fmt, line)
        if d["action"] in ENTRY and d["seq"] > 0 and d.get("key") != SENTINEL.hex():
            out.append(line)
    return out


def _flatten(doc: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


STRINGS = {"keyword", "constant_keyword", "wildcard", "match_only_text", "text"}
NUMBERS = {"long": int, "integer": int, "short": int, "byte": int, "unsigned_long": int}


def _ecs_type_ok(ecs_type: str, value: object) -> bool:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if ecs_type in STRINGS and not isinstance(v, str):
            return False
        if ecs_type in NUMBERS and not (isinstance(v, int) and not isinstance(v, bool)):
            return False
        if ecs_type == "date":
            datetime.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return ecs_type in STRINGS | set(NUMBERS) | {"date"}


def test_ecs_fields_are_ecs_fields_of_the_right_type(exported, ecs_types):
    import orjson

    name, all_lines, _ = exported
    lines = all_lines["ecs"]
    docs = [orjson.loads(line) for line in lines]
    entries = [orjson.loads(line) for line in live("ecs", lines)]
    assert len(entries) == 35
    for doc in docs:
        for field, value in _flatten(doc).items():
            if field.startswith("pymap."):
                continue  # pymap's custom namespace, as ECS advises for its own fields
            assert field in ecs_types, f"{field} is not an ECS field"
            assert _ecs_type_ok(ecs_types[field], value), \
                f"{field}={value!r} does not fit ECS type {ecs_types[field]}"
    for doc in entries:
        assert doc["ecs"]["version"].startswith("8.")
        assert doc["event"]["type"] == [{"added": "creation", "updated": "change",
                                         "removed": "deletion"}[doc["event"]["action"]]]
        p = doc["pymap"]
        assert p["map"]["name"] == name and p["map"]["type"] == "hash" and p["map"]["pinned"]
        assert p["formatted"]["key"]["id"] == int.from_bytes(bytes.fromhex(p["key"]), "little")
        assert "count" in p["formatted"]["value"] and len(p["value"]) == 16
        assert doc["host"]["name"]


def test_ocsf_output_validates_against_the_ocsf_schema(exported, ocsf_validator):
    import orjson

    name, all_lines, _ = exported
    lines = all_lines["ocsf"]
    docs = [orjson.loads(line) for line in lines]
    assert len(live("ocsf", lines)) == 35
    for doc in docs:
        errors = sorted(ocsf_validator.iter_errors(doc), key=str)
        assert not errors, f"{doc}: {[e.message for e in errors[:3]]}"
        assert doc["class_uid"] == 1003 and doc["category_uid"] == 1
        assert doc["type_uid"] == doc["class_uid"] * 100 + doc["activity_id"]
        assert doc["metadata"]["product"]["name"] == "pymap"
        p = doc["unmapped"]["pymap"]
        if p["action"] in ENTRY:
            assert doc["kernel"]["name"] == name and p["formatted"]["key"] is not None


def _cef_unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", "r": "\r"}.get(nxt, nxt))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def test_cef_parses_back_with_pycef(exported):
    import orjson
    import pycef

    name, all_lines, files = exported
    lines = all_lines["cef"]
    json_docs = [orjson.loads(line) for line in live("json", _lines(files["json"]))]
    assert all(pycef.parse(line.decode()) is not None for line in lines)
    entries = [pycef.parse(line.decode()) for line in live("cef", lines)]
    assert len(entries) == len(json_docs) == 35
    for p, doc in zip(entries, json_docs, strict=True):
        assert p["DeviceVendor"] == "pymap" and p["DeviceEventClassID"] == f"pymap:{p['act']}"
        assert p["act"] == doc["action"] and p["map"] == name and p["mapType"] == "hash"
        assert int(p["seq"]) == doc["seq"] and p["key"] == doc["key"]
        assert p["value"] == doc["value"]
        assert orjson.loads(_cef_unescape(p["decoded"]))["key"] == doc["formatted"]["key"]


def test_cef_escaping_survives_a_parser():
    """Header pipes and backslashes, extension '=' and line breaks, parsed back."""
    import pycef
    fmt = FORMATS["cef"]("1.0")
    ev = Event("resync", MapRef(7, "m"), time=1.0, reason="a=b \\ c\nd")
    line = fmt.payload(facts(ev, None, None, "host=x", "ep")).decode()
    assert "\n" not in line
    p = pycef.parse(line)
    assert _cef_unescape(p["dvchost"]) == "host=x"
    assert _cef_unescape(p["msg"]) == "resync of m: state re-read (a=b \\ c\nd)"
    from consumers.export.formats.cef import header

    assert header("a|b\\c") == "a\\|b\\\\c"


def test_every_format_carries_the_same_event_id(exported):
    """One id per event, the same in every format's own field (record_doc reads ECS
    event.id, OCSF metadata.uid, CEF externalId, the JSON lines' id), <node>.<epoch>.<seq>."""
    import socket

    _, all_lines, _ = exported
    docs = {fmt: [record_doc(fmt, line) for line in lines] for fmt, lines in all_lines.items()}
    # The 35 changes. The sentinel is left out: an exporter whose snapshot was still on its
    # way when the sentinel was written gets it inside the snapshot (seq 0), not live.
    ids = {fmt: {d["seq"]: d["id"] for d in ds if d["seq"] and d.get("key") != SENTINEL.hex()}
           for fmt, ds in docs.items()}
    assert len(ids["json"]) == 35, docs["json"]
    for fmt in FORMATS:
        assert ids[fmt] == ids["json"], (fmt, docs[fmt], docs["json"])
    assert all(d["id"] == f"{socket.gethostname()}.{d['epoch']}.{d['seq']}"
               for d in docs["json"] if d["seq"])
