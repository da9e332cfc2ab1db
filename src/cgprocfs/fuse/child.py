"""What every process the supervisor starts does first."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_supervisor() -> None:
    """SIGTERM when the supervisor goes. Without the supervisor nobody restarts us, and a
    mount served by orphans would hide the failure from the next start (which recovers
    a dead mount, see serve.prepare_mountpoint). execve of the supervisor (a reload) is
    not a death."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    expected = os.environ.get("CGPROCFS_SUPERVISOR")
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # it died before prctl took effect


def signal_ready() -> None:
    """One byte on the ready pipe; nobody may be listening (a restart after a crash is
    not waited for), which is fine."""
    ready = os.environ.get("CGPROCFS_READY_FD")
    if ready:
        with contextlib.suppress(OSError):
            os.write(int(ready), b"R")
        os.close(int(ready))
