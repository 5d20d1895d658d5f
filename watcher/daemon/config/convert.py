"""The daemon's own types on the one table converter (watcher/wire/tables.py).

File modes and declared layouts are written in TOML in ways no attrs validator
sees whole, so each has a structure hook; registering them here, once, keeps
the model free of cattrs.
"""

from __future__ import annotations

from ...decode.layout import LayoutError, validate_layout
from ...wire.tables import converter, structure
from .model import Config, ConfigError, FileMode, LayoutSpec


def _structure_mode(value, _type) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{value!r} is not a file mode (write 0o660 or \"0660\")")
    if isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ConfigError(f"{value!r} is not an octal mode") from None
    return value


def _structure_layout(value, _type) -> LayoutSpec:
    # Errors name the field; the converter's error line names the layout (layouts[0] (m)).
    try:
        return LayoutSpec(validate_layout(value).spec)
    except LayoutError as e:
        raise ConfigError(str(e)) from None


converter.register_structure_hook(FileMode, _structure_mode)
converter.register_structure_hook(LayoutSpec, _structure_layout)


def structure_config(data: dict, where: str) -> Config:
    """The whole file's tables as a :class:`Config`; every problem on one line."""
    return structure(data, Config, where, ConfigError)
