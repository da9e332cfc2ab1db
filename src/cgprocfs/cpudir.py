"""The caller's /sys/devices/system/cpu: the host's directory, where `cpuN` lists only the
caller's visible CPUs, renumbered from 0 (so htop's CPU meters, glibc's
_SC_NPROCESSORS_CONF and lscpu agree with /proc/cpuinfo and /proc/stat), and everything
else is the host's own, read through. `online`, `possible` and `present` are views
served by the FUSE layer itself.

What a name means depends on who asks, so the FUSE layer gives these entries no entry
cache; the host paths behind them get inode numbers of their own, stable for the
daemon's life.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

_CPU = re.compile(r"cpu(\d+)")
# Listing and reading sysfs is cheap but not free: a directory has at most this many
# entries and a file at most this many bytes through the mirror.
MAX_FILE = 1 << 20


class CpuDir:
    def __init__(self, host_dir: str, visible: Callable[[int], Sequence[int] | None],
                 static_names: Sequence[str], first_inode: int) -> None:
        self.host_dir = host_dir.rstrip("/")
        self.visible = visible
        self.static = set(static_names)
        self._next = first_inode
        self._inodes: dict[str, int] = {}
        self._paths: dict[int, str] = {}

    def inode_of(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            inode = self._next
            self._next += 1
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def path_of(self, inode: int) -> str | None:
        return self._paths.get(inode)

    def top_entry(self, name: str, pid: int) -> str | None:
        """The host path behind `name` directly under the cpu directory, for `pid`."""
        if name in self.static or "/" in name or name in (".", ".."):
            return None
        m = _CPU.fullmatch(name)
        if m:
            cpus = self.visible(pid)
            k = int(m.group(1))
            if cpus is not None:
                if k >= len(cpus):
                    return None
                name = f"cpu{cpus[k]}"
        path = f"{self.host_dir}/{name}"
        return path if os.path.lexists(path) else None

    def top_listing(self, pid: int) -> list[tuple[str, str]]:
        """(name shown, host path) for the cpu directory's dynamic entries."""
        cpus = self.visible(pid)
        out = []
        for name in sorted(os.listdir(self.host_dir)):
            if name in self.static:
                continue
            if _CPU.fullmatch(name):
                if cpus is None:
                    out.append((name, f"{self.host_dir}/{name}"))
                continue
            out.append((name, f"{self.host_dir}/{name}"))
        if cpus is not None:
            out.extend((f"cpu{k}", f"{self.host_dir}/cpu{c}") for k, c in enumerate(cpus))
        return out

    @staticmethod
    def read(path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, MAX_FILE)
        finally:
            os.close(fd)
