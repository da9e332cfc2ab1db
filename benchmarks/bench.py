#!/usr/bin/env python3
"""Side-by-side read benchmark: kernel /proc vs LXCFS vs cgprocfs.

Run as root:  /work/main/.venv/bin/python benchmarks/bench.py [options]
See docs/benchmarks.md for what every column means.

One run = one machine, one set of test cgroups, all targets mounted at the same time and
measured interleaved (file -> readers -> target), so figures are comparable within a run.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import datetime as dt
import errno
import json
import multiprocessing as mp
import os
import platform
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from pathlib import Path

ALL_FILES = ("meminfo", "vmstat", "swaps", "stat", "cpuinfo", "uptime", "loadavg")
ALL_TARGETS = ("kernel", "lxcfs", "cgprocfs")
READ_BUF = 64 * 1024
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_CGPROCFS_CMD = f"{REPO}/.venv/bin/cgprocfs serve"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def loud(msg: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! {msg}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- cgroups


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mountpoint, fstype, super_options) per mount of this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.rstrip("\n").partition(" - ")
            pf, qf = pre.split(), post.split()
            out.append((_unescape_mountinfo(pf[3]), _unescape_mountinfo(pf[4]), qf[0], qf[2]))
    return out


def _under(mount_root: str, mountpoint: str, cg_path: str) -> Path | None:
    """Directory of cgroup `cg_path` (as in /proc/self/cgroup) inside a mount of `mount_root`."""
    rel = os.path.relpath(cg_path, mount_root)
    if rel.startswith(".."):
        return None
    return Path(mountpoint) / rel if rel != "." else Path(mountpoint)


class CgroupSet:
    """N memory cgroups beneath this process's own memory cgroup (v1 or v2)."""

    def __init__(self, count: int, limit_bytes: int) -> None:
        self.count, self.limit = count, limit_bytes
        self.version = 0
        self.own: Path | None = None
        self.parent: Path | None = None
        self.children: list[Path] = []
        self._enabled_in: list[Path] = []  # v2: where we wrote +memory to subtree_control
        self._detect()

    def _detect(self) -> None:
        v1_path = v2_path = None
        with open("/proc/self/cgroup") as f:
            for line in f:
                hier, ctrls, path = line.rstrip("\n").split(":", 2)
                if hier == "0" and ctrls == "":
                    v2_path = path
                elif "memory" in ctrls.split(","):
                    v1_path = path
        mounts = _mountinfo()
        if v1_path is not None:
            for root, mp_, fstype, sopts in mounts:
                if fstype == "cgroup" and "memory" in sopts.split(","):
                    d = _under(root, mp_, v1_path)
                    if d is not None and d.is_dir():
                        self.version, self.own = 1, d
                        return
        if v2_path is not None:
            for root, mp_, fstype, _ in mounts:
                if fstype != "cgroup2":
                    continue
                d = _under(root, mp_, v2_path)
                if d is None or not d.is_dir():
                    continue
                ctrls = (d / "cgroup.controllers").read_text().split()
                if "memory" in ctrls:
                    self.version, self.own = 2, d
                    return
        raise SystemExit(
            "bench: no memory cgroup controller found for this process "
            "(neither a v1 'memory' hierarchy nor a cgroup2 mount offering 'memory')"
        )

    def _enable_memory_v2(self, d: Path) -> None:
        sc = d / "cgroup.subtree_control"
        if "memory" in sc.read_text().split():
            return
        try:
            sc.write_text("+memory")
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise SystemExit(
                    f"bench: cannot enable +memory in {sc}: the cgroup has processes of its own "
                    "(cgroup v2 'no internal processes' rule). Run the benchmark from the root "
                    "cgroup or from a cgroup whose subtree_control already has 'memory'."
                ) from e
            raise
        self._enabled_in.append(d)

    def create(self) -> None:
        assert self.own is not None
        if self.version == 2:
            self._enable_memory_v2(self.own)
        self.parent = self.own / f"cgprocfs-bench-{os.getpid()}"
        self.parent.mkdir()
        if self.version == 2:
            self._enable_memory_v2(self.parent)
        for i in range(self.count):
            d = self.parent / f"cg{i}"
            d.mkdir()
            self.children.append(d)
            knob = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
            (d / knob).write_text(str(self.limit))

    def procs_file(self, i: int) -> str:
        return str(self.children[i % self.count] / "cgroup.procs")

    def remove(self) -> None:
        for d in [*reversed(self.children), *([self.parent] if self.parent else [])]:
            for attempt in range(50):
                try:
                    if d.exists():
                        if d == self.parent and self.version == 2 and d in self._enabled_in:
                            with contextlib.suppress(OSError):
                                (d / "cgroup.subtree_control").write_text("-memory")
                        d.rmdir()
                    break
                except OSError as e:
                    if attempt == 49:
                        loud(f"could not remove cgroup {d}: {e}")
                    time.sleep(0.1)
        for d in self._enabled_in:
            if d != self.parent:
                with contextlib.suppress(OSError):
                    (d / "cgroup.subtree_control").write_text("-memory")
        self.children, self.parent, self._enabled_in = [], None, []


# --------------------------------------------------------------------------- targets


def _proc_cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _is_mounted(path: str) -> bool:
    p = os.path.realpath(path)
    return any(m[1] == p for m in _mountinfo())


@dataclass
class Target:
    name: str
    label: str
    root: str = "/"  # a file is read from <root>/proc/<file>
    cmd: list[str] | None = None  # daemon command, mountpoint appended; None = no daemon
    mnt: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None
    version: str = ""
    error: str | None = None
    _log: object = field(default=None, repr=False)

    def path(self, fname: str) -> str:
        return os.path.join(self.root, "proc", fname)

    def serves(self, fname: str) -> bool:
        return os.path.isfile(self.path(fname))

    def start(self, workdir: Path, logdir: Path, timeout: float = 30.0) -> None:
        if self.cmd is None:
            return
        self.mnt = tempfile.mkdtemp(prefix=f"{self.name}-mnt-", dir=workdir)
        self.root = self.mnt
        self.logfile = logdir / f"{self.name}.log"
        self._log = open(self.logfile, "wb")  # noqa: SIM115 - closed in stop()
        argv = [*self.cmd, self.mnt]
        log(f"starting {self.name}: {shlex.join(argv)}")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
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
            if _is_mounted(self.mnt):
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
        if self.proc is None:
            return None
        total = 0
        for p in _descendants(self.proc.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += _proc_cpu_ticks(p)
        return total

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    loud(f"{self.name} (pid {self.proc.pid}) ignored SIGTERM; sending SIGKILL")
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            rc = self.proc.returncode
            if rc not in (0, -signal.SIGTERM):
                log(f"{self.name} exited with status {rc} after SIGTERM (log: {self.logfile})")
            self.proc = None
        if self.mnt is not None:
            if _is_mounted(self.mnt):
                log(f"{self.name}: {self.mnt} still mounted after the daemon exited; umount -l")
                subprocess.run(["umount", "-l", self.mnt], check=False)
            with contextlib.suppress(OSError):
                os.rmdir(self.mnt)
            self.mnt = None
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None


def make_target(name: str, args: argparse.Namespace, files: list[str]) -> Target:
    if name == "kernel":
        return Target("kernel", "kernel /proc", version=platform.release())
    if name == "lxcfs":
        cmd = [args.lxcfs_bin, "-f"]
        if "loadavg" in files:
            cmd.append("-l")  # loadavg is only served with -l (costs a background thread)
        # own pidfile: never touch /run/lxcfs.pid of a system lxcfs
        cmd += ["-p", "PIDFILE"]
        ver = subprocess.run([args.lxcfs_bin, "--version"], capture_output=True, text=True)
        v = (ver.stdout or ver.stderr).strip().splitlines()
        return Target("lxcfs", "LXCFS", cmd=cmd, version=v[-1].strip('"') if v else "?")
    if name == "cgprocfs":
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return Target(
            "cgprocfs",
            "cgprocfs",
            cmd=shlex.split(args.cgprocfs_cmd),
            version=f"git {rev}" if rev else "?",
        )
    raise SystemExit(f"bench: unknown target {name!r} (known: {', '.join(ALL_TARGETS)})")


# --------------------------------------------------------------------------- readers


def reader_main(
    idx: int,
    procs_file: str,
    path: str,
    duration: float,
    cap: int,
    ready_w: int,
    go_r: int,
    unused: list[int],
    results: Connection,
) -> None:
    """One reader process: join cgroup, check read, report ready, wait for go, timed loop.

    Synchronisation is plain pipes (no multiprocessing semaphores, so no /dev/shm needed).
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for fd in unused:  # the parent's ends: without this, go_r would never see EOF
        os.close(fd)
    meta: dict[str, object] = {"idx": idx}
    lat = array.array("q", bytes(8 * cap))  # preallocated; touched now, not in the loop
    try:
        with open(procs_file, "w") as f:
            f.write(str(os.getpid()))
        with open("/proc/self/cgroup") as f:
            meta["cgroup"] = f.read()
        # first read = correctness check (not timed)
        fd = os.open(path, os.O_RDONLY)
        chunks = []
        while True:
            b = os.read(fd, READ_BUF)
            if not b:
                break
            chunks.append(b)
        os.close(fd)
        meta["first"] = b"".join(chunks).decode("utf-8", "replace")
    except OSError as e:
        meta["setup_error"] = f"{type(e).__name__}: {e}"
    os.write(ready_w, b"r")  # barrier, part 1: placed in its cgroup and checked
    if os.read(go_r, 1) != b"g":  # barrier, part 2: the parent has sampled daemon CPU
        os._exit(1)  # parent gave up (closed the pipe)
    pc, o, r, c, rd, buf = time.perf_counter_ns, os.open, os.read, os.close, os.O_RDONLY, READ_BUF
    n = 0
    start = pc()
    end = start + int(duration * 1e9)
    t0 = start
    if "setup_error" not in meta:
        try:
            while True:
                t0 = pc()
                if t0 >= end:
                    break
                fd = o(path, rd)
                while r(fd, buf):
                    pass
                c(fd)
                t1 = pc()
                if n < cap:
                    lat[n] = t1 - t0
                n += 1
        except OSError as e:
            meta["error"] = f"{type(e).__name__}: {e} (after {n} ops)"
    stop = t0
    meta.update(ops=n, elapsed_ns=max(stop - start, 1), recorded=min(n, cap))
    results.send((meta, lat[: min(n, cap)].tobytes()))
    results.close()


# --------------------------------------------------------------------------- cells


def meminfo_total_kb(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def check_first_read(
    target: Target, fname: str, meta: dict, expect_kb: int, host_total_kb: int | None
) -> str:
    """Return '' when fine, else a short problem description."""
    if "setup_error" in meta:
        return f"reader {meta['idx']}: {meta['setup_error']}"
    text = str(meta.get("first", ""))
    if not text:
        return f"reader {meta['idx']}: first read of {target.path(fname)} was empty"
    if fname != "meminfo":
        return ""
    got = meminfo_total_kb(text)
    want = host_total_kb if target.name == "kernel" else expect_kb
    if got != want:
        return f"reader {meta['idx']}: MemTotal {got} kB, expected {want} kB"
    return ""


def run_cell(
    target: Target,
    fname: str,
    nreaders: int,
    cgs: CgroupSet,
    args: argparse.Namespace,
    host_total_kb: int | None,
) -> dict:
    import numpy as np

    ctx = mp.get_context("fork")
    cap = max(100_000, int(args.duration * 250_000))  # > kernel ops/s per reader, with margin
    path = target.path(fname)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    conns = [ctx.Pipe(duplex=False) for _ in range(nreaders)]
    procs = [
        ctx.Process(
            target=reader_main,
            daemon=True,
            args=(
                i,
                cgs.procs_file(i),
                path,
                args.duration,
                cap,
                ready_w,
                go_r,
                [ready_r, go_w],
                conns[i][1],
            ),
        )
        for i in range(nreaders)
    ]
    got: list[tuple[dict, bytes]] = []
    cpu0 = cpu1 = None
    load0, wall = os.getloadavg()[0], 0.0
    try:
        for p in procs:
            p.start()
        for _, w in conns:
            w.close()
        os.close(ready_w)
        os.close(go_r)
        ready, deadline = 0, time.monotonic() + 60
        while ready < nreaders:
            if time.monotonic() > deadline or any(p.exitcode is not None for p in procs):
                raise RuntimeError(f"only {ready}/{nreaders} readers got ready")
            if select.select([ready_r], [], [], 0.2)[0]:
                ready += len(os.read(ready_r, nreaders))
        cpu0 = target.cpu_ticks()
        load0 = os.getloadavg()[0]
        os.write(go_w, b"g" * nreaders)
        t_wall0 = time.perf_counter()
        deadline = time.monotonic() + args.duration + 60
        pending = [r for r, _ in conns]
        while pending:
            done = mp_connection.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                loud(f"{target.name}/{fname}/{nreaders}: readers did not finish; killing them")
                break
            for r in done:
                pending.remove(r)  # type: ignore[arg-type]
                with contextlib.suppress(EOFError, OSError):
                    got.append(r.recv())  # type: ignore[union-attr]
        wall = time.perf_counter() - t_wall0
        cpu1 = target.cpu_ticks()
    except RuntimeError as e:
        loud(f"{target.name}/{fname}/{nreaders}: {e}")
    finally:
        for fd in (ready_r, go_w):
            with contextlib.suppress(OSError):
                os.close(fd)  # readers still waiting for "go" see EOF and exit
        for p in procs:
            p.join(timeout=args.duration + 5 if len(got) == nreaders else 2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for r, _ in conns:
            r.close()

    metas = [m for m, _ in got]
    lats = np.concatenate([np.frombuffer(b, dtype=np.int64) for _, b in got]) if got else None
    ops = sum(int(m["ops"]) for m in metas)
    ops_s = sum(int(m["ops"]) / (int(m["elapsed_ns"]) / 1e9) for m in metas)
    problems = [check_first_read(target, fname, m, args.expect_kb, host_total_kb) for m in metas]
    problems = [p for p in problems if p]
    problems += [f"reader {m['idx']}: {m['error']}" for m in metas if "error" in m]
    if len(metas) < nreaders:
        problems.append(f"only {len(metas)}/{nreaders} readers reported")
    mem_totals = (
        sorted({meminfo_total_kb(str(m.get("first", ""))) for m in metas} - {None})
        if fname == "meminfo"
        else []
    )
    cell = {
        "target": target.name,
        "file": fname,
        "readers": nreaders,
        "cgroups": cgs.count,
        "path": path,
        "ops": ops,
        "ops_per_s": ops_s,
        "wall_s": wall,
        "per_reader_ops": [int(m["ops"]) for m in sorted(metas, key=lambda m: m["idx"])],
        "latencies_recorded": int(lats.size) if lats is not None else 0,
        "p50_us": None,
        "p99_us": None,
        "p999_us": None,
        "mean_us": None,
        "daemon_cpu_s": None,
        "daemon_cpu_s_per_1k": None,
        "check": "ok" if not problems else "MISMATCH",
        "problems": problems,
        "memtotal_kb_seen": mem_totals,
        "loadavg1_before": load0,
    }
    if lats is not None and lats.size:
        p50, p99, p999 = np.percentile(lats, [50, 99, 99.9]) / 1e3
        cell.update(
            p50_us=float(p50),
            p99_us=float(p99),
            p999_us=float(p999),
            mean_us=float(lats.mean() / 1e3),
        )
    if cpu0 is not None and cpu1 is not None:
        cpu_s = (cpu1 - cpu0) / CLK_TCK
        cell["daemon_cpu_s"] = cpu_s
        cell["daemon_cpu_s_per_1k"] = cpu_s / ops * 1000 if ops else None
    if problems:
        loud(
            f"CORRECTNESS/ERROR {target.name} {fname} readers={nreaders}: "
            + "; ".join(problems[:4])
            + (" ..." if len(problems) > 4 else "")
        )
    return cell


# --------------------------------------------------------------------------- report


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def add_ratios(cells: list[dict]) -> None:
    by = {(c["target"], c["file"], c["readers"]): c for c in cells}
    for c in cells:
        k, lx = (
            by.get(("kernel", c["file"], c["readers"])),
            by.get(("lxcfs", c["file"], c["readers"])),
        )
        c["ratio_vs_lxcfs"] = (
            c["ops_per_s"] / lx["ops_per_s"] if lx and lx is not c and lx["ops_per_s"] else None
        )
        c["ratio_vs_kernel"] = (
            c["ops_per_s"] / k["ops_per_s"] if k and k is not c and k["ops_per_s"] else None
        )


def markdown_table(cells: list[dict]) -> str:
    head = (
        "| target | file | readers | ops/s | p50 µs | p99 µs | p99.9 µs "
        "| daemon CPU s / 1k ops | ÷ LXCFS | ÷ kernel | check |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        lines.append(
            f"| {c['target']} | {c['file']} | {c['readers']} | {c['ops_per_s']:,.0f} "
            f"| {_f(c['p50_us'], '.0f')} | {_f(c['p99_us'], '.0f')} | {_f(c['p999_us'], '.0f')} "
            f"| {_f(c['daemon_cpu_s_per_1k'], '.3f')} "
            f"| {_f(c['ratio_vs_lxcfs'], '.2f') if c['ratio_vs_lxcfs'] else '—'} "
            f"| {_f(c['ratio_vs_kernel'], '.3f') if c['ratio_vs_kernel'] else '—'} "
            f"| {c['check']} |"
        )
    return "\n".join(lines)


def summary_lines(cells: list[dict]) -> list[str]:
    out = []
    for c in cells:
        if c["target"] != "cgprocfs":
            continue
        parts = []
        if c["ratio_vs_lxcfs"]:
            parts.append(f"cgprocfs/LXCFS = {c['ratio_vs_lxcfs']:.2f}")
        if c["ratio_vs_kernel"]:
            parts.append(f"cgprocfs/kernel = {c['ratio_vs_kernel']:.3f}")
        if parts:
            out.append(f"- {c['file']}, {c['readers']} reader(s): " + ", ".join(parts))
    return out


def write_chart(cells: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((c["file"], c["readers"]) for c in cells))
    targets = list(dict.fromkeys(c["target"] for c in cells))
    by = {(c["target"], c["file"], c["readers"]): c for c in cells}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.6 * len(groups) + 4), 4.8))
    width = 0.8 / max(1, len(targets))
    colors = {"kernel": "#7f7f7f", "lxcfs": "#1f77b4", "cgprocfs": "#d62728"}
    for ax, key, title in (
        (axes[0], "ops_per_s", "throughput, ops/s (log)"),
        (axes[1], "p50_us", "p50 latency per op, µs (log)"),
    ):
        for ti, t in enumerate(targets):
            xs, ys = [], []
            for gi, (f, n) in enumerate(groups):
                c = by.get((t, f, n))
                if c and c.get(key):
                    xs.append(gi + (ti - (len(targets) - 1) / 2) * width)
                    ys.append(c[key])
            bars = ax.bar(xs, ys, width, label=t, color=colors.get(t))
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, rotation=90, padding=2)
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)), [f"{f}\n{n} reader{'s' * (n != 1)}" for f, n in groups])
        ax.set_title(title)
        ax.margins(y=0.25)
    axes[0].legend()
    fig.suptitle("open → read to EOF → close, per op (one run; compare only within it)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--files", default="meminfo", help=f"comma list of /proc files, from: {','.join(ALL_FILES)}"
    )
    ap.add_argument("--readers", default="1,8", help="comma list of reader-process counts")
    ap.add_argument(
        "--cgroups",
        type=int,
        default=1,
        help="readers are spread round-robin over this many test cgroups",
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    ap.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma list, from: {','.join(ALL_TARGETS)}",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results directory (default benchmarks/results/<timestamp>)",
    )
    ap.add_argument(
        "--limit-mib", type=int, default=300, help="memory limit of every test cgroup, MiB"
    )
    ap.add_argument("--lxcfs-bin", default=shutil.which("lxcfs") or "/usr/bin/lxcfs")
    ap.add_argument(
        "--cgprocfs-cmd",
        default=DEFAULT_CGPROCFS_CMD,
        help="daemon command; the mountpoint is appended",
    )
    a = ap.parse_args(argv)

    def csv(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    a.files = csv(a.files)
    bad = [f for f in a.files if f not in ALL_FILES]
    if bad:
        ap.error(f"unknown file(s) {bad}; choose from {','.join(ALL_FILES)}")
    a.targets = csv(a.targets)
    bad = [t for t in a.targets if t not in ALL_TARGETS]
    if bad:
        ap.error(f"unknown target(s) {bad}; choose from {','.join(ALL_TARGETS)}")
    try:
        a.readers = [int(x) for x in csv(a.readers)]
    except ValueError:
        ap.error("--readers must be a comma list of integers")
    if any(n < 1 for n in a.readers) or a.cgroups < 1 or a.duration <= 0:
        ap.error("--readers, --cgroups and --duration must be positive")
    a.expect_kb = a.limit_mib * 1024
    return a


class _Stop(BaseException):
    pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: must run as root (creates cgroups, mounts FUSE filesystems)")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out: Path = args.out or HERE / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)

    def on_signal(signum: int, _frame: object) -> None:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)  # one unwind only; cleanup must not be cut short
        raise _Stop(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)

    host_total_kb = meminfo_total_kb(Path("/proc/meminfo").read_text())
    cgs = CgroupSet(args.cgroups, args.limit_mib * 1024 * 1024)
    log(f"cgroup v{cgs.version}; test cgroups beneath {cgs.own}")
    workdir = Path(tempfile.mkdtemp(prefix="cgprocfs-bench-"))
    targets: list[Target] = []
    skipped: list[str] = []
    cells: list[dict] = []
    status = 0
    try:
        cgs.create()
        for name in args.targets:
            t = make_target(name, args, args.files)
            if t.cmd and "PIDFILE" in t.cmd:
                t.cmd[t.cmd.index("PIDFILE")] = str(workdir / f"{name}.pid")
            try:
                t.start(workdir, out)
                targets.append(t)
            except (RuntimeError, OSError) as e:
                t.stop()
                t.error = str(e)
                msg = f"target {name} unavailable: {e}"
                loud(msg)
                skipped.append(msg)
        for fname in args.files:
            for t in targets:
                if not t.serves(fname):
                    msg = f"{t.name} does not serve /proc/{fname} ({t.path(fname)}): skipped"
                    log(msg)
                    skipped.append(msg)
            for n in args.readers:
                for t in targets:
                    if not t.serves(fname):
                        continue
                    if t.proc is not None and t.proc.poll() is not None:
                        msg = f"{t.name} died (status {t.proc.returncode}); {fname}/{n} skipped"
                        loud(msg)
                        skipped.append(msg)
                        continue
                    log(f"cell: {t.name} {fname} readers={n} ({args.duration:g} s)")
                    c = run_cell(t, fname, n, cgs, args, host_total_kb)
                    log(
                        f"  {c['ops_per_s']:,.0f} ops/s, p50 {_f(c['p50_us'], '.0f')} µs, "
                        f"check {c['check']}"
                    )
                    cells.append(c)
    except _Stop as e:
        loud(f"interrupted by signal {e.args[0]}; cleaning up")
        status = 130
    finally:
        for t in reversed(targets):
            try:
                t.stop()
            except Exception as e:  # keep cleaning up
                loud(f"stopping {t.name}: {e}")
        cgs.remove()
        shutil.rmtree(workdir, ignore_errors=True)

    add_ratios(cells)
    table = markdown_table(cells)
    summary = summary_lines(cells)
    meta = {
        "started": stamp,
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cgroup_version": cgs.version,
        "cgroup_parent": str(cgs.own),
        "limit_mib": args.limit_mib,
        "expect_memtotal_kb": args.expect_kb,
        "files": args.files,
        "readers": args.readers,
        "cgroups": args.cgroups,
        "duration_s": args.duration,
        "targets": {t.name: {"version": t.version, "cmd": t.cmd} for t in targets},
        "skipped": skipped,
        "loadavg_end": os.getloadavg(),
        "interrupted": status != 0,
    }
    mismatches = [c for c in cells if c["check"] != "ok"]
    md = [
        f"# cgprocfs benchmark {stamp}",
        "",
        f"{meta['host']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, cgroup v{cgs.version}, "
        f"{args.cgroups} test cgroup(s) of {args.limit_mib} MiB, {args.duration:g} s per cell. "
        "Op = open → read to EOF (64 KiB buffer) → close.",
        "",
        "Targets: " + "; ".join(f"{t.name} ({t.version})" for t in targets),
        "",
        table,
        "",
    ]
    if summary:
        md += ["Ratios (ops/s):", "", *summary, ""]
    if status:
        md += ["**Run interrupted by a signal: the table is incomplete.**", ""]
    if skipped:
        md += ["Skipped:", "", *[f"- {s}" for s in skipped], ""]
    if mismatches:
        md += ["**Correctness problems:**", ""]
        md += [
            f"- {c['target']} {c['file']} {c['readers']}: {p}"
            for c in mismatches
            for p in c["problems"]
        ]
        md += [""]
    md += ["Noise: ±25 % between runs is normal here; compare only figures from one run.", ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=2))
    if cells:
        try:
            write_chart(cells, out / "results.png")
        except Exception as e:
            loud(f"chart failed: {e}")
    print("\n".join(md[2:]))
    print(f"results: {out}/results.md, results.json, results.png")
    if mismatches:
        loud(f"{len(mismatches)} cell(s) with correctness problems; see results.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
