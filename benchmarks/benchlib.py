"""Shared parts of the benchmarks: container-like cgroups, the daemons under test, and
measurements of a daemon's whole process tree (CPU, RSS/PSS, open fds).

Nothing here imports cgprocfs: the benchmarks look at the daemon from outside, like a
container runtime and `top` would.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
READ_BUF = 64 * 1024
T = TypeVar("T")


def log(msg: str, tag: str = "bench") -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! {msg}\n{bar}\n", file=sys.stderr, flush=True)


class Stop(BaseException):
    """Raised by the signal handler: unwinds to the `finally` that cleans up."""


def install_stop_handlers() -> None:
    def on_signal(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # one unwind only; cleanup must not be cut short
        raise Stop(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)


def require_root(tool: str) -> None:
    if os.geteuid() != 0:
        raise SystemExit(f"{tool}: must run as root (creates cgroups, mounts FUSE filesystems)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit(f"{tool}: /dev/fuse is missing")


# --------------------------------------------------------------------------- mounts


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, super_options) per mount of this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            pf, qf = pre.split(), post.split()
            out.append((_unescape(pf[3]), _unescape(pf[4]), qf[0], qf[2] if len(qf) > 2 else ""))
    return out


def is_mounted(path: str) -> bool:
    p = os.path.realpath(path)
    return any(m[1] == p for m in mountinfo())


# --------------------------------------------------------------------------- cgroups

# What a container runtime gives a container: a memory limit, a CPU quota and a cpuset,
# CPU accounting, block I/O and pids. On a v1 (or hybrid) host every one of these is its
# own hierarchy (or a shared one, e.g. cpu,cpuacct); on v2 it is one directory.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "cpuset", "blkio", "pids")
V2_CONTROLLERS = ("memory", "cpu", "cpuset", "io", "pids")


@dataclass
class Hierarchy:
    version: int
    mountpoint: str
    controllers: list[str]
    base: Path  # where our parent cgroup goes


def _own_paths() -> tuple[dict[str, str], str | None]:
    v1: dict[str, str] = {}
    v2 = None
    with open("/proc/self/cgroup") as f:
        for line in f:
            hier, ctrls, path = line.rstrip("\n").split(":", 2)
            if hier == "0" and ctrls == "":
                v2 = path
            else:
                for c in ctrls.split(","):
                    v1[c] = path
    return v1, v2


def _under(mount_root: str, mountpoint: str, cg_path: str) -> Path | None:
    rel = os.path.relpath(cg_path, mount_root)
    if rel.startswith(".."):
        return None
    return Path(mountpoint) / rel if rel != "." else Path(mountpoint)


def detect_hierarchies() -> list[Hierarchy]:
    """The hierarchies a container-like cgroup needs, each with the directory beneath which
    the benchmarks create theirs: beneath this process's own cgroup (v1), or beside it on
    v2 when it is a non-root leaf (the 'no internal processes' rule), as the tests do."""
    own_v1, own_v2 = _own_paths()
    out: list[Hierarchy] = []
    seen: set[str] = set()
    for root, mnt, fstype, sopts in mountinfo():
        if fstype != "cgroup" or mnt in seen:
            continue
        ctrls = [c for c in sopts.split(",") if c in V1_CONTROLLERS]
        if not ctrls or ctrls[0] not in own_v1:
            continue
        d = _under(root, mnt, own_v1[ctrls[0]])
        if d is None or not d.is_dir():
            continue
        seen.add(mnt)
        out.append(Hierarchy(1, mnt, ctrls, d))
    have = {c for h in out for c in h.controllers}
    if own_v2 is not None:
        for root, mnt, fstype, _ in mountinfo():
            if fstype != "cgroup2":
                continue
            d = _under(root, mnt, own_v2)
            if d is None or not d.is_dir():
                continue
            avail = (d / "cgroup.controllers").read_text().split()
            ctrls = [c for c in V2_CONTROLLERS if c in avail and c not in have]
            if "memory" not in ctrls and "memory" not in have:
                continue
            if not ctrls:
                continue
            base = d
            if base != Path(mnt) and (d / "cgroup.procs").read_text().split():
                base = d.parent
            out.append(Hierarchy(2, mnt, ctrls, base))
            break
    if not any("memory" in h.controllers for h in out):
        raise SystemExit("no memory cgroup controller found (neither v1 nor cgroup2)")
    return out


def online_cpus() -> list[int]:
    cpus: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


def limit_for(cg_id: int, base_mib: int) -> int:
    """Memory limit of test cgroup `cg_id`: distinct per cgroup (base .. base+127 MiB), so
    a response meant for another cgroup is caught by the sampled verification."""
    return (base_mib + cg_id % 128) * MiB


@dataclass
class Container:
    cg_id: int
    name: str
    dirs: list[Path]  # one per hierarchy
    memory_limit: int
    cpus: float | None  # CFS quota in CPUs
    expect_cpus: int  # how many CPUs a container-aware view should show
    resident: subprocess.Popen[bytes] | None = None  # its "init", when it has one

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]


class ContainerSet:
    """Container-like cgroups beneath <base>/cgprocfs-<tag>-<pid>/ in every hierarchy:
    memory limit, CFS quota, cpuset (copied from the parent), cpuacct, blkio/io, pids.
    With `resident`, each holds a sleeping process for its lifetime, as every real
    container holds its init: readers then visit a cgroup that is never empty, not one
    that exists only while they are in it. Always removed by `remove_all()` (call it from
    a `finally`)."""

    def __init__(self, tag: str, base_mib: int = 256, cpus: float | None = 1.0,
                 resident: bool = False) -> None:
        self.resident = resident
        self.hiers = detect_hierarchies()
        self.version = 2 if all(h.version == 2 for h in self.hiers) else 1
        self.base_mib, self.cpus = base_mib, cpus
        self.parents: list[Path] = []
        self.live: dict[int, Container] = {}
        self._enabled: list[tuple[Path, str]] = []
        self.tag = f"cgprocfs-{tag}-{os.getpid()}"
        ncpu = len(online_cpus())
        self.expect_cpus = max(1, min(ncpu, math.ceil(cpus))) if cpus else ncpu

    def describe(self) -> str:
        parts = [f"v{h.version} {','.join(h.controllers)} under {h.base}" for h in self.hiers]
        return "; ".join(parts)

    def _enable_v2(self, d: Path, ctrls: Iterable[str]) -> None:
        sc = d / "cgroup.subtree_control"
        have = sc.read_text().split()
        for c in ctrls:
            if c in have:
                continue
            try:
                sc.write_text(f"+{c}")
                self._enabled.append((d, c))
            except OSError as e:
                if c == "memory":
                    hint = (
                        " (the cgroup has processes: run from the root cgroup or from a "
                        "cgroup whose subtree_control already has memory)"
                        if e.errno == errno.EBUSY
                        else ""
                    )
                    raise SystemExit(f"cannot enable +memory in {sc}: {e}{hint}") from e
                log(f"could not enable +{c} in {sc}: {e}; continuing without it")

    def setup(self) -> None:
        for h in self.hiers:
            if h.version == 2:
                self._enable_v2(h.base, h.controllers)
            p = h.base / self.tag
            p.mkdir()
            self.parents.append(p)
            if h.version == 2:
                self._enable_v2(p, h.controllers)
            if "cpuset" in h.controllers and h.version == 1:
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (p / f).write_text((h.base / f).read_text().strip())

    def create(self, cg_id: int) -> Container:
        name = f"c{cg_id}"
        dirs: list[Path] = []
        limit = limit_for(cg_id, self.base_mib)
        try:
            for h, p in zip(self.hiers, self.parents, strict=True):
                d = p / name
                d.mkdir()
                dirs.append(d)
                cs = h.controllers
                if "cpuset" in cs and h.version == 1:
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        (d / f).write_text((p / f).read_text().strip())
                if "memory" in cs:
                    knob = "memory.max" if h.version == 2 else "memory.limit_in_bytes"
                    (d / knob).write_text(str(limit))
                if "cpu" in cs and self.cpus:
                    if h.version == 2:
                        (d / "cpu.max").write_text(f"{round(self.cpus * 100000)} 100000")
                    else:
                        (d / "cpu.cfs_period_us").write_text("100000")
                        (d / "cpu.cfs_quota_us").write_text(str(round(self.cpus * 100000)))
        except BaseException:
            for d in reversed(dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        ct = Container(cg_id, name, dirs, limit, self.cpus, self.expect_cpus)
        self.live[cg_id] = ct
        if self.resident:
            ct.resident = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
            for f in ct.procs_files:
                Path(f).write_text(str(ct.resident.pid))
        return ct

    def create_many(self, n: int, first_id: int = 0) -> list[Container]:
        return [self.create(first_id + i) for i in range(n)]

    def try_remove(self, ct: Container) -> bool:
        """rmdir every directory of `ct` that is empty now; True once all are gone."""
        left = []
        for d in ct.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        ct.dirs = left
        if not left:
            self.live.pop(ct.cg_id, None)
        return not left

    def force_remove(self, ct: Container, timeout: float = 10.0) -> None:
        """Remove `ct`, moving any process still inside (ours) up to the base cgroup."""
        if ct.resident is not None:
            ct.resident.kill()
            ct.resident.wait()
            ct.resident = None
        deadline = time.monotonic() + timeout
        while not self.try_remove(ct):
            for d in ct.dirs:
                parent_procs = d.parent.parent / "cgroup.procs"
                with contextlib.suppress(OSError):
                    for pid in (d / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            parent_procs.write_text(pid)
            if time.monotonic() > deadline:
                loud(f"could not remove cgroup(s) {[str(d) for d in ct.dirs]}")
                self.live.pop(ct.cg_id, None)
                return
            time.sleep(0.05)

    def remove_all(self) -> None:
        for ct in list(self.live.values()):
            self.force_remove(ct)
        for p in self.parents:
            for attempt in range(100):
                try:
                    if p.exists():
                        p.rmdir()
                    break
                except OSError as e:
                    if attempt == 99:
                        loud(f"could not remove cgroup {p}: {e}")
                    time.sleep(0.05)
        for d, c in reversed(self._enabled):
            with contextlib.suppress(OSError):
                (d / "cgroup.subtree_control").write_text(f"-{c}")
        self.parents, self._enabled = [], []


def join(procs_files: Iterable[str], pid: int | str = 0) -> None:
    """Move process `pid` (0 = the caller) into a cgroup in every hierarchy."""
    s = str(pid or os.getpid()).encode()
    for pf in procs_files:
        fd = os.open(pf, os.O_WRONLY)
        try:
            os.write(fd, s)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- daemon tree


def tree_pids(pid: int) -> list[int]:
    """`pid` and all its live descendants (supervisor + workers + their threads' owners)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def tree_cpu_ticks(pid: int) -> int:
    """utime+stime of every live process of the tree, plus cutime+cstime (children already
    reaped, e.g. a worker that was restarted), in clock ticks."""
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = _stat_fields(p)
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total


@dataclass
class TreeSample:
    nprocs: int = 0
    nthreads: int = 0
    rss: int = 0  # bytes, sum of VmRSS (shared pages counted once per process)
    pss: int = 0  # bytes, sum of Pss (shared pages split: the tree's real footprint)
    uss: int = 0  # bytes, sum of Private_Clean + Private_Dirty
    fds: int = 0
    cpu_ticks: int = 0


def tree_sample(pid: int) -> TreeSample:
    s = TreeSample()
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                vals = {}
                for line in f:
                    k, _, v = line.partition(":")
                    parts = v.split()
                    if parts and parts[-1] == "kB":
                        vals[k] = int(parts[0]) * 1024
            fds = len(os.listdir(f"/proc/{p}/fd"))
            f_ = _stat_fields(p)
        except (OSError, ValueError, IndexError):
            continue
        s.nprocs += 1
        s.nthreads += int(f_[17])
        s.rss += vals.get("Rss", 0)
        s.pss += vals.get("Pss", 0)
        s.uss += vals.get("Private_Clean", 0) + vals.get("Private_Dirty", 0)
        s.fds += fds
        s.cpu_ticks += int(f_[11]) + int(f_[12]) + int(f_[13]) + int(f_[14])
    return s


# --------------------------------------------------------------------------- targets

ALL_TARGETS = ("kernel", "lxcfs", "cgprocfs")


@dataclass
class Target:
    name: str
    version: str = ""
    cmd: list[str] | None = None  # daemon argv without the mountpoint; None = no daemon
    env: dict[str, str] | None = None
    root: str = "/"  # a file is read from <root>/proc/<file>
    mnt: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    _log: object = field(default=None, repr=False)

    def path(self, fname: str) -> str:
        return os.path.join(self.root, "proc", fname)

    def serves(self, fname: str) -> bool:
        return os.path.isfile(self.path(fname))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def start(self, workdir: Path, logdir: Path, timeout: float = 30.0) -> None:
        if self.cmd is None:
            return
        self.mnt = tempfile.mkdtemp(prefix=f"{self.name}-mnt-", dir=workdir)
        self.root = self.mnt
        self.logfile = logdir / f"{self.name}.log"
        self._log = open(self.logfile, "ab")  # noqa: SIM115 - closed in stop()
        argv = [*self.cmd, self.mnt]
        log(f"starting {self.name}: {shlex.join(argv)}")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # a Ctrl-C in the terminal must not reach it; we stop it
        )
        deadline = time.monotonic() + timeout
        probe = self.path("meminfo")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} before mounting; "
                    f"see {self.logfile}"
                )
            if is_mounted(self.mnt):
                try:
                    with open(probe, "rb") as f:
                        if f.read():
                            break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {probe} not readable after {timeout:.0f} s")
            time.sleep(0.05)
        log(f"{self.name} ready (pid {self.proc.pid}) at {self.mnt}")

    def cpu_ticks(self) -> int | None:
        return tree_cpu_ticks(self.proc.pid) if self.proc is not None else None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    loud(f"{self.name} (pid {self.proc.pid}) ignored SIGTERM; sending SIGKILL")
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            rc = self.proc.returncode
            if rc not in (0, -signal.SIGTERM) and not (self.name == "lxcfs" and rc == 1):
                log(f"{self.name} exited with status {rc} after SIGTERM (log: {self.logfile})")
            self.proc = None
        if self.mnt is not None:
            deadline = time.monotonic() + 5
            while is_mounted(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)  # workers may still be unmounting
            if is_mounted(self.mnt):
                log(f"{self.name}: {self.mnt} still mounted after the daemon exited; umount -l")
                subprocess.run(["umount", "-l", self.mnt], check=False)
            with contextlib.suppress(OSError):
                os.rmdir(self.mnt)
            self.mnt = None
            self.root = "/"
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def log_errors(self) -> list[str]:
        """Lines of the daemon's log that look like errors (tracebacks, ERROR)."""
        if self.logfile is None or not self.logfile.exists():
            return []
        out = []
        for line in self.logfile.read_text(errors="replace").splitlines():
            if " ERROR " in line or line.startswith("Traceback") or "CRITICAL" in line:
                out.append(line)
        return out


def stop_everything(targets: list[Target], cs: ContainerSet, workdir: Path) -> None:
    """The cleanup every tool's `finally` does: stop the daemons (last started first; one
    that fails to stop is reported and the rest go on), remove the test cgroups and the
    work directory."""
    for t in reversed(targets):
        try:
            t.stop()
        except Exception as e:  # keep cleaning up
            loud(f"stopping {t.name}: {e}")
    cs.remove_all()
    shutil.rmtree(workdir, ignore_errors=True)


def _git(*args: str) -> str:
    r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return r.stdout.strip()


def make_target(name: str, workdir: Path, lxcfs_bin: str | None = None,
                cgprocfs_cmd: str | None = None, cgprocfs_rev: str = "HEAD",
                io_uring: bool = False) -> Target:
    """kernel: no daemon. lxcfs: `lxcfs -f -l --enable-cfs -p <pidfile>` (-l: loadavg;
    --enable-cfs: the CPU views follow the CFS quota, without it LXCFS shows every CPU of
    the cpuset). cgprocfs: `python -m cgprocfs serve` from the committed tree at
    `cgprocfs_rev` (exported to workdir), or from the working tree with 'worktree', or
    an explicit command."""
    if name == "kernel":
        return Target("kernel", version=platform.release())
    if name == "lxcfs":
        lx = lxcfs_bin or shutil.which("lxcfs") or "/usr/bin/lxcfs"
        if not os.path.exists(lx):
            raise RuntimeError(f"lxcfs binary not found ({lx}); install Debian's lxcfs")
        ver = subprocess.run([lx, "--version"], capture_output=True, text=True)
        v = (ver.stdout or ver.stderr).strip().splitlines()
        cmd = [lx, "-f", "-l", "--enable-cfs", "-p", str(workdir / "lxcfs.pid")]
        return Target("lxcfs", version=v[-1].strip('"') if v else "?", cmd=cmd)
    if name == "cgprocfs":
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if cgprocfs_cmd:
            return Target("cgprocfs", version=f"cmd {cgprocfs_cmd}",
                          cmd=shlex.split(cgprocfs_cmd), env=env)
        if cgprocfs_rev == "worktree":
            version = f"worktree {_git('describe', '--always', '--dirty')}"
        else:
            sha = _git("rev-parse", "--verify", f"{cgprocfs_rev}^{{commit}}")
            if not sha:
                raise RuntimeError(f"unknown git revision {cgprocfs_rev!r}")
            dest = workdir / f"cgprocfs-{sha[:12]}"
            dest.mkdir(exist_ok=True)
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", sha, "src"], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
            env["PYTHONPATH"] = str(dest / "src")
            src = _git("log", "-1", "--format=%h %s", sha, "--", "src")[:70]
            version = f"git {sha[:12]} (src/ last changed in {src})"
        # The daemon is interpreter-bound: which build runs it matters (docs/benchmarks.md).
        version += f"; Python {platform.python_version()} ({os.path.realpath(PYTHON)})"
        cmd = [PYTHON, "-m", "cgprocfs", "serve"]
        if io_uring:
            cmd.append("--io-uring")
            version += "; --io-uring"
        return Target("cgprocfs", version=version, cmd=cmd, env=env)
    raise SystemExit(f"unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")


def in_round_order(targets: list[T], rnd: int) -> list[T]:
    """`targets` in the order round `rnd` (from 0) measures them: every other round in
    reverse, so that a drift of the machine's speed during a run, or what the target
    measured first leaves behind, favours none of them."""
    return targets if rnd % 2 == 0 else targets[::-1]


def add_run_args(ap: argparse.ArgumentParser, kind: str) -> None:
    """The options every benchmark tool shares: where results go (--out), the test cgroups
    (--base-mib, --cpus) and which daemons run (--lxcfs-bin, --cgprocfs-rev, --cgprocfs-cmd;
    handed to `start_targets` with the parsed arguments)."""
    ap.add_argument("--out", type=Path, help="results directory "
                    f"(default benchmarks/results/<timestamp>-{kind})")
    ap.add_argument("--base-mib", type=int, default=256,
                    help="memory limit of test cgroup i is base + i %% 128 MiB")
    ap.add_argument("--cpus", type=float, default=1.0,
                    help="CFS quota of every test cgroup, in CPUs (0 = none)")
    ap.add_argument("--lxcfs-bin", default=None)
    ap.add_argument("--cgprocfs-rev", default="HEAD",
                    help="git revision of cgprocfs to run (exported from the repo), "
                    "or 'worktree' for the working tree")
    ap.add_argument("--cgprocfs-cmd", default=None,
                    help="explicit daemon command instead; the mountpoint is appended")
    ap.add_argument("--io-uring", action="store_true",
                    help="run cgprocfs with --io-uring (FUSE over io_uring, Linux 6.14+)")


def start_targets(names: list[str], workdir: Path, out: Path, skipped: list[str],
                  args: argparse.Namespace) -> list[Target]:
    """Start each of `names` (as `args`' --lxcfs-bin, --cgprocfs-rev, --cgprocfs-cmd say);
    one that cannot start is reported loudly, added to `skipped` and left out."""
    kw = {"lxcfs_bin": args.lxcfs_bin, "cgprocfs_cmd": args.cgprocfs_cmd,
          "cgprocfs_rev": args.cgprocfs_rev, "io_uring": args.io_uring}
    targets = []
    for name in names:
        try:
            t = make_target(name, workdir, **kw)
            t.start(workdir, out)
            targets.append(t)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            with contextlib.suppress(Exception):
                t.stop()
            msg = f"target {name} unavailable: {e}"
            loud(msg)
            skipped.append(msg)
    return targets


# --------------------------------------------------------------------------- content checks


def memtotal_kb(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def stat_cpus(text: str) -> int:
    return len(re.findall(r"^cpu\d+ ", text, re.M))


def cpuinfo_cpus(text: str) -> int:
    return len(re.findall(r"^processor\s*:", text, re.M))


HOST_CPUS = len(online_cpus())


def host_memtotal_kb() -> int:
    v = memtotal_kb(Path("/proc/meminfo").read_text())
    assert v is not None
    return v


def check_content(target: str, fname: str, text: str, ct_limit: int | None,
                  ct_cpus: int | None, host_kb: int) -> str:
    """'' if `text` is right for a reader in a container with memory limit `ct_limit` and
    `ct_cpus` visible CPUs (None: not in a container), else the problem."""
    if not text:
        return f"{fname}: empty read"
    virt = target != "kernel" and ct_limit is not None
    if fname == "meminfo":
        got = memtotal_kb(text)
        want = ct_limit // 1024 if virt and ct_limit else host_kb
        if got != want:
            return f"meminfo: MemTotal {got} kB, expected {want} kB"
    elif fname == "stat":
        got = stat_cpus(text)
        want = ct_cpus if virt and ct_cpus else HOST_CPUS
        if got != want:
            return f"stat: {got} cpuN lines, expected {want}"
    elif fname == "cpuinfo":
        got = cpuinfo_cpus(text)
        want = ct_cpus if virt and ct_cpus else HOST_CPUS
        if got != want:
            return f"cpuinfo: {got} processors, expected {want}"
    elif fname == "uptime":
        parts = text.split()
        if len(parts) != 2 or not all(re.fullmatch(r"\d+\.\d\d", p) for p in parts):
            return f"uptime: unexpected {text[:40]!r}"
    elif fname == "loadavg":
        if not re.fullmatch(r"\d+\.\d\d \d+\.\d\d \d+\.\d\d \d+/\d+ \d+\n", text):
            return f"loadavg: unexpected {text[:60]!r}"
    elif fname == "vmstat" and not text.startswith("nr_free_pages "):
        return f"vmstat: unexpected start {text[:40]!r}"
    return ""


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, READ_BUF)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def run_meta() -> dict[str, object]:
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "python_executable": os.path.realpath(sys.executable),
        "git": _git("describe", "--always", "--dirty"),
        "loadavg_start": os.getloadavg(),
    }


def results_dir(out: Path | None, kind: str) -> Path:
    import datetime as dt

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    d = out or HERE / "results" / f"{stamp}-{kind}"
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- charts


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display); imported on first
    use, so the tools run without matplotlib until they draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
