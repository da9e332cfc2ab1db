"""The OCI `linux.seccomp.listenerPath` protocol (runc, crun; Docker, Podman and
containerd through a seccomp profile), which `cgprocfs exec` and `cgprocfs run` speak too.

The runtime connects to the unix socket at listenerPath and sends the container process
state as JSON (runtime-spec ContainerProcessState) with the fds it names in "fds"
attached by SCM_RIGHTS, "seccompFd" among them; then it closes the connection. Our own
clients send the same and then wait for the agent's one-line acknowledgement, so they
know the listener is in good hands before they exec.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from dataclasses import dataclass
from typing import Any

SECCOMP_FD = "seccompFd"
ACK = b"ok\n"
MAX_STATE = 1 << 20  # a state with huge annotations is still far below this
READ_TIMEOUT = 2.0


class ProtocolError(ValueError):
    pass


@dataclass(frozen=True)
class ListenerState:
    """What a connection handed over: the listener fd and who it belongs to."""

    fd: int
    container_id: str
    pid: int


def parse_state(data: bytes, fds: list[int]) -> ListenerState:
    """The listener among `fds` according to the state's "fds" list. Every other fd is
    closed here; on error all of them are."""
    try:
        state = json.loads(data)
        names = state["fds"]
        index = names.index(SECCOMP_FD)
        fd = fds[index]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        _close_all(fds)
        raise ProtocolError(f"no {SECCOMP_FD} in the container process state: {exc}") \
            from exc
    _close_all(f for i, f in enumerate(fds) if i != index)
    inner: Any = state.get("state") or {}
    cid = str(inner.get("id") or "") if isinstance(inner, dict) else ""
    pid = state.get("pid")
    return ListenerState(fd, cid, pid if isinstance(pid, int) else 0)


def _close_all(fds: Any) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive_state(conn: socket.socket) -> ListenerState | None:
    """Read one connection to its end (or to a complete JSON document, for clients that
    wait for the acknowledgement) and take its listener. None: an empty connection (a
    client checking that the agent is there)."""
    conn.settimeout(READ_TIMEOUT)
    chunks: list[bytes] = []
    fds: list[int] = []
    size = 0
    try:
        while size <= MAX_STATE:
            msg, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if not msg:
                break
            chunks.append(msg)
            size += len(msg)
            with contextlib.suppress(ValueError):
                json.loads(b"".join(chunks))
                break
    except OSError as exc:
        _close_all(fds)
        raise ProtocolError(f"reading the container process state: {exc}") from exc
    if not chunks and not fds:
        return None
    return parse_state(b"".join(chunks), fds)


def acknowledge(conn: socket.socket) -> None:
    # runc has closed its end by now: a failed send is expected and harmless.
    with contextlib.suppress(OSError):
        conn.send(ACK, socket.MSG_NOSIGNAL)


def send_listener(socket_path: str, fd: int, container_id: str, pid: int,
                  timeout: float = 10.0) -> None:
    """Hand listener `fd` to the agent at `socket_path` and wait for its acknowledgement.
    Raises OSError when the agent cannot be reached or does not acknowledge."""
    state = {
        "ociVersion": "1.0.2",
        "fds": [SECCOMP_FD],
        "pid": pid,
        "metadata": "",
        "state": {"ociVersion": "1.0.2", "id": container_id, "status": "creating",
                  "pid": pid, "bundle": ""},
    }
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendmsg([json.dumps(state).encode()],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        reply = s.recv(16)
    if reply != ACK:
        raise OSError(f"the sysinfo agent at {socket_path} did not acknowledge "
                      f"(said {reply!r})")


def reachable(socket_path: str) -> bool:
    """Does an agent listen at `socket_path`? (A connection it will read as empty.)"""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(socket_path)
    except OSError:
        return False
    return True
