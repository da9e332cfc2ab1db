"""The C library, for the few calls Python's os module lacks (mount, umount2, prctl,
sysinfo, seccomp, futex)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


# futex(2) is how parked workers sleep on a word of the shared arena; its number is per
# architecture (None: unknown here, and workers do not park).
SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "riscv64": 98, "s390x": 238,
             "ppc64le": 221}.get(platform.machine())
FUTEX_WAIT = 0
FUTEX_WAKE = 1


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(address: int, expected: int, timeout: float) -> None:
    """Sleep while the u32 at `address` (in shared memory) holds `expected`, at most
    `timeout` seconds; returns at once if it already differs. A signal ends it too."""
    assert SYS_FUTEX is not None
    ts = Timespec(int(timeout), int(timeout % 1 * 1e9))
    libc().syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAIT,
                   ctypes.c_uint32(expected), ctypes.byref(ts), None, 0)


def futex_wake(address: int, count: int) -> None:
    assert SYS_FUTEX is not None
    libc().syscall(SYS_FUTEX, ctypes.c_void_p(address), FUTEX_WAKE, count, None, None, 0)


MAP_SHARED = 0x01
MAP_FIXED_NOREPLACE = 0x100000
PROT_READ_WRITE = 0x3


def mmap_at(address: int, length: int, fd: int, offset: int) -> int:
    """Map `length` bytes of `fd` from `offset`, shared and writable, at exactly
    `address` (never over an existing mapping); returns the address mapped at, which
    may differ only on kernels older than 4.17 (the caller checks)."""
    fn = libc().mmap
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                   ctypes.c_int, ctypes.c_long]
    got = fn(address, length, PROT_READ_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, offset)
    if got is None or got == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, f"mmap at {address:#x}: {os.strerror(e)}")
    return int(got)
