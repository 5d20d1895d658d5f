"""TOML tables to attrs objects: one converter and one error line for every table pymap reads.

The daemon's config (``[daemon]``, ``[watch]``, ``[[sources]]``, ``[[layouts]]``
...) and the exporters' ``[[exports]]`` are all structured here, so a typo is
reported the same way wherever it is: ``config FILE: PATH: WHY``, with every
problem of the file on that one line, ``;``-separated.  PATH is the dotted key
(``daemon.stream_hwm``, ``watch.intervals[0]``); an element of an array of
tables carries its label, ``sources[0] (x.c)``, so the user finds it.

Strict on purpose: TOML has types, so a string is never read as a list of its
characters, ``"false"`` never as true, and ``true`` never as the number 1.

Here, beside the wire schema and ``tomlfile``, because both the daemon and the
consumers read tables and may import ``watcher/wire`` (docs/architecture.md).
Validation here is pure: nothing touches the host (see the daemon's resolve step).
"""

from __future__ import annotations

from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import list_structure_factory
from cattrs.gen import make_dict_structure_fn

T = TypeVar("T")

# Keys whose value names an element of an array of tables in error lines, in this order.
LABEL_KEYS = ("match", "program", "pin", "name")


class TableError(ValueError):
    """A table that cannot be used; the message is one line naming the key and why."""


def label(raw: object) -> str:
    """`` (x.c)`` for a table that names itself, else ``""``."""
    if isinstance(raw, dict):
        for key in LABEL_KEYS:
            value = raw.get(key)
            if isinstance(value, str) and value:
                return f" ({value})"
    return ""


def _list_of_str(value: Any, _type: Any) -> list[str]:
    # cattrs would turn "cilium_*" into ["c", "i", ...]: a one-glob typo must not watch everything.
    if isinstance(value, str):
        raise TableError(f"expected a list of strings, got the string {value!r} "
                         f"(write [{value!r}])")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TableError(f"expected a list of strings, got {value!r}")
    return list(value)


def _bool(value: Any, _type: Any) -> bool:
    # cattrs would take bool("false") == True: a switch is written true or false.
    if not isinstance(value, bool):
        raise TableError(f"expected true or false, got {value!r}")
    return value


def _int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TableError(f"expected an integer, got {value!r}")
    return value


def _float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TableError(f"expected a number, got {value!r}")
    return float(value)


def _str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TableError(f"expected a string, got {value!r}")
    return value


def _is_table(type_: Any) -> bool:
    """An attrs class, or a NewType over dict whose own hook validates it."""
    return attrs.has(type_) or getattr(type_, "__supertype__", None) is dict


def _is_list_of_tables(type_: Any) -> bool:
    args: tuple = getattr(type_, "__args__", ())
    return getattr(type_, "__origin__", None) is list and len(args) == 1 and _is_table(args[0])


def _tables_factory(type_: Any, converter: cattrs.Converter):
    each = list_structure_factory(type_, converter)

    def tables(value: Any, _type: Any) -> list:
        if not isinstance(value, list):
            raise TableError(f"must be an array of tables ([[...]]), not {value!r}")
        return each(value, type_)
    return tables


def table_hook(cls: type, converter: cattrs.Converter, **fields: Any):
    """The structure hook of an attrs class read from a table: refuses what is not a
    table and keys the class does not have; ``fields`` override single fields' hooks
    (``cattrs.gen.override``)."""
    build: Any = make_dict_structure_fn(cls, converter, _cattrs_forbid_extra_keys=True, **fields)

    def hook(value: Any, _type: Any) -> Any:
        if not isinstance(value, dict):
            raise TableError(f"expected a table, got {value!r}")
        return build(value, cls)
    return hook


def make_converter() -> cattrs.Converter:
    """A strict converter; a caller adds hooks for its own types (the daemon: file modes)."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook_func(lambda t: t == list[str], _list_of_str)
    for type_, hook in ((bool, _bool), (int, _int), (float, _float), (str, _str)):
        converter.register_structure_hook(type_, hook)
    converter.register_structure_hook_factory(_is_list_of_tables, _tables_factory)
    converter.register_structure_hook_factory(attrs.has, lambda cls: table_hook(cls, converter))
    return converter


converter = make_converter()


def structure(raw: object, cls: type[T], where: str, error: type[ValueError] = TableError) -> T:
    """``raw`` as a ``cls``, or ``error("WHERE: PATH: WHY; ...")`` (``where``: the file)."""
    try:
        return converter.structure(raw, cls)
    except Exception as e:  # cattrs groups every problem: one line for all of them
        raise error(f"{where}: " + "; ".join(describe(e, raw))) from None


def describe(error: BaseException, raw: object, path: str = "") -> list[str]:
    """Every leaf problem of a cattrs error tree as ``PATH: WHY`` (just WHY at the top)."""
    if isinstance(error, cattrs.ClassValidationError):
        with_notes, without = error.group_exceptions()
        out = [line for e in without for line in describe(e, raw, path)]
        for e, note in with_notes:
            sub = raw.get(note.name) if isinstance(raw, dict) else None
            out += describe(e, sub, f"{path}.{note.name}" if path else note.name)
        return out
    if isinstance(error, cattrs.IterableValidationError):
        with_inotes, iwithout = error.group_exceptions()
        out = [line for e in iwithout for line in describe(e, raw, path)]
        for e, inote in with_inotes:
            index = inote.index
            item = raw[index] if isinstance(raw, list) and isinstance(index, int) \
                and index < len(raw) else None
            out += describe(e, item, f"{path}[{inote.index}]{label(item)}")
        return out
    if isinstance(error, cattrs.BaseValidationError):
        return [line for e in error.exceptions for line in describe(e, raw, path)]
    why = _why(error)
    return [f"{path}: {why}" if path else why]


def _why(error: BaseException) -> str:
    if isinstance(error, cattrs.ForbiddenExtraKeysError):
        extra = sorted(error.extra_fields)
        keys = ", ".join(sorted(f.name for f in attrs.fields(error.cl)))
        which = f"key {extra[0]!r}" if len(extra) == 1 else "keys " + ", ".join(map(repr, extra))
        return f"unknown {which} (keys: {keys})"
    if isinstance(error, (ValueError, TypeError)) and error.args and isinstance(error.args[0], str):
        return error.args[0]  # our checks and attrs validators name the key and the rule
    return cattrs.v.format_exception(error, None)
