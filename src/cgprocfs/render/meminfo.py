"""/proc/meminfo for a cgroup, and the memory figures every other view derives from.

This is where MemTotal, MemFree, MemAvailable, Cached, SwapTotal, ... are computed
(design.md §3). vmstat, swaps and the sysinfo(2) answer all take their numbers from
`memory_figures`, so they agree with meminfo by construction.
"""

from __future__ import annotations

from collections.abc import Mapping

from cgprocfs.snapshot import (
    HostMemory,
    MeminfoLayout,
    MemoryView,
    RenderOptions,
    meminfo_layout,
)

# Values that are equally true inside a container: sizes of host-wide pools and of the
# kernel's address space, not anybody's usage.
HOST_CONSTANTS = frozenset(
    {
        "VmallocTotal",
        "Hugepagesize",
        "HugePages_Total",
        "HugePages_Free",
        "HugePages_Rsvd",
        "HugePages_Surp",
        "Hugetlb",
        "DirectMap4k",
        "DirectMap2M",
        "DirectMap4M",
        "DirectMap1G",
    }
)

# meminfo key -> (cgroup v2 memory.stat key, cgroup v1 memory.stat key or None).
# v1 keys are looked up with their hierarchical `total_` prefix first.
STAT_FIELDS: dict[str, tuple[str, str | None]] = {
    "SwapCached": ("swapcached", "swapcached"),
    "Active(anon)": ("active_anon", "active_anon"),
    "Inactive(anon)": ("inactive_anon", "inactive_anon"),
    "Active(file)": ("active_file", "active_file"),
    "Inactive(file)": ("inactive_file", "inactive_file"),
    "Unevictable": ("unevictable", "unevictable"),
    "AnonPages": ("anon", "rss"),
    "Mapped": ("file_mapped", "mapped_file"),
    "Shmem": ("shmem", "shmem"),
    "Dirty": ("file_dirty", "dirty"),
    "Writeback": ("file_writeback", "writeback"),
    "Slab": ("slab", None),
    "SReclaimable": ("slab_reclaimable", None),
    "SUnreclaim": ("slab_unreclaimable", None),
    "KReclaimable": ("slab_reclaimable", None),
    "KernelStack": ("kernel_stack", None),
    "PageTables": ("pagetables", None),
    "SecPageTables": ("sec_pagetables", None),
    "Percpu": ("percpu", None),
    "AnonHugePages": ("anon_thp", "rss_huge"),
    "ShmemHugePages": ("shmem_thp", None),
    "FileHugePages": ("file_thp", None),
    "Zswap": ("zswap", None),
    "Zswapped": ("zswapped", None),
}


def stat_value(view: MemoryView, v2_key: str, v1_key: str | None) -> int:
    """One memory.stat figure in bytes, by exact key (never by prefix), 0 if absent."""
    stat = view.stat
    if view.version == 2:
        return max(0, stat.get(v2_key, 0))
    if v1_key is None:
        return 0
    value = stat.get("total_" + v1_key)
    if value is None:
        value = stat.get(v1_key, 0)
    return max(0, value)


# (meminfo key, memory.stat key) per version; v1 prefers the hierarchical total_ figure.
_V2_KEYS = tuple((k, v2) for k, (v2, _) in STAT_FIELDS.items())
_V1_KEYS = tuple((k, "total_" + v1, v1) for k, (_, v1) in STAT_FIELDS.items() if v1 is not None)
_V1_ABSENT = tuple(k for k, (_, v1) in STAT_FIELDS.items() if v1 is None)


def _stat_fields(view: MemoryView, cap: int) -> dict[str, int]:
    """All STAT_FIELDS at once, each at most `cap` (the hot path: one dict lookup per
    field, one dict built)."""
    get = view.stat.get
    if view.version == 2:
        return {k: min(max(0, get(v2, 0)), cap) for k, v2 in _V2_KEYS}
    out = dict.fromkeys(_V1_ABSENT, 0)
    for k, total, own in _V1_KEYS:
        value = get(total)
        out[k] = min(max(0, get(own, 0) if value is None else value), cap)
    return out


def memory_figures(host: HostMemory, view: MemoryView, opts: RenderOptions) -> dict[str, int]:
    """Every meminfo field for `view`, in kB (HugePages_* counts as the host has them).

    Guarantees 0 <= MemFree <= MemAvailable <= MemTotal, MemFree <= host MemFree,
    MemAvailable <= host MemAvailable, SwapFree <= SwapTotal,
    Buffers + Cached + SReclaimable <= MemTotal.
    """
    hm = host.meminfo_kb
    host_total = hm.get("MemTotal", 0) * 1024
    host_free = hm.get("MemFree", 0) * 1024
    host_avail = hm.get("MemAvailable", hm.get("MemFree", 0)) * 1024
    host_swap_total = hm.get("SwapTotal", 0) * 1024
    host_swap_free = hm.get("SwapFree", 0) * 1024

    total = host_total if view.limit is None else min(view.limit, host_total)
    free = min(max(0, total - view.usage), host_free)

    reclaimable = stat_value(view, "active_file", "active_file") \
        + stat_value(view, "inactive_file", "inactive_file") \
        + stat_value(view, "slab_reclaimable", None)
    avail = min(free + reclaimable, total, host_avail)
    free = min(free, avail)

    out = _stat_fields(view, total)
    out["Active"] = min(out["Active(anon)"] + out["Active(file)"], total)
    out["Inactive"] = min(out["Inactive(anon)"] + out["Inactive(file)"], total)
    # The kernel's Cached excludes the swap cache; v2's `file` counts it, v1's `cache` not.
    if view.version == 2:
        cached = stat_value(view, "file", None) - stat_value(view, "swapcached", None)
    else:
        cached = stat_value(view, "cache", "cache")
    # Buffers is 0: a cgroup has no separate buffer figure; block-device pages are in Cached.
    out["Buffers"] = 0
    out["Cached"] = max(0, min(cached, total - out["SReclaimable"]))

    if opts.hide_swap:
        swap_total = swap_free = 0
    else:
        swap_total = (
            host_swap_total if view.swap_limit is None
            else min(view.swap_limit, host_swap_total)
        )
        swap_free = min(max(0, swap_total - view.swap_usage), host_swap_free, swap_total)

    out.update(MemTotal=total, MemFree=free, MemAvailable=avail,
               SwapTotal=swap_total, SwapFree=swap_free)
    kb = {k: v // 1024 for k, v in out.items()}

    # The kernel's CommitLimit is MemTotal * overcommit_ratio / 100 + SwapTotal; recover
    # the ratio from the host's own figures so no extra file is read.
    host_total_kb = hm.get("MemTotal", 0)
    if host_total_kb > 0 and "CommitLimit" in hm:
        ratio = max(0, hm["CommitLimit"] - hm.get("SwapTotal", 0)) / host_total_kb
        kb["CommitLimit"] = int(kb["MemTotal"] * ratio) + kb["SwapTotal"]
    kb.update({key: hm[key] for key in HOST_CONSTANTS if key in hm})
    return kb


def render_meminfo(host: HostMemory, view: MemoryView, opts: RenderOptions) -> bytes:
    layout = host.layout or meminfo_layout(host.meminfo_text)
    return render_like_host(layout, memory_figures(host, view, opts))


def render_like_host(layout: MeminfoLayout, values: Mapping[str, int]) -> bytes:
    """The host's meminfo with each number replaced (0 where `values` has none), keeping
    its keys, order, column alignment and units, so every parser keeps working."""
    return layout.format(values).encode()
