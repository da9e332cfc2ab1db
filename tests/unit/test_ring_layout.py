"""The pieces of FUSE over io_uring that need no mount: the arena's ring areas, how ring
workers split the queues, the submission entries the kernel reads. (The ring itself is
exercised end to end in tests/e2e/test_io_uring.py.)"""

from __future__ import annotations

import itertools
import struct

from cgprocfs.fuse import uring
from cgprocfs.fuse.arena import RING_ENT_SIZE, RING_META, Arena
from cgprocfs.fuse.ring_worker import OP_IN_SIZE, group_queues


def test_ring_areas_are_per_seat_and_mapped_at_distinct_fixed_addresses() -> None:
    a = Arena.create(seats=6, slots_per_seat=4, ring_ents=3)
    assert a.layout.ring_seat_size == 3 * RING_ENT_SIZE
    offs = [a.ring_seat_off(s) for s in range(6)]
    assert all(o % 4096 == 0 for o in offs)
    assert all(b - a_ == 3 * RING_ENT_SIZE for a_, b in itertools.pairwise(offs))
    addrs = [a.ring_address(s) for s in range(6)]
    assert len(set(addrs)) == 6 and all(x % (1 << 21) == 0 for x in addrs)
    assert all(b - a_ >= a.layout.ring_seat_size for a_, b in itertools.pairwise(addrs))
    assert a.layout.size >= offs[-1] + 3 * RING_ENT_SIZE
    # Another process maps the same arena and sees the same layout.
    assert Arena(a.fd).layout == a.layout


def test_a_seat_given_to_another_group_forgets_its_entries_requests() -> None:
    a = Arena.create(seats=2, slots_per_seat=4, ring_ents=2)
    assert a.ring_group(1) == -1
    a.set_ring_group(1, 0)
    assert a.ring_group(1) == 0
    second = a.ring_seat_off(1) + RING_ENT_SIZE
    struct.pack_into("<IIQ", a.mem, second, 80, 15, 1234)  # a request in entry 1
    struct.pack_into("<Q", a.mem, second + RING_META, 1234)  # answered
    a.set_ring_group(1, 0)  # the same group again (a successor): kept
    assert struct.unpack_from("<Q", a.mem, second + 8)[0] == 1234
    a.set_ring_group(1, 1)  # another group: forgotten
    assert a.ring_group(1) == 1
    assert struct.unpack_from("<Q", a.mem, second + 8)[0] == 0
    assert struct.unpack_from("<Q", a.mem, second + RING_META)[0] == 0
    a.set_ring_group(1, -1)
    assert a.ring_group(1) == -1


def test_an_arena_without_ring_areas_has_no_ring_seats() -> None:
    a = Arena.create(seats=2, slots_per_seat=4)
    assert a.layout.ring_ents == 0 and a.ring_groups == 0
    a.set_ring_group(0, 1)  # nowhere to keep it: ignored
    assert a.ring_group(0) == -1


def test_ring_workers_split_every_queue_between_them() -> None:
    n = uring.possible_cpus()
    for groups in range(1, 9):
        parts = [group_queues(g, groups) for g in range(groups)]
        assert sorted(q for p in parts for q in p) == list(range(n))
        assert all(q % groups == g for g, p in enumerate(parts) for q in p)


def test_commands_carry_the_queue_and_the_commit_id() -> None:
    req = uring.cmd_req(qid=3, commit_id=0x1122334455)
    assert len(req) == 24  # struct fuse_uring_cmd_req
    assert struct.unpack("<QQH", req[:18]) == (0, 0x1122334455, 3)


def test_op_headers_match_the_kernel_structs() -> None:
    # fuse_read_in 40, fuse_open_in 8, fuse_release_in 24, fuse_getattr_in 16,
    # fuse_access_in 8, fuse_flush_in 24, fuse_setattr_in 88 (include/uapi/linux/fuse.h).
    from cgprocfs.fuse import abi

    assert OP_IN_SIZE[abi.READ] == 40 and OP_IN_SIZE[abi.READDIR] == 40
    assert OP_IN_SIZE[abi.OPEN] == 8 and OP_IN_SIZE[abi.OPENDIR] == 8
    assert OP_IN_SIZE[abi.RELEASE] == 24 and OP_IN_SIZE[abi.FLUSH] == 24
    assert OP_IN_SIZE[abi.GETATTR] == 16 and OP_IN_SIZE[abi.SETATTR] == 88
    assert abi.LOOKUP not in OP_IN_SIZE  # the name comes whole in the payload
    assert uring.HEADER_SIZE == 288  # struct fuse_uring_req_header
