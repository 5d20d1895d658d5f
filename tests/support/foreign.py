"""A foreign writer: maps of the kinds pymap's routes differ on, filled and changed by
the test process as another program would, and a follower's replay of those changes
checked against bpftool (tests/test_degrade.py, tests/test_image.py)."""

from __future__ import annotations

from pathlib import Path

from watcher.kernel.asm.assembler import func_btf
from watcher.kernel.sys import create as progload
from watcher.kernel.sys import syscall
from watcher.kernel.sys.cpus import possible_cpus

from .events import Follower, replay_lines
from .kernel import bpftool_entries, pattern, percpu_value, u32, u64

ENGINE_ENTRIES = 65536  # the default watch.kernel_delta_min_entries


def btf_hash(maps, name: str, pin: Path) -> tuple[int, int]:
    """A hash map with BTF (``long`` keys and values), as a BPF loader would make it."""
    blob, _ = func_btf([("pymap_t", 0, True)])  # type 1 is a ``long``
    btf = progload.load_btf(blob)
    try:
        fd = syscall.map_create(1, 8, 8, 256, name=name, btf_fd=btf, btf_key_type_id=1,
                                btf_value_type_id=1)
    finally:
        syscall.os.close(btf)
    maps.fds.append(fd)
    syscall.obj_pin(fd, str(pin))
    return fd, syscall.map_info(fd).id


def make_maps(maps, bpffs_dir: Path, tag: str) -> dict[str, tuple[int, int]]:
    """One map per kind the routes differ on, filled by this process (a foreign writer)."""
    out = {}
    out["hash"] = maps.create("hash", 8, 16, ENGINE_ENTRIES, name=f"dg{tag}_h",
                              pin=bpffs_dir / f"dg{tag}_h")
    out["array"] = maps.create("array", 4, 8, ENGINE_ENTRIES, name=f"dg{tag}_a",
                               pin=bpffs_dir / f"dg{tag}_a")
    out["percpu"] = maps.create("percpu_hash", 4, 8, 128, name=f"dg{tag}_p",
                                pin=bpffs_dir / f"dg{tag}_p")
    out["btf"] = btf_hash(maps, f"dg{tag}_b", bpffs_dir / f"dg{tag}_b")
    for i in range(200):
        syscall.map_update_elem(out["hash"][0], u64(i), pattern(i, 16))
        syscall.map_update_elem(out["array"][0], u32(i), pattern(i, 8))
        syscall.map_update_elem(out["btf"][0], u64(i), u64(i * 3))
    for i in range(20):
        syscall.map_update_elem(out["percpu"][0], u32(i), percpu_value(8, [
            pattern(i * 16 + c, 8) for c in range(possible_cpus())]))
    return out


def write_foreign(made: dict[str, tuple[int, int]]) -> None:
    """Adds, updates and removes on every map, as another program would."""
    h, a, p, b = (made[k][0] for k in ("hash", "array", "percpu", "btf"))
    for i in range(5):
        syscall.map_update_elem(h, u64(1000 + i), pattern(1000 + i, 16))
        syscall.map_update_elem(a, u32(i), pattern(2000 + i, 8))
        syscall.map_update_elem(b, u64(i), u64(7777))
        syscall.map_update_elem(p, u32(i), percpu_value(8, [pattern(3000 + c, 8)
                                                            for c in range(possible_cpus())]))
    for i in range(10, 13):
        syscall.map_delete_elem(h, u64(i))
        syscall.map_delete_elem(b, u64(i))
        syscall.map_delete_elem(p, u32(i))


def replay_foreign_writes(f: Follower, made: dict[str, tuple[int, int]],
                          names: dict[str, str]) -> None:
    """:func:`write_foreign`, then wait until follower ``f`` replays every map's changes
    to exactly what bpftool dumps (``names``: the maps' names as the follower sees them)."""
    before = {k: bpftool_entries(map_id) for k, (_, map_id) in made.items()}
    write_foreign(made)
    after = {k: bpftool_entries(map_id) for k, (_, map_id) in made.items()}

    def replayed(lines: list[dict]) -> bool:
        return all(replay_lines([ln for ln in lines if ln["map"]["name"] == names[k]],
                                dict(before[k])) == after[k] for k in made)

    f.wait_for(replayed, "every map's changes, replayed to bpftool's dump")


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text
