"""Property tests: odd inputs never make a renderer raise, and the invariants of
design.md §3 always hold."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cgprocfs.render.meminfo import memory_figures, render_meminfo
from cgprocfs.render.swaps import render_swaps
from cgprocfs.render.vmstat import render_vmstat
from cgprocfs.snapshot import (
    HostMemory,
    MemoryView,
    OddCgroupData,
    RenderOptions,
    parse_flat_keyed,
    parse_limit,
    parse_meminfo,
)

FIXTURE = next(p for p in sorted((Path(__file__).parent.parent / "fixtures").iterdir())
               if (p / "proc/meminfo").exists())
TEMPLATE = (FIXTURE / "proc/meminfo").read_text()
VMSTAT_KEYS = tuple(ln.split()[0] for ln in (FIXTURE / "proc/vmstat").read_text().splitlines())
V1_HUGE = 9223372036854771712

STAT_KEYS_V2 = ["anon", "file", "kernel_stack", "pagetables", "percpu", "shmem", "file_mapped",
                "file_dirty", "file_writeback", "swapcached", "anon_thp", "file_thp",
                "shmem_thp", "inactive_anon", "active_anon", "inactive_file", "active_file",
                "unevictable", "slab_reclaimable", "slab_unreclaimable", "slab", "pgfault",
                "pgmajfault", "workingset_refault_file", "zswap", "zswapped"]
STAT_KEYS_V1 = [p + k for k in ("cache", "rss", "rss_huge", "shmem", "mapped_file", "dirty",
                                "writeback", "swap", "inactive_anon", "active_anon",
                                "inactive_file", "active_file", "unevictable", "pgfault",
                                "pgmajfault", "pgpgin") for p in ("", "total_")]

big = st.one_of(st.integers(0, 1 << 34), st.integers(0, 1 << 63), st.just(V1_HUGE), st.just(0))
limits = st.one_of(st.none(), st.just(0), st.integers(1, 1 << 40), st.just(V1_HUGE),
                   st.integers(1 << 40, 1 << 63))


@st.composite
def views(draw: st.DrawFn) -> MemoryView:
    version = draw(st.sampled_from([1, 2]))
    keys = STAT_KEYS_V2 if version == 2 else STAT_KEYS_V1
    stat = draw(st.dictionaries(st.sampled_from(keys), big, max_size=len(keys)))
    return MemoryView(
        version=version, cgroup="/x", limit=draw(limits), usage=draw(big), stat=stat,
        swap_limit=draw(limits), swap_usage=draw(big), oom_kill=draw(st.integers(0, 100)),
    )


@st.composite
def hosts(draw: st.DrawFn) -> HostMemory:
    total = draw(st.integers(1, 1 << 34))  # kB
    free = draw(st.integers(0, total))
    avail = draw(st.integers(0, total))
    swap = draw(st.integers(0, 1 << 30))
    swap_free = draw(st.integers(0, swap))
    kb = parse_meminfo(TEMPLATE)
    kb.update(MemTotal=total, MemFree=free, MemAvailable=avail, SwapTotal=swap,
              SwapFree=swap_free)
    text = "\n".join(f"{k}: {v} kB" for k, v in kb.items()) + "\n"
    return HostMemory(text, kb, VMSTAT_KEYS)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(hosts(), views(), st.booleans())
def test_invariants_hold_for_any_input(host: HostMemory, view: MemoryView, hide: bool) -> None:
    opts = RenderOptions(hide_swap=hide)
    f = memory_figures(host, view, opts)
    hm = host.meminfo_kb
    assert 0 <= f["MemFree"] <= f["MemAvailable"] <= f["MemTotal"] <= hm["MemTotal"]
    assert f["MemFree"] <= hm["MemFree"]
    assert f["MemAvailable"] <= hm["MemAvailable"]
    assert 0 <= f["SwapFree"] <= f["SwapTotal"] <= hm["SwapTotal"]
    assert f["MemTotal"] - f["MemAvailable"] >= 0  # procps "used"
    assert f["Buffers"] + f["Cached"] + f["SReclaimable"] <= f["MemTotal"]
    assert all(v >= 0 for v in f.values())
    if hide:
        assert f["SwapTotal"] == 0

    meminfo = render_meminfo(host, view, opts).decode()
    assert parse_meminfo(meminfo)["MemTotal"] == f["MemTotal"]
    vm = parse_flat_keyed(render_vmstat(host, view, opts).decode())
    page_kb = host.page_size // 1024
    assert abs(vm["nr_free_pages"] * page_kb - f["MemFree"]) < page_kb
    swaps = render_swaps(host, view, opts).decode().splitlines()
    if f["SwapTotal"] == 0:
        assert len(swaps) == 1
    else:
        size, used = (int(x) for x in swaps[1].split()[2:4])
        assert size == f["SwapTotal"] and used == f["SwapTotal"] - f["SwapFree"]


@given(st.text(max_size=40))
def test_limit_parser_raises_only_odd_cgroup_data(text: str) -> None:
    try:
        value = parse_limit(text)
    except OddCgroupData:
        return
    assert value is None or 0 <= value < 1 << 62


def test_limit_parser_knows_the_unlimited_spellings() -> None:
    assert parse_limit("max\n") is None
    assert parse_limit(f"{V1_HUGE}\n") is None
    assert parse_limit("268435456\n") == 268435456
    assert parse_limit("0") == 0


@given(st.text(max_size=300))
def test_flat_keyed_parser_never_raises(text: str) -> None:
    parse_flat_keyed(text)
    parse_meminfo(text)
