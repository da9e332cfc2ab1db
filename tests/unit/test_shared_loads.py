"""A worker's view of the load sampler's table: what it keeps per container is forgotten
once it no longer matters, so containers removed long ago do not pile up in it."""

from __future__ import annotations

import socket

import pytest

from cgprocfs.fuse import loads
from cgprocfs.fuse.arena import Arena
from cgprocfs.fuse.loads import SharedLoads


def test_reminders_older_than_their_period_are_forgotten_at_the_next_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    arena = Arena.create(seats=1, slots_per_seat=4)
    ours, sampler = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    shared = SharedLoads(arena, ours.fileno())
    clock = [1000.0]
    monkeypatch.setattr(loads.time, "monotonic", lambda: clock[0])
    for i in range(50):  # containers seen once, then removed
        shared._refresh(f"/sys/fs/cgroup/cpuacct/gone-{i}", 1, 0)
    assert sampler.recv(256).startswith(b"1:/sys/fs/cgroup/cpuacct/gone-0\0")
    assert len(shared._reminded) == 50
    clock[0] += loads.REMIND_EVERY - 1
    shared._refresh("/sys/fs/cgroup/cpuacct/live", 1, 0)
    arena.publish_loads({})  # a new table: the worker takes it at its next read
    clock[0] += 2  # the first 50 reminders are now older than REMIND_EVERY
    shared._refresh("/sys/fs/cgroup/cpuacct/live", 1, 0)
    assert set(shared._reminded) == {"1:/sys/fs/cgroup/cpuacct/live"}
    ours.close()
    sampler.close()
