"""CPU renderers and parsers: odd inputs never raise, invariants always hold."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cgprocfs.cpu import (
    CLK_TCK,
    CpuView,
    StartTimes,
    format_cpu_list,
    parse_cpu_list,
    parse_quota,
    visible_count,
)
from cgprocfs.render.cpu import (
    CpuTimes,
    cpu_times,
    parse_host_stat,
    render_cpu_list,
    render_cpuinfo,
    render_stat,
    render_uptime,
)
from cgprocfs.snapshot import OddCgroupData

HOST_STAT = parse_host_stat(
    "cpu  1 2 3 4 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 5 1 2 3\nctxt 9\n"
    "btime 1700000000\nprocesses 3\nprocs_running 1\nprocs_blocked 0\nsoftirq 4 1 1 1 1\n"
)
CPUINFO = "".join(
    f"processor\t: {i}\nvendor_id\t: Test\nphysical id\t: 0\nsiblings\t: 4\ncore id\t\t: {i}\n"
    f"cpu cores\t: 4\napicid\t\t: {i}\n\n" for i in range(4)
)


@st.composite
def cpu_views(draw: st.DrawFn) -> CpuView:
    cpus = tuple(sorted(draw(st.sets(st.integers(0, 63), min_size=1, max_size=16))))
    now = draw(st.floats(0, 1e7, allow_nan=False))
    start = draw(st.floats(0, 1e7, allow_nan=False))
    return CpuView(
        version=draw(st.sampled_from([1, 2])), cgroup="/x", cpus=cpus,
        user_us=draw(st.integers(0, 1 << 60)), system_us=draw(st.integers(0, 1 << 60)),
        start=start, now=now, running=draw(st.integers(0, 1000)),
        blocked=draw(st.integers(0, 1000)), threads=draw(st.integers(0, 10000)),
    )


@given(cpu_views())
def test_renderings_never_raise_and_keep_their_invariants(view: CpuView) -> None:
    times = cpu_times(view)
    assert min(times.user, times.system, times.idle) >= 0
    n = len(view.cpus)
    stat = render_stat(HOST_STAT, view, times).decode().splitlines()
    cpu_rows = [ln.split() for ln in stat if ln.startswith("cpu")]
    assert [r[0] for r in cpu_rows] == ["cpu"] + [f"cpu{i}" for i in range(n)]
    total = [int(x) for x in cpu_rows[0][1:]]
    per_cpu = [[int(x) for x in r[1:]] for r in cpu_rows[1:]]
    # The per-CPU rows add up to the summary row, field by field.
    assert [sum(col) for col in zip(*per_cpu, strict=True)] == total
    assert len(total) == 10
    age_s, idle_s = (float(x) for x in render_uptime(view, times).split())
    assert age_s >= 0 and idle_s >= 0
    assert idle_s <= max(0.0, view.now - view.start) * n + 0.01
    assert render_cpu_list(view) == f"{format_cpu_list(n)}\n".encode()
    info = render_cpuinfo(CPUINFO, view).decode()
    assert [int(ln.split(":")[1]) for ln in info.splitlines() if ln.startswith("processor")] \
        == list(range(n))


@given(cpu_views(), st.integers(0, 1 << 40), st.floats(0, 1e5, allow_nan=False))
def test_counters_only_move_forward(view: CpuView, more_us: int, later: float) -> None:

    first = cpu_times(view)
    second = cpu_times(view._replace(user_us=view.user_us + more_us, now=view.now + later))
    shown = second.at_least(first)
    assert shown.user >= first.user and shown.system >= first.system
    assert shown.idle >= first.idle


def test_a_cgroup_younger_than_one_tick() -> None:
    view = CpuView(2, "/x", (0,), 0, 0, start=100.0, now=100.0 + 0.5 / CLK_TCK)
    assert cpu_times(view) == CpuTimes(0, 0, 0)
    age, idle = (float(x) for x in render_uptime(view, cpu_times(view)).split())
    assert age <= 0.01 and idle == 0


@pytest.mark.parametrize(("cpuset", "quota", "want"), [
    ([0, 1, 2, 3], None, 4),
    ([0, 1, 2, 3], 1.5, 2),
    ([0, 1, 2, 3], 0.5, 1),  # below one CPU: still one
    ([0, 1], 8.0, 2),  # the cpuset binds
    ([], None, 1),  # empty cpuset (all offline): never zero CPUs
    ([3], 2.0, 1),
])
def test_visible_count(cpuset: list[int], quota: float | None, want: int) -> None:
    assert visible_count(cpuset, quota) == want


def test_quota_spellings() -> None:
    assert parse_quota("max 100000\n", 2) is None
    assert parse_quota("150000 100000\n", 2) == 1.5
    assert parse_quota("-1\n", 1, "100000\n") is None
    assert parse_quota("50000\n", 1, "100000\n") == 0.5
    with pytest.raises(OddCgroupData):
        parse_quota("garbage", 2)
    with pytest.raises(OddCgroupData):
        parse_quota("100 0", 2)


@given(st.text(max_size=30))
def test_cpu_list_parser_raises_only_odd_cgroup_data(text: str) -> None:
    with contextlib.suppress(OddCgroupData):
        parse_cpu_list(text)


def test_cpu_list_round_trip() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("") == []
    assert format_cpu_list(1) == "0" and format_cpu_list(4) == "0-3"


def test_host_stat_layout_of_this_machine() -> None:
    host = parse_host_stat(Path("/proc/stat").read_text())
    assert host.cpu_fields >= 8 and host.btime > 0


def test_start_times_are_kept_per_proc_inode_and_reread_for_a_new_one() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        starts = StartTimes()
        first = starts.of(child.pid)
        assert first == int(Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1]
                            .split()[19]) / CLK_TCK
        ino, _ = starts._known[child.pid]
        # What a reused pid looks like: /proc/PID is another inode. The cached start
        # (made wrong here on purpose) is not used for it; it is read again.
        starts._known[child.pid] = (ino + 1, first + 1000)
        assert starts.of(child.pid) == first
        starts._known[child.pid] = (ino, first + 1000)  # same inode: kept, not read
        assert starts.of(child.pid) == first + 1000
    finally:
        child.kill()
        child.wait()
    with pytest.raises(FileNotFoundError):
        starts.of(child.pid)
