"""Real parts for the tests: cgroups, a mounted daemon, commands run with the views bound
over /proc in a private mount namespace. Built on util-linux (unshare, mount) and plain
cgroup files, not on the code under test, so the tests check cgprocfs from outside."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VIEW_FILES = ("proc/meminfo", "proc/vmstat", "proc/swaps")
# The cpu directory is bound whole: the caller's cpuN entries come with it.
CPU_VIEW_FILES = ("proc/cpuinfo", "proc/stat", "proc/uptime", "proc/loadavg",
                  "sys/devices/system/cpu", "proc/diskstats")
PRESSURE_FILES = tuple(f"proc/pressure/{r}" for r in ("cpu", "memory", "io")
                       if os.path.exists(f"/proc/pressure/{r}"))
ALL_VIEW_FILES = VIEW_FILES + CPU_VIEW_FILES + PRESSURE_FILES
MiB = 1 << 20
# How long removing a test cgroup waits for the processes killed in it to die (and for
# the kernel to let go of a v1 memory cgroup) before the test fails.
REMOVE_GRACE = 30.0


def mountinfo_fstypes() -> dict[str, str]:
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            out[left.split()[4]] = right.split()[0]
    return out


def memory_hierarchy() -> tuple[int, str]:
    """(cgroup version, mountpoint) of the hierarchy holding the memory controller."""
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields[0] == "cgroup" and "memory" in rfields[2].split(","):
                return 1, fields[4]
            if rfields[0] == "cgroup2" and v2 is None:
                v2 = fields[4]
    if v2 and "memory" in Path(v2, "cgroup.controllers").read_text().split():
        return 2, v2
    raise RuntimeError("no memory cgroup controller mounted")


def own_cgroup_path(version: int) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        if (version == 2 and ctrls == "") or (version == 1 and "memory" in ctrls.split(",")):
            return path
    raise RuntimeError("no memory cgroup in /proc/self/cgroup")


@dataclass
class Cgroup:
    version: int
    dir: Path
    children: list[Cgroup] = field(default_factory=list)

    @property
    def path(self) -> str:
        """Path as /proc/PID/cgroup shows it."""
        _, mnt = memory_hierarchy()
        return "/" + str(self.dir.relative_to(mnt)) if self.dir != Path(mnt) else "/"

    def set_limit(self, limit: int | None) -> None:
        if limit is None:
            return
        name = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        (self.dir / name).write_text(str(limit))

    def set_swap(self, memory_plus_swap: int, memory: int) -> None:
        if self.version == 2:
            (self.dir / "memory.swap.max").write_text(str(memory_plus_swap - memory))
        else:
            (self.dir / "memory.memsw.limit_in_bytes").write_text(str(memory_plus_swap))

    def read(self, name: str) -> str:
        return (self.dir / name).read_text()

    def usage(self) -> int:
        return int(self.read("memory.current" if self.version == 2 else "memory.usage_in_bytes"))

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (ln.split() for ln in self.read("memory.stat").splitlines())}

    def child(self, name: str, limit: int | None = None) -> Cgroup:
        if self.version == 2:
            with contextlib.suppress(OSError):
                (self.dir / "cgroup.subtree_control").write_text("+memory")
        d = self.dir / name
        d.mkdir()
        cg = Cgroup(self.version, d)
        self.children.append(cg)
        cg.set_limit(limit)
        return cg

    def procs(self) -> list[int]:
        try:
            return [int(x) for x in self.read("cgroup.procs").split()]
        except FileNotFoundError:
            return []

    def _rmdir(self, grace: float) -> bool:
        """SIGKILL what is inside and rmdir, for up to `grace` s; True once it is gone."""
        deadline = time.monotonic() + grace
        while self.dir.exists() and time.monotonic() < deadline:
            for pid in self.procs():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.dir.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        return not self.dir.exists()

    def remove(self, grace: float = REMOVE_GRACE) -> None:
        """Remove the children, then this cgroup. Every one is tried; those still there
        after `grace` s (their processes killed) fail the test, all named at once."""
        left: list[Path] = []
        try:
            remove_all(reversed(self.children), grace)
        except CgroupsLeft as e:
            left += e.dirs
        if not self._rmdir(grace):
            left.append(self.dir)
        if left:
            raise CgroupsLeft(left)


class CgroupsLeft(AssertionError):
    """Test cgroups that could not be removed (a test that leaves one behind fails)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        super().__init__(f"could not remove test cgroup(s) {', '.join(map(str, dirs))}")


def remove_all(cgroups: Iterable[Cgroup], grace: float = REMOVE_GRACE) -> None:
    """`Cgroup.remove` of each, all tried even when one fails; then one CgroupsLeft
    (an AssertionError) names every directory left behind."""
    left: list[Path] = []
    for cg in cgroups:
        try:
            cg.remove(grace)
        except CgroupsLeft as e:
            left += e.dirs
    if left:
        raise CgroupsLeft(left)


@contextlib.contextmanager
def make_cgroup(limit: int | None = None) -> Iterator[Cgroup]:
    """A fresh memory cgroup beneath the one the tests run in (beside it on a v2 host
    whose test process sits in a non-root leaf), removed afterwards."""
    version, mnt = memory_hierarchy()
    own = own_cgroup_path(version)
    if version == 2 and own != "/":
        own = own.rsplit("/", 1)[0] or "/"
        with contextlib.suppress(OSError):
            Path(mnt + own, "cgroup.subtree_control").write_text("+memory")
    base = Path(mnt + (own if own != "/" else ""))
    d = base / f"cgprocfs-test-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    cg = Cgroup(version, d)
    try:
        cg.set_limit(limit)
        yield cg
    finally:
        cg.remove()


def hierarchies() -> dict[str, tuple[int, str]]:
    """controller -> (version, mountpoint) for memory, cpu, cpuacct, cpuset."""
    out: dict[str, tuple[int, str]] = {}
    v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if rfields[0] == "cgroup":
                for c in rfields[2].split(","):
                    if c in ("memory", "cpu", "cpuacct", "cpuset", "blkio"):
                        out.setdefault(c, (1, fields[4]))
            elif rfields[0] == "cgroup2" and v2 is None:
                v2 = fields[4]
    if v2:
        enabled = Path(v2, "cgroup.controllers").read_text().split()
        for c in ("memory", "cpu", "cpuset", "io"):
            if c in enabled:
                out.setdefault(c, (2, v2))
        if "cpu" in enabled:
            out.setdefault("cpuacct", (2, v2))
    return out


@dataclass
class Container:
    """A cgroup in every hierarchy that matters (one directory on v2)."""

    version: int
    dirs: dict[str, Path]  # controller -> directory

    @property
    def procs_files(self) -> list[Path]:
        return sorted({d / "cgroup.procs" for d in self.dirs.values()})

    def write(self, controller: str, name: str, value: str) -> None:
        (self.dirs[controller] / name).write_text(value)

    def set_cpus(self, cpus: float) -> None:
        if self.version == 2:
            self.write("cpu", "cpu.max", f"{round(cpus * 100000)} 100000")
        else:
            self.write("cpu", "cpu.cfs_period_us", "100000")
            self.write("cpu", "cpu.cfs_quota_us", str(round(cpus * 100000)))

    def set_cpuset(self, cpus: str) -> None:
        self.write("cpuset", "cpuset.cpus", cpus)

    def remove(self) -> None:
        remove_all(Cgroup(self.version, d) for d in sorted(set(self.dirs.values()), reverse=True))


@contextlib.contextmanager
def make_container(memory: int | None = None, cpuset: bool = False,
                   io: bool = False) -> Iterator[Container]:
    """Cgroups for memory, cpu, cpuacct (and cpuset if asked) beneath the test process's
    own, like a container runtime makes; removed afterwards."""
    hs = hierarchies()
    name = f"cgprocfs-test-{uuid.uuid4().hex[:8]}"
    wanted = ["memory", "cpu", "cpuacct"] + (["cpuset"] if cpuset else []) + \
        (["blkio", "io"] if io else [])
    dirs: dict[str, Path] = {}
    made: dict[str, Path] = {}
    version = hs["memory"][0]
    try:
        for c in wanted:
            if c not in hs:
                continue
            v, mnt = hs[c]
            if mnt in made:
                dirs[c] = made[mnt]
                continue
            own = next(ln.split(":", 2)[2] for ln in Path("/proc/self/cgroup").read_text()
                       .splitlines() if (v == 2 and ln.split(":")[1] == "") or
                       (v == 1 and c in ln.split(":")[1].split(",")))
            if v == 2 and own != "/":
                own = own.rsplit("/", 1)[0] or "/"
            base = Path(mnt + (own if own != "/" else ""))
            if v == 2:
                for ctl in wanted:
                    with contextlib.suppress(OSError):
                        (base / "cgroup.subtree_control").write_text(f"+{ctl}")
            d = base / name
            d.mkdir()
            made[mnt] = d
            dirs[c] = d
            if v == 1 and c == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((base / f).read_text().strip())
        ct = Container(version, dirs)
        if memory is not None:
            Cgroup(version, dirs["memory"]).set_limit(memory)
        yield ct
    finally:
        remove_all(Cgroup(version, d) for d in sorted(set(made.values()), reverse=True))


@dataclass
class Daemon:
    mountpoint: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def view(self, name: str) -> Path:
        return self.mountpoint / name


def wait_mounted(
    mountpoint: Path, proc: subprocess.Popen[bytes] | None, timeout: float = 15
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mountinfo_fstypes().get(str(mountpoint)) == "fuse.cgprocfs":
            # listdir reaches the daemon, unlike a cached stat; a stale mount answers
            # ENOTCONN, and the bare directory (a stale mount just detached) is empty.
            with contextlib.suppress(OSError):
                if "proc" in os.listdir(mountpoint):
                    return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def force_unmount(mountpoint: Path) -> None:
    if str(mountpoint) in mountinfo_fstypes():
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM `proc` if it still runs; SIGKILL if it has not exited after `timeout` s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_daemon(args: Sequence[str] = (), module: Sequence[str] = ("-m", "cgprocfs"),
                   mountpoint: Path | None = None,
                   env: dict[str, str] | None = None,
                   sysinfo: bool = False) -> Iterator[Daemon]:
    """`cgprocfs serve` on a fresh mountpoint; SIGTERM and unmount afterwards. Without
    `sysinfo`, no sysinfo agent (it would take the host's one socket path)."""
    if not sysinfo:
        args = ["--no-sysinfo", *args]
    tmp = Path(tempfile.mkdtemp(prefix="cgprocfs-test-"))
    mp = mountpoint or tmp / "mnt"
    log_path = tmp / "daemon.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(
            [PYTHON, *module, "--log-level", "debug", "serve", *args, str(mp)],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, start_new_session=True, env=env,
        )
    d = Daemon(mp, proc, log_path)
    try:
        if not wait_mounted(mp, proc):
            raise RuntimeError(f"daemon did not mount {mp}:\n{d.log()}")
        yield d
    finally:
        stop_process(proc)
        force_unmount(mp)
        keep = os.environ.get("CGPROCFS_TEST_LOGDIR")
        if keep:  # the guest lane hands daemon logs back to the host's report
            with contextlib.suppress(OSError):
                shutil.copy(log_path, Path(keep) / f"daemon-{proc.pid}.log")
        shutil.rmtree(tmp, ignore_errors=True)


def in_container(cg: Cgroup | Container, mountpoint: Path, cmd: Sequence[str],
                 views: Sequence[str] = VIEW_FILES, pid_ns: bool = False) -> list[str]:
    """A command line that joins `cg`, enters a private mount namespace (and a new pid
    namespace with its own /proc if asked), binds the views over /proc and /sys and execs
    `cmd` — what a container runtime does, with util-linux."""
    binds = "; ".join(
        f"mount --bind {mountpoint}/{v} /{v}" for v in views
    )
    inner = f"set -e; {binds}; exec \"$@\""
    procs = cg.procs_files if isinstance(cg, Container) else [cg.dir / "cgroup.procs"]
    join = " && ".join(f"echo $$ > {p}" for p in procs)
    ns = "--pid --fork --kill-child --mount-proc " if pid_ns else ""
    outer = f'{join} && exec unshare --mount --propagation private {ns}' \
            f'-- sh -c \'{inner}\' sh "$@"'
    return ["sh", "-c", outer, "sh", *cmd]


def run_in_container(cg: Cgroup | Container, mountpoint: Path, cmd: Sequence[str],
                     timeout: float = 60, views: Sequence[str] = VIEW_FILES,
                     pid_ns: bool = False) -> str:
    res = subprocess.run(in_container(cg, mountpoint, cmd, views, pid_ns), capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def parse_free_b(text: str) -> dict[str, int]:
    """procps `free -b` -> {total, used, free, shared, buff/cache, available, swap_total,...}
    (other lines around it, such as a runtime's warnings, are passed over)"""
    lines = [ln.split() for ln in text.splitlines()]
    header = next(ln for ln in lines if ln and ln[0] == "total")
    mem = next(ln for ln in lines if ln and ln[0] == "Mem:")[1:]
    out = {h: int(v) for h, v in zip(header, mem, strict=False)}
    swap = next(ln for ln in lines if ln and ln[0] == "Swap:")[1:]
    out.update({f"swap_{h}": int(v) for h, v in zip(header, swap, strict=False)})
    return out


def meminfo_kb(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        k, _, rest = line.partition(":")
        out[k] = int(rest.split()[0])
    return out


def scratch_dir() -> Path:
    """A directory on a disk-backed filesystem (page cache, not shmem) for file writes."""
    d = Path(os.environ.get("CGPROCFS_TEST_SCRATCH", "/var/tmp"))
    d.mkdir(parents=True, exist_ok=True)
    return d
