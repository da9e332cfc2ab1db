"""TtlCache: values reload after their bound, and with a shared table one process's load
serves its siblings with the age it was loaded at."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cgprocfs.fuse.arena import Arena
from cgprocfs.ttl import Sharing, TtlCache, WhileCgroupExists


def shared_cache(arena: Arena, max_age: float) -> TtlCache[str, tuple[int, str]]:
    cache = TtlCache[str, tuple[int, str]](max_age)
    cache.sharing = Sharing(arena, lambda k: f"test/1\0{k}".encode(), lambda v: v,
                            lambda k, data: (int(data[0]), str(data[1])))  # type: ignore[index]
    return cache


def test_a_value_is_reloaded_after_its_bound() -> None:
    cache = TtlCache[str, int](0.05)
    loads = []
    assert cache.get("a", lambda: loads.append(1) or 1) == 1
    assert cache.get("a", lambda: loads.append(2) or 2) == 1
    time.sleep(0.06)
    assert cache.get("a", lambda: loads.append(3) or 3) == 3
    assert loads == [1, 3]


def test_siblings_share_loads_within_the_bound_and_reload_after_it() -> None:
    arena = Arena.create(seats=2, slots_per_seat=4)
    one, two = shared_cache(arena, 0.2), shared_cache(Arena(arena.fd), 0.2)
    assert one.get("ct-1", lambda: (1, "one")) == (1, "one")
    # The sibling takes the shared value instead of loading its own.
    assert two.get("ct-1", lambda: (2, "two")) == (1, "one")
    assert two.get("ct-2", lambda: (3, "two")) == (3, "two")  # another key: loaded
    one.put("ct-1", (4, "refined"))  # a refinement keeps its age and is shared too
    fresh = shared_cache(Arena(arena.fd), 0.2)
    assert fresh.get("ct-1", lambda: (5, "x")) == (4, "refined")
    time.sleep(0.25)  # past the bound: shared or not, the value is loaded again
    assert two.get("ct-1", lambda: (6, "two")) == (6, "two")
    assert fresh.get("ct-1", lambda: (7, "x")) == (6, "two")


def test_a_shared_value_this_release_cannot_read_is_loaded_instead() -> None:
    arena = Arena.create(seats=2, slots_per_seat=4)
    arena.store_shared(b"test/1\0ct-1", time.monotonic(), "not a pair")
    cache = shared_cache(arena, 1.0)
    assert cache.get("ct-1", lambda: (1, "loaded")) == (1, "loaded")


def test_a_value_refreshed_unchanged_elsewhere_is_renewed_without_decoding_it() -> None:
    arena = Arena.create(seats=2, slots_per_seat=4)
    decoded: list[object] = []
    cache = TtlCache[str, tuple[int, str]](0.2)
    cache.sharing = Sharing(arena, lambda k: f"test/1\0{k}".encode(), lambda v: v,
                            lambda k, data: decoded.append(data) or  # type: ignore[func-returns-value]
                            (int(data[0]), str(data[1])))  # type: ignore[index]
    assert cache.get("ct-1", lambda: (1, "one")) == (1, "one")
    time.sleep(0.15)
    # Another process reloads it before it expires and finds the same value.
    (index, digest, at, value), = arena.due_shared(time.monotonic())
    refreshed_at = time.monotonic()
    assert arena.refresh_shared(index, digest, at, refreshed_at, value)
    time.sleep(0.1)  # past the bound of the first load, within that of the refresh
    assert cache.get("ct-1", lambda: (2, "loaded")) == (1, "one")
    assert decoded == []  # renewed in place: nothing decoded, nothing loaded
    time.sleep(0.05)
    # A refresh that found a change: the new value is decoded and served.
    (index, digest, at, _), = arena.due_shared(time.monotonic())
    assert arena.refresh_shared(index, digest, at, time.monotonic(), (3, "changed"))
    time.sleep(0.12)
    assert cache.get("ct-1", lambda: (4, "loaded")) == (3, "changed")
    assert decoded == [(3, "changed")]


def test_a_worker_that_only_fetches_shared_values_still_drops_expired_ones() -> None:
    """Keys of removed containers must not pile up in a worker whose values all come from
    its siblings (the common case with refresh ahead): fetches count towards the purge."""
    arena = Arena.create(seats=2, slots_per_seat=4)
    loader, fetcher = shared_cache(arena, 0.05), shared_cache(Arena(arena.fd), 0.05)
    for i in range(600):
        loader.get(f"ct-{i}", lambda i=i: (i, "x"))  # type: ignore[misc]
        assert fetcher.get(f"ct-{i}", lambda: (-1, "loaded")) == (i, "x")
        if i == 299:
            time.sleep(0.06)  # the first 300 expire
    assert len(fetcher._entries) < 600  # purged at its 512th new key
    assert "ct-0" not in fetcher._entries and "ct-599" in fetcher._entries


def test_entries_of_a_removed_cgroup_are_dropped_at_the_next_sweep(tmp_path: Path) -> None:
    live, removed = tmp_path / "live", tmp_path / "removed"
    live.mkdir()
    removed.mkdir()
    kept = WhileCgroupExists[str, int](sweep_every=4)
    kept.put("a", str(live), 1)
    kept.put("b", str(removed), 2)
    kept.put("a", str(live), 3)  # an update is not a new key
    assert (kept.get("a"), kept.get("b"), len(kept)) == (3, 2, 2)
    os.rmdir(removed)
    kept.put("c", str(live), 4)
    assert kept.get("b") == 2  # only 3 new keys so far: no sweep yet
    kept.put("d", str(live), 5)  # the 4th new key sweeps
    assert kept.get("b") is None and [kept.get(k) for k in "acd"] == [3, 4, 5]


def test_a_full_map_of_live_cgroups_starts_over(tmp_path: Path) -> None:
    kept = WhileCgroupExists[int, int](sweep_every=2, max_entries=4)
    for i in range(6):  # sweeps at the 2nd, 4th and 6th new key; full at the 6th
        kept.put(i, str(tmp_path), i)
    assert len(kept) == 1 and kept.get(5) == 5 and kept.get(0) is None
