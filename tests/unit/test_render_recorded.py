"""Renderers against files recorded from real kernels (tests/fixtures/*, made by
tests/fixtures/record.py: v1 on the host, v2 in the user-mode-linux guest).

Expected values are computed here from the recorded memory.stat with the design table
(design.md §3) written out independently of the renderer, field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cgprocfs.cgroups import Hierarchy, parse_mountinfo, parse_proc_cgroup
from cgprocfs.render.meminfo import render_meminfo
from cgprocfs.render.swaps import render_swaps
from cgprocfs.render.vmstat import render_vmstat
from cgprocfs.resolve import memory_view_for_path
from cgprocfs.snapshot import HostMemory, MemoryView, RenderOptions, parse_meminfo

FIXTURES = sorted(
    p for p in (Path(__file__).resolve().parent.parent / "fixtures").iterdir()
    if (p / "meta.json").exists()
)
MiB = 1 << 20


def load(fx: Path, path_key: str = "path") -> tuple[dict, HostMemory, MemoryView, dict[str, int]]:
    meta = json.loads((fx / "meta.json").read_text())
    h = Hierarchy(meta["version"], str(fx / "cgroup"), "/", frozenset({"memory"}))
    path = meta[path_key]
    view = memory_view_for_path(h, path, path)
    assert view is not None
    text = (fx / "proc/meminfo").read_text()
    vmstat_keys = tuple(ln.split()[0] for ln in (fx / "proc/vmstat").read_text().splitlines())
    host = HostMemory(text, parse_meminfo(text), vmstat_keys,
                      (fx / "proc/swaps").read_text().splitlines(keepends=True)[0],
                      meta["page_size"])
    stat_file = fx / "cgroup" / view.cgroup.lstrip("/") / "memory.stat"
    stat = {k: int(v) for k, v in (ln.split() for ln in stat_file.read_text().splitlines())}
    return meta, host, view, stat


def kb(text: bytes) -> dict[str, int]:
    return parse_meminfo(text.decode())


# The design table, written out: meminfo key -> v2 expression / v1 expression (bytes).
V2 = {
    "Cached": lambda s: s["file"] - s["swapcached"],
    "SwapCached": lambda s: s["swapcached"],
    "Active": lambda s: s["active_anon"] + s["active_file"],
    "Inactive": lambda s: s["inactive_anon"] + s["inactive_file"],
    "Active(anon)": lambda s: s["active_anon"],
    "Inactive(anon)": lambda s: s["inactive_anon"],
    "Active(file)": lambda s: s["active_file"],
    "Inactive(file)": lambda s: s["inactive_file"],
    "Unevictable": lambda s: s["unevictable"],
    "AnonPages": lambda s: s["anon"],
    "Mapped": lambda s: s["file_mapped"],
    "Shmem": lambda s: s["shmem"],
    "Dirty": lambda s: s["file_dirty"],
    "Writeback": lambda s: s["file_writeback"],
    "Slab": lambda s: s["slab"],
    "SReclaimable": lambda s: s["slab_reclaimable"],
    "SUnreclaim": lambda s: s["slab_unreclaimable"],
    "KReclaimable": lambda s: s["slab_reclaimable"],
    "KernelStack": lambda s: s["kernel_stack"],
    "PageTables": lambda s: s["pagetables"],
    "SecPageTables": lambda s: s.get("sec_pagetables", 0),
    "Percpu": lambda s: s["percpu"],
    "AnonHugePages": lambda s: s.get("anon_thp", 0),
    "ShmemHugePages": lambda s: s.get("shmem_thp", 0),
    "FileHugePages": lambda s: s.get("file_thp", 0),
    "Zswap": lambda s: s.get("zswap", 0),
    "Zswapped": lambda s: s.get("zswapped", 0),
    "Buffers": lambda s: 0,
}
V1 = {
    "Cached": lambda s: s["total_cache"],
    "SwapCached": lambda s: s.get("total_swapcached", 0),
    "Active": lambda s: s["total_active_anon"] + s["total_active_file"],
    "Inactive": lambda s: s["total_inactive_anon"] + s["total_inactive_file"],
    "Active(anon)": lambda s: s["total_active_anon"],
    "Inactive(anon)": lambda s: s["total_inactive_anon"],
    "Active(file)": lambda s: s["total_active_file"],
    "Inactive(file)": lambda s: s["total_inactive_file"],
    "Unevictable": lambda s: s["total_unevictable"],
    "AnonPages": lambda s: s["total_rss"],
    "Mapped": lambda s: s["total_mapped_file"],
    "Shmem": lambda s: s["total_shmem"],
    "Dirty": lambda s: s["total_dirty"],
    "Writeback": lambda s: s["total_writeback"],
    "AnonHugePages": lambda s: s["total_rss_huge"],
    "Buffers": lambda s: 0,
    **{k: (lambda s: 0) for k in ("Slab", "SReclaimable", "SUnreclaim", "KReclaimable",
                                  "KernelStack", "PageTables", "SecPageTables", "Percpu",
                                  "ShmemHugePages", "FileHugePages", "Zswap", "Zswapped")},
}


@pytest.fixture(params=FIXTURES, ids=[p.name for p in FIXTURES])
def fx(request: pytest.FixtureRequest) -> Path:
    return request.param  # type: ignore[no-any-return]


def test_fixtures_cover_v1_and_v2() -> None:
    versions = {json.loads((p / "meta.json").read_text())["version"] for p in FIXTURES}
    assert versions == {1, 2}, f"recorded fixtures: {[p.name for p in FIXTURES]}"


def test_every_field_follows_the_design_table(fx: Path) -> None:
    meta, host, view, s = load(fx)
    out = kb(render_meminfo(host, view, RenderOptions()))
    table = V2 if meta["version"] == 2 else V1
    for key, expr in table.items():
        if key in out:
            assert out[key] == expr(s) // 1024, key
    hm = host.meminfo_kb
    usage = view.usage
    assert out["MemTotal"] == 200 * 1024  # the child's limit, below the parent's
    assert out["MemFree"] == min((200 * MiB - usage) // 1024, hm["MemFree"])
    file_ = (s["active_file"] + s["inactive_file"] if meta["version"] == 2
             else s["total_active_file"] + s["total_inactive_file"])
    slab = s.get("slab_reclaimable", 0) if meta["version"] == 2 else 0
    avail = min(200 * MiB - usage + file_ + slab, 200 * MiB, hm["MemAvailable"] * 1024)
    assert out["MemAvailable"] == avail // 1024
    # Every key, in the host's order; nothing the table does not name carries host usage.
    assert list(out) == list(hm)
    for key in ("VmallocTotal", "Hugepagesize", "HugePages_Total", "DirectMap4k"):
        if key in hm:
            assert out[key] == hm[key]
    for key in ("Committed_AS", "VmallocUsed", "Mlocked", "Bounce", "NFS_Unstable"):
        if key in out:
            assert out[key] == 0, key


def test_lxcfs_defects_are_absent(fx: Path) -> None:
    """LXCFS matches memory.stat keys by prefix: on v2 `file` swallows `file_mapped`
    (Mapped 0) and Dirty/Writeback are 0; on v1 `total_rss` swallows `total_rss_huge`
    (AnonHugePages 0). The recording workload made each of these non-zero."""
    meta, host, view, s = load(fx)
    out = kb(render_meminfo(host, view, RenderOptions()))
    if meta["version"] == 2:
        assert s["file_mapped"] > 0 and out["Mapped"] == s["file_mapped"] // 1024
        assert s["file_dirty"] > 0 and out["Dirty"] == s["file_dirty"] // 1024
        assert out["Mapped"] != out["Cached"]
    else:
        assert s["total_rss_huge"] > 0
        assert out["AnonHugePages"] == s["total_rss_huge"] // 1024
        assert out["AnonPages"] == s["total_rss"] // 1024


def test_layout_is_the_hosts(fx: Path) -> None:
    _, host, view, _ = load(fx)
    mine = render_meminfo(host, view, RenderOptions()).decode().splitlines()
    theirs = host.meminfo_text.splitlines()
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs, strict=True):
        # Same label, same column of the number's end, same unit.
        assert a.split(":")[0] == b.split(":")[0]
        assert len(a) == len(b) or len(a.split()[1]) > 8, (a, b)
        assert a.endswith(" kB") == b.endswith(" kB")


def test_parent_as_caller_sees_300_mib(fx: Path) -> None:
    _, host, view, _ = load(fx, "parent")
    assert kb(render_meminfo(host, view, RenderOptions()))["MemTotal"] == 300 * 1024


def test_usage_above_limit_does_not_underflow(fx: Path) -> None:
    _, host, view, _ = load(fx)
    over = view._replace(usage=view.limit + 50 * MiB if view.limit else 1 << 40)
    out = kb(render_meminfo(host, over, RenderOptions()))
    assert out["MemFree"] == 0
    assert 0 <= out["MemAvailable"] <= out["MemTotal"]


def test_vmstat_from_the_recording(fx: Path) -> None:
    meta, host, view, s = load(fx)
    page = meta["page_size"]
    mi = kb(render_meminfo(host, view, RenderOptions()))
    lines = render_vmstat(host, view, RenderOptions()).decode().splitlines()
    vm = {ln.split()[0]: int(ln.split()[1]) for ln in lines}
    assert [ln.split()[0] for ln in lines] == list(host.vmstat_keys)
    assert vm["nr_free_pages"] * page // 1024 == mi["MemFree"] - mi["MemFree"] % (page // 1024)
    v2 = meta["version"] == 2

    def get(k2: str, k1: str) -> int:
        # A kernel built without THP (the UML guest's) has no *_thp keys at all.
        return s.get(k2, 0) if v2 else s.get(k1, 0)

    assert vm["nr_anon_pages"] == get("anon", "total_rss") // page
    assert vm["nr_mapped"] == get("file_mapped", "total_mapped_file") // page
    assert vm["nr_file_pages"] == get("file", "total_cache") // page
    assert vm["nr_dirty"] == get("file_dirty", "total_dirty") // page
    assert vm["nr_shmem"] == get("shmem", "total_shmem") // page
    assert vm["nr_inactive_file"] == get("inactive_file", "total_inactive_file") // page
    assert vm["nr_anon_transparent_hugepages"] == get("anon_thp", "total_rss_huge") // (2 * MiB)
    assert vm["pgfault"] == get("pgfault", "total_pgfault")
    assert vm["pgmajfault"] == get("pgmajfault", "total_pgmajfault")
    if v2:
        assert vm["nr_kernel_stack"] == s["kernel_stack"] // 1024  # the kernel keeps kB
        assert vm["nr_slab_reclaimable"] == s["slab_reclaimable"] // page
        assert vm["workingset_refault_file"] == s["workingset_refault_file"]
    # Keys with no cgroup source are 0, not the host's.
    host_vm = {ln.split()[0]: int(ln.split()[1])
               for ln in (fx / "proc/vmstat").read_text().splitlines()}
    for key in ("pgalloc_normal", "pgfree", "nr_dirty_threshold", "numa_hit"):
        if key in vm:
            assert (vm[key] == 0 and host_vm[key] != 0) or host_vm[key] == 0, key


def test_swaps_agree_with_meminfo(fx: Path) -> None:
    _, host, view, _ = load(fx)
    # The recording host has no swap; give the view some, as a host with swap would.
    host_sw = HostMemory(
        host.meminfo_text.replace("SwapTotal:             0 kB", "SwapTotal:       2097148 kB")
        .replace("SwapFree:              0 kB", "SwapFree:        2097148 kB"),
        {**host.meminfo_kb, "SwapTotal": 2097148, "SwapFree": 2097148},
        host.vmstat_keys, host.swaps_header, host.page_size,
    )
    v = view._replace(swap_limit=64 * MiB, swap_usage=5 * MiB)
    mi = kb(render_meminfo(host_sw, v, RenderOptions()))
    assert (mi["SwapTotal"], mi["SwapFree"]) == (64 * 1024, 59 * 1024)
    lines = render_swaps(host_sw, v, RenderOptions()).decode().splitlines()
    assert lines[0] == host.swaps_header.rstrip("\n")
    size, used = lines[1].split()[2:4]
    assert (int(size), int(used)) == (64 * 1024, 5 * 1024)
    hidden = render_swaps(host_sw, v, RenderOptions(hide_swap=True)).decode().splitlines()
    assert len(hidden) == 1
    assert kb(render_meminfo(host_sw, v, RenderOptions(hide_swap=True)))["SwapTotal"] == 0


def test_recorded_mountinfo_and_cgroup_resolve(fx: Path) -> None:
    meta = json.loads((fx / "meta.json").read_text())
    hier = parse_mountinfo((fx / "proc/mountinfo").read_text())
    procs = parse_proc_cgroup((fx / "proc/workload.cgroup").read_text())
    mem = next(h for h in hier if "memory" in h.controllers) if meta["version"] == 1 else \
        next(h for h in hier if h.version == 2)
    assert procs.path_in(mem) == meta["path"]
    assert mem.directory(meta["path"]) == mem.mountpoint.rstrip("/") + meta["path"]


def test_layout_reproduces_the_host_text_exactly(fx: Path) -> None:
    from cgprocfs.snapshot import meminfo_layout

    text = (fx / "proc/meminfo").read_text()
    assert meminfo_layout(text).format(parse_meminfo(text)) == text


def test_layout_keeps_labels_and_units_literal() -> None:
    """The layout is a printf template: a label or unit with % or braces in it (none of
    today's kernels print one) must come out as written, never as a conversion."""
    from cgprocfs.snapshot import meminfo_layout

    text = "MemTotal:       16384 kB\nOdd%d{0}:           7 %s\nWide:     123456789012 kB\n"
    layout = meminfo_layout(text)
    assert layout.format(parse_meminfo(text)) == text
    assert layout.format({"MemTotal": 1}) == \
        "MemTotal:           1 kB\nOdd%d{0}:           0 %s\nWide:            0 kB\n"
