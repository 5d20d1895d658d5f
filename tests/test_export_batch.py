"""The exporter's batch fast path against the per-event definition, on real maps' events.

A real daemon streams changes of three real maps: one with a declared layout
(decoded ``formatted`` entries), one plain hash (hex only) and one per-CPU hash.
Two snapshot-mode subscribers follow them at once: one with ``entry_batches=True``
(the exporter's stream: an ``EntryBatch`` per message) and an ordinary one (an
``Event`` per change).  The test proves that (1) the batches expand to exactly
the ordinary stream's events and leave the same map state, and (2) every format renders each batch
byte-identically to rendering its events one by one, with the template path
really taken where it applies (everything but per-CPU values).
"""

from __future__ import annotations

import pytest
import trio
from support.events import FAST, LibFollower, await_ready, await_until
from support.kernel import pattern, token, u32

from consumers.client import Client
from consumers.eventjson import MapCache
from consumers.events import EntryBatch, Event
from consumers.export.formats import FORMATS, facts
from watcher.kernel.sys import syscall
from watcher.kernel.sys.cpus import possible_cpus

pytestmark = pytest.mark.kernel
LAYOUT = """
[[layouts]]
match = "exb*_dec"
key = [{ name = "id", type = "u32" }]
value = [{ name = "count", type = "u64" }]
"""


def _entry_tuples(events: list) -> list[tuple]:
    return [(e.action, e.map.name, e.seq, e.topic_seq, e.time, e.key, e.value, e.old_value)
            for e in events if e.key is not None]


async def test_batch_path_matches_the_per_event_path(daemon_factory, maps, bpffs_dir, tmp_path):
    conf = tmp_path / "pymap.toml"
    conf.write_text(LAYOUT)
    d = daemon_factory(*FAST, "-c", str(conf))
    base = f"exb{token()}"
    names = {"dec": f"{base}_dec", "hex": f"{base}_hex", "pcpu": f"{base}_pcpu"}
    fds = {
        "dec": maps.create("hash", 4, 8, 512, name=names["dec"], pin=bpffs_dir / names["dec"])[0],
        "hex": maps.create("hash", 4, 8, 512, name=names["hex"], pin=bpffs_dir / names["hex"])[0],
        "pcpu": maps.create("percpu_hash", 4, 8, 64, name=names["pcpu"],
                            pin=bpffs_dir / names["pcpu"])[0],
    }
    ncpus = possible_cpus()
    # Snapshot mode, as the exporter's stream: the batches must keep the same map state.
    batched = LibFollower(d.endpoint, list(names.values()), snapshot=True, entry_batches=True)
    plain = LibFollower(d.endpoint, list(names.values()), snapshot=True)
    async with Client(d.endpoint) as client, trio.open_nursery() as nursery:
        await nursery.start(batched.run)
        await nursery.start(plain.run)
        for name in names.values():
            await await_ready(client, name, subscribers=2)
        expected = 0
        for rnd in range(3):  # added, then updated, then some removed: each poll one batch
            for kind, fd in fds.items():
                size = 8 * ncpus if kind == "pcpu" else 8
                count = 40 if kind == "pcpu" else 300
                for i in range(count):
                    if rnd == 2 and i % 3:
                        continue
                    if rnd == 2:
                        syscall.map_delete_elem(fd, u32(i))
                    else:
                        syscall.map_update_elem(fd, u32(i), pattern(rnd * 1000 + i, size))
                    expected += 1
            await await_until(lambda n=expected: len(_entry_tuples(plain.events)) >= n,
                              f"{expected} events on the ordinary stream")

        def batch_events() -> list[Event]:
            return [e for v in batched.events if isinstance(v, EntryBatch) for e in v.events()]

        await await_until(lambda: len(batch_events()) >= expected, "the batches")
        assert batched.error is None and plain.error is None
        assert _entry_tuples(batch_events()) == _entry_tuples(plain.events)
        assert batched.stream is not None and plain.stream is not None
        assert batched.stream._state == plain.stream._state  # noqa: SLF001 (every map's state at once)
        assert len(batched.stream._state[names["hex"]]) == 200  # noqa: SLF001 (300 added, 100 removed)
        views = [v for v in batched.events if isinstance(v, EntryBatch)]
        assert {v.map.name for v in views} == set(names.values())
        assert any(v.message.count > 1 for v in views)

        cache = MapCache(client)
        for fmt_name, cls in FORMATS.items():
            form = cls("0.0-test")
            for view in views:
                info, decoder = await cache.lookup(Event("batch", view.map))
                assert info is not None
                fast = form.render_batch(view, info, decoder, "node-a", "epoch-1")
                slow = [form.render(facts(e, info, decoder, "node-a", "epoch-1"))
                        for e in view.events()]
                assert fast == slow, (fmt_name, view.map.name)
                if view.map.name == names["dec"]:
                    assert decoder is not None
            # Everything but the per-CPU map (and CEF's decoded entries) took templates.
            pcpu = sum(v.message.count for v in views if v.map.name == names["pcpu"])
            dec = sum(v.message.count for v in views if v.map.name == names["dec"])
            untemplated = pcpu + (dec if fmt_name == "cef" else 0)
            assert form._batch.templated == expected - untemplated, fmt_name
        nursery.cancel_scope.cancel()
