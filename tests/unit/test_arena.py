"""The shared arena: handles survive any worker, stale handles never read bytes, seats
keep unanswered requests, loads publish atomically."""

from __future__ import annotations

import math
import os
import time

from cgprocfs.fuse import abi
from cgprocfs.fuse.arena import SHARED_KEEP, SLOT_DATA, Arena


def make() -> Arena:
    return Arena.create(seats=2, slots_per_seat=8)


def fetched(arena: Arena, key: bytes, newer_than: float = -math.inf
            ) -> tuple[float, object] | None:
    """(loaded at, value) of a shared entry, without its token."""
    got = arena.fetch_shared(key, newer_than)
    return None if got is None else got[:2]


def test_a_handle_reads_its_bytes_from_another_mapping() -> None:
    a = make()
    slot = a.allocate(0, 5)
    assert slot == 0
    fh = a.store(slot, inode=42, pid=7, data=b"hello")
    other = Arena(a.fd)  # what another worker process maps
    found = other.lookup(fh)
    assert found is not None
    start, length, inode, flags, opener = found
    assert (length, inode, flags, opener) == (5, 42, 0, 7)
    assert other.mem[start : start + length] == b"hello"


def test_a_stale_or_foreign_handle_names_nothing() -> None:
    a = make()
    fh = a.store(a.allocate(0, 3), 1, 1, b"abc")  # type: ignore[arg-type]
    assert a.free(fh)
    assert a.lookup(fh) is None  # freed
    fh2 = a.store(a.allocate(0, 3), 1, 1, b"xyz")  # type: ignore[arg-type]
    assert fh2 & 0xFFFFFFFF == fh & 0xFFFFFFFF and fh2 != fh  # same slot, new generation
    assert a.lookup(fh) is None  # the old handle does not read the new bytes
    assert a.lookup(1 << 32 | 10_000) is None  # out of range
    assert not a.free(fh)  # a RELEASE of a stale handle frees nothing


def test_slots_are_per_seat_lowest_first_and_large_contents_span_slots() -> None:
    a = make()
    assert a.allocate(1, 10) == 8  # seat 1 owns slots 8..15
    big = b"x" * (SLOT_DATA + 100)
    s = a.allocate(0, len(big))
    assert s == 0
    fh = a.store(s, 1, 1, big)  # type: ignore[arg-type]
    assert a.allocate(0, 1) == 2  # slots 0 and 1 are taken by the large one
    found = a.lookup(fh)
    assert found is not None and found[1] == len(big)
    assert a.mem[found[0] : found[0] + found[1]] == big
    a.free(fh)
    assert a.allocate(0, 1) == 0
    assert a.in_use() == 3


def test_a_full_seat_says_so() -> None:
    a = make()
    for _ in range(8):
        assert a.allocate(0, 1) is not None
    assert a.allocate(0, 1) is None
    assert a.allocate(1, 1) == 8


def test_replace_keeps_the_handle_and_refuses_what_does_not_fit() -> None:
    a = make()
    fh = a.store(a.allocate(0, 4), 3, 9, b"old!")  # type: ignore[arg-type]
    assert a.replace(fh, b"new bytes")
    found = a.lookup(fh)
    assert found is not None and a.mem[found[0] : found[0] + found[1]] == b"new bytes"
    assert not a.replace(fh, b"y" * (SLOT_DATA + 1))


def test_a_seat_keeps_an_unanswered_request() -> None:
    a = make()
    buf = a.request_buffer(1)
    buf[:4] = (56).to_bytes(4, "little")  # what read(/dev/fuse) leaves: the length first
    assert Arena(a.fd).pending_length(1) == 56
    assert a.bump_attempts(1) == 1 and a.bump_attempts(1) == 2
    a.clear_seat(1)
    a.reset_attempts(1)
    assert a.pending_length(1) == 0 and a.bump_attempts(1) == 1


def test_a_seat_tells_the_last_request_its_worker_took_even_once_answered() -> None:
    """What a parked worker watches to tell a stuck leader from a busy one."""
    a = make()
    buf = a.request_buffer(0)
    abi.IN_HEADER.pack_into(buf, 0, 56, abi.READ, 7_000_000_001, 5, 0, 0, 1234, 0, 0)
    other = Arena(a.fd)
    assert other.last_unique(0) == 7_000_000_001 and other.last_unique(1) == 0
    a.clear_seat(0)
    assert other.pending_length(0) == 0 and other.last_unique(0) == 7_000_000_001


def test_loads_publish_and_read_back() -> None:
    a = make()
    assert a.read_loads() == (0, {})
    a.publish_loads({"1:/sys/fs/cgroup/cpu/x": (2048, 1024, 512, 1, 3, 99)})
    a.publish_loads({"2:/sys/fs/cgroup/y": (1, 2, 3, 4, 5, 6)})
    version, table = Arena(a.fd).read_loads()
    assert version == 2
    assert table == {"2:/sys/fs/cgroup/y": (1, 2, 3, 4, 5, 6)}
    os.close(a.fd)


def test_cpu_counters_shown_never_go_back_across_workers() -> None:
    a = make()
    b = Arena(a.fd)  # another worker
    assert a.times_at_least(12345, (10, 5, 100)) == (10, 5, 100)
    assert b.times_at_least(12345, (11, 5, 99)) == (11, 5, 100)  # idle stays at 100
    assert a.times_at_least(999, (1, 1, 1)) == (1, 1, 1)  # another container: its own
    assert a.times_at_least(12345, (9, 9, 9)) == (11, 9, 100)


def test_one_spinner_at_a_time_and_a_dead_ones_flag_is_cleared_by_its_seat() -> None:
    a = Arena.create(seats=3, slots_per_seat=2)
    b = Arena(a.fd)  # another worker's mapping
    assert a.start_spinning(0)
    assert not b.start_spinning(1)  # seat 0 spins: seat 1 blocks in read() instead
    b.stop_spinning(1)  # not its flag: nothing changes
    assert not b.start_spinning(2)
    # Seat 0's worker is killed while spinning; its successor clears the flag at start.
    Arena(a.fd).stop_spinning(0)
    assert b.start_spinning(1)
    b.stop_spinning(1)
    assert a.start_spinning(2)


def test_shared_entries_serve_every_mapping_and_never_another_key() -> None:
    a = make()
    other = Arena(a.fd)
    a.store_shared(b"placement/1\0ct-1", 10.5, (1, "/ct-1", "/sys/fs/cgroup/cpu/ct-1", None,
                                                (0, 1), 3.25))
    assert fetched(other, b"placement/1\0ct-1") == (
        10.5, (1, "/ct-1", "/sys/fs/cgroup/cpu/ct-1", None, (0, 1), 3.25))
    assert fetched(other, b"placement/1\0ct-2") is None
    other.store_shared(b"placement/1\0ct-1", 11.0, None)  # replaced in place
    assert fetched(a, b"placement/1\0ct-1") == (11.0, None)
    # An entry loaded at or before `newer_than` is stale to the caller: missing.
    assert fetched(a, b"placement/1\0ct-1", newer_than=11.0) is None
    assert fetched(a, b"placement/1\0ct-1", newer_than=10.9) == (11.0, None)
    a.store_shared(b"big", 1.0, "x" * 10_000)  # too large to share: dropped
    assert fetched(a, b"big") is None
    a.store_shared(b"odd", 1.0, object())  # not marshal-able: dropped
    assert fetched(a, b"odd") is None


def test_a_torn_shared_entry_reads_as_missing() -> None:
    a = make()
    a.store_shared(b"k", 5.0, ("/ct-1", 1))
    # Find the entry and change one byte of its value, as a concurrent rewrite would.
    base = a.layout.shared_off
    raw = bytes(a.mem[base:])
    at = raw.find(b"/ct-1")
    assert at > 0
    a.mem[base + at + 4] = ord("2")
    assert fetched(a, b"k") is None


def test_an_arena_of_an_earlier_release_grows_to_take_the_shared_entries() -> None:
    a = make()
    os.ftruncate(a.fd, a.layout.shared_off)  # what a release without them allocated
    taken = Arena(a.fd)
    assert os.fstat(a.fd).st_size == taken.layout.size
    taken.store_shared(b"k", 1.0, 7)
    assert fetched(taken, b"k") == (1.0, 7)


def test_entries_in_use_are_due_for_refresh_until_unused_for_shared_keep_refreshes() -> None:
    a = make()
    refresher = Arena(a.fd)  # another process's mapping
    a.store_shared(b"in use", 10.0, ("old", 1))
    a.store_shared(b"young", 12.0, ("young", 1))
    # Only entries loaded before the bound are due; the young one waits its turn.
    due = refresher.due_shared(loaded_before=11.0)
    assert [(at, value) for _, _, at, value in due] == [(10.0, ("old", 1))]
    index, digest, at, _ = due[0]
    assert refresher.refresh_shared(index, digest, at, 11.5, ("new", 2))
    assert fetched(a, b"in use") == (11.5, ("new", 2))  # a use: back to SHARED_KEEP
    loaded = 11.5
    for n in range(SHARED_KEEP):  # refreshed SHARED_KEEP times without a use, then not
        (index, digest, at, value), = [d for d in refresher.due_shared(loaded + 1)
                                       if d[3][0] != "young"]
        assert (at, value) == (loaded, ("new", 2 + n))
        assert refresher.refresh_shared(index, digest, at, loaded + 1, ("new", 3 + n))
        loaded += 1
    assert [d for d in refresher.due_shared(loaded + 1) if d[3][0] != "young"] == []
    assert fetched(a, b"in use") == (loaded, ("new", 2 + SHARED_KEEP))
    assert len(refresher.due_shared(loaded + 1)) == 2  # used again: due again


def test_a_refresh_never_overwrites_an_entry_that_changed_since_it_was_read() -> None:
    a = make()
    a.store_shared(b"k", 10.0, "v1")
    (index, digest, at, _), = a.due_shared(11.0)
    a.store_shared(b"k", 10.5, "v2")  # a worker reloaded it meanwhile
    assert not a.refresh_shared(index, digest, at, 11.0, "stale refresh")
    assert fetched(a, b"k") == (10.5, "v2")
    (index, digest, at, _), = a.due_shared(11.0)
    assert not a.refresh_shared(index, digest, at, 11.0, "x" * 10_000)  # too large
    assert not a.refresh_shared(index, digest, at, 11.0, object())  # not marshal-able
    assert not a.refresh_shared(-1, digest, at, 11.0, "v3")
    a.forget_shared(index)
    assert a.due_shared(11.0) == []
    assert fetched(a, b"k") == (10.5, "v2")  # forgotten for refreshes, still valid


def test_the_first_parked_seat_is_the_lowest() -> None:
    a = Arena.create(seats=4, slots_per_seat=2)
    assert a.first_parked() == -1
    a.set_parked(3, True)
    a.set_parked(1, True)
    assert a.first_parked() == 1
    a.set_parked(1, False)
    assert a.first_parked() == 3


def test_refresh_counters_are_per_seat() -> None:
    a = make()
    a.store_counters(1, 5, 1, 0)
    a.add_refreshes(1, 3)
    a.add_refreshes(1, 2)
    assert (a.refreshes(0), a.refreshes(1)) == (0, 5)
    assert a.counters(1) == (5, 1, 0)  # beside the other counters, not over them


def test_a_parked_process_wakes_when_another_calls_wake_one() -> None:
    a = make()
    seq = a.wake_seq()
    pid = os.fork()
    if pid == 0:  # the parked worker: a long park, ended by the wake-up below
        child = Arena(a.fd)
        child.set_parked(1, True)
        child.park(seq, 30.0)
        os._exit(0 if child.wake_seq() != seq else 1)
    deadline = time.monotonic() + 10
    while not a.any_parked() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.any_parked()
    time.sleep(0.05)  # let it reach the futex wait (a wake before it also ends the wait)
    a.wake_one()
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the parked process was not woken (this only catches a hang)")


def test_leadership_is_recorded_with_the_pid() -> None:
    a = make()
    assert a.leader() == (-1, 0)
    a.set_leader(1, 1234)
    assert Arena(a.fd).leader() == (1, 1234)
    a.set_leader(-1, 0)
    assert a.leader() == (-1, 0)


def test_a_token_renews_only_the_same_bytes_loaded_later() -> None:
    a = make()
    token = a.store_shared(b"k", 10.0, ("v", 1))
    assert token is not None
    assert a.renew_shared(token, newer_than=10.0) is None  # not newer than asked
    assert a.renew_shared(token, newer_than=9.0) == 10.0
    (index, digest, at, value), = a.due_shared(11.0)
    assert a.refresh_shared(index, digest, at, 11.0, value)  # reloaded, unchanged
    assert a.renew_shared(token, newer_than=10.5) == 11.0
    got = a.fetch_shared(b"k", 10.5)
    assert got is not None and got[:2] == (11.0, ("v", 1)) and got[2] == token
    (index, digest, at, _), = a.due_shared(12.0)
    assert a.refresh_shared(index, digest, at, 12.0, ("v", 2))  # reloaded, changed
    assert a.renew_shared(token, newer_than=10.5) is None
    a.store_shared(b"k", 13.0, ("v", 1))  # the old bytes again, stored under the key
    assert a.renew_shared(token, newer_than=12.5) == 13.0
