"""CPU and time views end to end: real cgroups (cpuset / CFS quota / cpuacct on v1,
cpu.max and cpu.stat on v2), the real mount bound over /proc and /sys, and the real
getconf, Python, procps top and uptime inside."""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    ALL_VIEW_FILES,
    PYTHON,
    Container,
    Daemon,
    in_container,
    make_container,
    run_in_container,
)

from cgprocfs.resolve import PLACEMENT_MAX_AGE

ONLINE = len(os.sched_getaffinity(0))
BURN = [PYTHON, "-c", "import time\nt = time.time()\nwhile time.time() - t < 90: pass"]

COUNT_CPUS = (
    "getconf _NPROCESSORS_ONLN; getconf _NPROCESSORS_CONF; "
    f"{PYTHON} -c 'import os; print(os.cpu_count())'; "
    "grep -c ^processor /proc/cpuinfo; "
    "COLUMNS=512 top -1 -b -n1 | grep -o '%Cpu[0-9]*' | wc -l"
)


def counts(ct: Container, daemon: Daemon) -> list[int]:
    out = run_in_container(ct, daemon.mountpoint, ["sh", "-c", COUNT_CPUS],
                           views=ALL_VIEW_FILES)
    return [int(x) for x in out.split()]


def restrict_to_one_cpu(ct: Container) -> None:
    # v1: a cpuset; v2: a quota of one CPU (the two spellings of "one CPU").
    if ct.version == 1:
        ct.set_cpuset("0")
    else:
        ct.set_cpus(1.0)


def test_one_cpu_getconf_python_cpuinfo_top_agree(daemon: Daemon) -> None:
    with make_container(256 << 20, cpuset=True) as ct:
        restrict_to_one_cpu(ct)
        assert counts(ct, daemon) == [1, 1, 1, 1, 1]


def test_a_quota_of_one_and_a_half_cpus_shows_two(daemon: Daemon) -> None:
    with make_container(256 << 20) as ct:
        ct.set_cpus(1.5)
        want = min(ONLINE, 2)
        assert counts(ct, daemon) == [want] * 5


def test_a_quota_change_reaches_every_worker_within_the_placement_bound(
        daemon: Daemon) -> None:
    """Workers share each container's CPU placement (one looks it up, the others use it
    until PLACEMENT_MAX_AGE): a change must still show in every read after that bound."""
    if ONLINE < 2:
        pytest.skip(f"needs two online CPUs to see a quota change; this machine has {ONLINE}")
    loop = "for i in $(seq 40); do grep -c ^processor /proc/cpuinfo; done"
    with make_container(256 << 20) as ct:
        ct.set_cpus(1.0)
        before = run_in_container(ct, daemon.mountpoint, ["sh", "-c", loop],
                                  views=ALL_VIEW_FILES).split()
        ct.set_cpus(2.0)
        time.sleep(PLACEMENT_MAX_AGE + 0.2)
        after = run_in_container(ct, daemon.mountpoint, ["sh", "-c", loop],
                                 views=ALL_VIEW_FILES).split()
    assert before == ["1"] * 40
    assert after == ["2"] * 40


def top_us(ct: Container, daemon: Daemon) -> float:
    """%us of top's summary line on its last of three 1 s iterations inside `ct`."""
    out = run_in_container(ct, daemon.mountpoint, ["top", "-b", "-d1", "-n3"],
                           views=ALL_VIEW_FILES, timeout=60)
    lines = [ln for ln in out.splitlines() if ln.startswith("%Cpu(s)")]
    assert len(lines) == 3, out
    return float(re.search(r"([\d.]+) us", lines[-1]).group(1))  # type: ignore[union-attr]


@contextlib.contextmanager
def burning(ct: Container, daemon: Daemon, n: int = 1) -> Iterator[None]:
    """n processes in `ct` burning a CPU each, killed on the way out."""
    procs = [subprocess.Popen(in_container(ct, daemon.mountpoint, BURN, views=ALL_VIEW_FILES))
             for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_top_shows_a_burning_process_as_the_containers_full_cpu(daemon: Daemon) -> None:
    with make_container(256 << 20, cpuset=True) as ct:
        restrict_to_one_cpu(ct)
        with burning(ct, daemon):
            us = top_us(ct, daemon)
        assert 85 <= us <= 100, us


def test_top_shows_half_when_two_cpus_are_visible(daemon: Daemon) -> None:
    if ONLINE < 2:
        pytest.skip(f"needs 2 CPUs, this machine has {ONLINE}")
    with make_container(256 << 20, cpuset=True) as ct:
        ct.set_cpuset("0-1")
        with burning(ct, daemon):
            us = top_us(ct, daemon)
        assert 35 <= us <= 65, us


def test_an_idle_container_is_idle_while_another_burns(daemon: Daemon) -> None:
    with make_container(256 << 20) as busy, make_container(256 << 20) as idle:
        with burning(busy, daemon):
            us = top_us(idle, daemon)
        assert us <= 10, us


def test_uptime_in_a_new_container_is_its_own_age(daemon: Daemon) -> None:
    with make_container(256 << 20) as ct:
        out = run_in_container(ct, daemon.mountpoint,
                               ["sh", "-c", "sleep 1.2; cat /proc/uptime; uptime; nproc"],
                               views=ALL_VIEW_FILES, pid_ns=True)
        first, uptime_line, _ = out.splitlines()
        age, idle = (float(x) for x in first.split())
        host_age = float(Path("/proc/uptime").read_text().split()[0])
        assert 1.0 <= age < 30, out
        assert age < host_age - 1, (host_age, age)  # its own age, not the host's
        cpus = int(run_in_container(ct, daemon.mountpoint, ["getconf", "_NPROCESSORS_ONLN"],
                                    views=ALL_VIEW_FILES))
        assert 0 <= idle <= age * cpus + 0.02, out
        assert re.search(r"up\s+0 min", uptime_line), uptime_line


def test_stat_counters_never_decrease(daemon: Daemon) -> None:
    reader = (
        "prev = None\n"
        "for i in range(1000):\n"
        "    with open('/proc/stat') as f:\n"
        "        rows = [[int(x) for x in ln.split()[1:]] for ln in f if ln.startswith('cpu')]\n"
        "    if prev is not None:\n"
        "        for a, b in zip(prev, rows):\n"
        "            assert all(y >= x for x, y in zip(a, b)), (i, a, b)\n"
        "    prev = rows\n"
        "print('ok', len(prev))\n"
    )
    with make_container(256 << 20) as ct:
        ct.set_cpus(1.0)
        with burning(ct, daemon):
            out = run_in_container(ct, daemon.mountpoint, [PYTHON, "-c", reader],
                                   views=ALL_VIEW_FILES, timeout=120)
        assert out.split()[0] == "ok"
        assert int(out.split()[1]) == 1 + min(ONLINE, math.ceil(1.0))


def loadavg(ct: Container, daemon: Daemon) -> list[float]:
    out = run_in_container(ct, daemon.mountpoint, ["cat", "/proc/loadavg"],
                           views=ALL_VIEW_FILES)
    return [float(x) for x in out.split()[:3]]


def test_loadavg_follows_the_containers_runnable_threads(daemon: Daemon) -> None:
    """3 busy processes: the 1-minute load heads for 3 (above 2 at once and after 60 s of
    5 s samples) while an idle container's stays below 0.5 on the same, busy host."""
    with make_container(256 << 20) as busy, make_container(256 << 20) as idle:
        with burning(busy, daemon, 3):
            first = loadavg(busy, daemon)
            assert loadavg(idle, daemon)[0] < 0.5
            time.sleep(61)  # twelve sampling cycles
            later = loadavg(busy, daemon)
            quiet = loadavg(idle, daemon)
            uptime = run_in_container(busy, daemon.mountpoint, ["uptime"],
                                      views=ALL_VIEW_FILES)
        assert first[0] > 2, first
        assert later[0] > 2, later
        assert quiet[0] < 0.5, quiet
        assert re.search(r"load average: [2-3]\.\d\d", uptime), uptime


def test_htop_shows_the_containers_cpus_memory_uptime_and_load(daemon: Daemon) -> None:
    """htop -d 10 under tmux for a few seconds, in a container restricted to one CPU; the
    captured screen goes to the output."""
    import shlex

    if subprocess.run(["which", "tmux"], capture_output=True).returncode != 0:
        pytest.skip("tmux is not installed")
    with make_container(256 << 20, cpuset=True) as ct:
        restrict_to_one_cpu(ct)
        cmd = in_container(ct, daemon.mountpoint, ["htop", "-d", "10"], views=ALL_VIEW_FILES)
        session = f"cgprocfs-htop-{os.getpid()}"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "30",
                        "env TERM=xterm " + shlex.join(cmd)], check=True)
        try:
            time.sleep(3)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True, check=True).stdout
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        print(screen)
        # One CPU: htop draws a single "CPU[...]" meter, not one numbered meter per CPU.
        assert re.search(r"^\s*CPU\[", screen, re.M), screen
        assert not re.findall(r"^\s*\d+\[", screen, re.M), screen
        assert re.search(r"Mem\[.*/256M\]", screen), screen
        assert re.search(r"Uptime: 00:00:0\d", screen), screen
        assert "Load average:" in screen


def test_cpu_directory_shows_each_container_its_own_cpus(daemon: Daemon) -> None:
    """Two containers pinned to different CPUs each see one cpu0, and it is their own host
    CPU (its topology read through from the host's sysfs)."""
    if ONLINE < 2 or not Path("/sys/devices/system/cpu/cpu1/topology/core_id").exists():
        pytest.skip(f"needs 2 CPUs with topology in sysfs, this machine has {ONLINE}")
    script = ("ls /sys/devices/system/cpu | grep -c '^cpu[0-9]'; "
              "cat /sys/devices/system/cpu/cpu0/topology/core_id")
    with make_container(64 << 20, cpuset=True) as a, make_container(64 << 20, cpuset=True) as b:
        if a.version == 2 and "cpuset" not in a.dirs:
            pytest.skip("no cpuset controller here")
        a.set_cpuset("0")
        b.set_cpuset("1")
        for ct, host_cpu in ((a, 0), (b, 1), (a, 0)):
            out = run_in_container(ct, daemon.mountpoint, ["sh", "-c", script],
                                   views=ALL_VIEW_FILES).split()
            want = Path(f"/sys/devices/system/cpu/cpu{host_cpu}/topology/core_id").read_text()
            assert out == ["1", want.strip()], (host_cpu, out)


def test_vmstat_and_mpstat_inside_report_the_container(daemon: Daemon) -> None:
    """`vmstat 1 2`: free memory within the container's 256 MiB and the CPU columns from
    the container's /proc/stat; `mpstat` runs and counts the container's CPUs."""
    with make_container(256 << 20, cpuset=True) as ct:
        restrict_to_one_cpu(ct)
        out = run_in_container(ct, daemon.mountpoint,
                               ["sh", "-c", "vmstat 1 2; echo @@SPLIT@@; mpstat -P ALL"],
                               views=ALL_VIEW_FILES, timeout=60)
        vm, mp = out.split("@@SPLIT@@\n")
        rows = [ln.split() for ln in vm.splitlines() if ln.split() and ln.split()[0].isdigit()]
        assert len(rows) == 2, vm
        free_kb = int(rows[-1][3])
        assert 0 < free_kb <= 256 * 1024, vm
        us, sy, idle = (int(rows[-1][i]) for i in (12, 13, 14))
        assert idle >= 90 and us + sy <= 10, vm  # an idle container, whatever the host does
        assert "(1 CPU)" in mp, mp
        cpu_rows = [ln.split() for ln in mp.splitlines() if len(ln.split()) > 2]
        assert {r[1] for r in cpu_rows if r[1].isdigit()} == {"0"}, mp
