"""The files cgprocfs serves: one table, used by the FUSE layer, `show`, `run` and
`docker-args`, so the list of views never drifts between them."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cgprocfs.cgroups import read_optional, read_small
from cgprocfs.cpu import CpuView
from cgprocfs.loadavg import LoadSource, LoadTracker
from cgprocfs.render.cpu import (
    CpuTimes,
    cpu_times,
    render_cpu_list,
    render_cpuinfo,
    render_stat,
    render_uptime,
)
from cgprocfs.render.io import (
    IoStats,
    parse_blkio,
    parse_io_stat,
    render_block_stat,
    render_diskstats,
)
from cgprocfs.render.meminfo import render_meminfo
from cgprocfs.render.swaps import render_swaps
from cgprocfs.render.vmstat import render_vmstat
from cgprocfs.resolve import CpuSnapshot, Resolver
from cgprocfs.snapshot import HostMemory, MemoryView, OddCgroupData, RenderOptions
from cgprocfs.ttl import WhileCgroupExists

log = logging.getLogger(__name__)

MemoryRenderer = Callable[[HostMemory, MemoryView, RenderOptions], bytes]


class CpuContext(NamedTuple):
    """Everything a CPU view renders from."""

    view: CpuView
    snap: CpuSnapshot
    times: CpuTimes


CpuRenderer = Callable[[CpuContext], bytes]
# (container cgroup directory, cgroup version, host file text) -> bytes
CgroupRenderer = Callable[[str, int, str], bytes]


def _io_stats(d: str, version: int) -> IoStats:
    if version == 2:
        return parse_io_stat(read_optional(f"{d}/io.stat") or "")
    return parse_blkio(_blkio(d, "io_service_bytes"), _blkio(d, "io_serviced"))


def _blkio(d: str, name: str) -> str:
    # The _recursive files include descendant cgroups; older kernels lack them.
    text = read_optional(f"{d}/blkio.throttle.{name}_recursive")
    return text if text is not None else read_optional(f"{d}/blkio.throttle.{name}") or ""


def _diskstats(d: str, version: int, host_text: str) -> bytes:
    return render_diskstats(host_text, _io_stats(d, version))


def _block_stat(devno: tuple[int, int]) -> CgroupRenderer:
    def render(d: str, version: int, host_text: str) -> bytes:
        return render_block_stat(host_text, devno, _io_stats(d, version))

    return render


def block_views(sys_block: str = "/sys/block") -> tuple[View, ...]:
    """/sys/block/<dev>/stat for each block device of this host (sysstat's iostat reads
    these, not /proc/diskstats)."""
    out = []
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return ()
    for name in names:
        try:
            major, _, minor = read_small(f"{sys_block}/{name}/dev").strip().partition(":")
            devno = (int(major), int(minor))
        except (OSError, ValueError):
            continue
        out.append(View(f"sys/block/{name}/stat", f"{sys_block}/{name}/stat",
                        cgroup_render=_block_stat(devno), controller="io"))
    return tuple(out)


def _pressure(resource: str) -> CgroupRenderer:
    def render(d: str, version: int, host_text: str) -> bytes:
        # PSI is per cgroup on v2 only; on v1 the host's figures are all there is.
        if version != 2:
            return host_text.encode()
        return read_small(f"{d}/{resource}.pressure").encode()

    return render


@dataclass(frozen=True)
class View:
    path: str  # inside the mount, e.g. "proc/meminfo"
    host_path: str  # the file it replaces, e.g. "/proc/meminfo"
    render: MemoryRenderer | None = None
    cpu_render: CpuRenderer | None = None
    needs_events: bool = False  # memory.events / oom_control: only vmstat shows them
    needs_load: bool = False  # the container's load averages (loadavg)
    needs_tasks: bool = False  # the container's task counts (/proc/stat)
    # Views computed from one file of the container's cgroup in `controller`'s hierarchy.
    cgroup_render: CgroupRenderer | None = None
    controller: str = ""
    # runc (Docker, Kubernetes) only lets a container bind over an allow-list of /proc
    # files; /proc/vmstat is not on it, so `docker-args` leaves such views out by default.
    runc_bindable: bool = True


# A NamedTuple, not a frozen dataclass: one is made per open, and building one is
# 4x cheaper (measured: 0.4 against 1.75 µs for 11 fields; the records
# of views.py and resolve.py are NamedTuples for the same reason).
class Rendered(NamedTuple):
    data: bytes
    caller: str  # the caller's /proc/PID/cgroup at rendering; "" if unknown


def _cpu_list(c: CpuContext) -> bytes:
    return render_cpu_list(c.view)


VIEWS: tuple[View, ...] = (
    View("proc/meminfo", "/proc/meminfo", render_meminfo),
    View("proc/vmstat", "/proc/vmstat", render_vmstat, needs_events=True, runc_bindable=False),
    View("proc/swaps", "/proc/swaps", render_swaps),
    View("proc/cpuinfo", "/proc/cpuinfo",
         cpu_render=lambda c: render_cpuinfo(c.snap.host_cpuinfo, c.view)),
    View("proc/stat", "/proc/stat",
         cpu_render=lambda c: render_stat(c.snap.host_stat, c.view, c.times), needs_tasks=True),
    View("proc/uptime", "/proc/uptime", cpu_render=lambda c: render_uptime(c.view, c.times)),
    View("proc/loadavg", "/proc/loadavg", needs_load=True),
    *(View(f"sys/devices/system/cpu/{name}", f"/sys/devices/system/cpu/{name}",
           cpu_render=_cpu_list) for name in ("online", "possible", "present")),
    View("proc/diskstats", "/proc/diskstats", cgroup_render=_diskstats, controller="io"),
    # runc refuses binds over /proc/pressure/* too (not on its allow-list).
    *(View(f"proc/pressure/{r}", f"/proc/pressure/{r}", cgroup_render=_pressure(r),
           controller=c, runc_bindable=False)
      for r, c in (("cpu", "cpu"), ("memory", "memory"), ("io", "io"))),
)


CPU_DIR = "sys/devices/system/cpu"


def bind_targets(views: tuple[View, ...]) -> list[tuple[str, str]]:
    """(path in the mount, path it covers) for each bind a container needs: one per view,
    except that the /sys/devices/system/cpu views come with their whole directory (the
    caller's cpuN entries), bound once."""
    out: list[tuple[str, str]] = []
    for v in views:
        if v.path.startswith(CPU_DIR + "/"):
            if (CPU_DIR, "/" + CPU_DIR) not in out:
                out.append((CPU_DIR, "/" + CPU_DIR))
        else:
            out.append((v.path, v.host_path))
    return out


def available_views(views: tuple[View, ...] | None = None) -> tuple[View, ...]:
    """The views whose file exists on this host (no /proc/pressure without PSI), and one
    /sys/block/<dev>/stat view per block device."""
    if views is None:
        views = VIEWS + block_views()
    return tuple(v for v in views if os.path.exists(v.host_path))


class Renderer:
    """Renders a view for a caller pid; falls back to the host's file when the caller or
    its cgroup cannot be read (logged once per cgroup), never to anybody else's numbers."""

    def __init__(self, resolver: Resolver, opts: RenderOptions | None = None) -> None:
        self.resolver = resolver
        self.opts = opts or RenderOptions()
        self._warned: set[str] = set()
        self.fallbacks = 0
        # Last CPU counters shown per container, so that every counter only grows.
        self._times: WhileCgroupExists[tuple[str, float], CpuTimes] = WhileCgroupExists()
        # Set by workers: the same memory shared by every worker process.
        self.shared_times: Callable[[tuple[str, float], CpuTimes], CpuTimes] | None = None
        self.loads: LoadSource = LoadTracker()

    def render(self, view: View, pid: int) -> bytes:
        return self.render_for(view, pid).data

    def render_for(self, view: View, pid: int) -> Rendered:
        if view.needs_load:
            return self._render_load(view, pid)
        if view.cpu_render is not None:
            return self._render_cpu(view, view.cpu_render, pid)
        if view.cgroup_render is not None:
            return self._render_cgroup(view, view.cgroup_render, pid)
        assert view.render is not None
        try:
            snap = self.resolver.snapshot(pid, view.needs_events)
        except (OSError, OddCgroupData) as exc:
            self.fallbacks += 1
            self._warn_once(pid, exc)
            return Rendered(read_small(view.host_path).encode(), "")
        if snap.memory is None:
            return Rendered(read_small(view.host_path).encode(), snap.caller)
        return Rendered(view.render(snap.host, snap.memory, self.opts), snap.caller)

    def _render_cpu(self, view: View, render: CpuRenderer, pid: int) -> Rendered:
        try:
            snap = self.resolver.cpu_snapshot(pid, with_tasks=view.needs_tasks)
        except (OSError, OddCgroupData, ValueError, IndexError) as exc:
            self.fallbacks += 1
            self._warn_once(pid, exc)
            return Rendered(read_small(view.host_path).encode(), "")
        if snap.view is None:
            return Rendered(read_small(view.host_path).encode(), snap.caller)
        key = (snap.view.cgroup, snap.view.start)
        times = cpu_times(snap.view).at_least(self._times.get(key))
        if self.shared_times is not None:
            times = self.shared_times(key, times)
        self._times.put(key, snap.view.directory, times)
        return Rendered(render(CpuContext(snap.view, snap, times)), snap.caller)

    def _render_load(self, view: View, pid: int) -> Rendered:
        """/proc/loadavg: which container, then its line as the load source has it."""
        if pid <= 0:
            return Rendered(read_small(view.host_path).encode(), "")
        try:
            caller, placement = self.resolver.cpu_placement(pid, with_cpus=False)
            if placement is not None:
                return Rendered(self.loads.line(placement.directory, placement.version, pid),
                                caller)
        except (OSError, OddCgroupData, ValueError, IndexError) as exc:
            self.fallbacks += 1
            self._warn_once(pid, exc)
            caller = ""
        return Rendered(read_small(view.host_path).encode(), caller)

    def visible_cpus(self, pid: int) -> tuple[int, ...] | None:
        """The host CPUs `pid` sees, in order; None: all of the host's (a caller at the
        root, or one whose cgroups cannot be read)."""
        try:
            return self.resolver.visible_cpus(pid)
        except (OSError, OddCgroupData, ValueError, IndexError):
            return None

    def _render_cgroup(self, view: View, render: CgroupRenderer, pid: int) -> Rendered:
        host_text = read_small(view.host_path)
        try:
            found = self.resolver.container_dir(pid, view.controller)
            if found is None:
                return Rendered(host_text.encode(), "")
            d, version, caller = found
            return Rendered(render(d, version, host_text), caller)
        except (OSError, OddCgroupData) as exc:
            self.fallbacks += 1
            self._warn_once(pid, exc)
            return Rendered(host_text.encode(), "")

    def _warn_once(self, pid: int, exc: Exception) -> None:
        try:
            key = read_small(f"/proc/{pid}/cgroup")
        except OSError:
            key = "<caller gone>"
        if key not in self._warned:
            if len(self._warned) > 10000:
                self._warned.clear()
            self._warned.add(key)
            log.warning("pid %d: serving the host file: %s: %s", pid, type(exc).__name__, exc)
