"""FUSE over io_uring (Linux 6.14+, `fuse.enable_uring=1`): the kernel queues each request
on the ring queue of the CPU its caller runs on, and hands it to a ring entry registered
for that queue. A worker that registered the entries of its own CPU's queue and runs on
that CPU is woken on the CPU where the caller just went to sleep: no cross-CPU wake-up on
either side of a request (the cost that bounds a lone reader over /dev/fuse).

Only what a worker needs: a ring with 128-byte submission entries, registration of a
ring entry (a header buffer and a payload buffer), and commit-and-fetch (the reply to
one request and the wait for the next, in one system call). See the kernel's
fs/fuse/dev_uring.c and include/uapi/linux/fuse.h.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import struct

from cgprocfs.libc import libc

log = logging.getLogger("cgprocfs.uring")

SYS_IO_URING_SETUP = {"x86_64": 425, "aarch64": 425}.get(platform.machine())
SYS_IO_URING_ENTER = {"x86_64": 426, "aarch64": 426}.get(platform.machine())
ENABLE_PARAM = "/sys/module/fuse/parameters/enable_uring"

IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_ENTER_GETEVENTS = 1
IORING_OP_URING_CMD = 46
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
SQE_SIZE = 128
CQE = struct.Struct("<QiI")  # user_data res flags

FUSE_IO_URING_CMD_REGISTER = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2
FUSE_OVER_IO_URING = 1 << 41  # INIT flags (in flags2)

# struct fuse_uring_req_header: in_out[128] (fuse_in_header / fuse_out_header),
# op_in[128] (the opcode's own header), then fuse_uring_ent_in_out.
HEADER_OP_IN = 128
HEADER_ENT_IN_OUT = 256
ENT_IN_OUT = struct.Struct("<QQII8x")  # flags commit_id payload_sz padding reserved
HEADER_SIZE = HEADER_ENT_IN_OUT + ENT_IN_OUT.size
# SQE fields (struct io_uring_sqe): opcode u8, flags u8, ioprio u16, fd s32, cmd_op u32
# (with pad), addr u64, len u32, uring_cmd_flags u32, user_data u64; then, for a
# URING_CMD, the command itself from byte 48 (struct fuse_uring_cmd_req).
_SQE_HEAD = struct.Struct("<BBHiIIQIIQ")
_CMD_REQ = struct.Struct("<QQH6x")  # flags commit_id qid
_CMD_OFF = 48


class Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
        # struct io_sqring_offsets
        ("sq_head", ctypes.c_uint32), ("sq_tail", ctypes.c_uint32),
        ("sq_ring_mask", ctypes.c_uint32), ("sq_ring_entries", ctypes.c_uint32),
        ("sq_flags", ctypes.c_uint32), ("sq_dropped", ctypes.c_uint32),
        ("sq_array", ctypes.c_uint32), ("sq_resv1", ctypes.c_uint32),
        ("sq_user_addr", ctypes.c_uint64),
        # struct io_cqring_offsets
        ("cq_head", ctypes.c_uint32), ("cq_tail", ctypes.c_uint32),
        ("cq_ring_mask", ctypes.c_uint32), ("cq_ring_entries", ctypes.c_uint32),
        ("cq_overflow", ctypes.c_uint32), ("cq_cqes", ctypes.c_uint32),
        ("cq_flags", ctypes.c_uint32), ("cq_resv1", ctypes.c_uint32),
        ("cq_user_addr", ctypes.c_uint64),
    ]


def unavailable(turn_on: bool = True) -> str | None:
    """Why this kernel cannot serve FUSE over io_uring (None: it can). With `turn_on`,
    turns the fuse module's enable_uring parameter on if it is off: it only lets a daemon
    ask for it (in INIT, then by registering ring entries); other daemons are not
    affected."""
    if SYS_IO_URING_SETUP is None:
        return f"io_uring system call numbers unknown on {platform.machine()}"
    try:
        with open(ENABLE_PARAM, "rb") as f:
            enabled = f.read(1) in (b"Y", b"1")
    except OSError:
        return ("the kernel has no FUSE over io_uring (Linux 6.14+ built with "
                "CONFIG_FUSE_IO_URING)")
    try:
        with open("/proc/sys/kernel/io_uring_disabled", "rb") as f:
            if f.read(1) not in (b"0", b""):
                return "io_uring is disabled (sysctl kernel.io_uring_disabled)"
    except OSError:
        pass
    if not enabled and not turn_on:
        return None
    if not enabled:
        try:
            with open(ENABLE_PARAM, "w") as f:
                f.write("Y")
        except OSError as exc:
            return f"cannot turn on {ENABLE_PARAM}: {exc.strerror}"
        log.info("turned on %s (FUSE over io_uring)", ENABLE_PARAM)
    return None


def possible_cpus() -> int:
    """How many ring queues the kernel makes: one per possible CPU."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
        return max(int(part.split("-")[-1]) for part in text.split(",")) + 1
    except (OSError, ValueError):
        return os.cpu_count() or 1


class UringError(OSError):
    pass


_U32 = struct.Struct("<I")


class Ring:
    """One io_uring instance, used by one thread: a few 128-byte SQEs, completions read
    straight from the shared ring."""

    def __init__(self, entries: int = 8) -> None:
        if SYS_IO_URING_SETUP is None or SYS_IO_URING_ENTER is None:
            raise UringError(0, "io_uring: unknown system call numbers on this machine")
        self._syscall = libc().syscall
        p = Params()
        p.flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        fd = self._syscall(SYS_IO_URING_SETUP, entries, ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise UringError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        sq_size = p.sq_array + p.sq_entries * 4
        cq_size = p.cq_cqes + p.cq_entries * CQE.size
        self.sq = mmap.mmap(fd, sq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQ_RING)
        self.cq = mmap.mmap(fd, cq_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_CQ_RING)
        self.sqes = mmap.mmap(fd, p.sq_entries * SQE_SIZE, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)
        self.sq_head_off = p.sq_head
        self.sq_tail_off = p.sq_tail
        self.sq_mask = _U32.unpack_from(self.sq, p.sq_ring_mask)[0]
        self.sq_array_off = p.sq_array
        self.cq_head_off = p.cq_head
        self.cq_tail_off = p.cq_tail
        self.cq_mask = _U32.unpack_from(self.cq, p.cq_ring_mask)[0]
        self.cqes_off = p.cq_cqes
        self.sq_tail = _U32.unpack_from(self.sq, p.sq_tail)[0]
        self.cq_head = _U32.unpack_from(self.cq, p.cq_head)[0]
        # SQE i always sits at array slot i, and the bytes of an SQE we never write
        # (40-47, and the command's unused tail) stay zero: both set once, here.
        for i in range(p.sq_entries):
            _U32.pack_into(self.sq, self.sq_array_off + i * 4, i)
        self.sqes[:] = bytes(len(self.sqes))

    def uring_cmd(self, fd: int, cmd_op: int, addr: int, length: int, user_data: int,
                  cmd: bytes) -> None:
        """Queue a URING_CMD SQE (submitted by the next enter())."""
        idx = self.sq_tail & self.sq_mask
        off = idx * SQE_SIZE
        sqes = self.sqes
        _SQE_HEAD.pack_into(sqes, off, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr,
                            length, 0, user_data)
        sqes[off + _CMD_OFF:off + _CMD_OFF + len(cmd)] = cmd
        self.sq_tail = (self.sq_tail + 1) & 0xFFFFFFFF
        # x86 and arm64 readers see this store after the SQE's (the kernel reads the tail
        # with acquire semantics; Python's stores are plain memcpy, in program order on
        # x86; on arm64 the syscall below is a full barrier before the kernel looks).
        _U32.pack_into(self.sq, self.sq_tail_off, self.sq_tail)

    def enter(self, wait: int, events: bool = True) -> None:
        """Submit what is queued and wait until `wait` completions are there (with
        `events`, completions waiting to be posted are posted even if `wait` is 0)."""
        flags = IORING_ENTER_GETEVENTS if events else 0
        # What the kernel has not taken yet, from its own head: a count kept here would
        # be wrong after a signal handler raised between the call and its update (and
        # the kernel does not wait when it submits fewer than asked).
        queued = (self.sq_tail - _U32.unpack_from(self.sq, self.sq_head_off)[0]) & 0xFFFFFFFF
        ret = self._syscall(SYS_IO_URING_ENTER, self.fd, queued, wait, flags, None, 0)
        if ret < 0:
            e = ctypes.get_errno()
            raise UringError(e, f"io_uring_enter: {os.strerror(e)}")

    def completion_ready(self) -> bool:
        return bool(_U32.unpack_from(self.cq, self.cq_tail_off)[0] != self.cq_head)

    def completion(self) -> tuple[int, int] | None:
        """The next completion (user_data, result), or None."""
        tail = _U32.unpack_from(self.cq, self.cq_tail_off)[0]
        if tail == self.cq_head:
            return None
        off = self.cqes_off + (self.cq_head & self.cq_mask) * CQE.size
        user_data, res, _flags = CQE.unpack_from(self.cq, off)
        self.cq_head = (self.cq_head + 1) & 0xFFFFFFFF
        _U32.pack_into(self.cq, self.cq_head_off, self.cq_head)
        return user_data, res


def cmd_req(qid: int, commit_id: int = 0) -> bytes:
    return _CMD_REQ.pack(0, commit_id, qid)
