"""Which cgroup speaks for a caller (design.md §2), and reading its memory figures.

- effective limit: the minimum limit on the path from the caller's cgroup to the root;
- view cgroup: the (topmost) cgroup on that path carrying the effective limit, or, with no
  limit anywhere, the container's cgroup: the cgroup of the init of the caller's pid
  namespace without a trailing /init.scope (the caller's own cgroup in the host pid ns);
- callers in the root cgroup get the host's files (`memory_view` returns None).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from cgprocfs.cgroups import (
    Hierarchy,
    Layout,
    ancestors,
    parse_proc_cgroup,
    proc_stat_fields,
    read_optional,
    read_proc_cgroup,
    read_small,
)
from cgprocfs.cpu import CpuPaths, CpuPlacement, CpuReader, CpuView
from cgprocfs.kept import KeptFiles
from cgprocfs.render.cpu import HostStat, parse_host_stat
from cgprocfs.snapshot import (
    HostMemory,
    MemoryView,
    OddCgroupData,
    meminfo_layout,
    parse_count,
    parse_flat_keyed,
    parse_limit,
    parse_meminfo,
)
from cgprocfs.ttl import RefreshableTable, Sharing, TtlCache


class CpuSnapshot(NamedTuple):
    """What one open of a CPU view renders from. `view` None: serve the host's file."""

    view: CpuView | None
    host_stat: HostStat
    host_cpuinfo: str
    caller: str = ""


class Snapshot(NamedTuple):
    """What one open renders from. `memory` None means: serve the host's own file."""

    host: HostMemory
    memory: MemoryView | None
    caller: str = ""  # the caller's /proc/PID/cgroup as read for this snapshot


def _limits_at(d: str, limit_file: str, swap_file: str, read: Callable[[str], str | None]
               ) -> tuple[int | None, int | None]:
    limit, swap = read(f"{d}/{limit_file}"), read(f"{d}/{swap_file}")
    return (None if limit is None else parse_limit(limit),
            None if swap is None else parse_limit(swap))


# How old the host's cpuinfo may be.
CPUINFO_MAX_AGE = 10.0

# How old the host's meminfo may be when it is used to cap a cgroup's figures.
HOST_MAX_AGE = 0.05

# How long a container's CPU placement (its CPUs from cpuset, online list and CFS quota; its
# accounting cgroup; its start) may be served from memory: configuration, like limits.
PLACEMENT_MAX_AGE = 1.0
# A worker with nothing to serve reloads the shared placements in use from this age on
# (it looks every PARK_CHECK_S = 0.1 s), so that the entry a request finds is fresh.
PLACEMENT_REFRESH_AGE = 0.8

# How long a cgroup's limits may be served from memory. Limits change rarely (docker
# update, a Kubernetes resize); usage and memory.stat are always read fresh.
LIMITS_MAX_AGE = 1.0


# (limit, swap limit) of one cgroup directory.
LimitsCache = TtlCache[str, tuple[int | None, int | None]]


def memory_view_for_path(
    h: Hierarchy, path: str, container: str | Callable[[], str],
    limits: LimitsCache | None = None, with_events: bool = True,
    files: KeptFiles | None = None,
) -> MemoryView | None:
    """Read the memory figures that speak for a caller in cgroup `path` of hierarchy `h`.

    `container` is the cgroup to report when nothing on the path is limited (or a
    function finding it: it is needed only then, so it is looked up lazily). Raises
    OSError or OddCgroupData when the cgroup's files are missing or do not parse.
    `with_events` reads the OOM-kill counter too (only vmstat shows it). The figures
    are read through `files` when given (kept open between calls).
    """
    chain: list[tuple[str, str]] = []
    for p in ancestors(path):
        if p == "/":
            break  # the root cgroup cannot be limited
        d = h.directory(p)
        if d is None:
            break
        chain.append((p, d))
    cache = limits or LimitsCache(max_age=0)
    read = _Reads(files)
    if h.version == 2:
        return _v2_view(h, chain, container, cache, with_events, read)
    return _v1_view(h, chain, container, cache, with_events, read)


class _Reads:
    """read_small and read_optional, through kept files when there are."""

    def __init__(self, files: KeptFiles | None) -> None:
        self.small = files.read if files is not None else read_small
        self.optional = files.read_optional if files is not None else read_optional


def _pick(
    chain: list[tuple[str, str]], limit_file: str, swap_file: str, cache: LimitsCache,
    read: Callable[[str], str | None],
) -> tuple[int | None, str | None, int | None]:
    """Walk from the caller up: (min limit, topmost cgroup carrying it, min swap limit).
    Limits are re-read once a second per cgroup on the chain: through kept files (`read`),
    they cost a re-read, not an open by path."""
    best: int | None = None
    best_path: str | None = None
    swap_best: int | None = None
    for p, d in chain:
        lim, sw = cache.get(d, partial(_limits_at, d, limit_file, swap_file, read))
        if lim is not None and (best is None or lim <= best):
            best, best_path = lim, p
        if sw is not None and (swap_best is None or sw < swap_best):
            swap_best = sw
    return best, best_path, swap_best


def _view_dir(
    h: Hierarchy, best_path: str | None, container: str | Callable[[], str]
) -> tuple[str, str] | None:
    view_path = best_path or (container if isinstance(container, str) else container())
    if view_path == "/":
        return None
    d = h.directory(view_path)
    if d is None:
        raise OddCgroupData(f"cgroup {view_path} is outside the mounted hierarchy")
    return view_path, d


def _v2_view(
    h: Hierarchy, chain: list[tuple[str, str]], container: str | Callable[[], str],
    cache: LimitsCache,
    with_events: bool,
    read: _Reads,
) -> MemoryView | None:
    limit, best_path, swap_limit = _pick(chain, "memory.max", "memory.swap.max", cache,
                                         read.optional)
    where = _view_dir(h, best_path, container)
    if where is None:
        return None
    view_path, d = where
    usage_text = read.optional(f"{d}/memory.current")
    if usage_text is None:
        raise OddCgroupData(f"{view_path} has no memory.current (memory controller off)")
    usage = parse_count(usage_text)
    stat = parse_flat_keyed(read.small(f"{d}/memory.stat"))
    swap_text = read.optional(f"{d}/memory.swap.current")
    swap_usage = parse_count(swap_text) if swap_text is not None else 0
    events_text = read.optional(f"{d}/memory.events") if with_events else None
    events = parse_flat_keyed(events_text) if events_text is not None else {}
    return MemoryView(
        version=2, cgroup=view_path, limit=limit, usage=usage, stat=stat,
        swap_limit=swap_limit, swap_usage=swap_usage,
        oom_kill=events.get("oom_kill", 0), events=events,
    )


def _v1_view(
    h: Hierarchy, chain: list[tuple[str, str]], container: str | Callable[[], str],
    cache: LimitsCache,
    with_events: bool,
    read: _Reads,
) -> MemoryView | None:
    limit, best_path, memsw_limit = _pick(
        chain, "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", cache, read.optional
    )
    where = _view_dir(h, best_path, container)
    if where is None:
        return None
    view_path, d = where
    usage = parse_count(read.small(f"{d}/memory.usage_in_bytes"))
    stat = parse_flat_keyed(read.small(f"{d}/memory.stat"))
    # memory.stat carries the swap usage when swap accounting is on; saves a read.
    swap_usage = stat.get("total_swap", stat.get("swap"))
    if swap_usage is None:
        memsw_text = read.optional(f"{d}/memory.memsw.usage_in_bytes")
        swap_usage = max(0, parse_count(memsw_text) - usage) if memsw_text else 0
    if memsw_limit is None:
        swap_limit = None
    elif limit is None:
        swap_limit = memsw_limit
    else:
        swap_limit = max(0, memsw_limit - limit)
    oom_text = read.optional(f"{d}/memory.oom_control") if with_events else None
    oom = parse_flat_keyed(oom_text) if oom_text is not None else {}
    return MemoryView(
        version=1, cgroup=view_path, limit=limit, usage=usage, stat=stat,
        swap_limit=swap_limit, swap_usage=swap_usage, oom_kill=oom.get("oom_kill", 0),
    )


def _mode(use_quota: bool) -> str:
    return "quota" if use_quota else "cpuset"


def _placement_key(key: tuple[str, str], use_quota: bool) -> bytes:
    # Versioned: workers of two releases may briefly serve side by side. The quota setting
    # is part of the key because the arena outlives a reload (SIGHUP) that changes it.
    return f"placement/2\0{_mode(use_quota)}\0{key[0]}\0{key[1]}".encode()


def _dump_placement(p: CpuPlacement | None, mode: str) -> object:
    """A placement as shared: with what it was computed from, so that any worker can
    refresh it without the caller (refresh_placements)."""
    if p is None:
        return None
    return ("placement", 2, mode, p.pidns, (p.paths.cpu, p.paths.cpuacct, p.paths.cpuset),
            p.version, p.cgroup, p.directory, p.ns_init, p.cpus, p.start)


def _parse_placement(data: object) -> tuple[str, CpuPlacement]:
    """(quota mode, placement) of a shared value; raises ValueError for anything else."""
    if not isinstance(data, tuple) or len(data) != 11 or data[:2] != ("placement", 2):
        raise ValueError("not a placement")
    _, _, mode, pidns, paths, version, cgroup, directory, ns_init, cpus, start = data
    cpu, cpuacct, cpuset = paths
    return str(mode), CpuPlacement(
        int(version), str(cgroup), str(directory), CpuPaths(str(cpu), str(cpuacct), str(cpuset)),
        None if ns_init is None else int(ns_init), None if cpus is None else tuple(cpus),
        None if start is None else float(start), str(pidns))


def _load_placement(key: tuple[str, str], data: object) -> CpuPlacement | None:
    if data is None:
        return None
    _, p = _parse_placement(data)
    if p.pidns != key[1]:
        raise ValueError("another pid namespace's placement")
    return p


def _ppid(proc: str, pid: int) -> int:
    return int(proc_stat_fields(pid, proc)[1])


class Resolver:
    """Turns a caller pid into a Snapshot. One per daemon; holds only small caches."""

    def __init__(self, layout: Layout, proc: str = "/proc", use_quota: bool = True) -> None:
        self.layout = layout
        self.memory = layout.for_controller("memory")
        self.proc = proc
        self.own_pidns = os.readlink(f"{proc}/self/ns/pid")
        # pid namespace -> its init's pid; validated on use, so pid reuse cannot mislead.
        self._ns_init: dict[str, int] = {}
        self.limits = LimitsCache(LIMITS_MAX_AGE)
        # The files every open reads: the caller's /proc/PID/cgroup, its cgroup's figures.
        self.files = KeptFiles()
        self.host = TtlCache[None, HostMemory](HOST_MAX_AGE)
        self.cpuinfo = TtlCache[None, str](CPUINFO_MAX_AGE)
        self.placements = TtlCache[tuple[str, str], CpuPlacement | None](PLACEMENT_MAX_AGE)
        self._refresh_table: RefreshableTable | None = None
        # Key order and layout of the kernel's files never change while it runs.
        with open(f"{proc}/vmstat") as f:
            self.vmstat_keys = tuple(line.split(" ", 1)[0] for line in f if line.strip())
        with open(f"{proc}/swaps") as f:
            self.swaps_header = f.readline()
        with open(f"{proc}/meminfo") as f:
            template = f.read()
        self.meminfo_layout = meminfo_layout(template)
        tokens = template.split()
        self._meminfo_ntokens = len(tokens)
        self._meminfo_positions = [i + 1 for i, t in enumerate(tokens) if t.endswith(":")]
        self._meminfo_keys = [tokens[i - 1][:-1] for i in self._meminfo_positions]
        self.cpu = CpuReader(layout.for_controller("cpu"), layout.for_controller("cpuacct"),
                             layout.for_controller("cpuset"), use_quota=use_quota,
                             files=self.files)
        with open(f"{proc}/stat") as f:
            self.host_stat = parse_host_stat(f.read())

    def host_cpuinfo(self) -> str:
        """The host's /proc/cpuinfo, at most CPUINFO_MAX_AGE old (only "cpu MHz" moves,
        and the kernel takes a while to produce the file)."""
        return self.cpuinfo.get(None, lambda: read_small(f"{self.proc}/cpuinfo"))

    def container_dir(self, pid: int, controller: str) -> tuple[str, int, str] | None:
        """(directory, version, caller's /proc/PID/cgroup) of the caller's container
        cgroup in the hierarchy of `controller`; None for a caller at that hierarchy's
        root (it sees the host's file)."""
        # v1 names the I/O controller blkio; v2 calls it io.
        h = self.layout.for_controller(controller) or (
            self.layout.for_controller("blkio") if controller == "io" else None)
        if h is None or pid <= 0:
            return None
        caller = self.files.read(f"{self.proc}/{pid}/cgroup")
        own = parse_proc_cgroup(caller).path_in(h) or "/"
        if own == "/":
            return None
        path = self.container_path(pid, h, own)
        d = h.directory(path)
        if d is None:
            raise OddCgroupData(f"cgroup {path} is outside the mounted hierarchy")
        return d, h.version, caller

    def visible_cpus(self, pid: int) -> tuple[int, ...] | None:
        """The host CPUs `pid` sees; None for a caller at the root (all of the host's)."""
        if pid <= 0:
            return None
        _, placement = self.cpu_placement(pid, with_cpus=True)
        return None if placement is None else placement.cpus

    def cpu_placement(self, pid: int, with_cpus: bool = True, with_start: bool = False
                      ) -> tuple[str, CpuPlacement | None]:
        """(the caller's /proc/PID/cgroup, where its CPU views come from; None at the root).
        Kept per (cgroup membership, pid namespace) for PLACEMENT_MAX_AGE: a container's
        CPUs, quota, cgroup and start are configuration, re-read at least that often."""
        caller = self.files.read(f"{self.proc}/{pid}/cgroup")
        ns = self._pidns(pid)
        key = (caller, ns)

        def load() -> CpuPlacement | None:
            paths = self.cpu.paths(parse_proc_cgroup(caller))
            if self.cpu.at_root(paths):
                return None
            return self._place(paths, ns, self.namespace_init(pid), pid)

        placement = self.placements.get(key, load)
        if placement is not None:
            done = self.cpu.complete(placement, with_cpus, with_start)
            if done is not placement:
                self.placements.put(key, done)
            placement = done
        return caller, placement

    def _place(self, paths: CpuPaths, ns: str, ns_init: int | None, caller: int = 0
               ) -> CpuPlacement:
        return self.cpu.placement(
            paths, lambda h, own: self._path_via_init(ns_init, h, own, caller), ns_init, ns)

    def share_placements(self, table: RefreshableTable) -> None:
        """Let sibling processes (the FUSE workers) use each other's CPU placements: a
        container is then looked up once per PLACEMENT_MAX_AGE by the daemon, not once by
        every worker that serves it; and a worker with nothing to serve refreshes those
        in use before they expire (refresh_placements)."""
        def key(k: tuple[str, str]) -> bytes:
            return _placement_key(k, self.cpu.use_quota)

        def dump(p: CpuPlacement | None) -> object:
            return _dump_placement(p, _mode(self.cpu.use_quota))

        self.placements.sharing = Sharing(table, key, dump, _load_placement)
        self._refresh_table = table

    def refresh_placements(self) -> int:
        """Reload the shared placements in use that are older than PLACEMENT_REFRESH_AGE,
        so that a request rarely waits for one to be reloaded: the first read after a
        container's placement expired would otherwise pay for it (a few cgroup files and
        /proc entries, 60-150 µs). Each is recomputed from what it was computed from (the
        caller's CPU cgroups, its pid namespace and that namespace's init, still checked
        to be its init), exactly as a request would. Returns how many were refreshed."""
        table = self._refresh_table
        if table is None:
            return 0
        mode = _mode(self.cpu.use_quota)
        done = 0
        for index, digest, at, data in table.due_shared(
                time.monotonic() - PLACEMENT_REFRESH_AGE):
            now = time.monotonic()
            new = self._refreshed(data, mode)
            if new is None:
                table.forget_shared(index)  # let it expire; a request reloads it if need be
            elif table.refresh_shared(index, digest, at, now, _dump_placement(new, mode)):
                done += 1
        return done

    def _refreshed(self, data: object, mode: str) -> CpuPlacement | None:
        """The shared placement `data` computed anew; None when that cannot be done here:
        a caller at the root (nothing to refresh), workers of another configuration (left
        before a SIGHUP), a pid namespace that is gone, a removed cgroup, a cgroup without
        a process."""
        try:
            their_mode, old = _parse_placement(data)
            if their_mode != mode:
                return None
            init = old.ns_init
            if init is not None and (
                    os.readlink(f"{self.proc}/{init}/ns/pid") != old.pidns
                    or proc_stat_fields(init, self.proc)[0] == "Z"):
                return None  # the namespace is gone, or going (its init has exited)
            placed = self._place(old.paths, old.pidns, init)
            if not os.path.isdir(placed.directory):
                return None  # removed: its files would read as missing, not as its own
            if old.start is not None:
                # A cgroup without a process has no age yet: the request of the next one
                # to join finds it (a refresh would date it from now instead).
                start = self.cpu.start_of(placed.directory, init)
                if start is None:
                    return None
                placed = placed._replace(start=start)
            return self.cpu.complete(placed, old.cpus is not None, False)
        except (OSError, OddCgroupData, ValueError, TypeError, IndexError):
            return None

    def cpu_snapshot(self, pid: int, with_tasks: bool = True) -> CpuSnapshot:
        if pid <= 0:
            return CpuSnapshot(None, self.host_stat, "")
        caller, placement = self.cpu_placement(pid, with_cpus=True, with_start=True)
        if placement is None:
            return CpuSnapshot(None, self.host_stat, "", caller)
        return CpuSnapshot(self.cpu.view(placement, with_tasks), self.host_stat,
                           self.host_cpuinfo(), caller)

    def host_memory(self) -> HostMemory:
        """The host's meminfo, at most HOST_MAX_AGE old: its figures only cap ours (free
        and available never above the host's) or are host-wide constants."""
        return self.host.get(None, self._read_host_memory)

    def _read_host_memory(self) -> HostMemory:
        text = read_small(f"{self.proc}/meminfo")
        return HostMemory(
            meminfo_text=text, meminfo_kb=self._parse_host_meminfo(text),
            vmstat_keys=self.vmstat_keys, swaps_header=self.swaps_header,
            layout=self.meminfo_layout,
        )

    def _parse_host_meminfo(self, text: str) -> dict[str, int]:
        # The kernel's key order is fixed: take the numbers by position, and fall back to
        # the general parser should the text ever not have the expected shape.
        tokens = text.split()
        if len(tokens) == self._meminfo_ntokens:
            try:
                values = [int(tokens[i]) for i in self._meminfo_positions]
                return dict(zip(self._meminfo_keys, values, strict=True))
            except ValueError:
                pass
        return parse_meminfo(text)

    def snapshot(self, pid: int, with_events: bool = True) -> Snapshot:
        """Everything needed to render the memory views for `pid`. Raises OSError or
        OddCgroupData when the caller or its cgroup cannot be read."""
        if pid <= 0:
            return Snapshot(self.host_memory(), None)
        caller = self.files.read(f"{self.proc}/{pid}/cgroup")
        memory = self.memory_view(pid, with_events, caller)
        return Snapshot(self.host_memory(), memory, caller)

    def memory_view(
        self, pid: int, with_events: bool = True, caller: str | None = None
    ) -> MemoryView | None:
        h = self.memory
        if h is None or pid <= 0:
            return None
        if caller is None:
            caller = self.files.read(f"{self.proc}/{pid}/cgroup")
        procs = parse_proc_cgroup(caller)
        path = procs.path_in(h)
        if path is None or path == "/" or h.directory(path) is None:
            return None
        return memory_view_for_path(h, path, lambda: self.container_path(pid, h, path),
                                    self.limits, with_events, self.files)

    def container_path(self, pid: int, h: Hierarchy, own_path: str) -> str:
        """The caller's container cgroup: its pid namespace init's cgroup, minus a
        trailing /init.scope; its own cgroup in the host pid namespace."""
        return self._path_via_init(self.namespace_init(pid), h, own_path, pid)

    def _path_via_init(self, init: int | None, h: Hierarchy, own_path: str,
                       caller: int = 0) -> str:
        if init is None:
            return own_path
        try:
            path = own_path if init == caller else read_proc_cgroup(init, self.proc).path_in(h)
        except OSError:
            return own_path
        if path is None:
            return own_path
        if path.endswith("/init.scope"):
            path = path[: -len("/init.scope")] or "/"
        # Only an ancestor of the caller may speak for it.
        if path == "/" or not (own_path == path or own_path.startswith(path + "/")):
            return own_path
        return path

    def _pidns(self, pid: int) -> str:
        """The pid namespace of `pid`, whose /proc/PID/cgroup was just read: noted on that
        file's kept descriptor, since a process never changes its pid namespace and the
        descriptor fails once the process is gone."""
        path = f"{self.proc}/{pid}/cgroup"
        ns = self.files.noted(path)
        if isinstance(ns, str):
            return ns
        ns = os.readlink(f"{self.proc}/{pid}/ns/pid")
        self.files.note(path, ns)
        return ns

    def namespace_init(self, pid: int) -> int | None:
        """The init of `pid`'s pid namespace (None: ours), `pid`'s /proc/PID/cgroup having
        just been read."""
        proc = self.proc
        ns = self._pidns(pid)
        if ns == self.own_pidns:
            return None
        cached = self._ns_init.get(ns)
        if cached is not None:
            try:
                # A live namespace keeps its init alive, so a cached pid still in `ns`
                # is still its init (or at worst a process of the same container).
                if os.readlink(f"{proc}/{cached}/ns/pid") == ns:
                    return cached
            except OSError:
                pass
            del self._ns_init[ns]
        cur = pid
        for _ in range(4096):
            ppid = _ppid(proc, cur)
            if ppid <= 0:
                break
            try:
                if os.readlink(f"{proc}/{ppid}/ns/pid") != ns:
                    break
            except OSError:
                break
            cur = ppid
        if len(self._ns_init) > 4096:
            self._ns_init.clear()
        self._ns_init[ns] = cur
        return cur

