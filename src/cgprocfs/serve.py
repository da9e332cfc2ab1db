"""Mounting and serving: start-up checks, stale-mount recovery, signals, sd_notify."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from cgprocfs.cgroups import load_layout
from cgprocfs.config import Config, ConfigError
from cgprocfs.loadavg import SAMPLE_INTERVAL
from cgprocfs.resolve import Resolver
from cgprocfs.snapshot import RenderOptions
from cgprocfs.views import Renderer, View, available_views

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
    # How to read the configuration again on SIGHUP (same file, environment and flags).
    reload: Callable[[], Config] | None = None


def apply_config(cfg: Config, resolver: Resolver, renderer: Renderer) -> None:
    """The settings that can change while mounted (SIGHUP)."""
    renderer.opts = RenderOptions(hide_swap=cfg.hide_swap)
    resolver.cpu.use_quota = cfg.cpu_quota
    resolver.limits.max_age = cfg.limits_max_age
    resolver.host.max_age = cfg.host_max_age
    logging.getLogger().setLevel(cfg.log_level.upper())


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


def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


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
        if exc.errno != errno.ENOTCONN:
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
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as exc:
        raise StartupError(f"cannot open /dev/fuse: {exc.strerror}") from exc


def reload_config(opts: ServeOptions, running: Config, resolver: Resolver,
                  renderer: Renderer) -> None:
    """SIGHUP: read the configuration again and apply what can change while mounted."""
    sd_notify("RELOADING=1")
    try:
        if opts.reload is None:
            return
        try:
            new = opts.reload()
            new.check(tuple(v.path for v in available_views()))
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        apply_config(new, resolver, renderer)
        if (new.mountpoint, new.views) != (running.mountpoint, running.views):
            log.warning("SIGHUP: mountpoint and views change only with a restart")
        log.info("SIGHUP: configuration reloaded (hide_swap=%s, cpu_quota=%s, log_level=%s)",
                 new.hide_swap, new.cpu_quota, new.log_level)
    finally:
        sd_notify("READY=1")


def serve(opts: ServeOptions) -> int:
    cfg = opts.config
    check_environment()
    try:
        import pyfuse3
        import trio
    except ImportError as exc:
        raise StartupError(f"libfuse3/pyfuse3 missing ({exc}): install libfuse3 "
                           "(Debian: apt-get install fuse3 libfuse3-3) and pyfuse3") from exc
    from cgprocfs.fs import ViewsFS

    mountpoint = cfg.mountpoint
    prepare_mountpoint(mountpoint)
    layout = load_layout()
    resolver = Resolver(layout)
    renderer = Renderer(resolver)
    apply_config(cfg, resolver, renderer)
    views = select_views(cfg)
    ops = ViewsFS(renderer, views)

    fuse_options = set(pyfuse3.default_options)
    fuse_options |= {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "allow_other"}
    if opts.debug_fuse:
        fuse_options.add("debug")
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError as exc:
        raise StartupError(f"cannot mount {mountpoint}: {exc}") from exc
    log.info("serving %s on %s (%s; memory hierarchy %s)", ", ".join(v.path for v in views),
             mountpoint, layout.describe(),
             resolver.memory.mountpoint if resolver.memory else "none")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: unmounting", signal.Signals(signum).name)
                        sd_notify("STOPPING=1")
                        pyfuse3.terminate()
                        return

            async def sample_loads() -> None:
                # Runs between requests on the same thread: no locking needed.
                while True:
                    await trio.sleep(SAMPLE_INTERVAL)
                    n = renderer.loads.sample()
                    if n:
                        log.debug("load sample: %d cgroups, %.1f ms CPU", n,
                                  renderer.loads.last_cycle_cpu * 1000)

            async def on_reload() -> None:
                with trio.open_signal_receiver(signal.SIGHUP) as signals:
                    async for _ in signals:
                        reload_config(opts, cfg, resolver, renderer)

            nursery.start_soon(on_signals)
            nursery.start_soon(sample_loads)
            nursery.start_soon(on_reload)
            sd_notify(f"READY=1\nMAINPID={os.getpid()}")
            # One task: our handlers never await, so more tasks only hand a lock around.
            await pyfuse3.main(min_tasks=1, max_tasks=1)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    log.info("unmounted %s; %d opens served, %d errors", mountpoint,
             ops.stats.opens, ops.stats.errors)
    return 0
