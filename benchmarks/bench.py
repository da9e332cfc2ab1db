#!/usr/bin/env python3
"""Side-by-side read benchmark: kernel /proc vs LXCFS vs cgprocfs.

Run as root:  .venv/bin/python benchmarks/bench.py [--quick | --issue5] [options]
See docs/benchmarks.md for what every column means.

One run = one machine, one set of container-like test cgroups, all targets mounted at the
same time and measured interleaved (cgroups -> file -> readers -> target), so figures are
comparable within a run. Prints figures and ratios only; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing as mp
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from benchlib import (
    ALL_TARGETS,
    CLK_TCK,
    READ_BUF,
    Container,
    ContainerSet,
    Stop,
    Target,
    add_run_args,
    check_content,
    host_memtotal_kb,
    in_round_order,
    install_stop_handlers,
    join,
    log,
    loud,
    pyplot,
    require_root,
    results_dir,
    run_meta,
    save_figure,
    start_targets,
    stop_everything,
)

ALL_FILES = ("meminfo", "vmstat", "stat", "cpuinfo", "uptime", "loadavg", "swaps")
GRID_FILES = ("meminfo", "vmstat", "stat", "cpuinfo", "uptime", "loadavg")

# preset -> option defaults (explicit options override them)
PRESETS: dict[str, dict[str, object]] = {
    "full": {
        "files": ",".join(GRID_FILES),
        "readers": "1,8,32",
        "cgroups": "1,50,200",
        "duration": 3.0,
        "rounds": 1,
    },
    "quick": {
        "files": "meminfo,stat",
        "readers": "1,4",
        "cgroups": "1,6",
        "duration": 1.0,
        "rounds": 1,
    },
    "issue5": {
        "files": ",".join(GRID_FILES),
        "readers": "1,8,32",
        "cgroups": "50",
        "duration": 4.0,
        "rounds": 4,
    },
}
# What issue #5 asks of cgprocfs/LXCFS (printed next to the ratios; never asserted).
ISSUE5_MIN_RATIO = {"meminfo": 1.5}
ISSUE5_DEFAULT_RATIO = 1.0


# --------------------------------------------------------------------------- readers


def reader_main(
    idx: int,
    share: list[tuple[list[str], int, int]],
    target: str,
    fname: str,
    path: str,
    duration: float,
    rotate_ns: int,
    cap: int,
    host_kb: int,
    ready_w: int,
    go_r: int,
    unused: list[int],
    results: Connection,
) -> None:
    """One reader process. `share` = the cgroups it reads from: (procs files, memory limit,
    expected CPUs). It joins the first, checks one read, reports ready, waits for go, then
    loops open -> read to EOF -> close for `duration` s. With more than one cgroup in its
    share it moves itself to the next one every `rotate_ns`; the move and the check of the
    first read after it are not timed (excluded from its elapsed time)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for fd in unused:  # the parent's ends: without this, go_r would never see EOF
        os.close(fd)
    meta: dict[str, object] = {"idx": idx}
    problems: list[str] = []
    checks = 0
    lat = array.array("q", bytes(8 * cap))  # preallocated and touched now, not in the loop
    cur = 0
    try:
        join(share[0][0])
        fd = os.open(path, os.O_RDONLY)
        chunks = []
        while b := os.read(fd, READ_BUF):
            chunks.append(b)
        os.close(fd)
        text = b"".join(chunks).decode("utf-8", "replace")
        meta["first"] = text[:4096]
        p = check_content(target, fname, text, share[0][1], share[0][2], host_kb)
        checks += 1
        if p:
            problems.append(f"reader {idx} cgroup #0: {p}")
    except OSError as e:
        meta["setup_error"] = f"{type(e).__name__}: {e}"
    os.write(ready_w, b"r")  # barrier, part 1: placed in its cgroup and checked
    if os.read(go_r, 1) != b"g":  # barrier, part 2: the parent has sampled daemon CPU
        os._exit(1)  # parent gave up (closed the pipe)
    pc, o, r, c, rd, buf = time.perf_counter_ns, os.open, os.read, os.close, os.O_RDONLY, READ_BUF
    n = moves = 0
    paused = 0
    firsts: list[int] = []  # which recorded ops were the first read after a move
    rotate = len(share) > 1
    check_next = False
    start = pc()
    end = start + int(duration * 1e9)
    next_move = start + rotate_ns if rotate else end + 1
    t0 = start
    if "setup_error" not in meta:
        try:
            while True:
                t0 = pc()
                if t0 >= end:
                    break
                if t0 >= next_move:
                    cur = (cur + 1) % len(share)
                    join(share[cur][0])
                    moves += 1
                    check_next = True
                    t1 = pc()
                    paused += t1 - t0
                    next_move = t1 + rotate_ns
                    continue
                if check_next:
                    fd = o(path, rd)
                    data = b""
                    while b := r(fd, buf):
                        data += b
                    c(fd)
                    t1 = pc()
                    check_next = False
                    p = check_content(
                        target, fname, data.decode("utf-8", "replace"), share[cur][1],
                        share[cur][2], host_kb,
                    )
                    checks += 1
                    if p and len(problems) < 5:
                        problems.append(f"reader {idx} cgroup #{cur}: {p}")
                    paused += pc() - t1
                    if n < cap:
                        firsts.append(n)
                else:
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
    meta.update(
        ops=n,
        elapsed_ns=max(stop - start - paused, 1),
        paused_ns=paused,
        recorded=min(n, cap),
        moves=moves,
        checks=checks,
        problems=problems,
        firsts=firsts,
    )
    results.send((meta, lat[: min(n, cap)].tobytes()))
    results.close()


def shares_for(nreaders: int, cts: list[Container]) -> list[list[tuple[list[str], int, int]]]:
    """Reader i reads from cgroups j with j % nreaders == i (when there are more cgroups
    than readers), else from cgroup i % ncgroups: every cgroup is used in every cell."""
    spec = [(ct.procs_files, ct.memory_limit, ct.expect_cpus) for ct in cts]
    if len(spec) > nreaders:
        return [spec[i :: nreaders] for i in range(nreaders)]
    return [[spec[i % len(spec)]] for i in range(nreaders)]


# --------------------------------------------------------------------------- cells


def run_cell(
    target: Target,
    fname: str,
    nreaders: int,
    cts: list[Container],
    args: argparse.Namespace,
    host_kb: int,
    rnd: int,
) -> dict:
    import numpy as np

    ctx = mp.get_context("fork")
    per_reader_max = 250_000 if nreaders <= 2 else max(30_000, 500_000 // nreaders)
    cap = int(args.duration * per_reader_max) + 10_000
    shares = shares_for(nreaders, cts)
    longest = max(len(s) for s in shares)
    # visit every cgroup of a share at least twice per cell, and at most every rotate_ms
    rotate_ns = int(min(args.rotate_ms / 1e3, args.duration / (2 * longest)) * 1e9)
    path = target.path(fname)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    conns = [ctx.Pipe(duplex=False) for _ in range(nreaders)]
    procs = [
        ctx.Process(
            target=reader_main,
            daemon=True,
            args=(
                i, shares[i], target.name, fname, path, args.duration, rotate_ns, cap, host_kb,
                ready_w, go_r, [ready_r, go_w], conns[i][1],
            ),
        )
        for i in range(nreaders)
    ]
    got: list[tuple[dict, bytes]] = []
    cpu0 = cpu1 = None
    wall = 0.0
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
                p.kill()  # our own reader, by its pid
                p.join(timeout=5)
        for r, _ in conns:
            r.close()

    metas = [m for m, _ in got]
    per_reader = [(np.frombuffer(b, dtype=np.int64), list(m.get("firsts", []))) for m, b in got]
    lats = np.concatenate([a for a, _ in per_reader]) if got else None
    ops = sum(int(m["ops"]) for m in metas)
    checks = sum(int(m.get("checks", 0)) for m in metas)
    ops_s = sum(int(m["ops"]) / (int(m["elapsed_ns"]) / 1e9) for m in metas)
    problems: list[str] = []
    for m in metas:
        if "setup_error" in m:
            problems.append(f"reader {m['idx']}: {m['setup_error']}")
        if "error" in m:
            problems.append(f"reader {m['idx']}: {m['error']}")
        problems += list(m.get("problems", []))  # type: ignore[call-overload]
    if len(metas) < nreaders:
        problems.append(f"only {len(metas)}/{nreaders} readers reported")
    cell: dict[str, object] = {
        "round": rnd,
        "target": target.name,
        "file": fname,
        "readers": nreaders,
        "cgroups": len(cts),
        "path": path,
        "ops": ops,
        "ops_per_s": ops_s,
        "wall_s": wall,
        "moves": sum(int(m.get("moves", 0)) for m in metas),
        "checks": checks,
        "paused_s": sum(int(m.get("paused_ns", 0)) for m in metas) / 1e9,
        "per_reader_ops": [int(m["ops"]) for m in sorted(metas, key=lambda m: int(m["idx"]))],
        "latencies_recorded": int(lats.size) if lats is not None else 0,
        "p50_us": None,
        "p99_us": None,
        "p999_us": None,
        "mean_us": None,
        "daemon_cpu_s": None,
        "daemon_cpu_s_per_1k": None,
        "check": "ok" if not problems else "MISMATCH",
        "problems": problems,
    }
    if lats is not None and lats.size:
        p50, p99, p999 = np.percentile(lats, [50, 99, 99.9]) / 1e3
        cell.update(p50_us=float(p50), p99_us=float(p99), p999_us=float(p999),
                    mean_us=float(lats.mean() / 1e3))
        # The first read after each move is the one a daemon that caches per container
        # pays its (re)load on: kept apart too, so a tail can be traced to it.
        first = np.concatenate([a[i] for a, i in per_reader])
        rest = np.concatenate([np.delete(a, i) for a, i in per_reader])
        if first.size:
            cell["first_after_move_p50_us"] = float(np.percentile(first, 50) / 1e3)
            cell["first_after_move_share"] = float(first.size / lats.size)
        if rest.size:
            cell["p99_without_first_after_move_us"] = float(np.percentile(rest, 99) / 1e3)
    if cpu0 is not None and cpu1 is not None:
        cpu_s = (cpu1 - cpu0) / CLK_TCK
        cell["daemon_cpu_s"] = cpu_s
        # the checked reads after moves are requests too
        cell["daemon_cpu_s_per_1k"] = cpu_s / (ops + checks) * 1000 if ops else None
    if problems:
        loud(f"CORRECTNESS/ERROR {target.name} {fname} readers={nreaders} cgroups={len(cts)}: "
             + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))
    return cell


# --------------------------------------------------------------------------- report

KEY = ("file", "readers", "cgroups")


def combine_rounds(cells: list[dict]) -> list[dict]:
    """One row per (target, file, readers, cgroups): the median over rounds of each figure
    (a single round is passed through)."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["target"], *(c[k] for k in KEY)), []).append(c)
    rows = []
    for cs in groups.values():
        row = dict(cs[0])
        row["rounds"] = len(cs)
        for k in ("ops_per_s", "p50_us", "p99_us", "p999_us", "mean_us", "daemon_cpu_s_per_1k",
                  "first_after_move_p50_us", "first_after_move_share",
                  "p99_without_first_after_move_us"):
            vals = [c[k] for c in cs if c.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
        row["ops_per_s_rounds"] = [c["ops_per_s"] for c in cs]
        row["ops"] = sum(c["ops"] for c in cs)
        row["checks"] = sum(c["checks"] for c in cs)
        row["problems"] = [p for c in cs for p in c["problems"]]
        row["check"] = "ok" if not row["problems"] else "MISMATCH"
        rows.append(row)
    return rows


def add_ratios(rows: list[dict]) -> None:
    by = {(r["target"], *(r[k] for k in KEY)): r for r in rows}
    for r in rows:
        k = tuple(r[x] for x in KEY)
        kern, lx = by.get(("kernel", *k)), by.get(("lxcfs", *k))

        def ratio(a: float | None, b: float | None) -> float | None:
            return a / b if a and b else None

        r["ratio_vs_lxcfs"] = ratio(r["ops_per_s"], lx["ops_per_s"]) if lx and lx is not r else None
        r["ratio_vs_kernel"] = (
            ratio(r["ops_per_s"], kern["ops_per_s"]) if kern and kern is not r else None
        )
        r["p99_vs_lxcfs"] = ratio(r["p99_us"], lx["p99_us"]) if lx and lx is not r else None


def _f(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def markdown_tables(rows: list[dict]) -> list[str]:
    out = []
    for ncg in sorted({r["cgroups"] for r in rows}):
        out += [f"### Readers spread over {ncg} cgroup{'s' * (ncg != 1)}", ""]
        head = ("| target | file | readers | ops/s | p50 µs | p99 µs | p99.9 µs "
                "| daemon CPU s / 1k ops | ops ÷ LXCFS | ops ÷ kernel | p99 ÷ LXCFS | check |")
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            if r["cgroups"] != ncg:
                continue
            out.append(
                f"| {r['target']} | {r['file']} | {r['readers']} | {r['ops_per_s']:,.0f} "
                f"| {_f(r['p50_us'], '.0f')} | {_f(r['p99_us'], '.0f')} "
                f"| {_f(r['p999_us'], '.0f')} | {_f(r['daemon_cpu_s_per_1k'], '.3f')} "
                f"| {_f(r['ratio_vs_lxcfs'], '.2f')} | {_f(r['ratio_vs_kernel'], '.3f')} "
                f"| {_f(r['p99_vs_lxcfs'], '.2f')} | {r['check']} |"
            )
        out.append("")
    return out


def first_read_table(rows: list[dict[str, Any]]) -> list[str]:
    """One-reader cells of the daemons: the first read after a move apart from the rest."""
    rs = [r for r in rows if r["readers"] == 1 and r["target"] != "kernel"
          and r.get("first_after_move_p50_us") is not None]
    if not rs:
        return []
    out = [
        "| target | file | cgroups | first read after a move: p50 µs | its share of ops "
        "| p99 µs | p99 µs without it |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rs:
        out.append(
            f"| {r['target']} | {r['file']} | {r['cgroups']} "
            f"| {_f(r['first_after_move_p50_us'], '.0f')} "
            f"| {_f(100 * r['first_after_move_share'], '.2f')} % | {_f(r['p99_us'], '.0f')} "
            f"| {_f(r.get('p99_without_first_after_move_us'), '.0f')} |"
        )
    return out


def ratio_table(rows: list[dict]) -> list[str]:
    cg = [r for r in rows if r["target"] == "cgprocfs"]
    if not cg:
        return []
    out = [
        "| file | readers | cgroups | cgprocfs/LXCFS ops/s | issue #5 asks | "
        "cgprocfs p99 ÷ LXCFS p99 (asks ≤ 1) | cgprocfs/kernel ops/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cg:
        asks = ISSUE5_MIN_RATIO.get(r["file"], ISSUE5_DEFAULT_RATIO)
        out.append(
            f"| {r['file']} | {r['readers']} | {r['cgroups']} | {_f(r['ratio_vs_lxcfs'], '.2f')} "
            f"| ≥ {asks:g} | {_f(r['p99_vs_lxcfs'], '.2f')} | {_f(r['ratio_vs_kernel'], '.3f')} |"
        )
    return out


COLORS = {"kernel": "#7f7f7f", "lxcfs": "#1f77b4", "cgprocfs": "#d62728"}


def write_charts(rows: list[dict], out: Path) -> list[str]:
    plt = pyplot()
    written = []
    targets = [t for t in ALL_TARGETS if any(r["target"] == t for r in rows)]
    by = {(r["target"], *(r[k] for k in KEY)): r for r in rows}
    for ncg in sorted({r["cgroups"] for r in rows}):
        groups = list(dict.fromkeys((r["file"], r["readers"]) for r in rows if r["cgroups"] == ncg))
        fig, axes = plt.subplots(2, 1, figsize=(max(9, 0.9 * len(groups) + 3), 8.5))
        width = 0.8 / max(1, len(targets))
        for ax, key, title in (
            (axes[0], "ops_per_s", "throughput, ops/s (log scale; higher is better)"),
            (axes[1], "p99_us", "p99 latency of one op, µs (log scale; lower is better)"),
        ):
            for ti, t in enumerate(targets):
                xs, ys = [], []
                for gi, (f, n) in enumerate(groups):
                    r = by.get((t, f, n, ncg))
                    if r and r.get(key):
                        xs.append(gi + (ti - (len(targets) - 1) / 2) * width)
                        ys.append(r[key])
                bars = ax.bar(xs, ys, width, label=t, color=COLORS.get(t))
                ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=6, rotation=90,
                             padding=2)
            ax.set_yscale("log")
            ax.set_xticks(range(len(groups)), [f"{f}\n{n} rdr" for f, n in groups], fontsize=8)
            ax.set_title(title, fontsize=10)
            ax.margins(y=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"open → read to EOF → close; readers spread over {ncg} cgroup(s)")
        name = f"chart-{ncg}cg.png"
        save_figure(fig, out / name)
        written.append(name)
    cg = [r for r in rows if r["target"] == "cgprocfs" and r.get("ratio_vs_lxcfs")]
    if cg:
        files = list(dict.fromkeys(r["file"] for r in cg))
        series = list(dict.fromkeys((r["readers"], r["cgroups"]) for r in cg))
        fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(files) + 3), 4.8))
        width = 0.8 / max(1, len(series))
        for si, (n, ncg) in enumerate(series):
            xs, ys = [], []
            for fi, f in enumerate(files):
                r = by.get(("cgprocfs", f, n, ncg))
                if r and r.get("ratio_vs_lxcfs"):
                    xs.append(fi + (si - (len(series) - 1) / 2) * width)
                    ys.append(r["ratio_vs_lxcfs"])
            bars = ax.bar(xs, ys, width, label=f"{n} readers / {ncg} cgroups")
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.5, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(files)), files)
        ax.set_ylabel("cgprocfs ops/s ÷ LXCFS ops/s")
        ax.set_title("cgprocfs/LXCFS throughput (1.0 = parity; dashed 1.5 = issue #5 meminfo aim)",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=3)
        ax.margins(y=0.2)
        save_figure(fig, out / "ratios.png")
        written.append("ratios.png")
    return written


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pre = ap.add_mutually_exclusive_group()
    pre.add_argument("--quick", dest="preset", action="store_const", const="quick",
                     help="small grid for smoke tests: " + str(PRESETS["quick"]))
    pre.add_argument("--issue5", dest="preset", action="store_const", const="issue5",
                     help="what issue #5's closing note needs: " + str(PRESETS["issue5"]))
    pre.add_argument("--full", dest="preset", action="store_const", const="full",
                     help="the default grid: " + str(PRESETS["full"]))
    ap.add_argument("--files", help=f"comma list, from: {','.join(ALL_FILES)}")
    ap.add_argument("--readers", help="comma list of reader-process counts")
    ap.add_argument("--cgroups", help="comma list of cgroup counts readers are spread over")
    ap.add_argument("--duration", type=float, help="timed seconds per cell")
    ap.add_argument("--rounds", type=int,
                    help="repeat the whole grid; rows show the median over rounds")
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma list, from: {','.join(ALL_TARGETS)}")
    ap.add_argument("--rotate-ms", type=float, default=20.0,
                    help="a reader with several cgroups moves to its next one this often "
                    "(or faster, so it visits each twice per cell)")
    add_run_args(ap, "bench")
    a = ap.parse_args(argv)
    a.preset = a.preset or "full"
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k) is None:
            setattr(a, k, v)

    def csv(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    a.files = csv(a.files)
    a.targets = csv(a.targets)
    for name, vals, known in (("file", a.files, ALL_FILES), ("target", a.targets, ALL_TARGETS)):
        bad = [v for v in vals if v not in known]
        if bad:
            ap.error(f"unknown {name}(s) {bad}; choose from {','.join(known)}")
    try:
        a.readers = [int(x) for x in csv(a.readers)]
        a.cgroups = [int(x) for x in csv(a.cgroups)]
    except ValueError:
        ap.error("--readers and --cgroups must be comma lists of integers")
    if min(a.readers + a.cgroups) < 1 or a.duration <= 0 or a.rounds < 1:
        ap.error("--readers, --cgroups, --duration and --rounds must be positive")
    return a


def estimate_s(args: argparse.Namespace) -> float:
    per_cell = sum(args.duration + 0.8 + 0.03 * n for n in args.readers)
    targets = len(args.targets)
    return args.rounds * len(args.cgroups) * len(args.files) * targets * per_cell


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root("bench")
    out = results_dir(args.out, "bench")
    install_stop_handlers()
    est = estimate_s(args)
    log(f"preset {args.preset}: files {args.files}, readers {args.readers}, cgroups "
        f"{args.cgroups}, {args.duration:g} s/cell, {args.rounds} round(s), targets "
        f"{args.targets}: about {est / 60:.1f} min")
    host_kb = host_memtotal_kb()
    cs = ContainerSet("bench", base_mib=args.base_mib, cpus=args.cpus or None,
                      resident=True)
    log(f"test cgroups: {cs.describe()}")
    workdir = Path(tempfile.mkdtemp(prefix="cgprocfs-bench-"))
    targets: list[Target] = []
    skipped: list[str] = []
    cells: list[dict] = []
    status = 0
    t_start = time.monotonic()
    try:
        cs.setup()
        all_cts = cs.create_many(max(args.cgroups))
        targets = start_targets(args.targets, workdir, out, skipped, args)
        for t in targets:
            for fname in args.files:
                if not t.serves(fname):
                    msg = f"{t.name} does not serve /proc/{fname}: skipped"
                    log(msg)
                    skipped.append(msg)
        for rnd in range(args.rounds):
            for ncg in args.cgroups:
                cts = all_cts[:ncg]
                for fname in args.files:
                    for n in args.readers:
                        for t in in_round_order(targets, rnd):
                            if not t.serves(fname):
                                continue
                            if not t.alive():
                                msg = (f"{t.name} died (status {t.proc.returncode}); "  # type: ignore[union-attr]
                                       f"{fname}/{n}/{ncg} skipped")
                                loud(msg)
                                skipped.append(msg)
                                continue
                            c = run_cell(t, fname, n, cts, args, host_kb, rnd)
                            log(f"round {rnd + 1} {ncg:>3} cg {fname:<8} {n:>2} rdr "
                                f"{t.name:<8} {c['ops_per_s']:>9,.0f} ops/s  p99 "
                                f"{_f(c['p99_us'], '.0f'):>6} µs  cpu/1k "
                                f"{_f(c['daemon_cpu_s_per_1k'], '.3f')}  {c['check']}")
                            cells.append(c)
    except Stop as e:
        loud(f"interrupted by signal {e.args[0]}; cleaning up")
        status = 130
    finally:
        stop_everything(targets, cs, workdir)

    rows = combine_rounds(cells)
    add_ratios(rows)
    daemon_errors = {t.name: t.log_errors() for t in targets}
    meta = run_meta() | {
        "preset": args.preset,
        "cgroup_version": cs.version,
        "cgroups_layout": cs.describe(),
        "memory_limit": f"{args.base_mib} + i % 128 MiB",
        "cpu_quota": args.cpus,
        "expect_cpus": cs.expect_cpus,
        "files": args.files,
        "readers": args.readers,
        "cgroups": args.cgroups,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "rotate_ms": args.rotate_ms,
        "targets": {t.name: {"version": t.version, "cmd": t.cmd} for t in targets},
        "skipped": skipped,
        "run_s": time.monotonic() - t_start,
        "loadavg_end": os.getloadavg(),
        "interrupted": status != 0,
        "daemon_log_errors": daemon_errors,
    }
    problems = [r for r in rows if r["check"] != "ok"]
    md = [
        f"# cgprocfs benchmark ({args.preset})",
        "",
        f"{meta['host']}, kernel {meta['kernel']}, {meta['cpus']} CPUs, cgroup v{cs.version}; "
        f"test cgroups: memory limit {args.base_mib} + i % 128 MiB, CFS quota "
        f"{args.cpus:g} CPU (views should show {cs.expect_cpus}), cpuset copied from the parent; "
        f"{args.duration:g} s per cell, {args.rounds} round(s) (median shown), "
        f"run took {meta['run_s'] / 60:.1f} min. Op = open → read to EOF (64 KiB buffer) → "
        "close.",
        "",
        "Targets: " + "; ".join(f"**{t.name}** {t.version}" for t in targets),
        "",
    ]
    if any(r["target"] == "cgprocfs" for r in rows):
        md += ["## Ratios", "", *ratio_table(rows), ""]
    md += ["## All cells", "", *markdown_tables(rows)]
    if first := first_read_table(rows):
        md += ["## One reader: the first read after a move", "",
               "The first read after a reader moves to another cgroup is timed like every "
               "other; a daemon that caches a container's placement (cgprocfs, for at most "
               "1 s) reloads it there. Shown apart so a tail can be traced to it.", "",
               *first, ""]
    if status:
        md += ["**Run interrupted by a signal: the tables are incomplete.**", ""]
    if skipped:
        md += ["Skipped:", "", *[f"- {s}" for s in skipped], ""]
    md += [f"Correctness: {sum(r['checks'] for r in rows):,} sampled responses checked "
           f"(first read and first read after every cgroup move), "
           f"{sum(len(r['problems']) for r in rows)} problems.", ""]
    if problems:
        md += ["**Correctness problems:**", ""]
        md += [f"- {r['target']} {r['file']} {r['readers']} rdr {r['cgroups']} cg: {p}"
               for r in problems for p in r["problems"][:10]]
        md += [""]
    for name, errs in daemon_errors.items():
        if errs:
            md += [f"**{name} logged {len(errs)} error line(s)**, first: `{errs[0][:200]}`", ""]
    md += ["Noise: ±25 % between runs is normal on this 2-CPU VM; compare only figures from "
           "one run, prefer the ratios.", ""]
    charts: list[str] = []
    if rows:
        try:
            charts = write_charts(rows, out)
        except Exception as e:
            loud(f"chart failed: {e}")
    md += [f"Charts: {', '.join(charts)}", ""] if charts else []
    (out / "results.md").write_text("\n".join(md))
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "cells": cells}, indent=2, default=str)
    )
    print("\n".join(md))
    print(f"results: {out}")
    if problems:
        loud(f"{len(problems)} row(s) with correctness problems; see results.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
