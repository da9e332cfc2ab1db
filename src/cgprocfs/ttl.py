"""One small cache with an explicit freshness bound, for everything the daemon may serve
from memory: a value is reloaded once it is older than `max_age` seconds."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, max_age: float, max_entries: int = 8192) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V]] = {}
        self._inserts = 0

    def get(self, key: K, load: Callable[[], V]) -> V:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.max_age:
            return hit[1]
        value = load()
        self._inserts += 1
        if self._inserts % 512 == 0 or len(self._entries) >= self.max_entries:
            self._purge(now)
        self._entries[key] = (now, value)
        return value

    def put(self, key: K, value: V) -> None:
        """Replace a value, keeping the age of the entry it refines (a bound is a bound)."""
        hit = self._entries.get(key)
        self._entries[key] = (hit[0] if hit is not None else time.monotonic(), value)

    def _purge(self, now: float) -> None:
        """Drop what has expired (keys of removed cgroups and exited pids would otherwise
        pile up until the size bound); clear all if it is still full."""
        self._entries = {k: e for k, e in self._entries.items() if now - e[0] < self.max_age}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
