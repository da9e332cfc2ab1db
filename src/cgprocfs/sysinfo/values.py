"""What sysinfo(2) says to a caller: the container's figures, from the same code as the
files (design.md §3, §5), so busybox free and procps free agree to the byte.

- totalram, freeram, sharedram, bufferram, totalswap, freeswap: MemTotal, MemFree, Shmem,
  Buffers, SwapTotal, SwapFree of `memory_figures` (what /proc/meminfo shows), in bytes;
- uptime: the container's age, as /proc/uptime (CpuView.start);
- loads: the container's load averages, as /proc/loadavg (under `serve`, the load
  sampler's shared table; standalone, its own LoadTracker);
- procs: the container's threads, as /proc/stat's `processes` and /proc/loadavg's total.

A caller in the root cgroup gets no answer here (None): the kernel's own is right for it.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

from cgprocfs.cpu import host_uptime
from cgprocfs.libc import libc
from cgprocfs.loadavg import FIXED_1, LoadSource, LoadTracker
from cgprocfs.render.meminfo import memory_figures
from cgprocfs.resolve import Resolver
from cgprocfs.snapshot import RenderOptions
from cgprocfs.sysinfo.layout import SIZE_64, SysinfoValues, unpack64

# How long one thread's figures may be reused for its next sysinfo call. The host's
# meminfo, which caps them, may already be this old (HOST_MAX_AGE); a program calling
# sysinfo in a loop costs one snapshot per interval instead of one per call.
VALUES_MAX_AGE = 0.05


@dataclass(frozen=True)
class _Cached:
    expires: float
    start: float | None  # the container's start (seconds since boot); None: the host's
    values: SysinfoValues


def host_sysinfo() -> dict[str, int]:
    """This process's own sysinfo(2): the host's answer (the agent is never filtered)."""
    buf = ctypes.create_string_buffer(SIZE_64)
    if libc().sysinfo(buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return unpack64(buf.raw)


class SysinfoSource:
    """Computes a caller's SysinfoValues; keeps its own LoadTracker (sample it every
    loadavg.SAMPLE_INTERVAL with `loads.sample()`)."""

    def __init__(self, resolver: Resolver, opts: RenderOptions | None = None,
                 max_age: float = VALUES_MAX_AGE) -> None:
        self.resolver = resolver
        self.opts = opts or RenderOptions()
        self.loads: LoadSource = LoadTracker()
        self.max_age = max_age
        self._cache: dict[tuple[str, int], _Cached] = {}
        self.snapshots = 0

    def values(self, pid: int, listener: str) -> SysinfoValues | None:
        """The caller's answer, or None for a caller the host's answer is right for.
        `listener` names the seccomp listener the call came through. A thread calling
        again through the same listener within max_age gets the figures of its previous
        call (the age excepted): no cgroup lookup, no snapshot. Figures are never shared
        between threads or processes: busybox free combines sysinfo with /proc/meminfo
        read just after, and a newer file next to older figures borrowed from another
        process can add up to more memory than the container has.
        Raises OSError, OddCgroupData, ValueError, IndexError when its cgroup or its
        process cannot be read (the agent then lets the kernel answer)."""
        now = time.monotonic()
        caller = (listener, pid)
        hit = self._cache.get(caller)
        if hit is None or hit.expires <= now:
            hit = self._compute(pid, now)
            if hit is None:
                return None
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[caller] = hit
        if hit.start is None:
            return hit.values
        # The age moves on between snapshots; everything else is the snapshot's.
        return _with_uptime(hit.values, host_uptime() - hit.start)

    def _compute(self, pid: int, now: float) -> _Cached | None:
        self.snapshots += 1
        snap = self.resolver.snapshot(pid, with_events=False)
        if snap.memory is None:
            return None
        kb = memory_figures(snap.host, snap.memory, self.opts)
        cpu = self.resolver.cpu_snapshot(pid)
        if cpu.view is None:
            host = host_sysinfo()
            start = None
            uptime = float(host["uptime"])
            loads = tuple(host[f"load{n}"] / 65536 for n in (1, 5, 15))
            procs = host["procs"]
        else:
            start = cpu.view.start
            uptime = max(0.0, cpu.view.now - start)
            load = self.loads.read(cpu.view.directory, cpu.view.version, pid)
            loads = tuple(a / FIXED_1 for a in load.averages)
            procs = cpu.view.threads
        values = SysinfoValues(
            uptime=uptime, loads=(loads[0], loads[1], loads[2]),
            totalram=kb["MemTotal"] * 1024, freeram=kb["MemFree"] * 1024,
            sharedram=kb.get("Shmem", 0) * 1024, bufferram=kb.get("Buffers", 0) * 1024,
            totalswap=kb["SwapTotal"] * 1024, freeswap=kb["SwapFree"] * 1024,
            procs=procs,
        )
        return _Cached(now + self.max_age, start, values)


def _with_uptime(v: SysinfoValues, uptime: float) -> SysinfoValues:
    return SysinfoValues(max(0.0, uptime), v.loads, v.totalram, v.freeram, v.sharedram,
                         v.bufferram, v.totalswap, v.freeswap, v.procs)
