"""Where the cgroup hierarchies are mounted, and which cgroup a process is in.

Everything is discovered from /proc/self/mountinfo; /sys/fs/cgroup is never assumed.
Paths read from /proc/PID/cgroup are relative to the reader's cgroup namespace root,
which is what the mount's root field in mountinfo is expressed in too.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: v2 (controllers from cgroup.controllers) or v1."""

    version: int  # 1 or 2
    mountpoint: str
    root: str  # the mount's root within the hierarchy (mountinfo field 4)
    controllers: frozenset[str]  # v1: mount options naming controllers; v2: empty

    def directory(self, cgroup_path: str) -> str | None:
        """Filesystem directory of `cgroup_path` (as in /proc/PID/cgroup), or None if the
        cgroup lies outside what this mount shows."""
        root = self.root.rstrip("/")
        if root:
            if cgroup_path != root and not cgroup_path.startswith(root + "/"):
                return None
            cgroup_path = cgroup_path[len(root) :] or "/"
        if cgroup_path == "/":
            return self.mountpoint
        return self.mountpoint.rstrip("/") + cgroup_path


V1_CONTROLLERS = frozenset(
    {"cpu", "cpuacct", "cpuset", "memory", "blkio", "pids", "devices", "freezer", "hugetlb",
     "net_cls", "net_prio", "perf_event", "rdma", "misc"}
)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Hierarchy]:
    """All cgroup mounts in a mountinfo text. The first mount of each hierarchy wins."""
    found: list[Hierarchy] = []
    seen: set[tuple[int, frozenset[str]]] = set()
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3:
            continue
        fstype = rf[0]
        key: tuple[int, frozenset[str]]
        if fstype == "cgroup2":
            key = (2, frozenset())
            controllers: frozenset[str] = frozenset()
        elif fstype == "cgroup":
            opts = set(rf[2].split(",")) | set(lf[5].split(",") if len(lf) > 5 else [])
            controllers = frozenset(o for o in opts if o in V1_CONTROLLERS)
            if not controllers:
                continue  # named hierarchies such as name=systemd carry no resources
            key = (1, controllers)
        else:
            continue
        if key in seen:
            continue
        seen.add(key)
        found.append(
            Hierarchy(
                version=2 if fstype == "cgroup2" else 1,
                mountpoint=_unescape(lf[4]),
                root=_unescape(lf[3]),
                controllers=controllers,
            )
        )
    return found


@dataclass(frozen=True)
class Layout:
    """The host's cgroup layout: which hierarchy serves each controller."""

    hierarchies: tuple[Hierarchy, ...]

    def for_controller(self, controller: str) -> Hierarchy | None:
        """The v1 hierarchy with this controller, else the v2 one if the controller is
        enabled there (a hybrid host may mount v2 with few controllers)."""
        for h in self.hierarchies:
            if h.version == 1 and controller in h.controllers:
                return h
        v2 = self.unified
        if v2 is not None and controller in _v2_root_controllers(v2):
            return v2
        return None

    @property
    def unified(self) -> Hierarchy | None:
        for h in self.hierarchies:
            if h.version == 2:
                return h
        return None

    def describe(self) -> str:
        v1 = [h for h in self.hierarchies if h.version == 1]
        if v1 and self.unified:
            return "hybrid (v1 controllers + cgroup2)"
        if v1:
            return "cgroup v1"
        if self.unified:
            return "cgroup v2"
        return "no cgroups mounted"


def _v2_root_controllers(h: Hierarchy) -> frozenset[str]:
    try:
        with open(os.path.join(h.mountpoint, "cgroup.controllers")) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def load_layout(mountinfo_path: str = "/proc/self/mountinfo") -> Layout:
    with open(mountinfo_path) as f:
        return Layout(tuple(parse_mountinfo(f.read())))


@dataclass(frozen=True)
class ProcCgroups:
    """Contents of /proc/PID/cgroup: the v2 path and each v1 controller's path."""

    unified: str | None
    by_controller: dict[str, str]

    def path_in(self, h: Hierarchy) -> str | None:
        if h.version == 2:
            return self.unified
        for c in h.controllers:
            if c in self.by_controller:
                return self.by_controller[c]
        return None


# Every process of a container has the same text: parse it once. The result is shared, so
# nobody may modify it. Small bound: a miss costs only a parse (~5 µs).
@functools.lru_cache(maxsize=256)
def parse_proc_cgroup(text: str) -> ProcCgroups:
    unified: str | None = None
    by_controller: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            unified = path
        else:
            for c in ctrls.split(","):
                by_controller[c] = path
    return ProcCgroups(unified, by_controller)


def read_small(path: str) -> str:
    """Read a small pseudo-file with one read: cheaper than open().read() on the hot path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            chunks = [data]
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data.decode()


def read_optional(path: str) -> str | None:
    """read_small, or None when the file does not exist (an optional cgroup file)."""
    try:
        return read_small(path)
    except FileNotFoundError:
        return None


def proc_stat_fields(pid: int, proc: str = "/proc") -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses):
    [0] is the state, [1] the parent pid, [19] the start time in clock ticks."""
    stat = read_small(f"{proc}/{pid}/stat")
    return stat[stat.rindex(")") + 2 :].split()


def read_proc_cgroup(pid: int, proc: str = "/proc") -> ProcCgroups:
    return parse_proc_cgroup(read_small(f"{proc}/{pid}/cgroup"))


def ancestors(cgroup_path: str) -> list[str]:
    """`/a/b/c` -> [`/a/b/c`, `/a/b`, `/a`, `/`]: the caller's own cgroup first."""
    out = [cgroup_path]
    p = cgroup_path
    while p not in ("/", ""):
        p = p.rsplit("/", 1)[0] or "/"
        out.append(p)
    return out
