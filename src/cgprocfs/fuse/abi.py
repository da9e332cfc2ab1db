"""The parts of the Linux FUSE protocol (include/uapi/linux/fuse.h) cgprocfs speaks.

We answer INIT with protocol 7.31: every kernel since 5.10 speaks it, and nothing newer
is needed by a small read-only tree.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR = 31

# Opcodes (enum fuse_opcode).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
OPEN = 14
READ = 15
STATFS = 17
RELEASE = 18
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags we ask for.
FUSE_ASYNC_READ = 1 << 0
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30  # flags2 (the high 32 bits) follow in init_in and init_out
FUSE_OVER_IO_URING_HI = 1 << (41 - 32)  # in flags2

# open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
IN_HEADER_SIZE = IN_HEADER.size  # 40
OUT_HEADER_SIZE = OUT_HEADER.size  # 16

INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2)
U32 = struct.Struct("<I")
# major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2 + unused: 64 bytes in all.
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
# ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink uid gid
# rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
ATTR_OUT_HEAD = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QII")  # fh open_flags padding
READ_IN = struct.Struct("<QQI")  # fh offset size (then read_flags lock_owner flags pad)
RELEASE_IN = struct.Struct("<Q")  # fh
ACCESS_IN = struct.Struct("<I")  # mask
STATFS_OUT = struct.Struct("<QQQQQIII4x24x")  # blocks bfree bavail files ffree bsize namelen frsize
DIRENT_HEAD = struct.Struct("<QQII")  # ino off namelen type

MAX_WRITE = 4096
# The kernel refuses a read() of /dev/fuse into a buffer smaller than this.
MIN_READ_BUFFER = 8192
MAX_PAGES = 32  # largest READ: 128 KiB


def entry_valid_split(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    head = DIRENT_HEAD.pack(ino, off, len(name), dtype)
    pad = (-(len(head) + len(name))) % 8
    return head + name + b"\0" * pad
