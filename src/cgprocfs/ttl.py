"""One small cache with an explicit freshness bound, for everything the daemon may serve
from memory: a value is reloaded once it is older than `max_age` seconds.

A cache may also be backed by a table its sibling processes share (the FUSE workers'
arena): a value one worker loaded serves the others too, with the age it was loaded at,
so the bound holds whichever process answers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


Token = tuple[int, bytes, bytes]


class SharedTable(Protocol):
    """Values (marshal-able) by key, seen by several processes; loaded_at is
    time.monotonic(), which all processes of a host share."""

    def fetch_shared(self, key: bytes, newer_than: float
                     ) -> tuple[float, object, Token] | None:
        """(loaded at, value, token); None also for an entry loaded at or before
        `newer_than` (stale to the caller)."""

    def store_shared(self, key: bytes, loaded_at: float, value: object) -> Token | None:
        """A token for the value stored; None when it cannot be shared."""

    def renew_shared(self, token: Token, newer_than: float) -> float | None:
        """When the value behind `token` was loaded again (unchanged), if after
        `newer_than`; else None."""


class RefreshableTable(SharedTable, Protocol):
    """A SharedTable that keeps track of which entries are in use, so that an idle
    process can refresh them before they expire."""

    def due_shared(self, loaded_before: float) -> list[tuple[int, bytes, float, object]]:
        """(index, key digest, loaded at, value) of the entries in use loaded before
        `loaded_before`."""

    def refresh_shared(self, index: int, digest: bytes, was_loaded_at: float,
                       loaded_at: float, value: object) -> bool:
        """Replace entry `index` by a value loaded at `loaded_at`, unless it changed since
        due_shared read it. Counts as one refresh without use."""

    def forget_shared(self, index: int) -> None:
        """Stop refreshing entry `index` until a process uses it again."""


@dataclass(frozen=True)
class Sharing(Generic[K, V]):
    """How one cache's entries go into and come out of a SharedTable."""

    table: SharedTable
    key: Callable[[K], bytes]
    dump: Callable[[V], object]
    load: Callable[[K, object], V]  # may raise ValueError, TypeError or IndexError


class TtlCache(Generic[K, V]):
    def __init__(self, max_age: float, max_entries: int = 8192) -> None:
        self.max_age = max_age
        self.max_entries = max_entries
        self.sharing: Sharing[K, V] | None = None
        self._entries: dict[K, tuple[float, V]] = {}
        self._tokens: dict[K, Token] = {}  # where each shared value is, to renew it by
        self._inserts = 0

    def get(self, key: K, load: Callable[[], V]) -> V:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.max_age:
            return hit[1]
        if self.sharing is not None:
            # A value another process reloaded and found unchanged: renewed in place,
            # without decoding it again (the common case while it is refreshed ahead).
            token = self._tokens.get(key)
            if hit is not None and token is not None:
                at = self.sharing.table.renew_shared(token, now - self.max_age)
                if at is not None:
                    self._entries[key] = (at, hit[1])
                    return hit[1]
            shared = self._from_shared(self.sharing, key, now)
            if shared is not None:
                if hit is None:  # a worker that mostly fetches must purge too
                    self._count_insert(now)
                self._entries[key] = shared
                return shared[1]
        value = load()
        self._count_insert(now)
        self._entries[key] = (now, value)
        if self.sharing is not None:
            self._to_shared(self.sharing, key, now, value)
        return value

    def put(self, key: K, value: V) -> None:
        """Replace a value, keeping the age of the entry it refines (a bound is a bound)."""
        hit = self._entries.get(key)
        at = hit[0] if hit is not None else time.monotonic()
        self._entries[key] = (at, value)
        if self.sharing is not None:
            self._to_shared(self.sharing, key, at, value)

    def _from_shared(self, sharing: Sharing[K, V], key: K, now: float
                     ) -> tuple[float, V] | None:
        # Stale entries are the common miss (one worker serving): skip their unmarshalling.
        got = sharing.table.fetch_shared(sharing.key(key), now - self.max_age)
        if got is None:
            return None
        try:
            value = sharing.load(key, got[1])
        except (ValueError, TypeError, IndexError):
            return None  # not what this version stores: load it ourselves
        self._tokens[key] = got[2]
        return got[0], value

    def _to_shared(self, sharing: Sharing[K, V], key: K, at: float, value: V) -> None:
        token = sharing.table.store_shared(sharing.key(key), at, sharing.dump(value))
        if token is None:
            self._tokens.pop(key, None)
        else:
            self._tokens[key] = token

    def _count_insert(self, now: float) -> None:
        self._inserts += 1
        if self._inserts % 512 == 0 or len(self._entries) >= self.max_entries:
            self._purge(now)

    def _purge(self, now: float) -> None:
        """Drop what has expired (keys of removed cgroups and exited pids would otherwise
        pile up until the size bound); clear all if it is still full."""
        self._entries = {k: e for k, e in self._entries.items() if now - e[0] < self.max_age}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._tokens = {k: t for k, t in self._tokens.items() if k in self._entries}


class WhileCgroupExists(Generic[K, V]):
    """Values kept per container for as long as its cgroup directory exists (the last CPU
    counters shown, the oldest process found). Without this a busy node's daemon would
    keep one entry for every container it ever served. (A cgroup re-created at the same
    path may find its predecessor's entry if no sweep came between: each user checks what
    it finds, the counters by the container's start in their key, the oldest process by
    its start time.) Gone directories are swept once per `sweep_every` new keys, one stat(2) each,
    so a lookup stays a dict lookup; `max_entries` still bounds a node with that many live."""

    def __init__(self, sweep_every: int = 256, max_entries: int = 8192) -> None:
        self.sweep_every = sweep_every
        self.max_entries = max_entries
        self._entries: dict[K, tuple[str, V]] = {}
        self._new_keys = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        hit = self._entries.get(key)
        return None if hit is None else hit[1]

    def put(self, key: K, directory: str, value: V) -> None:
        if key not in self._entries:
            self._new_keys += 1
            if self._new_keys >= self.sweep_every:
                self.sweep()
        self._entries[key] = (directory, value)

    def sweep(self) -> None:
        """Drop the entries of removed cgroups (and all, if still full)."""
        self._new_keys = 0
        gone = {d for d in {e[0] for e in self._entries.values()} if not os.path.isdir(d)}
        if gone:
            self._entries = {k: e for k, e in self._entries.items() if e[0] not in gone}
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
