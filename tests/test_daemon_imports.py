"""What the daemon's process loads: its resident memory is mostly its modules
(issue 20: a daemon watching a 1M-entry map within 80 MB, of which the state
is 24 MB), so modules it does not need stay out of it.

A fresh interpreter each time: this test process has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

# Loaded only where used: the in-kernel engine's program builders (when watch.kernel_delta
# is not off), and no consumer-side module (the CLI's rendering, the exporters).
BUILDERS = ("watcher.kernel.kdelta.walker", "watcher.kernel.kdelta.programs",
            "watcher.kernel.kdelta.writers")
NOT_AT_START = (*BUILDERS, "watcher.kernel.kdelta.objects", "rich",
                "consumers.export", "consumers.top", "textual")


def loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\n"
                          "print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_daemon_modules_load_no_kernel_engine_and_no_consumer():
    loaded = loaded_after("import watcher.daemon.main")
    assert "watcher.daemon.engine" in loaded  # the import did happen
    assert not {m for m in loaded if m.startswith("consumers")}
    assert not loaded & set(NOT_AT_START)


def test_with_the_engine_off_its_program_builders_never_load():
    """Off: no broker, and the seccomp allow-list needs no kernel routes."""
    loaded = loaded_after(
        "from watcher.daemon.config import Config\n"
        "from watcher.daemon.diff import start_broker\n"
        "from watcher.daemon.privileges import allowed_bpf_commands\n"
        "config = Config()\n"
        "config.watch.kernel_delta = 'off'\n"
        "assert start_broker(config.watch) is None\n"
        "assert allowed_bpf_commands(config, None)\n")
    assert not loaded & set(BUILDERS)


# The CLI's parser and what it pulls in: `pymap daemon` parses its flags with them, then
# exec's `python -m watcher.daemon` (watcher/daemon/__main__.py), which never loads them.
CLI_ONLY = ("typer", "click", "rich", "shellingham")


def test_the_daemon_entry_point_loads_no_cli():
    loaded = loaded_after("import watcher.daemon.__main__\n"  # and what its _run imports:
                          "import trio, zmq, watcher.daemon.main, watcher.daemon.config")
    assert "watcher.daemon.__main__" in loaded
    assert not {m for m in loaded if m.split(".")[0] in CLI_ONLY or m.startswith("consumers")}


def test_pymap_daemon_hands_over_to_the_entry_point_with_its_errors_and_exit_codes(tmp_path):
    """The handover keeps the CLI's contract: a bad flag value is one line, exit 2."""
    pymap = [sys.executable, "-c", "import sys; from consumers.cli.app import main; "
             "sys.argv[0] = 'pymap'; main()"]
    proc = subprocess.run([*pymap, "daemon", "--socket-mode", "x9", "--endpoint",
                           f"ipc://{tmp_path}/s.sock"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr == "pymap: error: --socket-mode 'x9' is not an octal mode\n"
