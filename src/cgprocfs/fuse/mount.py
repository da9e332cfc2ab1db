"""Mounting a FUSE filesystem ourselves: open /dev/fuse, mount(2) with fd=N, answer INIT.

No fusermount and no libfuse: cgprocfs runs as root, and owning the protocol from the
first message is what lets any process holding the descriptor carry on serving it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from cgprocfs.fuse import abi
from cgprocfs.libc import libc

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4


class MountError(Exception):
    pass


def mount_fuse(mountpoint: str, fsname: str, subtype: str) -> int:
    """Mount a fresh FUSE connection at `mountpoint`; returns its /dev/fuse descriptor
    (inheritable: workers and re-executed supervisors get it)."""
    fd = os.open("/dev/fuse", os.O_RDWR)
    os.set_inheritable(fd, True)
    mode = os.stat(mountpoint).st_mode
    opts = (f"fd={fd},rootmode={stat.S_IFMT(mode):o},user_id=0,group_id=0,"
            "allow_other,default_permissions")
    ret = libc().mount(fsname.encode(), mountpoint.encode(), f"fuse.{subtype}".encode(),
                        MS_RDONLY | MS_NOSUID | MS_NODEV, opts.encode())
    if ret != 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount({mountpoint}): {os.strerror(e)}")
    return fd


def answer_init(fd: int, io_uring: bool = False) -> tuple[int, int]:
    """Read the kernel's INIT and answer it; returns (kernel minor, flags we agreed).
    With `io_uring`, also agree to FUSE over io_uring if the kernel offers it: the
    connection then keeps it even if the module parameter is turned off later (a ring
    worker's successor must still be able to register)."""
    buf = bytearray(abi.MIN_READ_BUFFER + abi.MAX_WRITE)
    while True:
        try:
            n = os.readv(fd, [buf])
            break
        except OSError as exc:
            if exc.errno not in (errno.EINTR, errno.ENOENT):
                raise
    _len, opcode, unique, *_ = abi.IN_HEADER.unpack_from(buf, 0)
    if opcode != abi.INIT or n < abi.IN_HEADER_SIZE + abi.INIT_IN.size:
        raise MountError(f"expected FUSE INIT, got opcode {opcode}")
    major, minor, max_readahead, kflags = abi.INIT_IN.unpack_from(buf, abi.IN_HEADER_SIZE)
    if major != abi.KERNEL_VERSION or minor < abi.KERNEL_MINOR:
        os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER_SIZE, -errno.EPROTO, unique))
        raise MountError(f"kernel FUSE protocol {major}.{minor}; 7.{abi.KERNEL_MINOR}+ needed")
    flags = kflags & (abi.FUSE_ASYNC_READ | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_MAX_PAGES)
    flags2 = 0
    if io_uring and kflags & abi.FUSE_INIT_EXT and n >= abi.IN_HEADER_SIZE + 20:
        kflags2 = abi.U32.unpack_from(buf, abi.IN_HEADER_SIZE + abi.INIT_IN.size)[0]
        if kflags2 & abi.FUSE_OVER_IO_URING_HI:
            flags |= abi.FUSE_INIT_EXT
            flags2 = abi.FUSE_OVER_IO_URING_HI
    out = abi.INIT_OUT.pack(abi.KERNEL_VERSION, abi.KERNEL_MINOR, max_readahead, flags,
                            16, 12, abi.MAX_WRITE, 1, abi.MAX_PAGES, 0, flags2)
    os.write(fd, abi.OUT_HEADER.pack(abi.OUT_HEADER_SIZE + len(out), 0, unique) + out)
    return minor, flags
