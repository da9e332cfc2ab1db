"""CPU figures of the cgroup that speaks for a caller (design.md §5): which CPUs it may use,
how much CPU time it has used, how old it is, how many of its tasks run or wait.

- visible CPUs: the effective cpuset ∩ online CPUs, cut to ceil(quota / period) when a CFS
  quota binds (the minimum quota/period on the path; optional), at least one;
- usage, age and task counts: the container's cgroup (its pid namespace init's, without
  /init.scope; the caller's own in the host pid namespace).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from cgprocfs.cgroups import (
    Hierarchy,
    ProcCgroups,
    ancestors,
    proc_stat_fields,
    read_optional,
    read_small,
)
from cgprocfs.kept import KeptFiles
from cgprocfs.snapshot import OddCgroupData, parse_flat_keyed
from cgprocfs.ttl import TtlCache, WhileCgroupExists

CLK_TCK = os.sysconf("SC_CLK_TCK")


# A NamedTuple, not a frozen dataclass: one is made per open, and building one is
# 4x cheaper (measured: 0.4 against 1.75 µs for 11 fields).
class CpuView(NamedTuple):
    version: int
    cgroup: str  # the container's cgroup, whose usage is shown
    cpus: tuple[int, ...]  # host CPU numbers shown, in order (renumbered from 0 when shown)
    user_us: int
    system_us: int
    start: float  # the container's start, seconds since boot
    now: float  # the moment of the snapshot, seconds since boot
    running: int = 0
    blocked: int = 0
    threads: int = 0
    directory: str = ""  # the container cgroup's directory in the accounting hierarchy


def parse_cpu_list(text: str) -> list[int]:
    """`0-3,8,10-11` -> [0, 1, 2, 3, 8, 10, 11]; raises OddCgroupData on garbage."""
    out: list[int] = []
    text = text.strip()
    if not text:
        return out
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise OddCgroupData(f"unparsable cpu list {text[:40]!r}") from exc
    return out


def format_cpu_list(n: int) -> str:
    return "0" if n <= 1 else f"0-{n - 1}"


def parse_quota(text: str, version: int, period_text: str | None = None) -> float | None:
    """CPUs' worth of CFS quota: v2 `cpu.max` ("max 100000" / "150000 100000"), v1
    `cpu.cfs_quota_us` (-1 = none) with `cpu.cfs_period_us`. None = no quota."""
    try:
        if version == 2:
            quota, period = text.split()[:2]
            if quota == "max":
                return None
            return int(quota) / int(period)
        q = int(text.strip())
        if q < 0:
            return None
        return q / int((period_text or "100000").strip())
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise OddCgroupData(f"unparsable cpu quota {text[:40]!r}") from exc


def visible_count(cpuset: list[int], quota: float | None) -> int:
    if quota is None:
        return max(1, len(cpuset))
    return max(1, min(len(cpuset), math.ceil(quota - 1e-9)))


def host_uptime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _start_seconds(pid: int) -> float:
    return int(proc_stat_fields(pid)[19]) / CLK_TCK


class StartTimes:
    """Start times of processes, kept while /proc/PID is the same inode: the kernel makes
    a new one (a new inode number) for a new process under a reused pid, and a stat(2)
    costs a fraction of reading and parsing /proc/PID/stat."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._known: dict[int, tuple[int, float]] = {}

    def of(self, pid: int) -> float:
        ino = os.stat(f"/proc/{pid}").st_ino
        hit = self._known.get(pid)
        if hit is not None and hit[0] == ino:
            return hit[1]
        start = _start_seconds(pid)
        if len(self._known) >= self.max_entries:
            self._known.clear()
        self._known[pid] = (ino, start)
        return start


def task_states(d: str, version: int, exclude: int = 0,
                read: Callable[[str], str | None] = read_optional
                ) -> tuple[int, int, int, int]:
    """(running, uninterruptible, threads, highest pid) over a cgroup and its descendants;
    thread `exclude` (a reader, which waits in "D" on our answer) is not counted as
    running or blocked. Raises FileNotFoundError when the cgroup is gone."""
    listing = "cgroup.threads" if version == 2 else "tasks"
    top = read(f"{d}/{listing}")
    if top is None:
        raise FileNotFoundError(d)
    running = blocked = threads = last_pid = 0
    for root in _descendants(d):
        text = (top if root == d else read(f"{root}/{listing}")) or ""
        for tid in text.split():
            try:
                state = proc_stat_fields(int(tid))[0]
            except (OSError, ValueError):
                continue
            threads += 1
            last_pid = max(last_pid, int(tid))
            if tid == str(exclude):
                continue
            if state == "R":
                running += 1
            elif state == "D":
                blocked += 1
    return running, blocked, threads, last_pid


def _descendants(d: str) -> list[str]:
    """`d` and the directories below it. A cgroup directory holds a few dozen control
    files and, mostly, no child: one scandir per level, kept to what is needed."""
    out = [d]
    for path in out:
        try:
            with os.scandir(path) as entries:
                out.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # removed meanwhile: counted as empty
    return out


def _quota_at(d: str, version: int,
              read: Callable[[str], str | None] = read_optional) -> float | None:
    if version == 2:
        text = read(f"{d}/cpu.max")
        return parse_quota(text, 2) if text is not None else None
    text = read(f"{d}/cpu.cfs_quota_us")
    if text is None or text.strip() == "-1":  # no quota here: its period does not matter
        return None
    return parse_quota(text, 1, read(f"{d}/cpu.cfs_period_us"))


class CpuPaths(NamedTuple):
    """A caller's cgroup in each CPU hierarchy ("/" where it has none): all a placement
    is computed from, besides its pid namespace."""

    cpu: str
    cpuacct: str
    cpuset: str


# NamedTuples like CpuView: placements are made and completed at every reload and every
# refresh ahead (~250 a second for 200 polled containers): _replace() costs 0.7 µs against
# a frozen dataclass's replace() 2.2, building one 0.27 against 0.92.
class CpuPlacement(NamedTuple):
    """Where a caller's CPU views come from: the slow-changing part of a CpuView, which the
    Resolver keeps per container for at most PLACEMENT_MAX_AGE. `cpus` and `start` are
    looked up when a view first needs them (loadavg needs neither); None: not yet."""

    version: int
    cgroup: str
    directory: str
    paths: CpuPaths
    ns_init: int | None = None
    cpus: tuple[int, ...] | None = None
    start: float | None = None
    pidns: str = ""  # the caller's pid namespace, as readlink(/proc/PID/ns/pid) names it


class CpuReader:
    """Reads CPU figures for callers: placements (configuration, re-read per container at
    most every PLACEMENT_MAX_AGE) and views (usage read at every open)."""

    # Task states are a gauge sampled for procs_running/blocked: at most this old.
    TASKS_MAX_AGE = 1.0
    ONLINE_MAX_AGE = 1.0

    def __init__(self, cpu: Hierarchy | None, cpuacct: Hierarchy | None,
                 cpuset: Hierarchy | None, use_quota: bool = True,
                 files: KeptFiles | None = None) -> None:
        self.cpu, self.cpuacct, self.cpuset = cpu, cpuacct, cpuset
        # Usage, read at every open, and configuration, re-read every PLACEMENT_MAX_AGE:
        # kept open between reads.
        self._read = files.read if files is not None else read_small
        self._read_optional = files.read_optional if files is not None else read_optional
        self.use_quota = use_quota
        self._oldest: WhileCgroupExists[str, tuple[int, float]] = WhileCgroupExists()
        self._tasks = TtlCache[tuple[str, int], tuple[int, int, int, int]](self.TASKS_MAX_AGE)
        # Online CPUs are host configuration, read as often as the placements using them.
        self._online = TtlCache[None, list[int]](self.ONLINE_MAX_AGE)
        self._starts = StartTimes()

    def paths(self, procs: ProcCgroups) -> CpuPaths:
        def path(h: Hierarchy | None) -> str:
            return (procs.path_in(h) if h is not None else None) or "/"

        return CpuPaths(path(self.cpu), path(self.cpuacct or self.cpu), path(self.cpuset))

    @staticmethod
    def at_root(paths: CpuPaths) -> bool:
        """A caller at the root of every CPU hierarchy sees the host's CPU files."""
        return paths.cpu == paths.cpuacct == paths.cpuset == "/"

    def online(self) -> list[int]:
        return self._online.get(
            None, lambda: parse_cpu_list(read_small("/sys/devices/system/cpu/online")))

    def cpus(self, paths: CpuPaths) -> tuple[int, ...]:
        """The host CPUs a caller sees, in order: its cpuset ∩ online, cut by its quota."""
        cpuset = self._cpuset(paths.cpuset, self.online())
        quota = self._quota(paths.cpu) if self.use_quota else None
        return tuple(cpuset[: visible_count(cpuset, quota)])

    def placement(self, paths: CpuPaths, container: Callable[[Hierarchy, str], str],
                  ns_init: int | None, pidns: str = "") -> CpuPlacement:
        acct = self.cpuacct or self.cpu
        if acct is None:
            raise OddCgroupData("no cpu accounting hierarchy")
        path = container(acct, paths.cpuacct)
        d = acct.directory(path)
        if d is None:
            raise OddCgroupData(f"cgroup {path} is outside the mounted hierarchy")
        return CpuPlacement(acct.version, path, d, paths, ns_init, pidns=pidns)

    def complete(self, p: CpuPlacement, with_cpus: bool, with_start: bool) -> CpuPlacement:
        """`p` with the parts asked for looked up (itself when it has them)."""
        cpus, start = p.cpus, p.start
        if with_cpus and cpus is None:
            cpus = self.cpus(p.paths)
        if with_start and start is None:
            start = self._start(p.directory, p.version, p.ns_init, host_uptime())
        if cpus is p.cpus and start is p.start:
            return p
        return p._replace(cpus=cpus, start=start)

    def view(self, p: CpuPlacement, with_tasks: bool = True) -> CpuView:
        """The figures of this moment (`p` completed with its CPUs and start). Task counts
        only `with_tasks` (/proc/stat and sysinfo show them; they cost a walk)."""
        now = host_uptime()
        user_us, system_us = self._usage(p.version, p.directory)
        start = now if p.start is None else p.start
        d, version = p.directory, p.version
        running = blocked = threads = 0
        if with_tasks:
            running, blocked, threads, _ = self._tasks.get(
                (d, version), lambda: task_states(d, version, read=self._read_optional))
        return CpuView(version, p.cgroup, p.cpus or (), user_us, system_us, start, now,
                       running, blocked, threads, d)

    def _cpuset(self, own: str, online: list[int]) -> list[int]:
        h = self.cpuset
        if h is None:
            return online
        name = "cpuset.cpus.effective" if h.version == 2 else "cpuset.effective_cpus"
        for p in ancestors(own):
            d = h.directory(p)
            if d is None:
                break
            text = self._read_optional(f"{d}/{name}")
            if text is not None and text.strip():
                allowed = set(parse_cpu_list(text))
                return [c for c in online if c in allowed] or online
        return online

    def _quota(self, own: str) -> float | None:
        h = self.cpu
        if h is None:
            return None
        best: float | None = None
        for p in ancestors(own):
            if p == "/":
                break
            d = h.directory(p)
            if d is None:
                break
            q = _quota_at(d, h.version, self._read_optional)
            if q is not None and (best is None or q < best):
                best = q
        return best

    def _usage(self, version: int, d: str) -> tuple[int, int]:
        if version == 2:
            stat = parse_flat_keyed(self._read(f"{d}/cpu.stat"))
            return stat.get("user_usec", 0), stat.get("system_usec", 0)
        text = self._read_optional(f"{d}/cpuacct.usage_all")
        if text is not None:
            tokens = text.split()
            if len(tokens) % 3 == 0 and tokens[:3] == ["cpu", "user", "system"]:
                # A header and one "N user system" line per CPU (a line per CPU of the
                # host: summed in two passes, not line by line).
                try:
                    return (sum(map(int, tokens[4::3])) // 1000,
                            sum(map(int, tokens[5::3])) // 1000)
                except ValueError:
                    pass
            user = system = 0
            for line in text.splitlines()[1:]:
                parts = line.split()
                if len(parts) == 3:
                    user += int(parts[1])
                    system += int(parts[2])
            return user // 1000, system // 1000
        stat = parse_flat_keyed(self._read(f"{d}/cpuacct.stat"))
        return (stat.get("user", 0) * 1_000_000 // CLK_TCK,
                stat.get("system", 0) * 1_000_000 // CLK_TCK)

    def _start(self, d: str, version: int, ns_init: int | None, now: float) -> float:
        """The container's start: its pid namespace init's start time, or, in the host
        pid namespace, that of the oldest process in the cgroup (cached while it lives);
        `now` for a cgroup without a process (its age starts with the next one)."""
        start = self.start_of(d, ns_init)
        return now if start is None else start

    def start_of(self, d: str, ns_init: int | None) -> float | None:
        """_start, None for a cgroup without a process."""
        if ns_init is not None:
            try:
                return self._starts.of(ns_init)
            except (OSError, ValueError, IndexError):
                pass
        cached = self._oldest.get(d)
        if cached is not None:
            pid, start = cached
            try:
                if self._starts.of(pid) == start:
                    return start
            except (OSError, ValueError, IndexError):
                pass
        oldest: tuple[int, float] | None = None
        for root, _dirs, _files in os.walk(d):
            for pid_text in (read_optional(os.path.join(root, "cgroup.procs")) or "").split():
                try:
                    s = _start_seconds(int(pid_text))
                except (OSError, ValueError, IndexError):
                    continue
                if oldest is None or s < oldest[1]:
                    oldest = (int(pid_text), s)
        if oldest is None:
            return None
        self._oldest.put(d, d, oldest)
        return oldest[1]
