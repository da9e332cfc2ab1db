"""Pseudo-files read again and again, kept open and re-read from offset 0.

Every open of a view reads the caller's /proc/PID/cgroup and a few files of its
container's cgroup. Opening such a file by path walks the path each time (procfs looks the
pid up, kernfs revalidates each component) and costs 2-4 times what the read itself does:
measured on the 2-vCPU test VM, /proc/PID/cgroup 14 µs by path against 6.6 re-read,
cpuacct.usage_all 12.6 against 2.8, memory.limit_in_bytes 11.6 against 1.9.

A kept descriptor never serves stale or someone else's figures:
- procfs and kernfs (cgroup) files generate their content at every read from offset 0
  (seq_file), so a re-read is as fresh as a new open;
- a descriptor of /proc/PID/... belongs to the process it was opened for, not to the pid
  number: once that process is gone every read fails (ESRCH), even after the pid is
  reused, and a failed read reopens the path, which finds the new process, or nothing;
- a descriptor of a removed cgroup's file fails every read (ENODEV), so a cgroup
  re-created at the same path is reopened too. Holding it does not keep the removed
  cgroup alive (measured: the cgroup is freed at rmdir, the descriptor only fails).

Only for such pseudo-files: a regular file replaced by a rename would go on being read
from the old one. Descriptors unused for IDLE_S are closed, and at most `max_files` are
kept (the least recently used go first), so the set follows the containers in use.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import OrderedDict

# Long enough for a poller coming back every few seconds (top: 3 s) to find its files.
# A worker waiting for requests is woken this often to close them (worker.py).
IDLE_S = 5.0
# How often reads look for idle descriptors to close.
SWEEP_EVERY_S = 1.0
MAX_FILES = 2048  # per worker, unless the kept_files setting says otherwise
CHUNK = 65536
# The soft descriptor limit a worker asks for, and so the largest kept_files that fits in
# the quarter of it that kept files may take.
FD_LIMIT = 65536
MAX_FILES_SETTING = FD_LIMIT // 4


def raise_fd_limit(want: int = FD_LIMIT) -> None:
    """Raise this process's soft descriptor limit towards `want`, within the hard limit
    (systemd starts services with a soft limit of 1,024 and a hard one far above)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        # On failure keep the limit we have: fewer files are kept open, that is all.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def capped_max_files(want: int = MAX_FILES) -> int:
    """`want` (the kept_files setting), or fewer when the descriptor limit is low: a
    quarter of it, so that kept files never starve the process of descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max(0, want)
    return max(0, min(want, soft // 4))


class _Kept:
    __slots__ = ("fd", "note", "used")

    def __init__(self, fd: int, used: float) -> None:
        self.fd = fd
        self.used = used
        self.note: object = None


class KeptFiles:
    def __init__(self, max_files: int | None = None) -> None:
        self.max_files = capped_max_files() if max_files is None else max_files
        self._files: OrderedDict[str, _Kept] = OrderedDict()  # least recently used first
        self._swept = time.monotonic()

    def __len__(self) -> int:
        return len(self._files)

    def read(self, path: str) -> str:
        """The file's content now, as read_small would return it (and raising what it
        raises: FileNotFoundError when there is no such file)."""
        return self._read(path)[0]

    def read_optional(self, path: str) -> str | None:
        """read, or None when the file does not exist (an optional cgroup file)."""
        try:
            return self._read(path)[0]
        except FileNotFoundError:
            return None

    def read_noted(self, path: str) -> tuple[str, object]:
        """read, and the note attached to the descriptor it was read from (None for a
        descriptor just opened): what holds as long as the file is the same one, like the
        pid namespace of the process a /proc/PID file belongs to."""
        text, kept = self._read(path)
        return text, kept.note if kept is not None else None

    def noted(self, path: str) -> object:
        """The note of the descriptor kept for `path`, without reading it: only right
        after a read of `path` has shown that the descriptor is still good."""
        kept = self._files.get(path)
        return kept.note if kept is not None else None

    def note(self, path: str, value: object) -> None:
        kept = self._files.get(path)
        if kept is not None:
            kept.note = value

    def _read(self, path: str) -> tuple[str, _Kept | None]:
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY_S:
            self.close_idle(now)
        files = self._files
        kept = files.get(path)
        if kept is not None:
            try:
                data = _pread_all(kept.fd)
            except OSError:
                # Gone (ESRCH, ENODEV) or broken: drop it and look again by path.
                del files[path]
                os.close(kept.fd)
            else:
                kept.used = now
                files.move_to_end(path)
                return data.decode(), kept
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _pread_all(fd)
        except BaseException:
            os.close(fd)
            raise
        if self.max_files <= 0:
            os.close(fd)
            return data.decode(), None
        while len(files) >= self.max_files:
            os.close(files.popitem(last=False)[1].fd)
        kept = files[path] = _Kept(fd, now)
        return data.decode(), kept

    def close_idle(self, now: float | None = None) -> int:
        """Close the descriptors unused for IDLE_S; returns how many."""
        now = time.monotonic() if now is None else now
        self._swept = now
        files = self._files
        closed = 0
        while files:
            path, kept = next(iter(files.items()))
            if now - kept.used < IDLE_S:
                break
            del files[path]
            os.close(kept.fd)
            closed += 1
        return closed

    def close_all(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1].fd)


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, CHUNK, 0)
    if len(data) < CHUNK:
        return data
    chunks = [data]
    off = len(data)
    while chunk := os.pread(fd, CHUNK, off):
        chunks.append(chunk)
        off += len(chunk)
    return b"".join(chunks)
