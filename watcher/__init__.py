"""pymap's host side: what runs beside the kernel and serves the stream.

Four floors, each importing only the ones below it (``tests/test_layers.py`` checks):

* :mod:`.kernel` -- syscalls, maps, BTF, buffers, the in-kernel engine's programs;
* :mod:`.decode` -- turning map bytes into values (BTF, Cilium layouts, declared layouts);
* :mod:`.wire` -- the protocol and the sockets, shared with every client;
* :mod:`.daemon` -- the daemon itself: what to watch, polling, publishing, serving.

The clients (CLI, library, exporters, fleet) are the separate package :mod:`consumers`,
the floor above all four.
"""
