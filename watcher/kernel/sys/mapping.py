"""Shared memory with the kernel: ``mmap(2)`` through ctypes.

Why not Python's :mod:`mmap`: the readers need the raw address of the mapping
(to read the producer position as one aligned 8-byte load through
``ctypes.c_uint64.from_address`` and to view the data pages with numpy
without copying), and Python's ``mmap`` object only exposes writable buffers
for ``from_buffer``; a ring buffer's data pages must be mapped read-only.
"""

from __future__ import annotations

import ctypes
import os

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class Mapping:
    """``length`` bytes of ``fd`` from ``offset``, shared with the kernel, until :meth:`close`."""

    def __init__(self, fd: int, length: int, prot: int, offset: int = 0, what: str = "mmap"):
        addr = _mmap(None, length, prot, MAP_SHARED, fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: mmap of {length} bytes at offset {offset} failed: "
                               f"{os.strerror(err)}")
        self.addr: int = addr
        self.length = length

    def u64(self, offset: int) -> ctypes.c_uint64:
        """An aligned 8-byte word of the mapping; each ``.value`` read is a fresh load."""
        return ctypes.c_uint64.from_address(self.addr + offset)

    def bytes_view(self, offset: int, length: int):
        """``length`` bytes from ``offset`` as a ctypes array (no copy)."""
        return (ctypes.c_uint8 * length).from_address(self.addr + offset)

    def close(self) -> None:
        if self.addr:
            _munmap(self.addr, self.length)
            self.addr = 0
