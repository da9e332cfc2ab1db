"""The sysinfo agent: one process, one loop, waiting on its unix socket and on every
seccomp listener it was handed; answers each sysinfo(2) of a filtered process with that
process's container figures.

- Listeners arrive on the socket (oci.py: runc/crun listenerPath, `cgprocfs exec`,
  `cgprocfs run`). Each is kept by the supervisor (keeper.py) so a restart of this process
  leaves sysinfo waiting instead of failing with ENOSYS; a listener whose processes have
  all exited (POLLHUP) is closed and dropped.
- On start it adopts the listeners, the socket and the in-flight page an earlier
  generation kept, and answers the notification that generation died on, if any.
- It never lets an exception escape: whatever goes wrong with one call, that caller gets
  the kernel's own answer (SECCOMP_USER_NOTIF_FLAG_CONTINUE), never garbage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import select
import signal
import socket
import stat
import time
import uuid

from cgprocfs import keeper
from cgprocfs.loadavg import SAMPLE_INTERVAL
from cgprocfs.sysinfo import oci
from cgprocfs.sysinfo.inflight import InFlight
from cgprocfs.sysinfo.layout import pack32, pack64
from cgprocfs.sysinfo.seccomp import (
    id_valid,
    parse_notification,
    recv_into,
    send,
    send_continue,
    sync_wake_up,
    sysinfo_abi,
    write_memory,
)
from cgprocfs.sysinfo.values import SysinfoSource

log = logging.getLogger(__name__)

SOCKET_NAME = "sysinfo.socket"
INFLIGHT_NAME = "sysinfo.inflight"
LISTENER_PREFIX = "sysinfo.listener."
KEEPER_PREFIX = "sysinfo."
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# Tracebacks logged in full before only counting (a broken cgroup must not flood the log).
_LOGGED_FAILURES = 20


class AgentError(Exception):
    pass


def listener_name(container_id: str, pid: int) -> str:
    who = _UNSAFE.sub("_", container_id)[:64] or f"pid{pid}"
    return f"{LISTENER_PREFIX}{who}.{uuid.uuid4().hex[:8]}"


def open_socket(path: str, kept: int | None) -> tuple[socket.socket, bool]:
    """The listening socket: the kept one if it still serves `path`, else a new one.
    Returns (socket, is_new)."""
    if kept is not None:
        sock = socket.socket(fileno=kept)
        try:
            same = sock.getsockname() == path and stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            same = False
        if same:
            return sock, False
        sock.close()
        keeper.drop(SOCKET_NAME)
    if oci.reachable(path):
        raise AgentError(f"another sysinfo agent already listens on {path}")
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    # Only root may hand us listeners (runc, Docker and `cgprocfs run` run as root).
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock, True


class Agent:
    def __init__(self, socket_path: str, source: SysinfoSource) -> None:
        self.socket_path = socket_path
        self.source = source
        self.epoll = select.epoll()
        self.listeners: dict[int, str] = {}  # fd -> keeper name
        self.answered = self.continued = self.failed = 0
        self._stopping = False
        self._told_no_sync = False
        kept = keeper.kept_fds()
        self.sock, new = open_socket(socket_path, kept.get(SOCKET_NAME))
        self.sock.setblocking(False)
        if new:
            keeper.keep(SOCKET_NAME, self.sock.fileno())
        if INFLIGHT_NAME in kept:
            self.inflight = InFlight(kept[INFLIGHT_NAME])
        else:
            self.inflight = InFlight.create()
            keeper.keep(INFLIGHT_NAME, self.inflight.fd)
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        for name, fd in sorted(kept.items()):
            if name.startswith(LISTENER_PREFIX):
                self._watch(fd, name)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self._wake_r, select.EPOLLIN)
        if kept:
            log.info("adopted %d kept listeners", len(self.listeners))
        self._recover()

    def _watch(self, fd: int, name: str) -> None:
        try:
            sync = sync_wake_up(fd)
        except OSError as exc:
            log.warning("listener %s: cannot set synchronous wake-up: %s", name, exc)
            sync = False
        if not sync and not self._told_no_sync:
            log.info("this kernel has no synchronous seccomp wake-up (Linux 6.6+): each "
                     "sysinfo call costs two cross-CPU wake-ups")
            self._told_no_sync = True
        self.listeners[fd] = name
        self.epoll.register(fd, select.EPOLLIN)

    def adopt(self, fd: int, container_id: str, pid: int) -> str:
        """Start answering a new listener; the supervisor keeps a copy of it."""
        os.set_inheritable(fd, False)
        name = listener_name(container_id, pid)
        keeper.keep(name, fd)
        self._watch(fd, name)
        log.info("listener %s for %s (pid %d)", name, container_id or "-", pid)
        return name

    def _recover(self) -> None:
        pending = self.inflight.pending()
        if pending is None:
            return
        name, data = pending
        fd = next((f for f, n in self.listeners.items() if n == name), None)
        try:
            if fd is not None:
                log.info("answering the call an earlier agent received (%s)", name)
                self._answer(fd, data)
        finally:
            self.inflight.clear()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def serve_forever(self) -> None:
        next_sample = time.monotonic() + SAMPLE_INTERVAL
        while not self._stopping:
            timeout = max(0.0, next_sample - time.monotonic())
            for fd, events in self.epoll.poll(timeout):
                self._event(fd, events)
            if time.monotonic() >= next_sample:
                next_sample = time.monotonic() + SAMPLE_INTERVAL
                try:
                    self.source.loads.sample()
                except Exception:
                    log.exception("sampling loads")

    def _event(self, fd: int, events: int) -> None:
        try:
            if fd in self.listeners:
                if events & select.EPOLLIN:
                    self._notification(fd)
                elif events & (select.EPOLLHUP | select.EPOLLERR):
                    self._close_listener(fd)
            elif fd == self.sock.fileno():
                self._accept()
            elif fd == self._wake_r:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
        except Exception:
            log.exception("agent event on fd %d", fd)

    def _close_listener(self, fd: int) -> None:
        name = self.listeners.pop(fd)
        self.epoll.unregister(fd)
        os.close(fd)
        keeper.drop(name)
        log.debug("listener %s: every process of the filter has exited", name)

    def _accept(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        with conn:
            conn.setblocking(True)
            try:
                st = oci.receive_state(conn)
            except oci.ProtocolError as exc:
                log.warning("listener socket: %s", exc)
                return
            if st is None:
                return
            self.adopt(st.fd, st.container_id, st.pid)
            oci.acknowledge(conn)

    def _notification(self, fd: int) -> None:
        self.inflight.begin(self.listeners[fd])
        try:
            recv_into(fd, self.inflight.address)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the caller was interrupted meanwhile
                log.warning("receiving on %s: %s", self.listeners[fd], exc)
            return
        try:
            self._answer(fd, self.inflight.notification())
        finally:
            self.inflight.clear()

    def _answer(self, fd: int, data: bytes) -> None:
        n = parse_notification(data)
        try:
            is32 = sysinfo_abi(n.arch, n.nr)
            listener = self.listeners[fd]
            values = None if is32 is None else self.source.values(n.pid, listener)
            if values is None:
                send_continue(fd, n.id)
                self.continued += 1
                return
            payload = pack32(values) if is32 else pack64(values)
            # The pid means the caller only while the caller still waits on this call.
            if not id_valid(fd, n.id):
                return
            try:
                write_memory(n.pid, n.args[0], payload)
            except OSError as exc:
                if exc.errno != errno.EFAULT:
                    raise
                send(fd, n.id, error=-errno.EFAULT)  # what the kernel says to a bad pointer
                return
            send(fd, n.id)
            self.answered += 1
        except Exception:
            self.failed += 1
            if self.failed <= _LOGGED_FAILURES:
                log.exception("pid %d: answering sysinfo with the host's figures", n.pid)
            with contextlib.suppress(OSError):
                send_continue(fd, n.id)


def serve(socket_path: str, source: SysinfoSource) -> int:
    """Run the agent until SIGTERM or SIGINT. Listeners stay with the supervisor."""
    try:
        agent = Agent(socket_path, source)
    except (AgentError, OSError) as exc:
        log.error("sysinfo agent: %s", exc)
        return 1
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: agent.stop())
    log.info("sysinfo agent listening on %s (pid %d)", socket_path, os.getpid())
    agent.serve_forever()
    log.info("sysinfo agent stops: %d answered, %d left to the kernel, %d failed",
             agent.answered, agent.continued, agent.failed)
    return 0
