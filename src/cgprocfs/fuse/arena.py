"""Shared memory of one mount, owned by the supervisor and mapped by every worker.

It is what makes worker processes interchangeable and replaceable at any moment:

- **seats**: each worker reads requests from /dev/fuse straight into its seat, and marks
  the seat empty only after the reply is written. A worker killed in between leaves the
  request there; its successor in the same seat answers it (the kernel keeps waiting for
  a reply to a request that was read, so nothing is lost and nothing fails). A crash
  counter per seat (bumped by the supervisor when a worker dies of a crash, not of a
  kill) stops a request that crashes every worker (answered EIO after MAX_ATTEMPTS).
- **handle slots**: the bytes rendered at OPEN live here, so a READ can be answered by any
  worker, of any generation. A file handle is (slot generation << 32 | slot): a stale
  handle never reads another open's bytes. Slots are partitioned among seats so that
  only one process allocates in each range (no locks); any process may free a slot.
- **counters** per seat and a **loads** area (the load sampler's published table).
- **leadership and parking**: which worker reads /dev/fuse while the load is low, which
  ones are parked, and the futex word that wakes one of them (see worker.py).
- **shared entries**: configuration one worker looked up (a container's CPU placement),
  so the others need not look it up again within its freshness bound.

Everything is plain stores into a MAP_SHARED mapping: one writer per field, or a single
byte (slot state), so no lock is ever needed.
"""

from __future__ import annotations

import ctypes
import hashlib
import marshal
import math
import mmap
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from cgprocfs.libc import futex_wait, futex_wake

MAGIC = b"CGPFSAR1"
HEADER_SIZE = 4096
SEAT_SIZE = 16384
SEAT_HEAD = 8  # attempts u32, pad
REQUEST_MAX = SEAT_SIZE - SEAT_HEAD
SLOT_SIZE = 32768
SLOT_HEAD = struct.Struct("<IIQIIH6x")  # generation length inode pid flags nslots
SLOT_DATA = SLOT_SIZE - SLOT_HEAD.size
COUNTERS = struct.Struct("<QQQ")  # opens errors fallbacks
REFRESHES = struct.Struct("<Q")  # after COUNTERS: shared entries this seat refreshed
COUNTERS_SIZE = 64
LOADS_AREA = 512 * 1024  # two buffers of half this size
TIMES_ENTRIES = 4096
TIMES_ENTRY = struct.Struct("<QQQQQ")  # key user system idle check
TIMES_PROBES = 8
SHARED_ENTRIES = 2048
SHARED_ENTRY_SIZE = 512
SHARED_HEAD = struct.Struct("<16s8sdI4x")  # key digest, check, loaded at, blob length
SHARED_BLOB_MAX = SHARED_ENTRY_SIZE - SHARED_HEAD.size
SHARED_PROBES = 8
# An entry in use is refreshed this many times after its last use (see due_shared): at
# about one refresh per 0.8-0.9 s, a poller coming back within ~3 s (top's default
# interval) still finds it fresh; an entry nobody uses is left to expire.
SHARED_KEEP = 4
_IN_USE = re.compile(b"[^\x00]")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Where a shared value was read or written, and its bytes: (entry index, digest, blob).
SharedToken = tuple[int, bytes, bytes]
# Version 2 has no back-references, so equal values always give equal bytes, whichever
# objects they were made of: a refresh that changed nothing leaves a value's bytes as
# they were (renew_shared compares them).
MARSHAL_VERSION = 2
MAX_ATTEMPTS = 3

FREE = 0
IN_USE = 1
READ_ONCE = 1  # slot flag: the handle has been read (a read at 0 then renders again)
# In a slot's head padding: the request (FUSE unique, low 48 bits) that last read the
# handle at offset 0. A worker replaying a request its killed predecessor may already
# have answered must not render the handle again: the reader may hold the first answer.
SLOT_READER = slice(26, 32)

SPINNER_OFF = 64  # header byte: 1 + the seat of the worker spinning for requests, or 0
LEADER = struct.Struct("<II")  # 1 + the leading worker's seat (0: none), its pid
LEADER_OFF = 72
WAKE_OFF = 128  # u32 futex word: bumped to wake a parked worker
RING_ENTS_OFF = 96  # u32: FUSE-over-io_uring entries per seat (0: no ring area)
RING_GROUPS_OFF = 100  # u32: ring workers (each serves the queues q % groups == its own)
PARKED_OFF = 192  # one byte per seat: 1 while its worker is parked
MAX_SEATS = HEADER_SIZE - PARKED_OFF
# header: magic, seats, slots per seat, kernel minor, init flags, restarts, poisoned,
# created, loads version, loads buffer, loads length
_HEADER = struct.Struct("<8sIIIIIIdQII")


# The ring area (FUSE over io_uring, see uring.py): per seat, `ring_ents` entries of a
# header page and a payload buffer. The kernel keeps the address each entry registered
# with, so a worker's successor maps its seat's area at the same address and answers the
# request its predecessor held (ring_address).
RING_HEADER = 4096
RING_PAYLOAD = 128 * 1024  # the kernel wants room for the largest READ (MAX_PAGES)
RING_ENT_SIZE = RING_HEADER + RING_PAYLOAD
RING_META = 2048  # in an entry's header page, after what the kernel writes: our own fields
RING_META_FMT = struct.Struct("<QI")  # the unique answered in the buffers, group + 1
RING_BASE = 0x5A0000000000  # where seat 0's ring area is mapped in every worker
# A ring seat's handover (a reload): the supervisor asks, the old worker parks its
# entries and says so, the new one in the same seat takes them over.
HANDOVER_ASKED = 1
HANDOVER_PARKED = 2
_HANDOVER = RING_META + 12


@dataclass(frozen=True)
class Layout:
    seats: int
    slots_per_seat: int
    ring_ents: int = 0

    @property
    def slots(self) -> int:
        return self.seats * self.slots_per_seat

    @property
    def counters_off(self) -> int:
        return HEADER_SIZE

    @property
    def states_off(self) -> int:
        return self.counters_off + self.seats * COUNTERS_SIZE

    @property
    def loads_off(self) -> int:
        return _align(self.states_off + self.slots, 4096)

    @property
    def times_off(self) -> int:
        return self.loads_off + LOADS_AREA

    @property
    def seats_off(self) -> int:
        return self.times_off + TIMES_ENTRIES * TIMES_ENTRY.size

    @property
    def slots_off(self) -> int:
        return self.seats_off + self.seats * SEAT_SIZE

    @property
    def shared_off(self) -> int:
        # Last, so that an arena taken over from an earlier version (which ended with the
        # slots) only has to grow: every region before keeps its place.
        return self.slots_off + self.slots * SLOT_SIZE

    @property
    def demand_off(self) -> int:
        # One byte per shared entry: refreshes left before it is left to expire.
        return self.shared_off + SHARED_ENTRIES * SHARED_ENTRY_SIZE

    @property
    def ring_off(self) -> int:
        return _align(self.demand_off + SHARED_ENTRIES, 4096)

    @property
    def ring_seat_size(self) -> int:
        return self.ring_ents * RING_ENT_SIZE

    @property
    def size(self) -> int:
        return self.ring_off + self.seats * self.ring_seat_size


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _shareable(value: object) -> bytes | None:
    """`value` as stored in a shared entry; None if it cannot be (not marshal-able, or
    too large)."""
    try:
        blob = marshal.dumps(value, MARSHAL_VERSION)  # type: ignore[arg-type]
    except ValueError:
        return None
    return blob if len(blob) <= SHARED_BLOB_MAX else None


def _check(digest: bytes, loaded_at: float, blob: bytes) -> bytes:
    return hashlib.blake2b(digest + struct.pack("<d", loaded_at) + blob,
                           digest_size=8).digest()


class Arena:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED, mmap.PROT_READ) as head:
            magic, seats, per_seat = struct.unpack_from("<8sII", head, 0)
            ring_ents = _U32.unpack_from(head, RING_ENTS_OFF)[0]
        if magic != MAGIC:
            raise ValueError("not a cgprocfs arena")
        self.layout = Layout(seats, per_seat, ring_ents)
        if seats > MAX_SEATS:
            raise ValueError(f"an arena has at most {MAX_SEATS} seats")
        if os.fstat(fd).st_size < self.layout.size:
            os.ftruncate(fd, self.layout.size)  # taken over from an earlier version
        self.mem = mmap.mmap(fd, self.layout.size, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.mem)
        self._wake = ctypes.c_uint32.from_buffer(self.mem, WAKE_OFF)
        # Plain attributes: these are on the path of every request.
        self.slots = self.layout.slots
        self.states_off = self.layout.states_off
        self.slots_off = self.layout.slots_off
        self.seats_off = self.layout.seats_off
        self.times_off = self.layout.times_off
        self.counters_off = self.layout.counters_off
        self.loads_off = self.layout.loads_off
        self.shared_off = self.layout.shared_off
        self.demand_off = self.layout.demand_off

    @classmethod
    def create(cls, seats: int, slots_per_seat: int, ring_ents: int = 0) -> Arena:
        layout = Layout(seats, slots_per_seat, ring_ents)
        fd = os.memfd_create("cgprocfs-arena", 0)  # inheritable: workers get it
        os.ftruncate(fd, layout.size)
        with mmap.mmap(fd, HEADER_SIZE, mmap.MAP_SHARED) as m:
            _HEADER.pack_into(m, 0, MAGIC, seats, slots_per_seat, 0, 0, 0, 0, time.time(),
                              0, 0, 0)
            _U32.pack_into(m, RING_ENTS_OFF, ring_ents)
        return cls(fd)

    # ---- the ring area -------------------------------------------------------------
    def ring_seat_off(self, seat: int) -> int:
        return self.layout.ring_off + seat * self.layout.ring_seat_size

    def ring_address(self, seat: int) -> int:
        """The address a seat's ring area is mapped at, in every process (see RING_BASE)."""
        return RING_BASE + seat * _align(self.layout.ring_seat_size, 1 << 21)

    @property
    def ring_groups(self) -> int:
        return int(_U32.unpack_from(self.mem, RING_GROUPS_OFF)[0])

    def set_ring_groups(self, groups: int) -> None:
        _U32.pack_into(self.mem, RING_GROUPS_OFF, groups)

    def ring_group(self, seat: int) -> int:
        """The ring group a seat serves (the supervisor sets it before it starts the
        seat's worker); -1: not a ring seat."""
        if not self.layout.ring_ents:
            return -1
        off = self.ring_seat_off(seat) + RING_META + 8
        return int(_U32.unpack_from(self.mem, off)[0]) - 1

    def set_ring_group(self, seat: int, group: int) -> None:
        """Make `seat` a ring seat of `group` (-1: not a ring seat). A seat that served
        another group before forgets its entries' requests: they were another queue's,
        and no successor of this seat is to take them."""
        if not self.layout.ring_ents or self.ring_group(seat) == group:
            return
        base = self.ring_seat_off(seat)
        for i in range(self.layout.ring_ents):
            off = base + i * RING_ENT_SIZE
            self.mem[off:off + 16] = bytes(16)  # the in/out header: no request
            self.mem[off + RING_META:off + RING_META + 8] = bytes(8)
        _U32.pack_into(self.mem, base + RING_META + 8, group + 1)

    def ring_handover(self, seat: int) -> int:
        if not self.layout.ring_ents:
            return 0
        return int(_U32.unpack_from(self.mem, self.ring_seat_off(seat) + _HANDOVER)[0])

    def set_ring_handover(self, seat: int, state: int) -> None:
        if self.layout.ring_ents:
            _U32.pack_into(self.mem, self.ring_seat_off(seat) + _HANDOVER, state)

    # ---- header fields -------------------------------------------------------------
    def _header(self) -> tuple[object, ...]:
        return _HEADER.unpack_from(self.mem, 0)

    def set_init(self, minor: int, flags: int) -> None:
        struct.pack_into("<II", self.mem, 16, minor, flags)

    @property
    def kernel_minor(self) -> int:
        return int(struct.unpack_from("<I", self.mem, 16)[0])

    def start_spinning(self, seat: int) -> bool:
        """Become the one worker that spins for the next request, unless another is. Two
        may race here and both spin once: harmless, and cheaper than a lock."""
        if self.mem[SPINNER_OFF]:
            return False
        self.mem[SPINNER_OFF] = seat + 1
        return True

    def stop_spinning(self, seat: int) -> None:
        if self.mem[SPINNER_OFF] == seat + 1:
            self.mem[SPINNER_OFF] = 0

    # ---- leadership and parking ------------------------------------------------------
    def leader(self) -> tuple[int, int]:
        """(seat, pid) of the leading worker; seat -1: none."""
        seat, pid = LEADER.unpack_from(self.mem, LEADER_OFF)
        return seat - 1, pid

    def set_leader(self, seat: int, pid: int) -> None:
        LEADER.pack_into(self.mem, LEADER_OFF, seat + 1, pid)

    def set_parked(self, seat: int, parked: bool) -> None:
        self.mem[PARKED_OFF + seat] = 1 if parked else 0

    def any_parked(self) -> bool:
        return self.first_parked() >= 0

    def first_parked(self) -> int:
        """The lowest seat whose worker is parked; -1: none."""
        at = self.mem.find(b"\x01", PARKED_OFF, PARKED_OFF + self.layout.seats)
        return at - PARKED_OFF if at >= 0 else -1

    def wake_seq(self) -> int:
        return int(self._wake.value)

    def wake_one(self) -> None:
        """Wake one parked worker. Two processes bumping the word at once may lose a
        count; each still wakes a waiter, and a waiter only asks whether it changed."""
        self._wake.value = (self._wake.value + 1) & 0xFFFFFFFF
        futex_wake(ctypes.addressof(self._wake), 1)

    def park(self, seq: int, timeout: float) -> None:
        """Sleep until wake_one (returns at once if one came since `seq` was read)."""
        futex_wait(ctypes.addressof(self._wake), seq, timeout)

    def add_restart(self) -> None:
        n = struct.unpack_from("<I", self.mem, 24)[0]
        struct.pack_into("<I", self.mem, 24, n + 1)

    def add_poisoned(self) -> None:
        # Several workers may bump this at once; it is a diagnostic, approximate is fine.
        n = struct.unpack_from("<I", self.mem, 28)[0]
        struct.pack_into("<I", self.mem, 28, n + 1)

    @property
    def restarts(self) -> int:
        return int(struct.unpack_from("<I", self.mem, 24)[0])

    @property
    def poisoned(self) -> int:
        return int(struct.unpack_from("<I", self.mem, 28)[0])

    @property
    def created(self) -> float:
        return float(struct.unpack_from("<d", self.mem, 32)[0])

    # ---- seats ---------------------------------------------------------------------
    def seat_off(self, seat: int) -> int:
        return self.seats_off + seat * SEAT_SIZE

    def request_buffer(self, seat: int) -> memoryview:
        off = self.seat_off(seat) + SEAT_HEAD
        return self.view[off : off + REQUEST_MAX]

    def pending_length(self, seat: int) -> int:
        return int(struct.unpack_from("<I", self.mem, self.seat_off(seat) + SEAT_HEAD)[0])

    def last_unique(self, seat: int) -> int:
        """The FUSE unique of the last request read into the seat (clearing a seat keeps
        it): it changes with every request its worker takes."""
        return int(_U64.unpack_from(self.mem, self.seat_off(seat) + SEAT_HEAD + 8)[0])

    def clear_seat(self, seat: int) -> None:
        _U32.pack_into(self.mem, self.seat_off(seat) + SEAT_HEAD, 0)

    def seat_clearer(self, seat: int) -> Callable[[], None]:
        """clear_seat(seat) bound once: it runs after every request."""
        return partial(_U32.pack_into, self.mem, self.seat_off(seat) + SEAT_HEAD, 0)

    def attempts(self, seat: int) -> int:
        """How many workers crashed holding the request in this seat."""
        return int(struct.unpack_from("<I", self.mem, self.seat_off(seat))[0])

    def bump_attempts(self, seat: int) -> int:
        off = self.seat_off(seat)
        n = struct.unpack_from("<I", self.mem, off)[0] + 1
        struct.pack_into("<I", self.mem, off, n)
        return int(n)

    def reset_attempts(self, seat: int) -> None:
        struct.pack_into("<I", self.mem, self.seat_off(seat), 0)

    # ---- counters ------------------------------------------------------------------
    def counters(self, seat: int) -> tuple[int, int, int]:
        return COUNTERS.unpack_from(self.mem, self.counters_off + seat * COUNTERS_SIZE)

    def store_counters(self, seat: int, opens: int, errors: int, fallbacks: int) -> None:
        COUNTERS.pack_into(self.mem, self.counters_off + seat * COUNTERS_SIZE,
                           opens, errors, fallbacks)

    def counters_writer(self, seat: int) -> Callable[[int, int, int], None]:
        """store_counters(seat, ...) bound once: it runs after every open."""
        return partial(COUNTERS.pack_into, self.mem,
                       self.counters_off + seat * COUNTERS_SIZE)

    def refreshes(self, seat: int) -> int:
        off = self.counters_off + seat * COUNTERS_SIZE + COUNTERS.size
        return int(REFRESHES.unpack_from(self.mem, off)[0])

    def add_refreshes(self, seat: int, n: int) -> None:
        off = self.counters_off + seat * COUNTERS_SIZE + COUNTERS.size
        REFRESHES.pack_into(self.mem, off, self.refreshes(seat) + n)

    def totals(self) -> tuple[int, int, int]:
        sums = [0, 0, 0]
        for s in range(self.layout.seats):
            for i, v in enumerate(self.counters(s)):
                sums[i] += v
        return sums[0], sums[1], sums[2]

    # ---- handle slots ---------------------------------------------------------------
    def allocate(self, seat: int, length: int) -> int | None:
        """The lowest run of free slots of `seat`'s range that holds `length` bytes
        (lowest: the touched memory stays as small as the number of handles open at
        once), or None if there is none. Large contents span consecutive slots."""
        per_seat = self.layout.slots_per_seat
        k = 1 if length < SLOT_DATA else -(-(length + SLOT_HEAD.size) // SLOT_SIZE)
        start = self.states_off + seat * per_seat
        i = self.mem.find(b"\0" * k, start, start + per_seat)
        if i < 0:
            return None
        self.mem[i : i + k] = b"\1" * k
        slot = i - self.states_off
        off = self.slots_off + slot * SLOT_SIZE
        struct.pack_into("<H", self.mem, off + 24, k)
        return slot

    def in_use(self) -> int:
        lay = self.layout
        return lay.slots - self.mem[lay.states_off : lay.states_off + lay.slots].count(0)

    def store(self, slot: int, inode: int, pid: int, data: bytes) -> int:
        """Put `data` in an allocated slot; returns the file handle naming it."""
        off = self.slots_off + slot * SLOT_SIZE
        gen, _, _, _, _, k = SLOT_HEAD.unpack_from(self.mem, off)
        gen = (gen + 1) & 0xFFFFFFFF or 1
        n = len(data)
        self.mem[off + SLOT_HEAD.size : off + SLOT_HEAD.size + n] = data
        SLOT_HEAD.pack_into(self.mem, off, gen, n, inode, pid, 0, k)
        return gen << 32 | slot

    def replace(self, fh: int, data: bytes, unique: int = 0) -> bool:
        """New bytes for a live handle, if they fit its slots (else keep the old), read
        by request `unique`."""
        off = self.slots_off + (fh & 0xFFFFFFFF) * SLOT_SIZE
        gen, _, inode, pid, flags, k = SLOT_HEAD.unpack_from(self.mem, off)
        n = len(data)
        if n + SLOT_HEAD.size > k * SLOT_SIZE:
            return False
        self.mem[off + SLOT_HEAD.size : off + SLOT_HEAD.size + n] = data
        SLOT_HEAD.pack_into(self.mem, off, gen, n, inode, pid, flags, k)
        self._set_reader(off, unique)
        return True

    def lookup(self, fh: int) -> tuple[int, int, int, int, int] | None:
        """(offset of the data, length, inode, flags, opener pid) of a live handle; None
        if `fh` names no live slot (freed, reused, or never ours)."""
        slot = fh & 0xFFFFFFFF
        if slot >= self.slots or self.mem[self.states_off + slot] != IN_USE:
            return None
        off = self.slots_off + slot * SLOT_SIZE
        gen, length, inode, pid, flags, _k = SLOT_HEAD.unpack_from(self.mem, off)
        if gen != fh >> 32:
            return None
        return off + SLOT_HEAD.size, length, inode, flags, pid

    def mark_read(self, fh: int, unique: int = 0) -> None:
        """The handle was read at offset 0, by request `unique`."""
        off = self.slots_off + (fh & 0xFFFFFFFF) * SLOT_SIZE
        _U32.pack_into(self.mem, off + 20, READ_ONCE)
        self._set_reader(off, unique)

    def last_reader(self, fh: int) -> int:
        """The request that last read the handle at offset 0 (low 48 bits; 0: none)."""
        off = self.slots_off + (fh & 0xFFFFFFFF) * SLOT_SIZE
        return int.from_bytes(self.mem[off + SLOT_READER.start : off + SLOT_READER.stop],
                              "little")

    def _set_reader(self, off: int, unique: int) -> None:
        self.mem[off + SLOT_READER.start : off + SLOT_READER.stop] = \
            (unique & 0xFFFFFFFFFFFF).to_bytes(6, "little")

    def free(self, fh: int) -> bool:
        if self.lookup(fh) is None:
            return False
        self.free_slot(fh & 0xFFFFFFFF)
        return True

    def free_slot(self, slot: int) -> None:
        (k,) = _U16.unpack_from(self.mem, self.slots_off + slot * SLOT_SIZE + 24)
        if k == 1:
            self.mem[self.states_off + slot] = FREE
            return
        k = max(1, min(k, self.slots - slot))
        self.mem[self.states_off + slot : self.states_off + slot + k] = b"\0" * k

    # ---- the last CPU counters shown per container ----------------------------------
    def times_at_least(self, key: int, values: tuple[int, int, int]) -> tuple[int, int, int]:
        """`values` raised to the last counters any worker showed for container `key`,
        and remembered: /proc/stat counters never go back, whichever worker answers.
        Two workers racing on one entry can lose an update (the worker's own memory still
        applies); an entry torn by such a race fails its check and is ignored, so one
        container's counters never leak into another's."""
        base = self.times_off
        size = TIMES_ENTRY.size
        first_free = -1
        for probe in range(TIMES_PROBES):
            off = base + ((key + probe) % TIMES_ENTRIES) * size
            k, u, s, i, check = TIMES_ENTRY.unpack_from(self.mem, off)
            if k == key and check == (k ^ u ^ s ^ i):
                values = (max(values[0], u), max(values[1], s), max(values[2], i))
                first_free = off
                break
            if k == 0 and first_free < 0:
                first_free = off
        if first_free < 0:  # all probed entries taken: replace the first
            first_free = base + (key % TIMES_ENTRIES) * size
        u, s, i = values
        TIMES_ENTRY.pack_into(self.mem, first_free, key, u, s, i, key ^ u ^ s ^ i)
        return values

    # ---- shared entries ---------------------------------------------------------------
    def fetch_shared(self, key: bytes, newer_than: float = -math.inf
                     ) -> tuple[float, object, SharedToken] | None:
        """(loaded at, value, token to renew it by: renew_shared) last stored under `key`
        by any worker, or None (also when loaded at or before `newer_than`). An entry
        being rewritten while it is read fails its check and reads as None: a 128-bit key
        digest and a 64-bit check over the whole entry keep one key's value from ever
        being taken for another's. Marks the entry in use."""
        digest = hashlib.blake2b(key, digest_size=16).digest()
        h = int.from_bytes(digest[:8], "little")
        for probe in range(SHARED_PROBES):
            index = (h + probe) % SHARED_ENTRIES
            off = self.shared_off + index * SHARED_ENTRY_SIZE
            if self.mem[off : off + 16] != digest:
                continue
            got = self._read_shared(off, newer_than)
            if got is None:
                return None
            _, at, blob, value = got
            self.mem[self.demand_off + index] = SHARED_KEEP
            return at, value, (index, digest, blob)
        return None

    def renew_shared(self, token: SharedToken, newer_than: float) -> float | None:
        """When the entry a token came from holds the same value, loaded after
        `newer_than` (a refresh found nothing changed): when it was loaded. The value
        one holds is then as fresh as that, without decoding it again. Else None."""
        index, digest, blob = token
        off = self.shared_off + index * SHARED_ENTRY_SIZE
        d, check, at, n = SHARED_HEAD.unpack_from(self.mem, off)
        if d != digest or at <= newer_than or n != len(blob):
            return None
        start = off + SHARED_HEAD.size
        if self.mem[start : start + n] != blob or _check(digest, at, blob) != check:
            return None
        self.mem[self.demand_off + index] = SHARED_KEEP
        return float(at)

    def store_shared(self, key: bytes, loaded_at: float, value: object
                     ) -> SharedToken | None:
        """Share `value` (marshal-able; dropped if too large: None) under `key`, replacing
        the entry of the same key, else an empty one, else the oldest probed. Marks the
        entry in use."""
        blob = _shareable(value)
        if blob is None:
            return None
        digest = hashlib.blake2b(key, digest_size=16).digest()
        h = int.from_bytes(digest[:8], "little")
        target, oldest = -1, float("inf")
        for probe in range(SHARED_PROBES):
            index = (h + probe) % SHARED_ENTRIES
            d, _, at, _ = SHARED_HEAD.unpack_from(
                self.mem, self.shared_off + index * SHARED_ENTRY_SIZE)
            if d == digest:
                target = index
                break
            if at < oldest:  # an empty entry has 0.0: the oldest of all
                target, oldest = index, at
        self._write_shared(target, digest, loaded_at, blob)
        self.mem[self.demand_off + target] = SHARED_KEEP
        return target, digest, blob

    def _read_shared(self, off: int, newer_than: float, older_than: float = math.inf
                     ) -> tuple[bytes, float, bytes, object] | None:
        """(key digest, loaded at, bytes, value) of the entry at `off` if it is intact and
        was loaded after `newer_than` and before `older_than` (others are not decoded)."""
        digest, check, at, n = SHARED_HEAD.unpack_from(self.mem, off)
        if n > SHARED_BLOB_MAX or not newer_than < at < older_than:
            return None
        start = off + SHARED_HEAD.size
        blob = self.mem[start : start + n]
        if _check(digest, at, blob) != check:
            return None
        try:
            return digest, at, blob, marshal.loads(blob)
        except (ValueError, EOFError, TypeError):
            return None

    def _write_shared(self, index: int, digest: bytes, loaded_at: float, blob: bytes
                      ) -> None:
        off = self.shared_off + index * SHARED_ENTRY_SIZE
        start = off + SHARED_HEAD.size
        self.mem[start : start + len(blob)] = blob
        SHARED_HEAD.pack_into(self.mem, off, digest, _check(digest, loaded_at, blob),
                              loaded_at, len(blob))

    def due_shared(self, loaded_before: float) -> list[tuple[int, bytes, float, object]]:
        """(index, key digest, loaded at, value) of each entry loaded before
        `loaded_before` and still in use: stored or fetched by a worker within its last
        SHARED_KEEP refreshes. A look at one byte per entry finds them."""
        demand = self.demand_off
        out: list[tuple[int, bytes, float, object]] = []
        for m in _IN_USE.finditer(self.mem, demand, demand + SHARED_ENTRIES):
            index = m.start() - demand
            off = self.shared_off + index * SHARED_ENTRY_SIZE
            got = self._read_shared(off, -math.inf, loaded_before)
            if got is not None:
                out.append((index, got[0], got[1], got[3]))
        return out

    def refresh_shared(self, index: int, digest: bytes, was_loaded_at: float,
                       loaded_at: float, value: object) -> bool:
        """Replace entry `index` (as due_shared returned it) by `value`, loaded at
        `loaded_at`, and spend one of its refreshes; False if the entry changed meanwhile
        (a worker stored it, or another key took its place) or `value` cannot be shared.
        A store racing with this one leaves a torn entry, which reads as missing."""
        if not 0 <= index < SHARED_ENTRIES:
            return False
        d, _, at, _ = SHARED_HEAD.unpack_from(
            self.mem, self.shared_off + index * SHARED_ENTRY_SIZE)
        blob = _shareable(value)
        if d != digest or at != was_loaded_at or blob is None:
            return False
        self._write_shared(index, digest, loaded_at, blob)
        left = self.demand_off + index
        self.mem[left] = max(0, self.mem[left] - 1)
        return True

    def forget_shared(self, index: int) -> None:
        """Stop refreshing entry `index` (one that cannot be refreshed); it stays valid
        until it expires, and a worker using it puts it back in use."""
        if 0 <= index < SHARED_ENTRIES:
            self.mem[self.demand_off + index] = 0

    # ---- published loads -------------------------------------------------------------
    def publish_loads(self, table: dict[str, tuple[int, ...]]) -> None:
        """Single writer (the load sampler): write the inactive buffer, then flip."""
        blob = marshal.dumps(table)
        half = LOADS_AREA // 2
        if len(blob) > half:
            return  # over ~10,000 tracked cgroups: keep the last table rather than fail
        version, buf, _ = struct.unpack_from("<QII", self.mem, 40)
        nxt = 1 - buf
        off = self.loads_off + nxt * half
        self.mem[off : off + len(blob)] = blob
        struct.pack_into("<QII", self.mem, 40, version + 1, nxt, len(blob))

    def loads_version(self) -> int:
        return int(struct.unpack_from("<Q", self.mem, 40)[0])

    def read_loads(self) -> tuple[int, dict[str, tuple[int, ...]]]:
        half = LOADS_AREA // 2
        for _ in range(5):
            version, buf, n = struct.unpack_from("<QII", self.mem, 40)
            off = self.loads_off + buf * half
            blob = bytes(self.mem[off : off + n])
            if struct.unpack_from("<Q", self.mem, 40)[0] == version:
                return version, marshal.loads(blob) if n else {}
        return 0, {}
