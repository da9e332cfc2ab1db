"""Per-container load averages, the kernel's way (design.md §5).

Every SAMPLE_INTERVAL seconds the daemon counts each tracked cgroup's runnable (R) and
uninterruptible (D) threads and folds the count into fixed-point exponential averages
with the kernel's constants (EXP_1, EXP_5, EXP_15 for 5 s samples). Only cgroups read in
the last RETENTION seconds are tracked, so the cost follows what is being looked at, not
how many cgroups the host has. A cgroup read for the first time starts from its current
count instead of from zero, so its first reading is sensible at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from cgprocfs.cpu import task_states

FSHIFT = 11
FIXED_1 = 1 << FSHIFT
EXP = (1884, 2014, 2037)  # 1/exp(5s/1min), 1/exp(5s/5min), 1/exp(5s/15min) in fixed point
SAMPLE_INTERVAL = 5.0
RETENTION = 900.0


def calc_load(load: int, exp: int, active: int) -> int:
    """The kernel's calc_load(): one step of the exponential average, in fixed point."""
    newload = load * exp + active * (FIXED_1 - exp)
    if active >= load:
        newload += FIXED_1 - 1
    return newload // FIXED_1


def format_load(load: int) -> str:
    # The kernel's LOAD_INT / LOAD_FRAC with rounding to two decimals.
    value = load + FIXED_1 // 200
    return f"{value >> FSHIFT}.{((value & (FIXED_1 - 1)) * 100) >> FSHIFT:02d}"


@dataclass
class Load:
    averages: list[int]
    running: int
    threads: int
    last_pid: int
    last_read: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        a = " ".join(format_load(x) for x in self.averages)
        return f"{a} {max(1, self.running)}/{self.threads} {self.last_pid}\n"

    @classmethod
    def current(cls, directory: str, version: int, reader: int = 0) -> Load:
        """A cgroup seen for the first time: its current count in all three averages (not
        counting the `reader` thread, which is running right now)."""
        running, blocked, threads, last_pid = task_states(directory, version, reader)
        active = (running + blocked) * FIXED_1
        return cls([active, active, active], running, threads, last_pid)


class LoadSource(Protocol):
    """Where a view's load averages come from: a LoadTracker of one's own, or the load
    sampler's table shared by every worker (cgprocfs.fuse.loads.SharedLoads)."""

    def read(self, directory: str, version: int, reader: int = 0) -> Load: ...

    def line(self, directory: str, version: int, reader: int = 0) -> bytes:
        """/proc/loadavg's content for the cgroup at `directory`."""
        ...

    def sample(self) -> int: ...


class LoadTracker:
    def __init__(self) -> None:
        self._loads: dict[tuple[str, int], Load] = {}
        self.last_cycle_cpu = 0.0

    def read(self, directory: str, version: int, reader: int = 0) -> Load:
        """The load of the cgroup at `directory`; starts tracking it if new, from its
        current count (not counting the `reader` thread, which is running right now)."""
        key = (directory, version)
        load = self._loads.get(key)
        if load is None:
            load = self._loads[key] = Load.current(directory, version, reader)
        load.last_read = time.monotonic()
        return load

    def line(self, directory: str, version: int, reader: int = 0) -> bytes:
        return self.read(directory, version, reader).line().encode()

    def tracks(self, directory: str, version: int) -> bool:
        return (directory, version) in self._loads

    def items(self) -> list[tuple[tuple[str, int], Load]]:
        return list(self._loads.items())

    def adopt(self, directory: str, version: int, load: Load) -> None:
        """Continue averages kept elsewhere (a restarted sampler's published table)."""
        self._loads[(directory, version)] = load

    def sample(self) -> int:
        """One sampling cycle over the tracked cgroups; returns how many were sampled."""
        started = time.process_time()
        now = time.monotonic()
        for key, load in list(self._loads.items()):
            if now - load.last_read > RETENTION:
                del self._loads[key]
                continue
            try:
                running, blocked, threads, last_pid = task_states(*key)
            except OSError:
                del self._loads[key]  # the cgroup is gone
                continue
            active = (running + blocked) * FIXED_1
            load.averages = [calc_load(a, e, active) for a, e in zip(load.averages, EXP,
                                                                      strict=True)]
            load.running, load.threads, load.last_pid = running, threads, last_pid
        self.last_cycle_cpu = time.process_time() - started
        return len(self._loads)
