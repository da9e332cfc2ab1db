"""The notification being answered, in memory that outlives the agent.

A notification the agent has received (SECCOMP_IOCTL_NOTIF_RECV) but not yet answered
belongs to nobody else: the kernel will never offer it again, and its caller would wait
until it is signalled. So the agent receives straight into a page of a memfd that the
supervisor keeps; the kernel writes it there before the ioctl returns, even if the agent
is killed on its way back to user space. A restarted agent finds it there and answers.
"""

from __future__ import annotations

import ctypes
import mmap
import os

from cgprocfs.sysinfo.seccomp import NOTIF

SIZE = 4096
_NAME_AT, _NAME_LEN = 0, 256
NOTIF_AT = 256


class InFlight:
    def __init__(self, fd: int) -> None:
        if os.fstat(fd).st_size < SIZE:
            os.ftruncate(fd, SIZE)
        self.fd = fd
        self.mm = mmap.mmap(fd, SIZE)
        self._view = (ctypes.c_char * SIZE).from_buffer(self.mm)
        self.address = ctypes.addressof(self._view) + NOTIF_AT
        self._name = ""

    @classmethod
    def create(cls) -> InFlight:
        return cls(os.memfd_create("cgprocfs-sysinfo-inflight", os.MFD_CLOEXEC))

    def begin(self, listener: str) -> None:
        """Say which listener the next receive is from (the page starts zeroed, as the
        kernel wants the receive buffer)."""
        if listener != self._name:
            raw = listener.encode()[: _NAME_LEN - 1]
            self.mm[_NAME_AT:_NAME_AT + _NAME_LEN] = raw + bytes(_NAME_LEN - len(raw))
            self._name = listener

    def notification(self) -> bytes:
        return self.mm[NOTIF_AT:NOTIF_AT + NOTIF.size]

    def clear(self) -> None:
        self.mm[NOTIF_AT:NOTIF_AT + NOTIF.size] = bytes(NOTIF.size)

    def pending(self) -> tuple[str, bytes] | None:
        """(listener name, notification) left by an agent that died answering it."""
        data = self.notification()
        if not any(data):
            return None
        name = self.mm[_NAME_AT:_NAME_AT + _NAME_LEN].split(b"\0", 1)[0].decode(
            errors="replace")
        self._name = name
        return name, data
