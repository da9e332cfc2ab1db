"""Holding fds across restarts of a child process (the sysinfo agent, FUSE workers).

A supervisor embeds `Keeper`. Each child inherits one end of a SOCK_SEQPACKET socket as
fd number $CGPROCFS_KEEPER_FD and sends, one message each:

    keep <name>    with the fd attached (SCM_RIGHTS): hold it under <name>
    drop <name>    close what is held under <name>

The next generation of children inherits every kept fd at the same number, listed in
$CGPROCFS_KEPT_FDS as `name=fd,name=fd`. A child run without a supervisor gets no-ops:
`keep` and `drop` return False and `kept_fds()` is empty.

Why: an fd the supervisor holds outlives the child. A seccomp listener held this way keeps
sysinfo(2) waiting for the next agent instead of failing with ENOSYS, and a listening
socket held this way keeps queueing connections while the agent restarts.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

ENV_SOCKET = "CGPROCFS_KEEPER_FD"
ENV_KEPT = "CGPROCFS_KEPT_FDS"
MAX_NAME = 200
_MSG_MAX = MAX_NAME + 16

_client: socket.socket | None = None
_client_checked = False


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME and not any(c in name for c in ",= \n\0")


def _connection() -> socket.socket | None:
    global _client, _client_checked
    if not _client_checked:
        _client_checked = True
        text = os.environ.get(ENV_SOCKET, "")
        if text.isdigit():
            try:
                _client = socket.socket(fileno=int(text))
            except OSError as exc:
                log.warning("%s=%s is not a socket: %s", ENV_SOCKET, text, exc)
    return _client


def keep(name: str, fd: int) -> bool:
    """Ask the supervisor to hold a duplicate of `fd` under `name`. False: no keeper."""
    if not _valid_name(name):
        raise ValueError(f"bad keeper name {name!r}")
    sock = _connection()
    if sock is None:
        return False
    try:
        sock.sendmsg([b"keep " + name.encode()],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    except OSError as exc:
        log.warning("keeper: could not keep %s: %s", name, exc)
        return False
    return True


def drop(name: str) -> bool:
    sock = _connection()
    if sock is None:
        return False
    try:
        sock.send(b"drop " + name.encode())
    except OSError as exc:
        log.warning("keeper: could not drop %s: %s", name, exc)
        return False
    return True


def kept_fds(env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The fds an earlier generation kept, inherited by this process: {name: fd}."""
    text = (os.environ if env is None else env).get(ENV_KEPT, "")
    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, fd = item.partition("=")
        if sep and fd.isdigit() and _valid_name(name):
            out[name] = int(fd)
    return out


class Keeper:
    """The supervisor's side: receives keep/drop messages and hands the kept fds to the
    next generation of children.

        keeper = Keeper()
        pass_fds, env = keeper.child_args()
        child = subprocess.Popen(cmd, pass_fds=pass_fds, env={**os.environ, **env})
        # in the supervisor's loop, whenever keeper.fileno() is readable:
        keeper.receive()
        # before spawning a replacement: child_args() receives what is pending first.
    """

    def __init__(self) -> None:
        self._server, self._client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._server.setblocking(False)
        self.fds: dict[str, int] = {}

    def fileno(self) -> int:
        """Readable when a child has sent something: call `receive()`."""
        return self._server.fileno()

    def receive(self) -> int:
        """Handle every pending message without blocking; returns how many."""
        handled = 0
        while True:
            try:
                msg, anc, _flags, _addr = self._server.recvmsg(
                    _MSG_MAX, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return handled
            handled += 1
            fds: list[int] = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
                    fds.extend(arr)
            self._handle(msg, fds)

    def _handle(self, msg: bytes, fds: list[int]) -> None:
        verb, _, raw = msg.partition(b" ")
        name = raw.decode(errors="replace")
        if verb == b"keep" and len(fds) == 1 and _valid_name(name):
            old = self.fds.pop(name, None)
            if old is not None:
                os.close(old)
            self.fds[name] = fds.pop()
        elif verb == b"drop" and not fds:
            old = self.fds.pop(name, None)
            if old is not None:
                os.close(old)
        else:
            log.warning("keeper: ignoring message %r with %d fds", msg[:60], len(fds))
        for fd in fds:  # anything not taken
            os.close(fd)

    def child_args(self, prefix: str = "") -> tuple[list[int], dict[str, str]]:
        """(pass_fds, environment additions) for the next child: the keeper socket and
        every kept fd whose name starts with `prefix`."""
        self.receive()
        kept = {n: fd for n, fd in self.fds.items() if n.startswith(prefix)}
        env = {ENV_SOCKET: str(self._client.fileno()),
               ENV_KEPT: ",".join(f"{n}={fd}" for n, fd in sorted(kept.items()))}
        return [self._client.fileno(), *kept.values()], env

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self._server.close()
        self._client.close()
