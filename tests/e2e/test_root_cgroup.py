"""A caller in the root cgroup (a plain host process) gets the host's files byte for byte.

On this project's host the test process sits in a non-root memory cgroup and tests never
move processes out of their subtree, so this runs in the guest lane (tests/guest), where
the test process is in the root cgroup of a real cgroup v2 hierarchy."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import Daemon, memory_hierarchy, own_cgroup_path


def _close_enough(before: bytes, mine: bytes, after: bytes) -> bool:
    """vmstat's counters move with every read (the reads fault pages): every value must lie
    within the host's before/after values, give or take 1 % + 64, key for key."""
    def parse(b: bytes) -> list[tuple[str, int]]:
        return [(k, int(v)) for k, v in (ln.split() for ln in b.decode().splitlines())]

    b, m, a = parse(before), parse(mine), parse(after)
    if [k for k, _ in m] != [k for k, _ in b]:
        return False
    for (_, vb), (_, vm), (_, va) in zip(b, m, a, strict=True):
        lo, hi = min(vb, va), max(vb, va)
        slack = hi // 100 + 64
        if not lo - slack <= vm <= hi + slack:
            return False
    return True


@pytest.mark.parametrize("name", ["proc/meminfo", "proc/vmstat", "proc/swaps", "proc/cpuinfo",
                                  "proc/uptime", "sys/devices/system/cpu/online"])
def test_root_cgroup_caller_gets_the_host_file(daemon: Daemon, name: str) -> None:
    version, _ = memory_hierarchy()
    if own_cgroup_path(version) != "/":
        pytest.skip("needs a test process in the root cgroup: runs in the guest lane "
                    "(tests/guest/test_v2_lane.py)")
    host = Path("/" + name)
    # The host's numbers move between any two reads: the mount's bytes must equal a host
    # read taken right before or right after (no rendering ever does by accident).
    for _ in range(200):
        before = host.read_bytes()
        mine = daemon.view(name).read_bytes()
        after = host.read_bytes()
        if mine in (before, after):
            return
        if name == "proc/vmstat" and _close_enough(before, mine, after):
            return
        if name == "proc/uptime":
            lo, hi = float(before.split()[0]), float(after.split()[0])
            if lo <= float(mine.split()[0]) <= hi:
                return
    pytest.fail(f"{name}: never byte-identical to the host's file\n{mine.decode()[:600]}")
