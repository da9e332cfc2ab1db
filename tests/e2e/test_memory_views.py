"""End to end: real cgroups, the real mount bound over /proc in a private mount namespace,
the real procps `free`/`vmstat` and psutil. Runs on whatever the machine has: cgroup v1
on the host, cgroup v2 in the user-mode-linux guest (tests/guest)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from support import (
    PYTHON,
    Cgroup,
    Daemon,
    MiB,
    in_container,
    make_cgroup,
    meminfo_kb,
    parse_free_b,
    run_in_container,
    scratch_dir,
)

AGENT = str(Path(__file__).with_name("agent.py"))


def host_meminfo() -> dict[str, int]:
    return meminfo_kb(Path("/proc/meminfo").read_text())


def agent(cg: Cgroup, daemon: Daemon, *steps: str) -> list[dict]:
    out = run_in_container(cg, daemon.mountpoint, [PYTHON, AGENT, *steps], timeout=120)
    return [json.loads(line) for line in out.splitlines()]


def test_free_vmstat_psutil_follow_the_cgroup(daemon: Daemon) -> None:
    """Issue scenario 1: a 300 MiB cgroup; anonymous memory shows as used, a written file
    as buff/cache with `available` unchanged."""
    scratch = scratch_dir() / f"cgprocfs-pagecache-{uuid.uuid4().hex[:8]}"
    with make_cgroup(300 * MiB) as cg:
        try:
            r = agent(cg, daemon, "free", "alloc", "100", "free", "write", "100", str(scratch),
                      "free", "vmstat", "psutil", "free", "cat",
                      str(cg.dir / ("memory.current" if cg.version == 2
                                    else "memory.usage_in_bytes")))
        finally:
            scratch.unlink(missing_ok=True)
        f0, f1, f2 = (parse_free_b(r[i]["free"]) for i in (0, 2, 4))
        assert f0["total"] == 314572800, r[0]["free"]
        grew = f1["used"] - f0["used"]
        assert 0.9 * 100 * MiB <= grew <= 1.1 * 100 * MiB, (r[0], r[2])
        # The page-cache case: the file is buff/cache, not used, and available holds.
        assert f2["buff/cache"] - f1["buff/cache"] >= 80 * MiB, (r[2], r[4])
        assert abs(f2["available"] - f1["available"]) <= 0.1 * f1["available"], (r[2], r[4])
        assert f2["used"] - f1["used"] < 10 * MiB
        vm = r[5]["vmstat"]
        assert f"{314572800 // 1024} K total memory" in vm, vm
        ps, f3 = r[6]["psutil"], parse_free_b(r[7]["free"])
        assert ps["total"] == 314572800
        # Taken moments apart: agree to within 2 MiB.
        assert abs(ps["available"] - f3["available"]) < 2 * MiB, (ps, f3)
        assert abs(ps["free"] - f3["free"]) < 2 * MiB, (ps, f3)
        # And the numbers are the cgroup's own: usage as the kernel counts it.
        usage = int(r[8]["cat"])
        assert f3["total"] - f3["free"] == pytest.approx(usage, abs=8 * MiB)


def test_sub_cgroup_limit_wins(daemon: Daemon) -> None:
    """Issue scenario 2: a 200 MiB sub-cgroup of a 300 MiB cgroup sees 200 MiB."""
    with make_cgroup(300 * MiB) as parent:
        child = parent.child("inner", 200 * MiB)
        text = run_in_container(child, daemon.mountpoint, ["cat", "/proc/meminfo"])
        assert meminfo_kb(text)["MemTotal"] == 200 * 1024
        free = parse_free_b(run_in_container(child, daemon.mountpoint, ["free", "-b"]))
        assert free["total"] == 200 * MiB


def test_no_limit_on_path_sees_host_total_and_own_usage(daemon: Daemon) -> None:
    with make_cgroup(None) as cg:
        text = run_in_container(cg, daemon.mountpoint, ["cat", "/proc/meminfo"])
        mine, host = meminfo_kb(text), host_meminfo()
        assert mine["MemTotal"] == host["MemTotal"]
        # Never promise more than the host has.
        assert mine["MemFree"] <= host["MemFree"] + 16 * 1024
        assert mine["MemAvailable"] <= host["MemAvailable"] + 16 * 1024
        # Its own usage figures, not the host's: a fresh cgroup holds only a few MiB.
        lru = mine["Active"] + mine["Inactive"]
        assert lru < 32 * 1024
        assert lru < host["Active"] + host["Inactive"]


def test_two_cgroups_reading_concurrently_never_cross(daemon: Daemon) -> None:
    """Issue scenario 3: two cgroups with different limits, 10,000+ reads in all."""
    reader = (
        "import sys\n"
        "want = sys.argv[1]\n"
        "for i in range(int(sys.argv[2])):\n"
        "    with open('/proc/meminfo') as f:\n"
        "        line = f.readline()\n"
        "    if want not in line:\n"
        "        print('WRONG', i, line.strip()); sys.exit(1)\n"
        "print('OK')\n"
    )
    n = 5000
    with make_cgroup(100 * MiB) as a, make_cgroup(150 * MiB) as b:
        procs = [
            subprocess.Popen(in_container(cg, daemon.mountpoint,
                                          [PYTHON, "-c", reader, f" {want} kB", str(n)]),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for cg, want in ((a, 100 * 1024), (b, 150 * 1024))
        ]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all(o.strip().endswith("OK") for o in outs), outs


def test_swap_views_agree(daemon: Daemon) -> None:
    """/proc/swaps and meminfo's swap figures come from the same numbers; a cgroup limited
    to memory-plus-swap == memory sees no swap."""
    with make_cgroup(256 * MiB) as cg:
        cg.set_swap(256 * MiB, 256 * MiB)
        r = agent(cg, daemon, "free", "cat", "/proc/swaps", "cat", "/proc/meminfo")
        free = parse_free_b(r[0]["free"])
        assert free["swap_total"] == 0
        swaps = r[1]["cat"].splitlines()
        assert swaps[0].startswith("Filename")
        assert len(swaps) == 1, swaps
        mi = meminfo_kb(r[2]["cat"])
        assert mi["SwapTotal"] == mi["SwapFree"] == 0


def test_vmstat_keys_match_host_and_free_pages_match_meminfo(daemon: Daemon) -> None:
    with make_cgroup(200 * MiB) as cg:
        r = agent(cg, daemon, "cat", "/proc/vmstat", "cat", "/proc/meminfo")
        vm_lines = r[0]["cat"].splitlines()
        host_keys = [ln.split()[0] for ln in Path("/proc/vmstat").read_text().splitlines()]
        assert [ln.split()[0] for ln in vm_lines] == host_keys
        vm = {ln.split()[0]: int(ln.split()[1]) for ln in vm_lines}
        mi = meminfo_kb(r[1]["cat"])
        # One page of slack: the two files were rendered at two opens.
        assert abs(vm["nr_free_pages"] * 4 - mi["MemFree"]) <= 64 * 4
        assert vm["nr_free_pages"] * 4 <= 200 * 1024
        # Counters come from the cgroup, not the host.
        host_vm = {ln.split()[0]: int(ln.split()[1])
                   for ln in Path("/proc/vmstat").read_text().splitlines()}
        assert vm["pgfault"] < host_vm["pgfault"]
        stat = cg.stat()
        key = "pgfault" if cg.version == 2 else "total_pgfault"
        assert vm["pgfault"] <= stat[key]
