"""A READ replayed by the successor of a killed worker (it may have been answered already)
never renders the handle again: the reader may hold the first answer, and a second
rendering of another length would hand it a tail of other bytes at its next offset."""

from __future__ import annotations

import os

from cgprocfs.cgroups import load_layout
from cgprocfs.fs import ViewsFS
from cgprocfs.fuse import abi
from cgprocfs.fuse.arena import Arena
from cgprocfs.resolve import Resolver
from cgprocfs.views import Renderer, available_views


def test_a_replayed_read_at_zero_keeps_the_bytes_a_new_read_renders_again() -> None:
    arena = Arena.create(seats=1, slots_per_seat=4)
    fs = ViewsFS(Renderer(Resolver(load_layout())), available_views(), arena, 0)
    inode = next(i for i, n in fs.nodes.items() if n.path == "proc/uptime")
    pid = os.getpid()
    fs.unique = 2
    fh = abi.OPEN_OUT.unpack(fs.open(inode, pid, memoryview(abi.OPEN_IN.pack(os.O_RDONLY, 0))))[0]
    read_at_zero = memoryview(abi.READ_IN.pack(fh, 0, 65536))

    def rendering() -> bytes:
        start, length, *_ = arena.lookup(fh)  # type: ignore[misc]
        return bytes(arena.mem[start : start + length])

    fs.unique = 4
    first = bytes(fs.read(inode, pid, read_at_zero))
    arena.replace(fh, b"9" * 40, 4)  # what request 4 left, rendered before the kill
    fs.unique = 4  # the same request again, as a successor replays it
    assert bytes(fs.read(inode, pid, read_at_zero)) == b"9" * 40
    assert rendering() == b"9" * 40
    fs.unique = 6  # a new read at 0 by the opener: a new look, rendered again
    again = bytes(fs.read(inode, pid, read_at_zero))
    assert again != b"9" * 40 and len(again.split()) == len(first.split()) == 2
    assert rendering() == again
    assert arena.last_reader(fh) == 6
