"""Operator commands: `status`, `doctor`, `install-service`."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cgprocfs.cgroups import load_layout
from cgprocfs.serve import mounted_at

STATUS_FILE = ".cgprocfs-status"
UNIT_NAME = "cgprocfs.service"


def status(mountpoint: str) -> int:
    """Print the mount's state and the serving daemon's counters. Exit 0 when served,
    1 when not mounted, 2 when the mount is stale (ENOTCONN)."""
    fstype = mounted_at(mountpoint)
    if fstype is None:
        print(f"{mountpoint}: not mounted")
        return 1
    try:
        doc = json.loads(Path(mountpoint, STATUS_FILE).read_text())
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            print(f"{mountpoint}: STALE mount ({fstype}): its daemon is gone "
                  "(Transport endpoint is not connected); restart the daemon: it detaches "
                  "the stale mount at start-up")
            return 2
        print(f"{mountpoint}: mounted ({fstype}) but unreadable: {exc.strerror}")
        return 2
    print(f"{mountpoint}: served by pid {doc['pid']} (cgprocfs {doc['version']}), "
          f"up {doc['uptime']:.0f} s")
    print(f"views: {', '.join(doc['views'])}")
    print(f"opens: {doc['opens']}, errors: {doc['errors']}, host-file fallbacks: "
          f"{doc['fallbacks']}, open handles: {doc['open_handles']}")
    if "placement_refreshes" in doc:
        print(f"placements refreshed ahead by idle workers: {doc['placement_refreshes']}")
    leader = doc.get("leader") or {}
    if leader.get("seat", -1) >= 0:
        served = [n for n in doc.get("opens_by_seat", []) if n]
        print(f"leading worker: pid {leader['pid']} (seat {leader['seat']}); "
              f"opens served per worker seat: {served}")
    ring = doc.get("io_uring") or {}
    if ring.get("groups"):
        print(f"FUSE over io_uring: {ring['groups']} ring workers, each serving the "
              "requests of its share of the CPUs")
    return 0


def _check(ok: bool, what: str, fix: str = "") -> bool:
    print(f"{'ok     ' if ok else 'PROBLEM'} {what}")
    if not ok and fix:
        print(f"        fix: {fix}")
    return ok


def doctor(mountpoint: str) -> int:
    """Check the host for what cgprocfs needs; say what to fix. Exit 1 on any problem."""
    good = True
    good &= _check(os.geteuid() == 0, "running as root",
                   "run cgprocfs (serve, run, doctor) as root")
    fuse = Path("/dev/fuse")
    good &= _check(fuse.exists(), "/dev/fuse exists",
                   "modprobe fuse; in a container add --device /dev/fuse")
    if fuse.exists():
        try:
            os.close(os.open(fuse, os.O_RDWR))
            _check(True, "/dev/fuse opens read-write")
        except OSError as exc:
            good &= _check(False, f"/dev/fuse opens read-write ({exc.strerror})",
                           "run as root; in a container run privileged or allow the device")
    from cgprocfs.fuse import uring

    problem = uring.unavailable(turn_on=False)
    _check(True, "FUSE over io_uring (serve --io-uring): "
           + (f"not available: {problem}" if problem else "available"))
    layout = load_layout()
    _check(bool(layout.hierarchies), f"cgroups: {layout.describe()}")
    for controller, fix in (("memory", "boot with cgroup_enable=memory"),
                            ("cpu", "mount the cpu controller (v1) or enable +cpu (v2)"),
                            ("cpuset", "mount the cpuset controller (v1) or enable +cpuset"),
                            ("io", "")):
        h = layout.for_controller(controller) or (
            layout.for_controller("blkio") if controller == "io" else None)
        ok = h is not None
        where = f"cgroup v{h.version} at {h.mountpoint}" if h else "not mounted"
        if controller in ("memory", "cpu"):
            good &= _check(ok, f"{controller} controller: {where}", fix)
        else:
            _check(True, f"{controller} controller: {where}"
                   + ("" if ok else " (its views fall back to what is available)"))
    mem = layout.for_controller("memory")
    if mem is not None:
        if mem.version == 1:
            swap = Path(mem.mountpoint, "memory.memsw.limit_in_bytes").exists()
        else:
            swap = any(Path(d).joinpath("memory.swap.max").exists()
                       for d in Path(mem.mountpoint).iterdir() if d.is_dir())
        _check(True, "swap accounting: " + ("on" if swap else
               "off (containers see the host's swap; boot with swapaccount=1 or use "
               "--hide-swap)"))
    _check(True, "pressure stall information: " + (
        "present" if Path("/proc/pressure").is_dir() else "absent (no /proc/pressure views)"))
    fstype = mounted_at(mountpoint)
    if fstype is None:
        _check(True, f"{mountpoint}: not mounted (start cgprocfs serve)")
    else:
        try:
            os.listdir(mountpoint)
            _check(True, f"{mountpoint}: served ({fstype})")
        except OSError as exc:
            good &= _check(False, f"{mountpoint}: {exc.strerror} ({fstype})",
                           "restart the daemon (it detaches a stale mount at start-up), "
                           "then restart the containers that bound its files")
    return 0 if good else 1


def unit_text(executable: str) -> str:
    source = Path(__file__).resolve().parent / "data" / UNIT_NAME
    text = source.read_text()
    return text.replace("/opt/cgprocfs/bin/cgprocfs", executable)


def install_service(root: str = "/", reload: bool = True) -> int:
    """Write the systemd unit, pointing at this installation's `cgprocfs`."""
    exe = shutil.which("cgprocfs") or str(Path(sys.executable).with_name("cgprocfs"))
    target = Path(root, "etc/systemd/system", UNIT_NAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text(exe))
    print(f"installed {target} (ExecStart={exe} serve)")
    systemd_runs = Path("/run/systemd/system").is_dir()
    if reload and root == "/" and shutil.which("systemctl") and systemd_runs:
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print(f"now: systemctl enable --now {UNIT_NAME}")
    return 0
