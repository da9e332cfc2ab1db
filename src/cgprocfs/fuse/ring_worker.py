"""A ring worker: a worker that takes its requests from FUSE-over-io_uring queues.

With `io_uring = true`, the kernel queues each request on the ring queue of the CPU its
caller runs on (one queue per possible CPU). Ring worker `g` of `G` registers one ring
entry on every queue q with q % G == g and runs on those CPUs only, so a request is
served on the CPU where its caller went to sleep: neither side needs a cross-CPU
wake-up, which is what bounds a lone reader over /dev/fuse.

Takeover works as for the other workers. The entries' buffers live in the arena, mapped
at the same address in every process (Arena.ring_address), because the kernel keeps the
address an entry registered with. A worker killed while holding a request leaves it in
the buffers; its successor in the same seat answers it and commits it through its own
ring, which makes the entry its own again. An entry whose worker died while waiting is
cancelled by the kernel; the successor registers a new one, and then looks itself up in
the mount from each of its CPUs: a request that arrived while its queue had no entry is
handed over only when an entry of that queue commits, and this lookup makes one commit.

What it does not cover (docs/operation.md): while a ring worker is stopped or stuck,
requests from its CPUs wait for it (the /dev/fuse workers replace a stalled leader).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import struct
import threading
import time

from cgprocfs.fs import ViewsFS
from cgprocfs.fuse import abi, uring
from cgprocfs.fuse.arena import (
    HANDOVER_ASKED,
    HANDOVER_PARKED,
    MAX_ATTEMPTS,
    RING_ENT_SIZE,
    RING_HEADER,
    RING_META,
    RING_META_FMT,
    RING_PAYLOAD,
    Arena,
)
from cgprocfs.fuse.child import ENV_CONFIG
from cgprocfs.fuse.worker import Worker, _Stop, _Sweep, config_from_json
from cgprocfs.kept import IDLE_S
from cgprocfs.libc import mmap_at

log = logging.getLogger("cgprocfs.ring")

# Looked up (it does not exist) from each CPU: a name per CPU, because the kernel lets
# only one lookup of a name in a directory run at a time (d_alloc_parallel).
KICK_PREFIX = ".cgprocfs-ring-kick-"
# The size of each opcode's own header (the kernel's in_args[0]), which the kernel puts in
# the entry's op_in; the rest of the request is in the payload buffer.
OP_IN_SIZE = {abi.GETATTR: 16, abi.SETATTR: 88, abi.OPEN: 8, abi.OPENDIR: 8, abi.READ: 40,
              abi.READDIR: 40, abi.RELEASE: 24, abi.RELEASEDIR: 24, abi.FLUSH: 24,
              abi.ACCESS: 8}
_IN_HEAD = struct.Struct("<IIQ")  # len opcode unique
_UNIQUE = struct.Struct("<Q")
_PAYLOAD_SZ = uring.HEADER_ENT_IN_OUT + 16  # fuse_uring_ent_in_out.payload_sz
REGISTER, COMMIT = 0, 1
HANDOVER_WAIT_S = 10.0
MAX_FAILURES = 10  # then the worker exits, and the supervisor starts another


def _is_kick(ent: Entry) -> bool:
    """The entry holds a lookup of one of our kick names (a request just delivered: the
    name is the payload)."""
    return bytes(ent.payload[:len(KICK_PREFIX)]) == KICK_PREFIX.encode()


def group_queues(group: int, groups: int) -> list[int]:
    return [q for q in range(uring.possible_cpus()) if q % groups == group]


class Entry:
    """One ring entry: a header page and a payload buffer at a fixed address."""

    def __init__(self, qid: int, base: int, view: memoryview) -> None:
        self.qid = qid
        self.header_addr = base
        self.payload_addr = base + RING_HEADER
        self.hdr = view[:RING_HEADER]
        self.payload = view[RING_HEADER:RING_ENT_SIZE]
        # The iovec pair the kernel reads at registration.
        self.iov = (ctypes.c_uint64 * 4)(self.header_addr, uring.HEADER_SIZE,
                                         self.payload_addr, RING_PAYLOAD)

    @property
    def answered(self) -> int:
        return int(RING_META_FMT.unpack_from(self.hdr, RING_META)[0])

    def set_answered(self, unique: int) -> None:
        _UNIQUE.pack_into(self.hdr, RING_META, unique)

    @property
    def unique(self) -> int:
        """The request in the buffers (0: none ever)."""
        return int(_UNIQUE.unpack_from(self.hdr, 8)[0])


class RingWorker(Worker):
    def __init__(self, fuse_fd: int, arena: Arena, seat: int, fs: ViewsFS) -> None:
        super().__init__(fuse_fd, arena, seat, fs)
        self.group = arena.ring_group(seat)
        self.queues = group_queues(self.group, max(1, arena.ring_groups))
        self.mountpoint = config_from_json(os.environ[ENV_CONFIG]).mountpoint
        self.entry: Entry | None = None  # the one whose request is being answered
        self.ring: uring.Ring | None = None
        self.failures = 0  # ring entries that failed in a row (not ENOENT)
        self.cpus: set[int] = set()  # ours to run on (_pin)

    # ---- set-up --------------------------------------------------------------------
    def _map_entries(self) -> list[Entry]:
        arena, seat = self.arena, self.seat
        per_seat = arena.layout.ring_ents
        if self.group < 0 or len(self.queues) > per_seat:
            raise OSError(errno.ENOSPC, f"{len(self.queues)} queues for {per_seat} "
                          "ring entries per seat")
        size = per_seat * RING_ENT_SIZE
        want = arena.ring_address(seat)
        base = mmap_at(want, size, arena.fd, arena.ring_seat_off(seat))
        if base != want:
            raise OSError(errno.EEXIST, f"ring area mapped at {base:#x}, not {want:#x}")
        view = memoryview((ctypes.c_char * size).from_address(base)).cast("B")
        return [Entry(q, base + i * RING_ENT_SIZE,
                      view[i * RING_ENT_SIZE:(i + 1) * RING_ENT_SIZE])
                for i, q in enumerate(self.queues)]

    def _pin(self) -> None:
        """Run on our queues' CPUs (those online and allowed), so that a request and its
        caller share a CPU."""
        self.cpus = set(self.queues) & os.sched_getaffinity(0)
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)

    def _kick(self) -> set[int]:
        """A lookup of KICK_PREFIX<cpu> from a thread on each of our CPUs: it goes
        through our entry there, and its commit hands over whatever waited for an entry
        while this queue had none. Returns the threads' ids (they fill it as they
        start), by which _park_for_successor knows its own lookups."""
        tids: set[int] = set()

        def look(cpu: int) -> None:
            tids.add(threading.get_native_id())
            with contextlib.suppress(OSError):  # ENOENT, the answer expected
                os.sched_setaffinity(0, {cpu})
                os.stat(os.path.join(self.mountpoint, f"{KICK_PREFIX}{cpu}"))

        for cpu in self.cpus:
            threading.Thread(target=look, args=(cpu,), daemon=True).start()
        return tids

    # ---- requests ------------------------------------------------------------------
    def _take(self, ent: Entry) -> None:
        """Copy the request in `ent` into our seat, laid out as read from /dev/fuse, and
        answer it (the reply goes to the entry's buffers, see _reply)."""
        hdr, buf = ent.hdr, self.buf
        _len, opcode, _unique = _IN_HEAD.unpack_from(hdr, 0)
        payload_sz = int(struct.unpack_from("<I", hdr, _PAYLOAD_SZ)[0])
        oplen = OP_IN_SIZE.get(opcode, 0)
        end = abi.IN_HEADER_SIZE + oplen + payload_sz
        if end > len(buf):
            payload_sz = len(buf) - abi.IN_HEADER_SIZE - oplen
            end = len(buf)
        # The length goes in last: a seat holding a request (its length non-zero) must
        # hold all of it, since a successor answers from it (_recover). Killed before,
        # the seat is empty and the entry's own buffers are still intact.
        struct.pack_into("<I", buf, 0, 0)
        buf[4:abi.IN_HEADER_SIZE] = hdr[4:abi.IN_HEADER_SIZE]
        buf[abi.IN_HEADER_SIZE:abi.IN_HEADER_SIZE + oplen] = \
            hdr[uring.HEADER_OP_IN:uring.HEADER_OP_IN + oplen]
        buf[abi.IN_HEADER_SIZE + oplen:end] = ent.payload[:payload_sz]
        struct.pack_into("<I", buf, 0, end)
        self.entry = ent
        try:
            self.handle()
        finally:
            self.entry = None

    def _reply(self, unique: int, err: int, payload: bytes, opcode: int, nodeid: int) -> None:
        ent = self.entry
        if ent is None:  # not a ring request (none should come here)
            super()._reply(unique, err, payload, opcode, nodeid)
            return
        n = len(payload)
        ent.payload[:n] = payload
        abi.OUT_HEADER.pack_into(ent.hdr, 0, abi.OUT_HEADER_SIZE + n, err, unique)
        struct.pack_into("<I", ent.hdr, _PAYLOAD_SZ, n)
        ent.set_answered(unique)
        self._commit(ent, unique)

    def _commit(self, ent: Entry, unique: int) -> None:
        assert self.ring is not None
        self.ring.uring_cmd(self.fd, uring.FUSE_IO_URING_CMD_COMMIT_AND_FETCH, 0, 0,
                            ent.qid << 1 | COMMIT, uring.cmd_req(ent.qid, unique))

    def _register(self, ent: Entry) -> None:
        assert self.ring is not None
        self.ring.uring_cmd(self.fd, uring.FUSE_IO_URING_CMD_REGISTER,
                            ctypes.addressof(ent.iov), 2, ent.qid << 1 | REGISTER,
                            uring.cmd_req(ent.qid))

    def _recover(self, ent: Entry) -> None:
        """Resume an entry of our seat: commit an answer a predecessor wrote but may not
        have committed, answer a request it was answering (from the copy in the seat: the
        entry's own buffers may be half overwritten by its reply), answer one the kernel
        had handed it, or register the entry afresh. A commit the kernel no longer
        expects fails with ENOENT, and the entry is registered then."""
        unique = ent.unique
        arena, seat = self.arena, self.seat
        if not unique:
            self._register(ent)
            return
        if ent.answered == unique:
            self._commit(ent, unique)
            return
        in_seat = bool(arena.pending_length(seat)) and arena.last_unique(seat) == unique
        if in_seat and arena.attempts(seat) >= MAX_ATTEMPTS:
            log.error("request %d crashed %d workers; answering EIO", unique,
                      arena.attempts(seat))
            arena.add_poisoned()
            self.entry = ent
            self._reply(unique, -errno.EIO, b"", 0, 0)
            self.entry = None
            arena.clear_seat(seat)
            arena.reset_attempts(seat)
            return
        parked = not in_seat and _is_kick(ent)
        log.log(logging.DEBUG if parked else logging.WARNING,
                "answering request %d left in ring entry %d by a previous worker%s",
                unique, ent.qid, " (parked for us)" if parked else "")
        if in_seat:
            self.entry = ent
            try:
                self.handle()
            finally:
                self.entry = None
        else:
            self._take(ent)
        arena.reset_attempts(seat)

    # ---- the loop ------------------------------------------------------------------
    def serve(self) -> None:
        try:
            entries = self._map_entries()
            self.ring = uring.Ring(entries=max(2, 2 * len(entries)))
        except OSError as exc:
            # Not serving /dev/fuse instead: once the kernel uses the ring, requests from
            # our CPUs reach only our queues' entries. The supervisor starts another ring
            # worker, with a growing delay if this one keeps failing.
            log.error("ring worker %d cannot use io_uring: %s", self.group, exc)
            raise SystemExit(1) from exc
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._await_handover()
        signal.signal(signal.SIGALRM, self._on_idle_timer)
        signal.setitimer(signal.ITIMER_REAL, IDLE_S, IDLE_S)
        self._pin()
        by_qid = {e.qid: e for e in entries}
        for ent in entries:
            self._recover(ent)
        ring = self.ring
        try:
            # Submit the registrations and commits. A commit the kernel no longer
            # expects fails at once (ENOENT), and the entry is registered again: only
            # when every entry is registered may the kick go, since an entry registered
            # after it would not take what waits in the queue.
            if not self._until_quiet(by_qid):
                return
            ring.enter(0, events=False)
        except OSError as exc:
            log.error("ring worker %d: io_uring_enter: %s", self.group, exc)
            return
        self._kick()
        while not self.stopping:
            try:
                self.in_read = self.in_fuse_read = True
                ring.enter(1)
            except _Stop:
                break
            except _Sweep:
                self.in_read = self.in_fuse_read = False
                self.fs.renderer.resolver.files.close_idle()
                continue
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise
            finally:
                self.in_read = self.in_fuse_read = False
            if not self._completions(by_qid):
                return
        self._drain(by_qid)

    def _until_quiet(self, by_qid: dict[int, Entry], rounds: int = 4,
                     hold: tuple[set[int], set[int]] | None = None) -> bool:
        """Submit what is queued and answer what comes back at once, until nothing does
        (at most `rounds` times); False: the mount is gone. `hold`: see _completions."""
        assert self.ring is not None
        for _ in range(rounds):
            try:
                self.ring.enter(0)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not self.ring.completion_ready():
                break
            if not self._completions(by_qid, hold):
                return False
        return True

    def _completions(self, by_qid: dict[int, Entry],
                     hold: tuple[set[int], set[int]] | None = None) -> bool:
        """Answer every request the ring has for us; False: the mount is gone. With
        `hold` (our kick threads' ids, the queues held): a lookup of our own is left
        unanswered, and its entry counted as held (_park_for_successor)."""
        assert self.ring is not None
        while (done := self.ring.completion()) is not None:
            user_data, res = done
            ent = by_qid[user_data >> 1]
            if res >= 0 and hold is not None and self._is_own_kick(ent, hold[0]):
                hold[1].add(ent.qid)
            elif res >= 0:
                self._take(ent)
            elif res == -errno.ENOENT and user_data & 1 == COMMIT:
                # A commit of a request the kernel no longer expects (answered before
                # our predecessor died, or interrupted): start afresh.
                self._register(ent)
            elif res in (-errno.ENOTCONN, -errno.ECONNABORTED, -errno.ENODEV):
                log.info("the mount is gone; ring worker %d exits", self.group)
                return False
            else:
                self.failures += 1
                if self.failures > MAX_FAILURES:
                    raise uring.UringError(-res, f"ring entry {ent.qid}: registering "
                                           f"failed {self.failures} times in a row")
                log.error("ring entry %d: %s; registering it again", ent.qid,
                          os.strerror(-res))
                time.sleep(min(1.0, 0.01 * 2 ** self.failures))
                self._register(ent)
                continue
            if res >= 0:
                self.failures = 0
        return True

    def _await_handover(self) -> None:
        """A reload started us in the seat of a running ring worker: wait until it has
        parked its entries (see _park_for_successor) or died (the supervisor then says
        so for it), then take them over. Not before: two live workers in one seat would
        share its request buffer."""
        waited = 0.0
        while self.arena.ring_handover(self.seat) == HANDOVER_ASKED and not self.stopping:
            time.sleep(0.001)
            waited += 0.001
            if waited >= HANDOVER_WAIT_S:
                log.warning("ring worker %d: the previous one has not handed over its "
                            "entries after %.0f s; still waiting", self.group, waited)
                waited = 0.0
        self.arena.set_ring_handover(self.seat, 0)

    def _park_for_successor(self, by_qid: dict[int, Entry]) -> None:
        """Retire for a successor in this seat (a reload). An entry of ours that is free
        when we exit is cancelled by the kernel, and a request handed to it in that
        instant fails; so first each entry is made to hold a request of our own, a
        lookup of KICK_PREFIX<cpu> from a thread on its CPU (_kick), left unanswered.
        Then the kernel hands us nothing more, requests from our CPUs wait in its
        queues, and the successor answers our lookups (our exit waits for that) and
        carries on."""
        assert self.ring is not None
        tids = self._kick()
        held: set[int] = set()
        deadline = time.monotonic() + HANDOVER_WAIT_S / 2
        while len(held) < len(self.cpus) and time.monotonic() < deadline:
            if not self._until_quiet(by_qid, rounds=1, hold=(tids, held)):
                return
            time.sleep(0.0002)
        self.ring.enter(0, events=False)  # commits still queued (a deadline passed)
        if len(held) < len(self.cpus):
            log.warning("ring worker %d: %d of %d entries parked for the successor",
                        self.group, len(held), len(self.cpus))
        self.arena.set_ring_handover(self.seat, HANDOVER_PARKED)

    @staticmethod
    def _is_own_kick(ent: Entry, tids: set[int]) -> bool:
        _len, opcode, _unique, _node, _uid, _gid, pid, *_ = abi.IN_HEADER.unpack_from(ent.hdr)
        return opcode == abi.LOOKUP and pid in tids and _is_kick(ent)

    def _drain(self, by_qid: dict[int, Entry]) -> None:
        """Stopping (SIGTERM: a reload or a shutdown). Commit what was answered, and
        answer what the kernel handed us meanwhile, until nothing more comes; for a
        reload, park the entries for the successor; then exit at once. On a shutdown, a
        request handed to an entry of ours in the moment before the kernel cancels it at
        our exit fails (docs/operation.md, "Limits")."""
        assert self.ring is not None
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with contextlib.suppress(OSError):
            if self._until_quiet(by_qid, rounds=1000) \
                    and self.arena.ring_handover(self.seat) == HANDOVER_ASKED:
                self._park_for_successor(by_qid)
        logging.shutdown()
        os._exit(0)

