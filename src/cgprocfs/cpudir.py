"""The caller's /sys/devices/system/cpu: the host's directory, where `cpuN` lists only the
caller's visible CPUs, renumbered from 0 (so htop's CPU meters, glibc's
_SC_NPROCESSORS_CONF and lscpu agree with /proc/cpuinfo and /proc/stat), and everything
else is the host's own, read through. `online`, `possible` and `present` are views
served by the FUSE layer itself.

What a name means depends on who asks, so the FUSE layer gives these entries no entry
cache; the host paths behind them get inode numbers derived from the path, the same in
every worker process and every daemon generation (a worker asked about an inode it has
not seen yet finds its path by walking the host directory once).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence

_CPU = re.compile(r"cpu(\d+)")
# Listing and reading sysfs is cheap but not free: a directory has at most this many
# entries and a file at most this many bytes through the mirror.
MAX_FILE = 1 << 20
# Mirror inodes: 2^32 + a 48-bit hash of the host path (tree inodes stay below 2^31).
INODE_BASE = 1 << 32


class CpuDir:
    def __init__(self, host_dir: str, visible: Callable[[int], Sequence[int] | None],
                 static_names: Sequence[str]) -> None:
        self.host_dir = host_dir.rstrip("/")
        self.visible = visible
        self.static = set(static_names)
        self._inodes: dict[str, int] = {}
        self._paths: dict[int, str] = {}

    def inode_of(self, path: str) -> int:
        inode = self._inodes.get(path)
        if inode is None:
            digest = hashlib.blake2b(path.encode(), digest_size=6).digest()
            inode = INODE_BASE + int.from_bytes(digest, "little")
            if len(self._inodes) > 200_000:  # hotplug churn: start over, it is a cache
                self._inodes.clear()
                self._paths.clear()
            self._inodes[path] = inode
            self._paths[inode] = path
        return inode

    def path_of(self, inode: int) -> str | None:
        if inode < INODE_BASE:
            return None
        path = self._paths.get(inode)
        if path is None:
            self._walk()
            path = self._paths.get(inode)
        return path

    def _walk(self) -> None:
        """Learn every host path under the directory (the kernel may ask this worker
        about an inode another worker, or an earlier generation, handed out)."""
        for root, dirs, files in os.walk(self.host_dir):
            for name in dirs + files:
                self.inode_of(f"{root}/{name}")

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
