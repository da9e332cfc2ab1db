"""Immutable snapshots: everything one rendering needs, read once per open.

A snapshot is plain data. Renderers turn it into bytes without any I/O, so the same
snapshot always renders the same files and the files can never disagree.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# v1 reports "no limit" as PAGE_COUNTER_MAX rounded to pages (9223372036854771712 on 4 KiB
# pages); anything this large is treated as unlimited on either version.
UNLIMITED_THRESHOLD = 1 << 62


class OddCgroupData(ValueError):
    """A cgroup file was missing or did not parse: the open falls back to the host file."""


@dataclass(frozen=True)
class MeminfoLayout:
    """The key order and column layout of a meminfo text, as one printf-style template
    (the kernel prints each number with %8lu after a padded label; `%` formatting of
    ~55 numbers costs a third less than str.format, and this runs on every open)."""

    keys: tuple[str, ...]
    template: str

    def format(self, values: Mapping[str, int]) -> str:
        get = values.get
        return self.template % tuple([get(k, 0) for k in self.keys])


def _printf_literal(text: str) -> str:
    return text.replace("%", "%%")


def meminfo_layout(text: str) -> MeminfoLayout:
    """Computed once per daemon: the layout is constant for a running kernel."""
    keys, parts = [], []
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        stripped = rest.lstrip(" ")
        number, _, suffix = stripped.partition(" ")
        field = max(8, len(number))
        pad = max(0, len(rest) - len(stripped) + len(number) - field)
        prefix = f"{key}:{rest[:pad]}"
        keys.append(key)
        tail = f" {suffix}" if suffix else ""
        parts.append(f"{_printf_literal(prefix)}%8d{_printf_literal(tail)}\n")
    return MeminfoLayout(tuple(keys), "".join(parts))


@dataclass(frozen=True)
class HostMemory:
    """The host's own files. `meminfo_text` is also the template for key order and layout
    (`layout`, when given, is that template's layout computed ahead)."""

    meminfo_text: str
    meminfo_kb: Mapping[str, int]
    vmstat_keys: tuple[str, ...] = ()
    swaps_header: str = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    page_size: int = PAGE_SIZE
    layout: MeminfoLayout | None = None


class MemoryView(NamedTuple):
    """Memory figures of the cgroup that speaks for a caller (design.md §2).

    A NamedTuple, made per open: cheaper to build than a frozen dataclass.
    Byte values throughout. `limit` is the minimum limit on the caller's path (None when
    nothing on the path is limited). `stat` holds memory.stat as the kernel wrote it
    (v1 keeps its `total_` prefixes; the renderer picks the right keys per version).
    """

    version: int
    cgroup: str
    limit: int | None
    usage: int
    stat: Mapping[str, int]
    swap_limit: int | None  # bytes of swap the cgroup may use (v1: memsw limit - mem limit)
    swap_usage: int
    oom_kill: int = 0
    events: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True)
class RenderOptions:
    hide_swap: bool = False


def parse_flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, vmstat). Unparsable lines are skipped."""
    parts = text.split()
    lines = text.count("\n") + (0 if not text or text.endswith("\n") else 1)
    if len(parts) == 2 * lines:
        # Well-formed kernel files: one split, no per-line work.
        try:
            return dict(zip(parts[::2], map(int, parts[1::2]), strict=True))
        except ValueError:
            pass
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


_MEMINFO_LINE = re.compile(r"^([^:\n]+):[ \t]*(\d+)", re.MULTILINE)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {key: value}; values in kB (or pages for HugePages_ counts)."""
    return {k: int(v) for k, v in _MEMINFO_LINE.findall(text)}


def parse_limit(text: str) -> int | None:
    """A limit file: a byte count, `max` (v2) or v1's huge 'unlimited'. None = unlimited."""
    value = text.strip()
    if value == "max":
        return None
    try:
        n = int(value)
    except ValueError as exc:
        raise OddCgroupData(f"unparsable limit {value[:40]!r}") from exc
    if n < 0:
        raise OddCgroupData(f"negative limit {n}")
    if n >= UNLIMITED_THRESHOLD:
        return None
    return n


def parse_count(text: str) -> int:
    try:
        n = int(text.strip())
    except ValueError as exc:
        raise OddCgroupData(f"unparsable counter {text.strip()[:40]!r}") from exc
    if n < 0:
        raise OddCgroupData(f"negative counter {n}")
    return n
