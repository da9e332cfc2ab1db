"""Mounting and serving: start-up checks, stale-mount recovery, signals, sd_notify."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
from dataclasses import dataclass

from cgprocfs.cgroups import load_layout
from cgprocfs.config import Config
from cgprocfs.libc import libc
from cgprocfs.views import View, available_views

log = logging.getLogger(__name__)

DEFAULT_MOUNTPOINT = "/var/lib/cgprocfs"
FSNAME = "cgprocfs"
MNT_DETACH = 2


class StartupError(Exception):
    """A condition the operator must fix; printed as one line, exit status 1."""


@dataclass(frozen=True)
class ServeOptions:
    config: Config
    debug_fuse: bool = False
    sysinfo: bool = True  # run the sysinfo(2) agent as one of the supervisor's processes


def select_views(cfg: Config) -> tuple[View, ...]:
    views = available_views()
    if cfg.views is None:
        return views
    return tuple(v for v in views if v.path in cfg.views)


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message, exc)


def lazy_unmount(path: str) -> None:
    if libc().umount2(path.encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount2({path}, MNT_DETACH): {os.strerror(e)}")


def mounted_at(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, if any."""
    real = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == real:
                found = right.split()[0]
    return found


def prepare_mountpoint(mountpoint: str) -> None:
    """Create the mountpoint; detach a stale mount left by a crashed daemon (ENOTCONN);
    refuse a mountpoint that is already served."""
    try:
        # listdir, not stat: the kernel may answer stat from cached attributes even when
        # the daemon behind the mount is gone; opendir always reaches the daemon.
        os.listdir(mountpoint)
    except FileNotFoundError:
        try:
            os.makedirs(mountpoint)
        except OSError as exc:
            raise StartupError(f"cannot create mountpoint {mountpoint}: {exc.strerror}") \
                from exc
        return
    except OSError as exc:
        # ECONNABORTED: the connection was torn down under a request just now.
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise StartupError(f"cannot use mountpoint {mountpoint}: {exc.strerror}") from exc
        log.warning("%s: stale mount from a crashed run (ENOTCONN); detaching it", mountpoint)
        lazy_unmount(mountpoint)
        return
    fstype = mounted_at(mountpoint)
    if fstype is not None:
        raise StartupError(
            f"mountpoint busy: {mountpoint} is already mounted ({fstype}); "
            f"stop the daemon serving it or unmount it (umount {mountpoint})"
        )


def check_environment() -> None:
    if os.geteuid() != 0:
        raise StartupError("cgprocfs serve must run as root (it mounts FUSE and reads every "
                           "process's cgroup)")
    if not os.path.exists("/dev/fuse"):
        raise StartupError("no /dev/fuse: load the fuse module (modprobe fuse) or, in a "
                           "container, pass --device /dev/fuse")
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        raise StartupError(f"cannot open /dev/fuse: {exc.strerror}") from exc


def worker_count() -> int:
    """Workers serving requests: one per CPU (at least 2, so a dying worker never leaves
    the mount without one; at most 8)."""
    env = os.environ.get("CGPROCFS_WORKERS")
    if env:
        return max(1, min(32, int(env)))
    return max(2, min(8, os.cpu_count() or 2))


def dev_fuse_workers(ring_groups: int) -> int:
    """Workers reading /dev/fuse: with ring workers, two serve what comes before the ring
    is ready, FORGETs and INTERRUPTs (two, so that a dying one never leaves none)."""
    return 2 if ring_groups else worker_count()


def ring_worker_count(cfg: Config) -> int:
    """Ring workers for `io_uring = true` (one per CPU, at most 8; each serves the ring
    queues of its share of the CPUs), or 0 where the kernel cannot do it. Turns the fuse
    module's enable_uring parameter on if need be (it only lets daemons ask for it)."""
    from cgprocfs.fuse import uring

    if not cfg.io_uring:
        return 0
    problem = uring.unavailable()
    if problem:
        log.warning("io_uring = true, but %s: serving through /dev/fuse", problem)
        return 0
    return max(1, min(8, uring.possible_cpus()))


def serve(opts: ServeOptions) -> int:
    cfg = opts.config
    if os.environ.get("CGPROCFS_CHECK_ONLY"):
        # The supervisor's check before it re-executes itself (SIGHUP): configuration
        # valid (we got here) and every module of the installed code imports.
        import cgprocfs.fuse.loads
        import cgprocfs.fuse.worker  # noqa: F401

        cfg.check(tuple(v.path for v in available_views()))
        return 0
    check_environment()
    import sys

    from cgprocfs.fuse import supervisor as sv
    from cgprocfs.fuse.arena import Arena
    from cgprocfs.fuse.mount import MountError, answer_init, mount_fuse

    mountpoint = cfg.mountpoint
    views = select_views(cfg)
    state = sv.takeover_state()
    stored = sv.listen_fds()
    keep_mount = False
    if state is not None:
        conn = sv.Connection(int(state["fuse"]), Arena(int(state["arena"])),  # type: ignore[call-overload]
                             int(state["loads_r"]), int(state["loads_w"]))  # type: ignore[call-overload]
        log.info("re-executed: taking over %s from the previous image", mountpoint)
        keep_mount = bool(state.get("keep_mount"))
    elif all(name in stored for name in sv.FDNAMES):
        fds = [stored[name] for name in sv.FDNAMES]
        for fd in fds:
            os.set_inheritable(fd, True)
        conn = sv.Connection(fds[0], Arena(fds[1]), fds[2], fds[3])
        log.info("taking over %s from systemd's descriptor store", mountpoint)
        keep_mount = True
    else:
        prepare_mountpoint(mountpoint)
        ring_groups = ring_worker_count(cfg)
        workers = dev_fuse_workers(ring_groups)
        try:
            fuse_fd = mount_fuse(mountpoint, FSNAME, FSNAME)
        except (MountError, OSError) as exc:
            raise StartupError(f"cannot mount {mountpoint}: {exc}") from exc
        try:
            minor, flags = answer_init(fuse_fd, io_uring=bool(ring_groups))
        except (MountError, OSError) as exc:
            lazy_unmount(mountpoint)
            raise StartupError(f"cannot start FUSE on {mountpoint}: {exc}") from exc
        from cgprocfs.fuse.uring import possible_cpus

        ents = -(-possible_cpus() // ring_groups) if ring_groups else 0
        conn = sv.Connection.create(fuse_fd, 2 * (workers + ring_groups) + 2, ents)
        conn.arena.set_ring_groups(ring_groups)
        conn.arena.set_init(minor, flags)
        keep_mount = sv.store_fds(conn)
        layout = load_layout()
        log.info("serving %s on %s (%s; kernel FUSE 7.%d; %d workers%s)",
                 ", ".join(v.path for v in views), mountpoint, layout.describe(), minor,
                 workers, f", {ring_groups} on io_uring" if ring_groups else "")

    def unmount() -> None:
        try:
            lazy_unmount(mountpoint)
        except OSError as exc:
            log.warning("%s", exc)

    # A taken-over mount keeps the transport it started with (the kernel cannot turn a
    # connection's ring off, and a ring without its workers would hold requests).
    ring_groups = conn.arena.ring_groups
    workers = dev_fuse_workers(ring_groups)
    if bool(ring_groups) != cfg.io_uring and (state is not None or keep_mount):
        log.warning("io_uring = %s takes effect at the next start of the service, not at a "
                    "reload", "true" if cfg.io_uring else "false")
    sup = sv.Supervisor(cfg, conn, mountpoint, workers, unmount, keep_mount=keep_mount,
                        debug_fuse=opts.debug_fuse, ring_groups=ring_groups)
    if opts.sysinfo:
        sup.enable_sysinfo(state.get("kept") if state else None)  # type: ignore[arg-type]
    sup.reexec_argv = [sys.executable, "-m", "cgprocfs", *sys.argv[1:]]
    if state is not None:
        sv.adopt(sup, state)
        sup.upgrade = True
    return sup.run()
