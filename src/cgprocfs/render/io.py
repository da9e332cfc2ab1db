"""/proc/diskstats for a cgroup (design.md §5): the host's device list and layout, each
device's reads, writes and discards from the cgroup's own I/O accounting (v2 io.stat;
v1 blkio.throttle.io_service_bytes / io_serviced), sectors of 512 bytes. Timing and
merge columns have no cgroup source and are 0."""

from __future__ import annotations

SECTOR = 512

# (reads, read bytes, writes, written bytes, discards, discarded bytes) per MAJ:MIN
IoStats = dict[tuple[int, int], tuple[int, int, int, int, int, int]]


def _devno(text: str) -> tuple[int, int] | None:
    major, sep, minor = text.partition(":")
    if not sep or not major.isdigit() or not minor.isdigit():
        return None
    return int(major), int(minor)


def parse_io_stat(text: str) -> IoStats:
    """v2 io.stat: `8:0 rbytes=1 wbytes=2 rios=3 wios=4 dbytes=5 dios=6`."""
    out: IoStats = {}
    for line in text.splitlines():
        parts = line.split()
        dev = _devno(parts[0]) if parts else None
        if dev is None:
            continue
        kv: dict[str, int] = {}
        for item in parts[1:]:
            k, _, v = item.partition("=")
            if v.isdigit():
                kv[k] = int(v)
        out[dev] = (kv.get("rios", 0), kv.get("rbytes", 0), kv.get("wios", 0),
                    kv.get("wbytes", 0), kv.get("dios", 0), kv.get("dbytes", 0))
    return out


def parse_blkio(service_bytes: str, serviced: str) -> IoStats:
    """v1 blkio: `8:0 Read 4096` / `8:0 Write ...` / `8:0 Discard ...` lines, bytes in one
    file and operation counts in the other."""
    acc: dict[tuple[int, int], list[int]] = {}
    for text, offset in ((serviced, 0), (service_bytes, 1)):
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue
            dev = _devno(parts[0])
            if dev is None:
                continue
            slot = {"Read": 0, "Write": 2, "Discard": 4}.get(parts[1])
            if slot is None:
                continue
            acc.setdefault(dev, [0] * 6)[slot + offset] = int(parts[2])
    return {dev: (v[0], v[1], v[2], v[3], v[4], v[5]) for dev, v in acc.items()}


def render_diskstats(host_diskstats: str, stats: IoStats) -> bytes:
    lines = []
    for line in host_diskstats.splitlines():
        parts = line.split()
        if len(parts) < 14 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        rios, rbytes, wios, wbytes, dios, dbytes = stats.get(
            (int(parts[0]), int(parts[1])), (0, 0, 0, 0, 0, 0))
        fields = [0] * (len(parts) - 3)
        fields[0], fields[2] = rios, rbytes // SECTOR
        fields[4], fields[6] = wios, wbytes // SECTOR
        if len(fields) >= 14:
            fields[11], fields[13] = dios, dbytes // SECTOR
        lines.append(f"{parts[0]:>4} {parts[1]:>7} {parts[2]} " + " ".join(map(str, fields)))
    return ("\n".join(lines) + "\n").encode() if lines else b""


def render_block_stat(host_stat: str, devno: tuple[int, int], stats: IoStats) -> bytes:
    """/sys/block/<dev>/stat (what iostat reads): the same columns as a diskstats line,
    without the device's numbers and name, each right-aligned in 8 columns."""
    n = max(11, len(host_stat.split()))
    rios, rbytes, wios, wbytes, dios, dbytes = stats.get(devno, (0, 0, 0, 0, 0, 0))
    fields = [0] * n
    fields[0], fields[2] = rios, rbytes // SECTOR
    fields[4], fields[6] = wios, wbytes // SECTOR
    if n >= 15:
        fields[11], fields[13] = dios, dbytes // SECTOR
    return (" ".join(f"{v:>8}" for v in fields) + "\n").encode()
