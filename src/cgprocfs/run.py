"""`cgprocfs run`: run a command in a transient cgroup with the views bound over /proc.

The command runs in a private mount namespace where each served view is bind-mounted
over the file it replaces; the cgroup is created beneath the caller's own cgroup (v1) or
beside it (v2, whose no-internal-processes rule forbids a child of a populated leaf), and
removed afterwards, together with a private daemon if none was serving.

The command is also attached to the sysinfo agent (docs/sysinfo.md): between fork and
exec the child installs the sysinfo seccomp filter and hands its listener to the agent at
the configured socket, or to a private agent started for this run when none answers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cgprocfs.cgroups import Hierarchy, Layout, load_layout, read_proc_cgroup
from cgprocfs.libc import libc
from cgprocfs.serve import DEFAULT_MOUNTPOINT, lazy_unmount, mounted_at
from cgprocfs.views import VIEWS, available_views, bind_targets

log = logging.getLogger(__name__)

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class RunError(Exception):
    pass


def parse_size(text: str) -> int:
    """`256M`, `1.5G`, `512MiB`, `268435456` -> bytes (binary multiples, like Docker)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 256M, 1G, 268435456)")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass(frozen=True)
class Limits:
    memory: int | None = None
    memory_swap: int | None = None
    cpus: float | None = None  # CFS quota in CPUs
    cpuset: str | None = None  # e.g. "0" or "0-1"

    def check(self) -> None:
        if self.memory_swap is not None and self.memory is None:
            raise RunError("--memory-swap needs --memory")
        if self.memory_swap is not None and self.memory is not None and \
                self.memory_swap < self.memory:
            raise RunError("--memory-swap is memory plus swap: it cannot be below --memory")
        if self.cpus is not None and self.cpus <= 0:
            raise RunError("--cpus must be above 0")


CFS_PERIOD = 100_000


@dataclass
class TransientCgroup:
    """One cgroup per hierarchy involved (v1: memory, cpu, cpuacct, cpuset; v2: one)."""

    directories: list[str]
    version: int

    @classmethod
    def create(cls, layout: Layout, limits: Limits) -> TransientCgroup:
        limits.check()
        wanted = ["memory", "cpu", "cpuacct", "blkio", "io"] + (["cpuset"] if limits.cpuset else [])
        hierarchies: list[Hierarchy] = []
        for controller in wanted:
            h = layout.for_controller(controller)
            if h is not None and h not in hierarchies:
                hierarchies.append(h)
        if not hierarchies:
            raise RunError("no memory cgroup controller is mounted")
        cg = cls([], hierarchies[0].version)
        try:
            for h in hierarchies:
                cg.directories.append(cls._make(h, wanted))
            cg._set_limits(hierarchies, limits)
        except BaseException:
            cg.destroy()
            raise
        return cg

    @staticmethod
    def _make(h: Hierarchy, controllers: list[str]) -> str:
        own = read_proc_cgroup(os.getpid()).path_in(h) or "/"
        beside = h.version == 2 and own != "/"
        parent = (own.rsplit("/", 1)[0] or "/") if beside else own
        parent_dir = h.directory(parent)
        if parent_dir is None:
            raise RunError(f"cgroup {parent} is not visible under {h.mountpoint}")
        if h.version == 2:
            for c in controllers:
                try:
                    _write(os.path.join(parent_dir, "cgroup.subtree_control"), f"+{c}")
                except OSError as exc:
                    log.debug("enabling +%s in %s: %s", c, parent_dir, exc)
        directory = os.path.join(parent_dir, f"cgprocfs-run-{os.getpid()}")
        os.mkdir(directory)
        if h.version == 1 and "cpuset" in h.controllers:
            # A v1 cpuset takes no task until its cpus and mems are set.
            for name in ("cpuset.cpus", "cpuset.mems"):
                with open(os.path.join(parent_dir, name)) as f:
                    _write(os.path.join(directory, name), f.read().strip() or "0")
        return directory

    def _set_limits(self, hierarchies: list[Hierarchy], limits: Limits) -> None:
        for h, d in zip(hierarchies, self.directories, strict=True):
            if h.version == 2:
                self._set_v2(d, limits)
            else:
                self._set_v1(h, d, limits)

    @staticmethod
    def _set_v2(d: str, limits: Limits) -> None:
        if limits.memory is not None:
            _write(f"{d}/memory.max", str(limits.memory))
        if limits.memory_swap is not None and limits.memory is not None:
            _write(f"{d}/memory.swap.max", str(limits.memory_swap - limits.memory))
        if limits.cpus is not None:
            _write(f"{d}/cpu.max", f"{round(limits.cpus * CFS_PERIOD)} {CFS_PERIOD}")
        if limits.cpuset is not None:
            if not os.path.exists(f"{d}/cpuset.cpus"):
                raise RunError("--cpuset: the cpuset controller is not available here")
            _write(f"{d}/cpuset.cpus", limits.cpuset)

    @staticmethod
    def _set_v1(h: Hierarchy, d: str, limits: Limits) -> None:
        if "memory" in h.controllers:
            if limits.memory is not None:
                _write(f"{d}/memory.limit_in_bytes", str(limits.memory))
            if limits.memory_swap is not None:
                if not os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
                    raise RunError("--memory-swap: this kernel has no swap accounting "
                                   "(boot with swapaccount=1)")
                _write(f"{d}/memory.memsw.limit_in_bytes", str(limits.memory_swap))
        if "cpu" in h.controllers and limits.cpus is not None:
            _write(f"{d}/cpu.cfs_period_us", str(CFS_PERIOD))
            _write(f"{d}/cpu.cfs_quota_us", str(round(limits.cpus * CFS_PERIOD)))
        if "cpuset" in h.controllers and limits.cpuset is not None:
            _write(f"{d}/cpuset.cpus", limits.cpuset)

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories]

    def procs(self) -> list[int]:
        pids: set[int] = set()
        for d in self.directories:
            try:
                with open(f"{d}/cgroup.procs") as f:
                    pids.update(int(x) for x in f.read().split())
            except FileNotFoundError:
                pass
        return sorted(pids)

    def destroy(self) -> None:
        """Kill whatever is left in the cgroups and remove them."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self.procs()
            if not pids:
                left = []
                for d in self.directories:
                    try:
                        os.rmdir(d)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        left.append(d)  # EBUSY until the last task is reaped
                if not left:
                    return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        log.error("could not remove %s: processes remain %s", self.directories, self.procs())


def serving_mountpoint(path: str = DEFAULT_MOUNTPOINT) -> bool:
    """True if a live cgprocfs serves `path`."""
    try:
        if mounted_at(path) != "fuse.cgprocfs":
            return False
        # listdir reaches the daemon (a cached stat would not notice a dead one).
        return VIEWS[0].path.split("/")[0] in os.listdir(path)
    except OSError:
        return False


def cannot_start(command: str, exc: OSError, program: str) -> int:
    """The shell's exit status for a program that cannot be started (127: not found,
    126: not executable), with a one-line message."""
    if isinstance(exc, FileNotFoundError):
        print(f"cgprocfs {command}: command not found: {program}", file=sys.stderr)
        return 127
    print(f"cgprocfs {command}: permission denied: {program}", file=sys.stderr)
    return 126


class _PrivateProcess:
    """A cgprocfs process of our own for the life of one `run`: started in its own
    session with its output in a log file, waited for until `ready()`, stopped after."""

    what = ""
    log_path = ""
    proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        raise NotImplementedError

    def _launch(self, argv: Sequence[str]) -> None:
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cgprocfs", *argv],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(self.log_path, errors="replace") as f:
            tail = f.read()[-2000:]
        self.stop()
        raise RunError(f"the private {self.what} did not come up:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PrivateDaemon(_PrivateProcess):
    """A `cgprocfs serve` on a temporary mountpoint (its own sysinfo agent is left out:
    `run` has a PrivateAgent for that when no agent answers)."""

    what = "cgprocfs daemon"

    def __init__(self) -> None:
        base = "/run/cgprocfs" if os.path.isdir("/run") else None
        if base:
            os.makedirs(base, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="run-", dir=base)
        self.mountpoint = os.path.join(self.dir, "mnt")
        self.log_path = os.path.join(self.dir, "daemon.log")

    def ready(self) -> bool:
        return serving_mountpoint(self.mountpoint)

    def start(self, extra_args: Sequence[str] = ()) -> None:
        self._launch(["serve", "--no-sysinfo", *extra_args, self.mountpoint])

    def stop(self) -> None:
        super().stop()
        if mounted_at(self.mountpoint) is not None:
            try:
                lazy_unmount(self.mountpoint)
            except OSError as exc:
                log.error("could not unmount %s: %s", self.mountpoint, exc)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateAgent(_PrivateProcess):
    """A `cgprocfs sysinfo-agent` on a temporary socket, for the life of one `run`."""

    what = "sysinfo agent"

    def __init__(self, directory: str) -> None:
        self.socket_path = os.path.join(directory, "seccomp.sock")
        self.log_path = os.path.join(directory, "sysinfo-agent.log")

    def ready(self) -> bool:
        from cgprocfs.sysinfo.oci import reachable

        return reachable(self.socket_path)

    def start(self, extra_args: Sequence[str] = ()) -> None:
        self._launch(["sysinfo-agent", "--socket", self.socket_path, *extra_args])


def _enter(procs_files: list[str], binds: list[tuple[str, str]],
           sysinfo_socket: str | None = None) -> None:
    """In the child, between fork and exec: join the cgroups, get a private mount
    namespace, bind the views over the files they replace, attach to the sysinfo agent."""
    for procs_file in procs_files:
        _write(procs_file, str(os.getpid()))
    lib = libc()
    _check(lib.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(lib.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for source, target in binds:
        if os.path.exists(target):
            _check(lib.mount(source.encode(), target.encode(), None, MS_BIND, None),
                   f"bind {source} over {target}")
    if sysinfo_socket is not None:
        from cgprocfs.sysinfo.cli import attach

        attach(sysinfo_socket, f"run-{os.getppid()}")


def _sysinfo_agent(socket_path: str | None, agent_args: Sequence[str]) -> tuple[
        str | None, PrivateAgent | None, str | None]:
    """(socket to attach to, private agent started, its directory): the configured agent
    if it answers, else a private one; (None, None, None) when sysinfo is left alone."""
    from cgprocfs.sysinfo.oci import reachable

    if socket_path is None:
        return None, None, None
    if reachable(socket_path) and not agent_args:
        return socket_path, None, None
    base = "/run/cgprocfs" if os.path.isdir("/run") else None
    if base:
        os.makedirs(base, exist_ok=True)
    directory = tempfile.mkdtemp(prefix="agent-", dir=base)
    agent = PrivateAgent(directory)
    try:
        agent.start(agent_args)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return agent.socket_path, agent, directory


def run(cmd: Sequence[str], limits: Limits, serve_args: Sequence[str] = (),
        sysinfo_socket: str | None = None) -> int:
    """Run `cmd`; with `sysinfo_socket`, attach it to the sysinfo agent there (or to a
    private one when none answers)."""
    if os.geteuid() != 0:
        raise RunError("cgprocfs run must run as root (it creates cgroups and mounts)")
    if not cmd:
        raise RunError("no command given (cgprocfs run --memory 256M -- CMD ...)")
    limits.check()
    layout = load_layout()
    daemon: PrivateDaemon | None = None
    if serving_mountpoint(DEFAULT_MOUNTPOINT) and not serve_args:
        mountpoint = DEFAULT_MOUNTPOINT
    else:
        daemon = PrivateDaemon()
        daemon.start(serve_args)
        mountpoint = daemon.mountpoint
    cg: TransientCgroup | None = None
    agent: PrivateAgent | None = None
    agent_dir: str | None = None
    try:
        # The agent takes the same rendering options as the daemon (--hide-swap).
        attach_to, agent, agent_dir = _sysinfo_agent(sysinfo_socket, serve_args)
        cg = TransientCgroup.create(layout, limits)
        binds = [(os.path.join(mountpoint, src), dst)
                 for src, dst in bind_targets(available_views())]
        procs_files = cg.procs_files()
        try:
            child = subprocess.Popen(list(cmd),
                                     preexec_fn=lambda: _enter(procs_files, binds, attach_to))
        except (FileNotFoundError, PermissionError) as exc:
            return cannot_start("run", exc, cmd[0])
        except subprocess.SubprocessError as exc:
            raise RunError(f"could not set up the cgroup and mounts for {cmd[0]}: {exc}") \
                from exc
        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
        previous = {s: signal.signal(s, lambda signum, _f: child.send_signal(signum))
                    for s in forwarded}
        try:
            rc = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 128 - rc if rc < 0 else rc
    finally:
        if cg is not None:
            cg.destroy()
        if agent is not None:
            agent.stop()
        if agent_dir is not None:
            shutil.rmtree(agent_dir, ignore_errors=True)
        if daemon is not None:
            daemon.stop()
