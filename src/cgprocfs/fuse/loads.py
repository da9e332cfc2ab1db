"""Load averages shared by all workers.

One sampler process keeps the LoadTracker (the kernel's exponential averages, every
SAMPLE_INTERVAL seconds) and publishes its table in the arena; workers read the table
and tell the sampler, over a datagram socket the supervisor holds, which cgroups are
being looked at. Every worker therefore shows the same numbers, and the averages survive
the restart of any process but the supervisor (a new sampler starts from the published
table).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time

from cgprocfs.fuse.arena import Arena
from cgprocfs.fuse.child import (
    ENV_ARENA_FD,
    ENV_LOADS_FD,
    ENV_LOG_LEVEL,
    die_with_supervisor,
    signal_ready,
)
from cgprocfs.loadavg import SAMPLE_INTERVAL, Load, LoadTracker

log = logging.getLogger("cgprocfs.loads")

# A worker reminds the sampler of a cgroup it shows at most this often (the sampler
# forgets cgroups nobody asked about for loadavg.RETENTION seconds).
REMIND_EVERY = 60.0


def _key(directory: str, version: int) -> str:
    return f"{version}:{directory}"


class SharedLoads:
    """What a worker uses instead of its own LoadTracker (same read())."""

    def __init__(self, arena: Arena, sock_fd: int) -> None:
        self.arena = arena
        self.sock = socket.socket(fileno=os.dup(sock_fd))
        self.sock.setblocking(False)
        self._version = -1
        self._table: dict[str, tuple[int, ...]] = {}
        # Cleared with each new table (every SAMPLE_INTERVAL at most).
        self._first: dict[str, Load] = {}
        self._lines: dict[str, bytes] = {}
        self._reminded: dict[str, float] = {}

    def sample(self) -> int:
        """The sampler process samples; nothing to do here (LoadTracker's interface)."""
        return 0

    def read(self, directory: str, version: int, reader: int = 0) -> Load:
        return self._load(self._refresh(directory, version, reader), directory, version,
                          reader)

    def line(self, directory: str, version: int, reader: int = 0) -> bytes:
        """The file's bytes: the same from one published table to the next, so they are
        formatted once per table and container."""
        key = self._refresh(directory, version, reader)
        text = self._lines.get(key)
        if text is None:
            load = self._load(key, directory, version, reader)
            text = self._lines[key] = load.line().encode()
        return text

    def _load(self, key: str, directory: str, version: int, reader: int) -> Load:
        entry = self._table.get(key)
        if entry is None:  # not sampled yet: its count at the first read, until sampled
            load = self._first.get(key)
            if load is None:
                load = self._first[key] = Load.current(directory, version, reader)
            return load
        a1, a5, a15, running, threads, last_pid = entry
        return Load([a1, a5, a15], running, threads, last_pid)

    def _refresh(self, directory: str, version: int, reader: int) -> str:
        """Take the sampler's latest table; remind it of this cgroup now and then."""
        key = _key(directory, version)
        now = time.monotonic()
        if self.arena.loads_version() != self._version:
            self._version, self._table = self.arena.read_loads()
            self._first.clear()
            self._lines.clear()
            # A reminder older than REMIND_EVERY counts as none: forget it, so that the
            # containers removed since do not pile up here.
            self._reminded = {k: t for k, t in self._reminded.items()
                              if now - t < REMIND_EVERY}
        if now - self._reminded.get(key, -REMIND_EVERY) >= REMIND_EVERY:
            try:
                self.sock.send(f"{key}\0{reader}".encode())
                self._reminded[key] = now
            except OSError:
                pass  # the sampler is restarting; we remind it on a later read
        return key


def publish(arena: Arena, tracker: LoadTracker) -> None:
    table = {_key(d, v): (*load.averages, load.running, load.threads, load.last_pid)
             for (d, v), load in tracker.items()}
    arena.publish_loads(table)


def restore(arena: Arena, tracker: LoadTracker) -> None:
    _, table = arena.read_loads()
    for key, (a1, a5, a15, running, threads, last_pid) in table.items():
        version, _, directory = key.partition(":")
        tracker.adopt(directory, int(version), Load([a1, a5, a15], running, threads, last_pid))


def run_sampler(arena: Arena, sock: socket.socket) -> None:
    tracker = LoadTracker()
    restore(arena, tracker)
    next_sample = time.monotonic() + SAMPLE_INTERVAL
    while True:
        timeout = max(0.0, next_sample - time.monotonic())
        ready, _, _ = select.select([sock], [], [], timeout)
        changed = False
        while ready:
            try:
                msg = sock.recv(8192, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            key, _, reader = msg.decode(errors="replace").partition("\0")
            version, _, directory = key.partition(":")
            try:
                new = not tracker.tracks(directory, int(version))
                tracker.read(directory, int(version), int(reader or 0))
                changed |= new
            except (OSError, ValueError):
                continue  # a cgroup gone since, or a garbled message
        if time.monotonic() >= next_sample:
            try:
                n = tracker.sample()
            except Exception:
                log.exception("load sampling failed; trying again next cycle")
                n = 0
            next_sample += SAMPLE_INTERVAL
            if next_sample < time.monotonic():  # we were stopped: do not catch up
                next_sample = time.monotonic() + SAMPLE_INTERVAL
            log.debug("load sample: %d cgroups, %.1f ms CPU", n,
                      tracker.last_cycle_cpu * 1000)
            changed = True
        if changed:
            publish(arena, tracker)


def main() -> int:
    logging.basicConfig(level=os.environ.get(ENV_LOG_LEVEL, "INFO").upper(),
                        format="cgprocfs[%(process)d] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_supervisor()
    arena = Arena(int(os.environ[ENV_ARENA_FD]))
    sock = socket.socket(fileno=int(os.environ[ENV_LOADS_FD]))
    signal_ready()
    run_sampler(arena, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
