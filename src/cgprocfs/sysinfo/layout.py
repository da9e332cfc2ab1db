"""struct sysinfo as the caller's ABI lays it out: 112 bytes on 64-bit, 64 on i386.

x86_64 (and aarch64): long uptime; unsigned long loads[3], totalram, freeram, sharedram,
bufferram, totalswap, freeswap; unsigned short procs, pad; unsigned long totalhigh,
freehigh; unsigned int mem_unit; padding to 112. i386: the same with 4-byte longs, then
8 bytes of padding (64 in all).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

SI_LOAD_SHIFT = 16  # loads[] are fixed point with 16 fractional bits
_LAYOUT_64 = struct.Struct("<q3Q6QHH4xQQI4x")
_LAYOUT_32 = struct.Struct("<i3I6IHHIII8x")
SIZE_64 = _LAYOUT_64.size
SIZE_32 = _LAYOUT_32.size
PAGE = 4096
U32 = (1 << 32) - 1


@dataclass(frozen=True)
class SysinfoValues:
    """What one sysinfo(2) answer says; memory in bytes, loads as floats."""

    uptime: float
    loads: tuple[float, float, float]
    totalram: int
    freeram: int
    sharedram: int
    bufferram: int
    totalswap: int
    freeswap: int
    procs: int

    def _memory(self) -> tuple[int, ...]:
        return (self.totalram, self.freeram, self.sharedram, self.bufferram,
                self.totalswap, self.freeswap)

    def _common(self, word_max: int) -> tuple[int, tuple[int, ...], int]:
        # The kernel rounds a partial second of uptime up.
        uptime = min(math.ceil(max(0.0, self.uptime)), word_max >> 1)
        loads = tuple(min(word_max, max(0, round(x * (1 << SI_LOAD_SHIFT))))
                      for x in self.loads)
        return uptime, loads, min(0xFFFF, max(0, self.procs))


def pack64(v: SysinfoValues) -> bytes:
    """The 64-bit struct, in bytes (mem_unit 1), as the kernel fills it."""
    uptime, loads, procs = v._common((1 << 64) - 1)
    return _LAYOUT_64.pack(uptime, *loads, *(max(0, m) for m in v._memory()), procs, 0,
                           0, 0, 1)


def pack32(v: SysinfoValues) -> bytes:
    """The i386 struct: bytes (mem_unit 1) when every figure fits 32 bits, else pages
    (mem_unit 4096), the way the kernel's compat_sysinfo scales."""
    uptime, loads, procs = v._common(U32)
    memory = [max(0, m) for m in v._memory()]
    unit = 1 if all(m <= U32 for m in memory) else PAGE
    scaled = [min(U32, m // unit) for m in memory]
    return _LAYOUT_32.pack(uptime, *loads, *scaled, procs, 0, 0, 0, unit)


def unpack64(data: bytes) -> dict[str, int]:
    """For tests and the benchmark: the fields of a 64-bit struct."""
    f = _LAYOUT_64.unpack(data)
    names = ("uptime", "load1", "load5", "load15", "totalram", "freeram", "sharedram",
             "bufferram", "totalswap", "freeswap", "procs", "pad", "totalhigh", "freehigh",
             "mem_unit")
    return dict(zip(names, f, strict=True))


def unpack32(data: bytes) -> dict[str, int]:
    f = _LAYOUT_32.unpack(data)
    names = ("uptime", "load1", "load5", "load15", "totalram", "freeram", "sharedram",
             "bufferram", "totalswap", "freeswap", "procs", "pad", "totalhigh", "freehigh",
             "mem_unit")
    return dict(zip(names, f, strict=True))
