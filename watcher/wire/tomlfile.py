"""Reading a TOML file with a one-line error: one definition for the daemon's config,
the exporters' ``[[exports]]`` file and the CLI's ``--layout`` files.

Here, beside the wire schema, because both the daemon and the consumers may
import ``watcher/wire`` (docs/architecture.md) and neither may import the other.
"""

from __future__ import annotations

import tomllib


class TomlFileError(ValueError):
    """The file cannot be read or is not TOML; the message is one line, naming the file."""


def read_toml(path: str, what: str = "config") -> dict:
    """The tables of ``path``; ``what`` names the file in errors (``config``, ``layout file``)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise TomlFileError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise TomlFileError(f"{what} {path} is not valid TOML: {e}") from None
