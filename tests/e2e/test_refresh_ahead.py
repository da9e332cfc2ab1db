"""Refresh ahead: a worker with nothing to serve recomputes the CPU placements in use
before they expire, from the real cgroup files, so that requests find them fresh."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil
import pytest
from support import (
    ALL_VIEW_FILES,
    Container,
    make_container,
    run_in_container,
    running_daemon,
)

from cgprocfs.cgroups import load_layout
from cgprocfs.cpu import CpuPlacement
from cgprocfs.fuse.arena import Arena
from cgprocfs.resolve import PLACEMENT_REFRESH_AGE, Resolver

ONLINE = len(os.sched_getaffinity(0))


def worker(arena: Arena) -> Resolver:
    """What each FUSE worker builds: its own resolver, sharing placements in the arena."""
    r = Resolver(load_layout())
    r.share_placements(arena)
    return r


@contextmanager
def sleeper(ct: Container, pid_ns: bool) -> Iterator[int]:
    """A process in `ct` (in a new pid namespace, under an init of its own, if asked);
    yields its pid, kills it on the way out."""
    join = "; ".join(f"echo $$ > {p}" for p in ct.procs_files)
    inner = "exec unshare --pid --fork sh -c 'sleep 60 & wait'" if pid_ns else "exec sleep 60"
    proc = subprocess.Popen(["sh", "-c", f"{join}; {inner}"])
    try:
        deadline = time.monotonic() + 10
        pid = 0
        while not pid and time.monotonic() < deadline:
            pid = next((c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                        if c.name() == "sleep"), 0) if pid_ns else proc.pid
            if pid and psutil.Process(pid).name() != "sleep":
                pid = 0
            time.sleep(0.02)
        assert pid, "the sleeper did not start"
        yield pid
    finally:
        with suppress(psutil.NoSuchProcess):
            for child in psutil.Process(proc.pid).children(recursive=True):
                with suppress(psutil.NoSuchProcess):
                    child.kill()
        proc.kill()
        proc.wait(timeout=10)


def must_not_load(*args: object) -> CpuPlacement:
    raise AssertionError("the placement was loaded, not taken from the arena")


@pytest.mark.parametrize("pid_ns", [False, True], ids=["host-pid-ns", "own-pid-ns"])
def test_an_idle_worker_refreshes_placements_in_use_from_the_current_cgroup_files(
        root_fuse: None, pid_ns: bool) -> None:
    """The refreshed placement carries the cgroup's current quota (seen as a change of
    visible CPUs on a machine with two or more; with one, both quotas show one CPU)."""
    want_before, want_after = 1, min(ONLINE, 2)
    if ONLINE < 2:
        print(f"\none online CPU: the quota change cannot change the CPUs shown ({ONLINE})")
    arena = Arena.create(seats=3, slots_per_seat=2)
    leader, idle = worker(arena), worker(arena)
    with make_container(256 << 20) as ct:
        ct.set_cpus(1.0)
        with sleeper(ct, pid_ns) as pid:
            _, first = leader.cpu_placement(pid, with_cpus=True, with_start=True)
            assert first is not None and first.cpus is not None and len(first.cpus) == want_before
            assert (first.ns_init is not None) == pid_ns
            ct.set_cpus(2.0)
            assert idle.refresh_placements() == 0  # not due yet: loaded just now
            time.sleep(PLACEMENT_REFRESH_AGE + 0.05)
            assert idle.refresh_placements() == 1
            # Another worker takes the refreshed placement as it is: the new quota,
            # everything else as the leader computed it.
            third = worker(arena)
            third.cpu.placement = must_not_load  # type: ignore[method-assign]
            _, got = third.cpu_placement(pid, with_cpus=True, with_start=True)
            assert got is not None and got.cpus is not None and len(got.cpus) == want_after
            assert (got.cgroup, got.directory, got.ns_init, got.pidns) == \
                (first.cgroup, first.directory, first.ns_init, first.pidns)
            assert got.start == pytest.approx(first.start, abs=0.02)
        # The sleeper is gone: its pid namespace with it (own-pid-ns), or the cgroup has no
        # process left to date the container from (host-pid-ns). Nothing to refresh from:
        # the entry is left to expire, and no longer looked at.
        time.sleep(PLACEMENT_REFRESH_AGE + 0.05)
        assert idle.refresh_placements() == 0
        assert arena.due_shared(float("inf")) == []


def test_the_daemon_refreshes_a_pollers_placement_between_its_reads(root_fuse: None) -> None:
    """A real daemon: a parked worker refreshes the placement of a container that reads
    /proc/uptime and /proc/loadavg, and the container's answers stay right."""
    with running_daemon() as d, make_container(256 << 20) as ct:
        out = run_in_container(
            ct, d.mountpoint,
            ["sh", "-c", "for i in 1 2 3 4; do cat /proc/uptime /proc/loadavg; sleep 0.5; done"],
            views=ALL_VIEW_FILES, pid_ns=True)
        status = json.loads((d.mountpoint / ".cgprocfs-status").read_text())
        print(f"\nplacement refreshes: {status['placement_refreshes']}")
        assert status["placement_refreshes"] >= 1
        assert status["errors"] == 0
        uptimes = [float(ln.split()[0]) for ln in out.splitlines()[0::2]]
        assert len(uptimes) == 4 and uptimes == sorted(uptimes)
        assert uptimes[-1] < 30  # the container's age, not the host's
        assert "Traceback" not in d.log()
