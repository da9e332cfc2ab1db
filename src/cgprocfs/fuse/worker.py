"""A worker: one process answering FUSE requests from the shared /dev/fuse descriptor.

Several workers read the same descriptor (the kernel hands each request to exactly one
blocked reader), so a node's readers are served on every core. Each request is read
straight into the worker's seat in the arena and the seat is cleared only after the
reply is written: a worker killed in between leaves the request for its successor,
which answers it first thing. The kernel never learns that anything happened.

Run by the supervisor as `python -m cgprocfs.fuse.worker`; everything it needs comes in
inherited descriptors and environment variables (see Worker.from_environment).
"""

from __future__ import annotations

import errno
import functools
import gc
import hashlib
import json
import logging
import mmap
import os
import select
import signal
import sys
import time
from types import FrameType

from cgprocfs.cgroups import load_layout
from cgprocfs.config import Config
from cgprocfs.fs import FsError, ViewsFS
from cgprocfs.fuse import abi
from cgprocfs.fuse.arena import MAX_ATTEMPTS, Arena
from cgprocfs.fuse.child import (
    ENV_ARENA_FD,
    ENV_CONFIG,
    ENV_DEBUG_FUSE,
    ENV_FUSE_FD,
    ENV_LOADS_FD,
    ENV_ROLE,
    ENV_SEAT,
    die_with_supervisor,
    signal_ready,
)
from cgprocfs.fuse.loads import SharedLoads
from cgprocfs.kept import IDLE_S, capped_max_files, raise_fd_limit
from cgprocfs.libc import SYS_FUTEX
from cgprocfs.render.cpu import CpuTimes
from cgprocfs.resolve import Resolver
from cgprocfs.serve import select_views
from cgprocfs.snapshot import RenderOptions
from cgprocfs.views import Renderer

log = logging.getLogger("cgprocfs.worker")

_unpack_in_header = abi.IN_HEADER.unpack_from
_pack_out_header = abi.OUT_HEADER.pack
_IN_HEADER_SIZE = abi.IN_HEADER_SIZE
_OUT_HEADER_SIZE = abi.OUT_HEADER_SIZE
_OPEN = abi.OPEN



# After answering, one worker at a time keeps polling /dev/fuse this long before it
# blocks in read(). A reader's requests come in quick succession (OPEN, READ, READ at EOF,
# RELEASE; the next file): a worker already running picks the next one up at once, where
# a blocked one has to be woken (an open of uptime: p50 76 µs on one CPU, 195 across two,
# on the 2-vCPU test VM). Measured with one reader: 1.3-1.6x the opens per second, p99
# -30-40 %, +11 % worker CPU per open.
SPIN_US = 25.0
# Spinning only pays while it catches requests: a `top` polling once a second is woken
# from sleep between its requests, which takes longer than the spin, and every spin would
# be 25 µs of CPU for nothing (measured: 200 pollers cost 28 % of a core instead of 24 %).
# So a worker spins after a catch; after a miss only on every SPIN_PROBE_EVERY-th request,
# until one catches again (polling then cost 19.6 %, the one-reader gains stayed).
SPIN_SCORE_MAX = 8
SPIN_MISS_COST = 8
SPIN_PROBE_EVERY = 4
ENV_SPIN_US = "CGPROCFS_SPIN_US"  # 0: never spin
# A spin is only worth it on a CPU nobody else wants: with more runnable tasks than CPUs
# (8 readers on 2 CPUs, say) the spinning worker takes the time a reader needed to send
# the next request. Measured, 8 readers of meminfo on 2 vCPUs, interleaved: 12,326 and
# 12,911 opens/s spinning regardless, 14,379 and 13,907 with this rule. The kernel's
# count of runnable tasks (the fourth field of /proc/loadavg) is looked at most every
# CONTENTION_CHECK_S.
CONTENTION_CHECK_S = 0.01
# Under load the next request is already queued when a worker comes back to read: a
# read() that returned this fast (without a spin before it) did not wait, and the worker
# reads the next one straight away, without spinning or asking poll() first. That is one
# system call less per request where the daemon is busiest (8 readers of uptime on the
# test VM: ~1 µs of the ~35 each request costs there).
QUEUED_S = 15e-6


# Parking. The kernel hands each request to the worker that has waited longest in read(),
# so N workers take turns even when one would do: each request then runs in a process
# whose caches went cold since its last turn, and a spinning worker still causes a
# wake-up of the one blocked in read(). Measured, 200 `top`-like pollers on 2 CPUs: one
# worker cost 14-15 % of a core, two 19-20 %. So one worker (the leader) reads
# /dev/fuse; the others stay parked on a futex in the arena until the leader sees
# requests queued behind the one it took, serve while requests keep waiting, and park
# again when none is. A parked worker also checks every PARK_CHECK_S that the leader
# lives and, should requests wait, that it took a request since the last check (else it
# is stuck, in a slow cgroup read say), and leads in its place; the first parked one then
# also refreshes the shared configuration in use that is about to expire
# (ViewsFS.refresh_ahead), so that the leader finds it fresh.
PARK_CHECK_S = 0.1
BACKLOG_TO_WAKE = 2
ENV_PARKING = "CGPROCFS_PARKING"  # 0: every worker reads /dev/fuse all the time


def parking_enabled() -> bool:
    return os.environ.get(ENV_PARKING, "1") != "0" and SYS_FUTEX is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CpuContention:
    """Whether more tasks are runnable than there are CPUs, as of at most
    CONTENTION_CHECK_S ago (the caller passes the time: it has it at hand)."""

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self.busy = False
        self.checked = 0.0
        try:
            self.fd: int | None = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.fd = None  # never contended: spin as configured

    def now(self, t: float) -> bool:
        if t - self.checked >= CONTENTION_CHECK_S and self.fd is not None:
            self.checked = t
            try:
                running = int(os.pread(self.fd, 128, 0).split()[3].split(b"/")[0])
            except (OSError, ValueError, IndexError):
                running = 0
            self.busy = running > self.cpus
        return self.busy


def spin_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_SPIN_US, SPIN_US))) / 1e6
    except ValueError:
        return SPIN_US / 1e6


class _Stop(BaseException):
    """Raised by SIGTERM only while blocked in read(): nothing is in hand then."""


class _Sweep(BaseException):
    """Raised by the idle timer while the worker waits for a request: time to close the
    kept files nobody read for a while, which a worker with no request would keep."""


def config_to_json(cfg: Config) -> str:
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    return json.dumps(d)


def config_from_json(text: str) -> Config:
    d = json.loads(text)
    if d.get("views") is not None:
        d["views"] = tuple(d["views"])
    return Config(**d)


def build_renderer(cfg: Config, loads_fd: int | None, arena: Arena) -> Renderer:
    resolver = Resolver(load_layout())
    renderer = Renderer(resolver, RenderOptions(hide_swap=cfg.hide_swap))
    resolver.cpu.use_quota = cfg.cpu_quota
    resolver.limits.max_age = cfg.limits_max_age
    resolver.host.max_age = cfg.host_max_age
    resolver.files.max_files = capped_max_files(cfg.kept_files)
    if loads_fd is not None:
        renderer.loads = SharedLoads(arena, loads_fd)

    # The hash is cheap to recompute; a small LRU keeps the containers in use and does not
    # grow with every container ever served.
    @functools.lru_cache(maxsize=1024)
    def times_key(key: tuple[str, float]) -> int:
        digest = hashlib.blake2b(f"{key[0]}\0{key[1]}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") or 1

    def shared_times(key: tuple[str, float], times: CpuTimes) -> CpuTimes:
        return CpuTimes(*arena.times_at_least(times_key(key),
                                              (times.user, times.system, times.idle)))

    renderer.shared_times = shared_times
    resolver.share_placements(arena)
    return renderer


class Worker:
    def __init__(self, fuse_fd: int, arena: Arena, seat: int, fs: ViewsFS) -> None:
        self.fd = fuse_fd
        self.arena = arena
        self.seat = seat
        self.fs = fs
        self.buf = arena.request_buffer(seat)
        # Bound once: these run for every request.
        self._clear_seat = arena.seat_clearer(seat)
        self._store_counters = arena.counters_writer(seat)
        self._ops = fs.ops
        self.stopping = False
        self.in_read = False
        self.in_fuse_read = False
        self.debug = bool(os.environ.get(ENV_DEBUG_FUSE))

    @classmethod
    def from_environment(cls) -> Worker:
        env = os.environ
        cfg = config_from_json(env[ENV_CONFIG])
        arena = Arena(int(env[ENV_ARENA_FD]))
        seat = int(env[ENV_SEAT])
        loads_fd = int(env[ENV_LOADS_FD]) if env.get(ENV_LOADS_FD) else None
        renderer = build_renderer(cfg, loads_fd, arena)
        fs = ViewsFS(renderer, select_views(cfg), arena, seat)
        return cls(int(env[ENV_FUSE_FD]), arena, seat, fs)

    def _on_idle_timer(self, signum: int, frame: FrameType | None) -> None:
        if self.in_fuse_read:
            raise _Sweep

    def _sweep(self) -> None:
        """Close idle kept files; answer a request that came in just as the timer went
        off (the read returned, then the signal was handled)."""
        self.fs.renderer.resolver.files.close_idle()
        if self.arena.pending_length(self.seat):
            self.handle()

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self.in_read:
            raise _Stop

    def _fault_in_seat(self) -> None:
        """Map every page of our seat now, writable. The kernel copies a request into it
        from the reader's side; were a page still unmapped when this process is being
        killed, that copy would fault with a fatal signal pending and the kernel would
        fail the request with EIO. Rewriting each page's first byte keeps its content (a
        request left by our predecessor)."""
        buf = self.buf
        for off in range(0, len(buf), mmap.PAGESIZE):
            buf[off] = buf[off]

    def serve(self) -> None:
        self._fault_in_seat()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGALRM, self._on_idle_timer)
        signal.setitimer(signal.ITIMER_REAL, IDLE_S, IDLE_S)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
        self._answer_leftover()
        fd, buf = self.fd, [self.buf]
        spin = spin_seconds()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        pc = time.perf_counter
        arena, seat, me = self.arena, self.seat, os.getpid()
        parking = parking_enabled()
        arena.stop_spinning(seat)  # a predecessor killed while spinning
        arena.set_parked(seat, False)
        score = probe = backlog = 0
        contention = CpuContention()
        queued = False  # the last read did not wait: requests are queued
        try:
            while not self.stopping:
                lead = arena.leader()[0]
                if lead < 0:
                    arena.set_leader(seat, me)
                    continue
                leading = lead == seat or not parking
                if not leading and not queued and not poller.poll(0):
                    if not self._park(poller):
                        break
                    continue
                probe += 1
                spun = False
                if leading and spin and not queued \
                        and (score > 0 or probe % SPIN_PROBE_EVERY == 0) \
                        and not contention.now(spin_from := pc()) \
                        and arena.start_spinning(seat):
                    spun = True
                    deadline = spin_from + spin
                    while not (caught := bool(poller.poll(0))) and pc() < deadline \
                            and not self.stopping:
                        pass
                    arena.stop_spinning(seat)
                    score = SPIN_SCORE_MAX if caught else max(0, score - SPIN_MISS_COST)
                try:
                    self.in_read = self.in_fuse_read = True
                    began = pc()
                    os.readv(fd, buf)
                    self.in_read = self.in_fuse_read = False
                    queued = not spun and pc() - began < QUEUED_S
                except _Stop:
                    self.in_read = self.in_fuse_read = False
                    break
                except _Sweep:
                    self.in_read = self.in_fuse_read = False
                    self._sweep()
                    continue
                except OSError as exc:
                    self.in_read = self.in_fuse_read = False
                    if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                        continue  # the request was interrupted before we got it
                    if exc.errno == errno.ENODEV:
                        log.info("the mount is gone (ENODEV); worker %d exits", self.seat)
                        return
                    raise
                if not queued:
                    # A read that waited found the queue empty: no need to ask (most
                    # requests of a polled node come this way).
                    backlog = 0
                elif parking and lead == seat and arena.any_parked():
                    # Requests queued behind this one, at several reads in a row: the
                    # load outgrew one worker (a single one now and then is a burst the
                    # leader clears itself, cheaper than a wake-up).
                    backlog = backlog + 1 if poller.poll(0) else 0
                    if backlog >= BACKLOG_TO_WAKE:
                        arena.wake_one()
                        backlog = 0
                self.handle()
            # SIGTERM may land just after read() returned: answer what is in hand.
            if self.arena.pending_length(self.seat):
                self.handle()
        finally:
            if arena.leader()[0] == seat:  # hand over at once, not at the next check
                arena.set_leader(-1, 0)
                arena.wake_one()

    def _park(self, poller: select.poll) -> bool:
        """Sleep off /dev/fuse until the leader finds requests queued (or leaves, or
        stalls: requests waiting, none taken since the last check). False: stop."""
        arena, seat = self.arena, self.seat
        arena.set_parked(seat, True)
        # The leader's last request (its seat, the FUSE unique) and since when it is.
        seen: tuple[tuple[int, int], float] | None = None
        waited = False  # a request was waiting at the last check
        try:
            while not self.stopping:
                seq = arena.wake_seq()
                lead, pid = arena.leader()
                if lead < 0 or not _alive(pid):
                    arena.set_leader(seat, os.getpid())  # gone without handing over
                    return True
                # A request waiting at one check is no sign of trouble by itself: with a
                # few thousand requests a second one often is, and the leader keeps up.
                # A request waiting while the leader took none for a whole check is: the
                # leader is stuck (a slow cgroup read, a stopped process). Lead in its
                # place (answering only what waits at each check would serve a lone
                # reader one request per check); it parks when it comes back.
                now = time.monotonic()
                progress = (lead, arena.last_unique(lead))
                waiting = bool(poller.poll(0))
                if waiting and seen is not None and progress == seen[0] \
                        and now - seen[1] >= PARK_CHECK_S / 2:
                    log.warning("leader (seat %d, pid %d) took no request for %.2f s "
                                "while requests wait; seat %d leads", lead, pid,
                                now - seen[1], seat)
                    arena.set_leader(seat, os.getpid())
                    return True
                if waiting and waited:
                    # Requests waiting at two checks in a row: more load than the leader
                    # clears, where the leader's own backlog test cannot tell (it times
                    # its reads: on a machine with slow system calls, user-mode Linux
                    # for one, no read looks queued). Help while requests wait.
                    return True
                waited = waiting
                if seen is None or progress != seen[0]:
                    seen = (progress, now)
                self.in_read = True  # nothing in hand: SIGTERM may end the wait
                arena.park(seq, PARK_CHECK_S)
                self.in_read = False
                if arena.wake_seq() != seq:
                    return True
                if arena.first_parked() == seat:  # one refresher is enough
                    self.fs.refresh_ahead()  # closes idle kept files too
                    if arena.wake_seq() != seq:  # woken while refreshing
                        return True
                else:
                    self.fs.renderer.resolver.files.close_idle()
            return False
        except _Stop:
            return False
        finally:
            self.in_read = False
            arena.set_parked(seat, False)

    def _answer_leftover(self) -> None:
        """A request our predecessor in this seat read but did not answer."""
        if not self.arena.pending_length(self.seat):
            return
        crashes = self.arena.attempts(self.seat)
        if crashes >= MAX_ATTEMPTS:
            # This request crashed every worker that took it: answer EIO, keep the mount.
            _, opcode, unique, nodeid, *_ = abi.IN_HEADER.unpack_from(self.buf, 0)
            log.error("request %d (opcode %d, inode %d) crashed %d workers; answering EIO",
                      unique, opcode, nodeid, crashes)
            self.arena.add_poisoned()
            self._reply(unique, -errno.EIO, b"", opcode, 0)
            self.arena.clear_seat(self.seat)
            self.arena.reset_attempts(self.seat)
            return
        log.warning("answering a request left by a previous worker (after %d crashes)",
                    crashes)
        self.handle()
        self.arena.reset_attempts(self.seat)

    def handle(self) -> None:
        buf = self.buf
        length, opcode, unique, nodeid, _uid, _gid, pid, _, _ = _unpack_in_header(buf, 0)
        if self.debug:
            log.info("request %d: opcode %d inode %d pid %d (%d bytes)", unique, opcode,
                     nodeid, pid, length)
        op = self._ops.get(opcode)
        payload = b""
        if op is not None:
            fs = self.fs
            try:
                fs.unique = unique
                payload = op(nodeid, pid, buf[_IN_HEADER_SIZE:length])
                err = 0
            except FsError as exc:
                err = -exc.errno
            except Exception:
                log.exception("opcode %d on inode %d failed; answering EIO", opcode, nodeid)
                fs.counters.errors += 1
                err = -errno.EIO
        elif opcode in abi.NO_REPLY:
            self._clear_seat()
            return
        else:
            err = -errno.ENOSYS
        if opcode == _OPEN:
            # Before the reply: a caller that has its answer finds its open counted,
            # whichever worker serves the status file it reads next.
            c = self.fs.counters
            self._store_counters(c.opens, c.errors, self.fs.renderer.fallbacks)
        self._reply(unique, err, payload, opcode, nodeid)
        self._clear_seat()

    def _reply(self, unique: int, err: int, payload: bytes, opcode: int, nodeid: int) -> None:
        try:
            os.write(self.fd, _pack_out_header(_OUT_HEADER_SIZE + len(payload), err, unique)
                     + payload)
        except OSError as exc:
            # ENOENT: the caller gave up (interrupted) or a predecessor answered already.
            # An OPEN nobody will RELEASE must not keep its slot.
            if exc.errno == errno.ENOENT and opcode == abi.OPEN and not err:
                fh = abi.OPEN_OUT.unpack_from(payload)[0]
                self.arena.free(fh)
            elif exc.errno not in (errno.ENOENT, errno.ENODEV):
                log.warning("reply to request %d failed: %s", unique, exc)


def main() -> int:
    cfg = config_from_json(os.environ[ENV_CONFIG])
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="cgprocfs[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    die_with_supervisor()
    raise_fd_limit()  # before the resolver sizes its kept files by the limit
    worker: Worker
    if os.environ.get(ENV_ROLE) == "ring":
        from cgprocfs.fuse.ring_worker import RingWorker

        worker = RingWorker.from_environment()
    else:
        worker = Worker.from_environment()
    # What was built so far (modules, the tree, the renderer) lives as long as the worker:
    # the collector's full passes need not walk it again and again.
    gc.freeze()
    signal_ready()
    log.debug("worker seat %d serving", worker.seat)
    worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
