"""The supervisor: holds the mount's /dev/fuse connection and runs worker generations.

The process that mounts never answers a request. It keeps the connection's descriptor,
the arena and the load sampler's socket open for the life of the mount and runs the
processes that serve: a worker per seat (started again at once when one dies; its
successor answers whatever request it had in hand) and the load sampler. Because the
descriptor never closes, the kernel never sees the daemon go away: readers at most wait
for a new worker, they never get ENOTCONN.

- SIGHUP: zero-downtime reload and upgrade. The supervisor checks that the code on disk
  imports, then re-executes itself (the descriptors survive execve; its children stay
  its children), and the new image replaces every worker and the sampler one at a time:
  a new one is started and retires the old one only once it is ready. A build that does
  not start leaves the old processes serving.
- SIGTERM/SIGINT: unmount and stop (under systemd with a descriptor store: keep the
  mount and stop, the next start takes the connection over from the store).
- Under systemd the descriptors also go to the service's descriptor store
  (FDSTORE=1), so even the supervisor's own crash or `systemctl restart` is survived.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cgprocfs.config import Config
from cgprocfs.fuse.arena import HANDOVER_ASKED, HANDOVER_PARKED, Arena
from cgprocfs.fuse.child import (
    ENV_ARENA_FD,
    ENV_CONFIG,
    ENV_DEBUG_FUSE,
    ENV_FUSE_FD,
    ENV_LOADS_FD,
    ENV_LOG_LEVEL,
    ENV_READY_FD,
    ENV_ROLE,
    ENV_SEAT,
    ENV_SUPERVISOR,
)
from cgprocfs.fuse.worker import config_to_json
from cgprocfs.keeper import Keeper

log = logging.getLogger("cgprocfs.supervisor")

ENV_TAKEOVER = "CGPROCFS_TAKEOVER"
FDNAMES = ("cgprocfs-fuse", "cgprocfs-arena", "cgprocfs-loads-r", "cgprocfs-loads-w")
READY_TIMEOUT = 30.0
SLOTS_PER_SEAT = 256


@dataclass
class Child:
    pid: int
    role: str  # "worker", "ring" (a ring worker), "sampler" or "sysinfo"
    seat: int  # -1 for the sampler
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False
    ready: bool = False  # it said it serves (a start-up failure is not a crash)
    ready_fd: int = -1  # the read end of its ready pipe, while not yet ready


@dataclass
class Connection:
    """Everything that must outlive every process but the supervisor."""

    fuse_fd: int
    arena: Arena
    loads_r: int  # the sampler's end of the load registration socket pair
    loads_w: int  # the workers' end

    def fds(self) -> list[int]:
        return [self.fuse_fd, self.arena.fd, self.loads_r, self.loads_w]

    @classmethod
    def create(cls, fuse_fd: int, seats: int, ring_ents: int = 0) -> Connection:
        arena = Arena.create(seats, SLOTS_PER_SEAT, ring_ents)
        r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        conn = cls(fuse_fd, arena, r.detach(), w.detach())
        for fd in conn.fds():
            os.set_inheritable(fd, True)
        return conn


# Deaths that may be a request's doing: a crash signal, or an exit with an error status.
CRASH_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                           signal.SIGABRT, signal.SIGSYS, signal.SIGTRAP})


def crashed(status: int) -> bool:
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status) in CRASH_SIGNALS
    return os.waitstatus_to_exitcode(status) != 0


class Supervisor:
    def __init__(self, cfg: Config, conn: Connection, mountpoint: str, workers: int,
                 on_unmount: Callable[[], None], keep_mount: bool = False,
                 debug_fuse: bool = False, ring_groups: int = 0) -> None:
        self.cfg = cfg
        self.conn = conn
        self.mountpoint = mountpoint
        self.workers = workers
        self.ring_groups = ring_groups  # ring workers to run (0: /dev/fuse only)
        self.on_unmount = on_unmount
        self.keep_mount = keep_mount
        self.debug_fuse = debug_fuse
        self.children: dict[int, Child] = {}
        self.failures: dict[int, int] = {}
        self.delayed: list[tuple[float, str, int]] = []  # (when, role, seat)
        self.reexec_argv: list[str] | None = None
        self.keeper: Keeper | None = None  # holds the sysinfo agent's descriptors
        self.upgrade = False  # replace every adopted process once running (after re-exec)
        self.stopping = False

    # ---- processes -------------------------------------------------------------------
    def _env(self, seat: int, ready_fd: int, role: str = "worker") -> dict[str, str]:
        env = dict(os.environ)
        env.pop(ENV_TAKEOVER, None)
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(k, None)  # only the supervisor talks to systemd
        env.update({
            ENV_FUSE_FD: str(self.conn.fuse_fd),
            ENV_ARENA_FD: str(self.conn.arena.fd),
            ENV_SEAT: str(seat),
            ENV_READY_FD: str(ready_fd),
            ENV_LOADS_FD: str(self.conn.loads_w if seat >= 0 else self.conn.loads_r),
            ENV_CONFIG: config_to_json(self.cfg),
            ENV_LOG_LEVEL: self.cfg.log_level,
            ENV_SUPERVISOR: str(os.getpid()),
            ENV_ROLE: role,
        })
        if self.debug_fuse:
            env[ENV_DEBUG_FUSE] = "1"
        return env

    def spawn(self, role: str, seat: int, group: int = -1) -> Child:
        """Start a worker, the sampler or the sysinfo agent; its ready pipe (one byte
        when it serves, EOF if it dies first) is in `ready_fd` until settled."""
        r, w = os.pipe()
        os.set_inheritable(w, True)
        try:
            if role == "sysinfo":
                pid = self._spawn_sysinfo(w)
            else:
                if role == "ring" and group >= 0:
                    self.conn.arena.set_ring_group(seat, group)
                elif role == "worker":
                    self.conn.arena.set_ring_group(seat, -1)
                module = ("cgprocfs.fuse.loads" if role == "sampler"
                          else "cgprocfs.fuse.worker")
                pid = os.posix_spawn(sys.executable, [sys.executable, "-m", module],
                                     self._env(seat, w, role))
        finally:
            os.close(w)
        child = Child(pid, role, seat, ready_fd=r)
        self.children[pid] = child
        return child

    def enable_sysinfo(self, kept: dict[str, int] | None) -> None:
        """Run the sysinfo agent (docs/sysinfo.md) as one of our processes. Its
        descriptors (socket, in-flight page, every container's seccomp listener) are kept
        here, so a restarted agent answers the same containers."""
        from cgprocfs.sysinfo.oci import reachable

        if not kept and reachable(self.cfg.sysinfo_socket):
            log.info("a sysinfo agent already answers at %s; not starting one",
                     self.cfg.sysinfo_socket)
            return
        self.keeper = Keeper()
        for name, fd in (kept or {}).items():
            self.keeper.fds[name] = fd

    def _spawn_sysinfo(self, ready_w: int) -> int:
        assert self.keeper is not None
        pass_fds, env = self.keeper.child_args(prefix="sysinfo.")
        argv = [sys.executable, "-m", "cgprocfs", "sysinfo-agent",
                "--socket", self.cfg.sysinfo_socket]
        if self.cfg.hide_swap:
            argv.append("--hide-swap")
        if not self.cfg.cpu_quota:
            argv.append("--no-cpu-quota")
        # The workers' end of the load socket and the arena: the agent shows the very
        # load averages /proc/loadavg shows.
        full = {**self._env(0, ready_w), **env}
        full.pop(ENV_SEAT, None)
        pass_fds = [*pass_fds, self.conn.arena.fd, self.conn.loads_w]
        # The agent has no ready message: it serves once started (a start-up failure is
        # caught by its short life, see reap()).
        os.write(ready_w, b"R")
        proc = subprocess.Popen(argv, env=full, pass_fds=pass_fds, stdin=subprocess.DEVNULL)
        return proc.pid

    @staticmethod
    def _settle(c: Child, readable: bool) -> None:
        """Read a child's ready byte (if there is one to read) and close its pipe."""
        if readable:
            with contextlib.suppress(OSError):
                c.ready = os.read(c.ready_fd, 1) == b"R"
        os.close(c.ready_fd)
        c.ready_fd = -1

    def wait_ready(self, c: Child, timeout: float = READY_TIMEOUT) -> bool:
        ready, _, _ = select.select([c.ready_fd], [], [], timeout)
        self._settle(c, bool(ready))
        return c.ready

    def check_ready(self, readable: list[int]) -> None:
        for c in self.children.values():
            if c.ready_fd >= 0 and c.ready_fd in readable:
                self._settle(c, True)

    def free_seat(self, exclude: set[int] | None = None) -> int:
        """A seat no process uses or is about to use, and with no request left in it."""
        used = {c.seat for c in self.children.values()}  # retiring ones still read
        used |= {seat for _, _, seat in self.delayed} | (exclude or set())
        for seat in range(self.conn.arena.layout.seats):
            if seat not in used and not self.conn.arena.pending_length(seat):
                return seat
        raise RuntimeError("no free seat")

    def start_all(self) -> None:
        """Workers for every seat that holds an unanswered request, then up to the
        configured count, and the sampler; waits until all are serving."""
        arena = self.conn.arena
        # A live process answers its own seat's request, and so will one due to start.
        taken = {c.seat for c in self.children.values()} | {d[2] for d in self.delayed}
        seats = {s for s in range(arena.layout.seats)
                 if arena.pending_length(s) and s not in taken}
        ring_seats = {s for s in seats if 0 <= arena.ring_group(s) < self.ring_groups}
        seats -= ring_seats
        serving = len([c for c in self.children.values()
                       if c.role == "worker" and not c.retiring])
        serving += len([d for d in self.delayed if d[1] == "worker"])
        while serving + len(seats) < self.workers:
            seats.add(self.free_seat(exclude=seats | ring_seats))
        started = [self.spawn("worker", s) for s in sorted(seats)]
        started += [self.spawn("ring", s) for s in sorted(ring_seats)]
        groups = {arena.ring_group(c.seat) for c in self.children.values()
                  if c.role == "ring" and not c.retiring}
        groups |= {arena.ring_group(seat) for _, role, seat in self.delayed if role == "ring"}
        for group in range(self.ring_groups):
            if group not in groups:
                started.append(self.spawn("ring", self.free_seat(), group))
        roles = {c.role for c in self.children.values()} | {d[1] for d in self.delayed}
        if "sampler" not in roles:
            started.append(self.spawn("sampler", -1))
        if self.keeper is not None and "sysinfo" not in roles:
            started.append(self.spawn("sysinfo", -2))
        for c in started:
            self.wait_ready(c)

    def replace_all(self) -> bool:
        """The rolling part of a reload: each old process is retired only after its
        replacement is ready. Returns False (old ones keep serving) if one fails."""
        old = [c for c in self.children.values() if not c.retiring]
        arena = self.conn.arena
        for child in old:
            seat = self.free_seat() if child.role == "worker" else child.seat
            if child.role == "ring":
                # A ring worker's successor takes its seat: the old one leaves each of its
                # ring entries holding a request of its own, so the kernel hands it
                # nothing more, and the new one takes the entries over (ring_worker.py).
                arena.set_ring_handover(seat, HANDOVER_ASKED)
            new = self.spawn(child.role, seat)
            if not self.wait_ready(new):
                log.error("reload: the new %s did not start; the running ones keep "
                          "serving", child.role)
                if child.role == "ring":
                    arena.set_ring_handover(seat, 0)
                new.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(new.pid, signal.SIGKILL)
                return False
            child.retiring = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGTERM)
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.ready_fd >= 0:
                self._settle(child, False)
            if child.role == "worker" and self.conn.arena.leader()[0] == child.seat:
                # The leading worker died: a parked one takes over now, not at its next
                # check (its successor in the seat will find a leader and park).
                self.conn.arena.set_leader(-1, 0)
                self.conn.arena.wake_one()
            pending = child.seat >= 0 and self.conn.arena.pending_length(child.seat)
            successor = any(c.seat == child.seat for c in self.children.values())
            if child.role == "ring" and child.retiring \
                    and self.conn.arena.ring_handover(child.seat) == HANDOVER_ASKED:
                # It died before parking its entries: its successor need not wait.
                self.conn.arena.set_ring_handover(child.seat, HANDOVER_PARKED)
            if self.stopping or (child.retiring and (not pending or successor)):
                continue
            how = (f"signal {-os.waitstatus_to_exitcode(status)}"
                   if os.WIFSIGNALED(status) else f"status {os.waitstatus_to_exitcode(status)}")
            log.warning("%s %d (seat %d) ended with %s; starting another%s", child.role,
                        pid, child.seat, how, " to answer its request" if pending else "")
            self.conn.arena.add_restart()
            if pending and crashed(status):
                # Counted for the crash-loop guard: the request it held may be the cause.
                # A kill from outside (SIGKILL, SIGTERM: an operator, a test, a rollout)
                # says nothing about the request, which the next worker simply answers.
                self.conn.arena.bump_attempts(child.seat)
            key = child.seat
            # A process that served is replaced at once (readers are waiting). One that
            # dies before it serves, again and again (a broken install), is started again
            # with a growing delay instead of in a tight loop.
            lived = time.monotonic() - child.started
            failed_start = (not child.ready or lived < 1.0) and not os.WIFSIGNALED(status)
            self.failures[key] = self.failures.get(key, 0) + 1 if failed_start else 0
            delay = 0.0 if self.failures[key] <= 1 else min(5.0, 0.1 * 2 ** self.failures[key])
            self.delayed.append((time.monotonic() + delay, child.role, child.seat))

    def start_delayed(self) -> None:
        now = time.monotonic()
        due = [d for d in self.delayed if d[0] <= now]
        self.delayed = [d for d in self.delayed if d[0] > now]
        for _, role, seat in due:
            self.spawn(role, seat)

    # ---- the loop ------------------------------------------------------------------
    def run(self) -> int:
        # A leader recorded by an earlier supervisor (takeover) may be gone, and its pid
        # reused: the workers elect one afresh.
        self.conn.arena.set_leader(-1, 0)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        self.reap()
        self.start_all()
        from cgprocfs.serve import sd_notify

        sd_notify(f"READY=1\nMAINPID={os.getpid()}")
        if self.upgrade:
            self.upgrade = False
            ok = self.replace_all()
            log.info("reload: every worker replaced" if ok else "reload: not completed")
        while True:
            timeout = None
            if self.delayed:
                timeout = max(0.0, min(d[0] for d in self.delayed) - time.monotonic())
            waiting = [c.ready_fd for c in self.children.values() if c.ready_fd >= 0]
            if self.keeper is not None:
                waiting.append(self.keeper.fileno())
            readable: list[int] = []
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([wake_r, *waiting], [], [], timeout)
            self.check_ready(readable)
            if self.keeper is not None and self.keeper.fileno() in readable:
                try:
                    self.keeper.receive()
                except Exception:
                    log.exception("keeper: a message could not be read")
            try:
                signums = os.read(wake_r, 256)
            except BlockingIOError:
                signums = b""
            self.reap()
            if signal.SIGTERM in signums or signal.SIGINT in signums:
                return self.shutdown(signal.Signals(signums[-1]).name)
            if signal.SIGHUP in signums:
                self.reload()
            self.start_delayed()

    def reload(self) -> None:
        from cgprocfs.serve import sd_notify

        sd_notify("RELOADING=1")
        argv = self.reexec_argv or [sys.executable, "-m", "cgprocfs", "serve"]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        env["CGPROCFS_CHECK_ONLY"] = "1"
        try:
            check = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("SIGHUP: cannot check the installed code (%s); not reloading", exc)
            sd_notify("READY=1")
            return
        if check.returncode != 0:
            log.error("SIGHUP: the installed code or the configuration does not load; "
                      "not reloading:\n%s", check.stderr[-2000:])
            sd_notify("READY=1")
            return
        if self.reexec_argv is None:
            ok = self.replace_all()
            log.info("SIGHUP: workers replaced" if ok else "SIGHUP: reload failed")
            sd_notify("READY=1")
            return
        kept = dict(self.keeper.fds) if self.keeper is not None else {}
        for fd in kept.values():
            os.set_inheritable(fd, True)
        state = {
            "kept": kept,
            "fuse": self.conn.fuse_fd, "arena": self.conn.arena.fd,
            "loads_r": self.conn.loads_r, "loads_w": self.conn.loads_w,
            "children": [[c.pid, c.role, c.seat, c.retiring] for c in self.children.values()],
            "keep_mount": self.keep_mount,
        }
        env = dict(os.environ)
        env[ENV_TAKEOVER] = json.dumps(state)
        log.info("SIGHUP: re-executing the supervisor (pid %d stays) to load the installed "
                 "code", os.getpid())
        signal.set_wakeup_fd(-1)
        os.execve(sys.executable, self.reexec_argv, env)

    def shutdown(self, why: str) -> int:
        from cgprocfs.serve import sd_notify

        self.stopping = True
        sd_notify("STOPPING=1")
        if self.keep_mount:
            log.info("%s: stopping; the mount stays in the service's descriptor store", why)
        else:
            log.info("%s: unmounting", why)
            self.on_unmount()
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.01)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        opens, errors, _ = self.conn.arena.totals()
        log.info("unmounted %s; %d opens served, %d errors", self.mountpoint, opens, errors)
        return 0


def takeover_state() -> dict[str, object] | None:
    text = os.environ.pop(ENV_TAKEOVER, None)
    return json.loads(text) if text else None


def adopt(sup: Supervisor, state: dict[str, object]) -> None:
    """After a re-exec: the children are still ours."""
    for pid, role, seat, retiring in state["children"]:  # type: ignore[attr-defined]
        sup.children[pid] = Child(pid, role, seat, retiring=retiring)


def listen_fds() -> dict[str, int]:
    """Descriptors systemd passed back from the service's store, by name."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    n = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = {names[i] if i < len(names) else f"fd{i}": 3 + i for i in range(n)}
    for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(k, None)
    return out


def store_fds(conn: Connection) -> bool:
    """Give systemd a copy of each descriptor (FDSTORE=1); False outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    # systemd (>= 254) sets $FDSTORE to FileDescriptorStoreMax=: without a store, the
    # descriptors sent would be refused.
    if not addr or int(os.environ.get("FDSTORE", "0") or 0) < len(FDNAMES):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            for name, fd in zip(FDNAMES, conn.fds(), strict=True):
                socket.send_fds(s, [f"FDSTORE=1\nFDNAME={name}".encode()], [fd])
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("cannot store descriptors in systemd: %s", exc)
        return False
    return True
