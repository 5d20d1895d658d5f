"""`--log-format json`: the daemon's own log as one JSON object per line."""

from __future__ import annotations

import datetime
import json
import signal

import pytest
from support.events import wait_until
from support.kernel import token

pytestmark = pytest.mark.kernel


def test_json_log_lines_carry_time_level_logger_message_and_fields(tmp_path, daemon_factory,
                                                                   maps):
    conf = tmp_path / "pymap.toml"
    name = f"lg_{token()}"
    conf.write_text(f'[watch]\nalways = ["{name}"]\ninterval = 0.2\n')
    maps.create("hash", 4, 8, 8, name=name)
    d = daemon_factory("-c", str(conf), "--log-format", "json")
    assert d.cli("get", f"nosuch_{token()}").returncode != 0  # logs an error reply
    conf.write_text("[watch\n")  # a broken config: the reload is refused
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.log.read_text(), "the refused reload in the log")
    wait_until(lambda: f"watching {name}" in d.log.read_text(), f"{name} watched")
    assert d.stop() == 0
    records = [json.loads(line) for line in d.log.read_text().splitlines()]  # every line
    for r in records:
        assert {"time", "level", "logger", "message"} <= r.keys(), r
        when = datetime.datetime.fromisoformat(r["time"])
        assert when.tzinfo is not None
        assert abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) < 600
    by_message = {r["message"].split(" ")[0]: r for r in records}
    assert by_message["pymap"]["logger"] == "pymap.daemon" and by_message["pymap"]["level"] == "INFO"
    watching = next(r for r in records if r["message"].startswith(f"watching {name}"))
    assert watching["map"] == name and watching["interval"] == 0.2
    error = next(r for r in records if r["message"].startswith("error reply"))
    assert error["code"] == "not_found"
    refused = next(r for r in records if r["message"].startswith("reload refused"))
    assert refused["level"] == "ERROR" and "not valid TOML" in refused["error"]
    assert records[-1]["message"] == "stopped"
