"""Seccomp user notification through ctypes: the filter that turns sysinfo(2) into a
notification, and the ioctls an agent answers with.

Only sysinfo is intercepted, and the filter checks the architecture before the syscall
number: the same number means different calls on different ABIs (99 is sysinfo on
x86_64 but statfs on i386, whose sysinfo is 116). Everything else is allowed.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass

from cgprocfs.libc import libc

# linux/audit.h
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7
AUDIT_ARCH_ARM = 0x40000028

# machine -> (seccomp(2) syscall number, ((audit arch, sysinfo number, 32-bit ABI), ...))
_ABIS: dict[str, tuple[int, tuple[tuple[int, int, bool], ...]]] = {
    "x86_64": (317, ((AUDIT_ARCH_X86_64, 99, False), (AUDIT_ARCH_I386, 116, True))),
    "aarch64": (277, ((AUDIT_ARCH_AARCH64, 179, False), (AUDIT_ARCH_ARM, 116, True))),
}

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
PR_SET_NO_NEW_PRIVS = 38

# _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
# _IOW('!', 2, __u64): the same numbers on every architecture Linux runs containers on.
IOCTL_RECV = 0xC0502100
IOCTL_SEND = 0xC0182101
IOCTL_ID_VALID = 0x40082102
# _IOW('!', 4, __u64), whose argument is the flags themselves (Linux 6.6+).
IOCTL_SET_FLAGS = 0x40082104
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

# struct seccomp_notif: id, pid, flags, then seccomp_data (nr, arch, ip, args[6]).
NOTIF = struct.Struct("<QIIiIQ6Q")
# struct seccomp_notif_resp: id, val, error, flags.
RESP = struct.Struct("<QqiI")
assert NOTIF.size == 80 and RESP.size == 24

# BPF: ld [k]; jeq #k, jt, jf; ret #k. seccomp_data: nr at 0, arch at 4.
_LD_ABS = 0x20
_JEQ = 0x15
_RET = 0x06


class Unsupported(OSError):
    """This machine's architecture has no sysinfo table here."""


def abis(machine: str | None = None) -> tuple[tuple[int, int, bool], ...]:
    entry = _ABIS.get(machine or platform.machine())
    if entry is None:
        raise Unsupported(errno.ENOSYS, f"no seccomp sysinfo table for {platform.machine()}")
    return entry[1]


def sysinfo_abi(arch: int, nr: int) -> bool | None:
    """True for a 32-bit caller's sysinfo, False for a native one, None: not sysinfo."""
    for a, n, is32 in abis():
        if a == arch and n == nr:
            return is32
    return None


def filter_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: for each ABI, arch first, then the number."""
    table = abis(machine)
    allow = 4 * len(table)
    notify = allow + 1
    prog: list[tuple[int, int, int, int]] = []
    for arch, nr, _ in table:
        at = len(prog)
        prog.append((_LD_ABS, 0, 0, 4))
        prog.append((_JEQ, 0, 2, arch))  # another arch: on to the next block
        prog.append((_LD_ABS, 0, 0, 0))
        here = at + 3
        prog.append((_JEQ, notify - here - 1, allow - here - 1, nr))
    prog.append((_RET, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((_RET, 0, 0, SECCOMP_RET_USER_NOTIF))
    return prog


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = libc()
_libc.syscall.restype = ctypes.c_long
_libc.process_vm_writev.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                                    ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def install_listener_filter() -> int:
    """Install the sysinfo filter on the calling thread's process and return the listener
    fd (close-on-exec). Without CAP_SYS_ADMIN the kernel demands no_new_privs; with it we
    leave no_new_privs alone, so setuid programs inside keep working."""
    table = filter_program()
    arr = (_SockFilter * len(table))(*[_SockFilter(*ins) for ins in table])
    prog = _SockFprog(len(table), arr)
    nr = _ABIS[platform.machine()][0]
    fd = _libc.syscall(nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                       ctypes.byref(prog))
    if fd < 0 and ctypes.get_errno() == errno.EACCES:
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            _raise("prctl(PR_SET_NO_NEW_PRIVS)")
        fd = _libc.syscall(nr, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                           ctypes.byref(prog))
    if fd < 0:
        _raise("seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
    return int(fd)


@dataclass(frozen=True)
class Notification:
    id: int
    pid: int
    nr: int
    arch: int
    args: tuple[int, ...]


def parse_notification(data: bytes) -> Notification:
    nid, pid, _flags, nr, arch, _ip, *args = NOTIF.unpack(data)
    return Notification(nid, pid, nr, arch, tuple(args))


def recv_into(fd: int, address: int) -> None:
    """SECCOMP_IOCTL_NOTIF_RECV into memory at `address` (80 zeroed bytes: the kernel
    refuses a buffer that is not zero). Raises OSError (ENOENT: the caller went away)."""
    if _libc.ioctl(fd, IOCTL_RECV, address) != 0:
        _raise("SECCOMP_IOCTL_NOTIF_RECV")


def id_valid(fd: int, notif_id: int) -> bool:
    """Is the caller still waiting on this notification (so its pid is still its own)?"""
    try:
        fcntl.ioctl(fd, IOCTL_ID_VALID, struct.pack("<Q", notif_id))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def sync_wake_up(fd: int) -> bool:
    """Ask the kernel to hand each notification to the agent, and each answer back to its
    caller, on the CPU that is already running: the two sides take turns instead of
    waking each other across CPUs. On this machine's VM that takes a round trip from ~50 µs
    to ~7 µs. False on kernels before 6.6, which do not have the flag."""
    try:
        fcntl.ioctl(fd, IOCTL_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    return True


def send(fd: int, notif_id: int, val: int = 0, error: int = 0, flags: int = 0) -> bool:
    """Answer a notification; False when the caller no longer waits for it."""
    try:
        fcntl.ioctl(fd, IOCTL_SEND, RESP.pack(notif_id, val, error, flags))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def send_continue(fd: int, notif_id: int) -> bool:
    """Let the kernel run the call as if unfiltered: the caller gets the host's answer."""
    return send(fd, notif_id, flags=SECCOMP_USER_NOTIF_FLAG_CONTINUE)


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write `data` at `address` in process `pid` (process_vm_writev, one syscall).
    Raises OSError: EFAULT for a bad address, ESRCH for a process that is gone."""
    buf = ctypes.create_string_buffer(data, len(data))
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), len(data))
    remote = _Iovec(address, len(data))
    n = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        _raise(f"process_vm_writev({pid})")
    if n != len(data):
        raise OSError(errno.EFAULT, f"process_vm_writev({pid}): wrote {n} of {len(data)}")
