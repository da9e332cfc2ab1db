"""What every process the supervisor starts does first."""

from __future__ import annotations

import contextlib
import os
import signal

from cgprocfs.libc import libc

PR_SET_PDEATHSIG = 1

# What the supervisor tells the processes it starts (inherited descriptors are numbers).
ENV_FUSE_FD = "CGPROCFS_FUSE_FD"
ENV_ARENA_FD = "CGPROCFS_ARENA_FD"
ENV_ROLE = "CGPROCFS_ROLE"  # "ring": a ring worker (ring_worker.py)
ENV_SEAT = "CGPROCFS_SEAT"
ENV_READY_FD = "CGPROCFS_READY_FD"
ENV_LOADS_FD = "CGPROCFS_LOADS_FD"  # workers: their end; the sampler: its end
ENV_CONFIG = "CGPROCFS_CONFIG_JSON"
ENV_LOG_LEVEL = "CGPROCFS_LOG_LEVEL"
ENV_SUPERVISOR = "CGPROCFS_SUPERVISOR"
ENV_DEBUG_FUSE = "CGPROCFS_DEBUG_FUSE"


def die_with_supervisor() -> None:
    """SIGTERM when the supervisor goes. Without the supervisor nobody restarts us, and a
    mount served by orphans would hide the failure from the next start (which recovers
    a dead mount, see serve.prepare_mountpoint). execve of the supervisor (a reload) is
    not a death."""
    libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    expected = os.environ.get(ENV_SUPERVISOR)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)  # it died before prctl took effect


def signal_ready() -> None:
    """One byte on the ready pipe; nobody may be listening (a restart after a crash is
    not waited for), which is fine."""
    ready = os.environ.get(ENV_READY_FD)
    if ready:
        with contextlib.suppress(OSError):
            os.write(int(ready), b"R")
        os.close(int(ready))
