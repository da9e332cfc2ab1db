"""/proc/vmstat for a cgroup (design.md §4).

Same keys and order as the host's file. Gauges come from memory.stat converted to the
kernel's unit for that key; event counters are copied from the memory.stat key of the
same name; `oom_kill` comes from memory.events. A key with no cgroup source is 0.
"""

from __future__ import annotations

from cgprocfs.render.meminfo import memory_figures, stat_value
from cgprocfs.snapshot import HostMemory, MemoryView, RenderOptions

HPAGE_SIZE = 2 * 1024 * 1024

# vmstat gauge -> (v2 key, v1 key or None, unit). Units: "page" (bytes / page size),
# "kB" (nr_kernel_stack is kept in kB by the kernel), "thp" (huge pages).
GAUGES: dict[str, tuple[str, str | None, str]] = {
    "nr_inactive_anon": ("inactive_anon", "inactive_anon", "page"),
    "nr_active_anon": ("active_anon", "active_anon", "page"),
    "nr_inactive_file": ("inactive_file", "inactive_file", "page"),
    "nr_active_file": ("active_file", "active_file", "page"),
    "nr_unevictable": ("unevictable", "unevictable", "page"),
    "nr_slab_reclaimable": ("slab_reclaimable", None, "page"),
    "nr_slab_unreclaimable": ("slab_unreclaimable", None, "page"),
    "nr_anon_pages": ("anon", "rss", "page"),
    "nr_mapped": ("file_mapped", "mapped_file", "page"),
    "nr_file_pages": ("file", "cache", "page"),
    "nr_dirty": ("file_dirty", "dirty", "page"),
    "nr_writeback": ("file_writeback", "writeback", "page"),
    "nr_shmem": ("shmem", "shmem", "page"),
    "nr_kernel_stack": ("kernel_stack", None, "kB"),
    "nr_page_table_pages": ("pagetables", None, "page"),
    "nr_sec_page_table_pages": ("sec_pagetables", None, "page"),
    "nr_swapcached": ("swapcached", "swapcached", "page"),
    "nr_anon_transparent_hugepages": ("anon_thp", "rss_huge", "thp"),
    "nr_shmem_hugepages": ("shmem_thp", None, "thp"),
    "nr_file_hugepages": ("file_thp", None, "thp"),
}
# A cgroup has no zones: each per-zone LRU gauge is the cgroup's whole LRU list.
GAUGES.update({
    f"nr_zone_{lru}": GAUGES[f"nr_{lru}"]
    for lru in ("inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable")
})


def vmstat_values(host: HostMemory, view: MemoryView, opts: RenderOptions) -> dict[str, int]:
    page = host.page_size
    figures = memory_figures(host, view, opts)
    out: dict[str, int] = {}
    for key, (v2, v1, unit) in GAUGES.items():
        value = stat_value(view, v2, v1)
        divisor = {"kB": 1024, "thp": HPAGE_SIZE}.get(unit, page)
        out[key] = value // divisor
    out["nr_free_pages"] = figures["MemFree"] * 1024 // page
    out["nr_zone_write_pending"] = out["nr_dirty"] + out["nr_writeback"]
    for key in host.vmstat_keys:
        if key.startswith("nr_") or key in out:
            continue
        found = view.stat.get(key) if view.version == 2 else view.stat.get("total_" + key)
        if found is None and view.version == 1:
            found = view.stat.get(key)
        if found is not None:
            out[key] = max(0, found)
    out["oom_kill"] = view.oom_kill
    return out


def render_vmstat(host: HostMemory, view: MemoryView, opts: RenderOptions) -> bytes:
    values = vmstat_values(host, view, opts)
    return "".join(f"{k} {values.get(k, 0)}\n" for k in host.vmstat_keys).encode()
