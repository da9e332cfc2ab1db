"""/proc/diskstats and /proc/pressure/* inside a container."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import ALL_VIEW_FILES, PYTHON, Daemon, make_container, run_in_container, scratch_dir

WRITE = (
    "import os, sys\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)\n"
    "import mmap\n"
    "buf = mmap.mmap(-1, 1 << 20)\n"
    "buf.write(b'x' * (1 << 20))\n"
    "for _ in range(8): os.write(fd, buf)\n"
    "os.fsync(fd); os.close(fd); os.unlink(sys.argv[1])\n"
    "print(open('/proc/diskstats').read(), end='')\n"
)


def cgroup_io(ct_dirs: dict[str, Path], version: int) -> dict[str, tuple[int, int]]:
    """MAJ:MIN -> (write ops, written bytes), from the cgroup's own files."""
    out: dict[str, tuple[int, int]] = {}
    if version == 2:
        for line in (ct_dirs["io"] / "io.stat").read_text().splitlines():
            dev, *kv = line.split()
            d = dict(x.split("=") for x in kv)
            out[dev] = (int(d.get("wios", 0)), int(d.get("wbytes", 0)))
        return out
    d = ct_dirs["blkio"]
    ops = {ln.split()[0]: int(ln.split()[2]) for ln in
           (d / "blkio.throttle.io_serviced_recursive").read_text().splitlines()
           if len(ln.split()) == 3 and ln.split()[1] == "Write"}
    for ln in (d / "blkio.throttle.io_service_bytes_recursive").read_text().splitlines():
        parts = ln.split()
        if len(parts) == 3 and parts[1] == "Write":
            out[parts[0]] = (ops.get(parts[0], 0), int(parts[2]))
    return out


def test_diskstats_are_the_containers_own(daemon: Daemon) -> None:
    with make_container(256 << 20, io=True) as ct:
        target = scratch_dir() / f"cgprocfs-io-{os.getpid()}"
        out = run_in_container(ct, daemon.mountpoint, [PYTHON, "-c", WRITE, str(target)],
                               views=ALL_VIEW_FILES)
        mine = {f"{p[0]}:{p[1]}": p for p in (ln.split() for ln in out.splitlines())}
        host = {f"{p[0]}:{p[1]}": p for p in
                (ln.split() for ln in Path("/proc/diskstats").read_text().splitlines())}
        assert set(mine) == set(host)  # the host's device list, in the host's layout
        own = cgroup_io(ct.dirs, ct.version)
        for dev, fields in mine.items():
            wios, wbytes = own.get(dev, (0, 0))
            assert int(fields[7]) == wios, (dev, fields, own)
            assert int(fields[9]) == wbytes // 512, (dev, fields, own)
            assert all(int(x) == 0 for x in fields[8:9] + fields[10:13])
        if ct.version == 2:
            # v2 accounts the 8 MiB written with O_DIRECT to the device under the scratch dir.
            assert sum(w for _, w in own.values()) >= 8 << 20, own


def test_pressure_views(daemon: Daemon) -> None:
    if not Path("/proc/pressure/cpu").exists():
        pytest.skip("this kernel has no PSI (/proc/pressure): the views are not served")
    with make_container(256 << 20) as ct:
        out = run_in_container(ct, daemon.mountpoint, ["cat", "/proc/pressure/memory"],
                               views=ALL_VIEW_FILES)
        assert out.startswith("some avg10=") and "full avg10=" in out
        if ct.version == 2:
            own = (ct.dirs["memory"] / "memory.pressure").read_text()
            assert out.split("total=")[0] == own.split("total=")[0]


def test_iostat_reports_the_containers_io(daemon: Daemon) -> None:
    """sysstat's iostat reads /sys/block/<dev>/stat: bound, it reports the container's
    own I/O (a fresh container has done next to none of the host's)."""
    script = (
        "iostat -d -k; echo ---; "
        "for d in /sys/block/*; do echo $(basename $d) $(cat $d/stat); done"
    )
    views = ALL_VIEW_FILES + tuple(
        f"sys/block/{d}/stat" for d in sorted(os.listdir("/sys/block"))
        if Path(f"/sys/block/{d}/stat").exists())
    with make_container(256 << 20, io=True) as ct:
        out = run_in_container(ct, daemon.mountpoint, ["sh", "-c", script], views=views)
        report, stats = out.split("---\n")
        mine = {p[0]: [int(x) for x in p[1:]] for p in (ln.split() for ln in stats.splitlines())}
        host = {d: [int(x) for x in Path(f"/sys/block/{d}/stat").read_text().split()]
                for d in mine}
        rows = [ln.split() for ln in report.splitlines()
                if ln.split() and ln.split()[0] in mine]
        # iostat lists the devices with I/O: here those the container used, not the host's.
        assert {r[0] for r in rows} <= {d for d, f in mine.items() if any(f)}, report
        host_active = {d for d, f in host.items() if any(f[:8])}
        assert host_active, "the host has done no I/O at all?"
        for name, *cols in rows:
            kb_read = int(cols[4])
            assert kb_read <= mine[name][2] // 2, (name, cols, mine[name])
            assert kb_read < host[name][2] // 2 or host[name][2] == 0
        # Writes in the stat files are the cgroup's own (nothing wrote since).
        own = cgroup_io(ct.dirs, ct.version)
        for name, fields in mine.items():
            devno = Path(f"/sys/block/{name}/dev").read_text().strip()
            assert fields[4] == own.get(devno, (0, 0))[0], (name, fields, own)
