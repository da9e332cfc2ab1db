"""The C library, for the few calls Python's os module lacks (mount, umount2, prctl,
sysinfo, seccomp)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
