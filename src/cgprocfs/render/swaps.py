"""/proc/swaps for a cgroup: the header, then one line for the container's swap when it
has any (never the host's devices). Sizes in kB, the same numbers as meminfo's."""

from __future__ import annotations

from cgprocfs.render.meminfo import memory_figures
from cgprocfs.snapshot import HostMemory, MemoryView, RenderOptions


def render_swaps(host: HostMemory, view: MemoryView, opts: RenderOptions) -> bytes:
    figures = memory_figures(host, view, opts)
    total, free = figures["SwapTotal"], figures["SwapFree"]
    text = host.swaps_header
    if total > 0:
        used = total - free
        # The kernel's layout: name padded to 40 columns, tab-separated numbers.
        name = "none"
        tab_t = "\t" if total < 10000000 else ""
        tab_u = "\t" if used < 10000000 else ""
        text += f"{name}{' ' * (40 - len(name))}virtual\t{total}\t{tab_t}{used}\t{tab_u}-1\n"
    return text.encode()
