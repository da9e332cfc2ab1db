#!/usr/bin/env python3
"""`top`-like polling: what it costs the daemon when every container polls a few files
once a second.

Run as root:  .venv/bin/python benchmarks/poll.py [--cgroups 200] [--duration 60]

For each target in turn (LXCFS, cgprocfs), one poller process is placed in each of N
container-like cgroups; every --interval seconds (each at its own random phase) it opens,
reads to EOF and closes --files (default stat, meminfo, uptime, loadavg: what top reads
per refresh), checking every response. After a warm-up, the daemon's process-tree CPU time
is measured over --duration seconds: CPU % of one core. With --rounds N each target is
measured N times, the order of targets reversed every other round (so that a drift of the
machine's speed during the run favours neither), and the median is reported. Prints
figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import select
import signal
import sys
import tempfile
import time
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from pathlib import Path

from benchlib import (
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

TOP_FILES = "stat,meminfo,uptime,loadavg"


def poller_main(idx: int, ct: tuple[list[str], int, int], target: str, root: str,
                files: list[str], interval: float, mode: str, host_kb: int, ready_w: int,
                stop_r: int, unused: list[int], results: Connection, counter: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    for fd in unused:
        os.close(fd)
    procs_files, limit, cpus = ct
    paths = [os.path.join(root, "proc", f) for f in files]
    res: dict[str, object] = {"idx": idx, "polls": 0, "reads": 0, "errors": 0, "bad": 0}
    errs: list[str] = []
    lat: list[int] = []
    held: list[int] = []
    try:
        join(procs_files)
        if mode == "reread":
            held = [os.open(p, os.O_RDONLY) for p in paths]
    except OSError as e:
        errs.append(f"setup: {e}")
    os.write(ready_w, b"r")
    rng = random.Random(idx)
    nxt = time.monotonic() + rng.random() * interval
    pc = time.perf_counter_ns
    setup_failed = bool(errs)
    while not setup_failed:
        wait = nxt - time.monotonic()
        if wait > 0 and select.select([stop_r], [], [], wait)[0]:
            break  # the parent closed the pipe: stop
        if wait <= 0 and select.select([stop_r], [], [], 0)[0]:
            break
        nxt += interval
        res["polls"] = int(res["polls"]) + 1  # type: ignore[call-overload]
        for i, (fname, path) in enumerate(zip(files, paths, strict=True)):
            t0 = pc()
            try:
                if mode == "reread":  # procps-ng 4 top: keep the fd, pread from 0
                    fd, off, chunks = held[i], 0, []
                    while b := os.pread(fd, READ_BUF, off):
                        chunks.append(b)
                        off += len(b)
                else:
                    fd = os.open(path, os.O_RDONLY)
                    chunks = []
                    while b := os.read(fd, READ_BUF):
                        chunks.append(b)
                    os.close(fd)
            except OSError as e:
                res["errors"] = int(res["errors"]) + 1  # type: ignore[call-overload]
                if len(errs) < 5:
                    errs.append(f"{fname}: {e}")
                continue
            lat.append(pc() - t0)
            res["reads"] = int(res["reads"]) + 1  # type: ignore[call-overload]
            counter[idx] = res["reads"]  # type: ignore[index]
            p = check_content(target, fname, b"".join(chunks).decode("utf-8", "replace"),
                              limit, cpus, host_kb)
            if p:
                res["bad"] = int(res["bad"]) + 1  # type: ignore[call-overload]
                if len(errs) < 5:
                    errs.append(p)
    for fd in held:
        with contextlib.suppress(OSError):
            os.close(fd)
    res["problems"] = errs
    res["lat"] = lat
    results.send(res)
    results.close()


def run_target(t: Target, cts: list[Container], args: argparse.Namespace,
               host_kb: int) -> dict:
    ctx = mp.get_context("fork")
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    conns = [ctx.Pipe(duplex=False) for _ in cts]
    counter = ctx.RawArray("q", len(cts))  # reads so far, per poller (no lock: one writer)
    procs = [
        ctx.Process(
            target=poller_main,
            daemon=True,
            args=(i, (ct.procs_files, ct.memory_limit, ct.expect_cpus), t.name, t.root,
                  args.files, args.interval, args.mode, host_kb, ready_w, stop_r,
                  [ready_r, stop_w], conns[i][1], counter),
        )
        for i, ct in enumerate(cts)
    ]
    series: list[tuple[float, float]] = []
    got: list[dict] = []
    cpu_s = elapsed = 0.0
    measured_reads = 0
    try:
        for p in procs:
            p.start()
        for _, w in conns:
            w.close()
        os.close(ready_w)
        os.close(stop_r)
        ready, deadline = 0, time.monotonic() + 120
        while ready < len(procs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready}/{len(procs)} pollers got ready")
            if select.select([ready_r], [], [], 0.5)[0]:
                ready += len(os.read(ready_r, 4096))
        log(f"{t.name}: {len(procs)} pollers running; warm-up {args.warmup:g} s", "poll")
        time.sleep(args.warmup)
        pid = t.pid
        assert pid is not None
        tick0 = prev_tick = t.cpu_ticks() or 0
        reads0 = sum(counter)
        t0 = prev_t = time.monotonic()
        end = t0 + args.duration
        while (now := time.monotonic()) < end:
            time.sleep(min(1.0, end - now))
            tick, tn = t.cpu_ticks() or 0, time.monotonic()
            series.append((tn - t0, (tick - prev_tick) / CLK_TCK / (tn - prev_t) * 100))
            prev_tick, prev_t = tick, tn
        cpu_s = (prev_tick - tick0) / CLK_TCK
        elapsed = prev_t - t0
        measured_reads = sum(counter) - reads0
    except RuntimeError as e:
        loud(f"{t.name}: {e}")
    finally:
        for fd in (ready_r, stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)  # pollers see EOF on the stop pipe and report
        pending = [r for r, _ in conns]
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for r in mp_connection.wait(pending, timeout=1):
                pending.remove(r)  # type: ignore[arg-type]
                with contextlib.suppress(EOFError, OSError):
                    got.append(r.recv())  # type: ignore[union-attr]
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()  # our own poller, by its pid
                p.join(timeout=5)
        for r, _ in conns:
            r.close()
    lats = sorted(x for g in got for x in g["lat"])

    def pct(q: float) -> float | None:
        return lats[min(len(lats) - 1, int(q * len(lats)))] / 1e3 if lats else None

    reads = sum(int(g["reads"]) for g in got)
    return {
        "target": t.name,
        "version": t.version,
        "pollers": len(cts),
        "pollers_reported": len(got),
        "polls": sum(int(g["polls"]) for g in got),
        "reads": reads,
        "errors": sum(int(g["errors"]) for g in got),
        "bad_responses": sum(int(g["bad"]) for g in got),
        "problems": [p for g in got for p in g["problems"]][:20],
        "measured_s": elapsed,
        "daemon_cpu_s": cpu_s,
        "daemon_cpu_pct_of_one_core": cpu_s / elapsed * 100 if elapsed else None,
        "measured_reads": measured_reads,
        "reads_per_s": measured_reads / elapsed if elapsed else None,
        "cpu_ms_per_read": cpu_s * 1000 / measured_reads if measured_reads else None,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "series": series,
    }


def write_chart(results: list[dict], path: Path) -> None:
    plt = pyplot()
    colors = {"lxcfs": "#1f77b4", "cgprocfs": "#d62728"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        if r["series"]:
            xs, ys = zip(*r["series"], strict=True)
            ax.plot(xs, ys, label=f"{r['target']} (mean {r['daemon_cpu_pct_of_one_core']:.1f} %)",
                    color=colors.get(r["target"]))
    ax.axhline(25, color="black", lw=0.8, ls="--", label="25 % (issue #5 aim for cgprocfs)")
    ax.set_xlabel("seconds into the measurement")
    ax.set_ylabel("daemon CPU, % of one core (1 s samples)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"top-like polling: {results[0]['pollers']} containers x "
                 f"{results[0]['files']} every second", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cgroups", type=int, default=200, help="containers, one poller in each")
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds per target")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    ap.add_argument("--files", default=TOP_FILES)
    ap.add_argument("--mode", choices=("open", "reread"), default="open",
                    help="open: open/read/close each time (busybox, procps 3); reread: keep "
                    "the files open and pread from offset 0 (procps-ng 4 top)")
    ap.add_argument("--targets", default="lxcfs,cgprocfs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every target this many times (order alternating); the "
                    "median is reported")
    add_run_args(ap, "poll")
    a = ap.parse_args(argv)
    a.files = [f.strip() for f in a.files.split(",") if f.strip()]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    if "kernel" in a.targets:
        ap.error("the kernel has no daemon to measure")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    return a


def median_rows(results: list[dict]) -> list[dict]:
    """One row per target: the round with the median CPU (the lower middle one for an
    even count), with every round's CPU alongside."""
    rows = []
    for name in dict.fromkeys(r["target"] for r in results):
        mine = [r for r in results if r["target"] == name]
        ranked = sorted(mine, key=lambda r: r["daemon_cpu_pct_of_one_core"] or 0.0)
        row = dict(ranked[(len(ranked) - 1) // 2])
        row["rounds_cpu_pct"] = [r["daemon_cpu_pct_of_one_core"] for r in mine]
        row["reads"] = sum(r["reads"] for r in mine)
        row["errors"] = sum(r["errors"] for r in mine)
        row["bad_responses"] = sum(r["bad_responses"] for r in mine)
        row["problems"] = [p for r in mine for p in r["problems"]]
        row["log_errors"] = mine[-1]["log_errors"]  # the log is appended to each round
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root("poll")
    out = results_dir(args.out, "poll")
    install_stop_handlers()
    minutes = args.rounds * len(args.targets) * (args.duration + args.warmup + 10) / 60
    log(f"{args.cgroups} pollers x {args.files} every {args.interval:g} s, "
        f"{args.duration:g} s measured per target, targets {args.targets}, {args.rounds} "
        f"round(s): about {minutes:.1f} min", "poll")
    host_kb = host_memtotal_kb()
    cs = ContainerSet("poll", base_mib=args.base_mib, cpus=args.cpus or None,
                      resident=True)
    workdir = Path(tempfile.mkdtemp(prefix="cgprocfs-poll-"))
    skipped: list[str] = []
    results: list[dict] = []
    targets: list[Target] = []
    status = 0
    try:
        cs.setup()
        cts = cs.create_many(args.cgroups)
        unavailable: set[str] = set()
        # One daemon at a time: each measured alone, started afresh every round.
        order = [(rnd, name) for rnd in range(args.rounds)
                 for name in in_round_order(args.targets, rnd)]
        for rnd, name in order:
            if name in unavailable:
                continue
            ts = start_targets([name], workdir, out, skipped, args)
            if not ts:
                unavailable.add(name)
                continue
            t = ts[0]
            targets.append(t)
            try:
                missing = [f for f in args.files if not t.serves(f)]
                if missing:
                    skipped.append(f"{name} does not serve {missing}: skipped")
                    unavailable.add(name)
                    continue
                r = run_target(t, cts, args, host_kb)
                r["files"] = ",".join(args.files)
                r["round"] = rnd + 1
                r["log_errors"] = t.log_errors()
                results.append(r)
                log(f"{name} (round {rnd + 1}): {r['daemon_cpu_pct_of_one_core'] or 0:.1f} % "
                    f"of one core, {r['reads']:,} reads, {r['errors']} errors, "
                    f"{r['bad_responses']} bad", "poll")
            finally:
                t.stop()
    except Stop as e:
        loud(f"interrupted by signal {e.args[0]}; cleaning up")
        status = 130
    finally:
        stop_everything(targets, cs, workdir)

    runs, results = results, median_rows(results)
    md = [
        "# top-like polling cost",
        "",
        f"{args.cgroups} container-like cgroups (memory limit, 1-CPU quota), one poller each; "
        f"every {args.interval:g} s each reads {', '.join(args.files)} ({args.mode} mode); "
        f"daemon process-tree CPU over {args.duration:g} s after {args.warmup:g} s warm-up. "
        "Every response is checked (MemTotal = the poller's limit, CPU count = its quota).",
        "",
        f"{args.rounds} round(s), the order of targets reversed every other round; each row "
        "is the round with the median CPU, with reads, errors and wrong responses summed "
        "over all rounds.",
        "",
        "| target | daemon CPU, % of one core | every round | CPU ms per read | reads/s "
        "| p50 µs | p99 µs | reads | errors | wrong responses |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = (lambda v, f: "—" if v is None else format(v, f))  # noqa: E731
    for r in results:
        md.append(
            f"| {r['target']} | {fmt(r['daemon_cpu_pct_of_one_core'], '.1f')} "
            f"| {' / '.join(fmt(v, '.1f') for v in r['rounds_cpu_pct'])} "
            f"| {fmt(r['cpu_ms_per_read'], '.3f')} | {fmt(r['reads_per_s'], ',.0f')} "
            f"| {fmt(r['p50_us'], '.0f')} | {fmt(r['p99_us'], '.0f')} | {r['reads']:,} "
            f"| {r['errors']} | {r['bad_responses']} |"
        )
    md.append("")
    by = {r["target"]: r for r in results}
    if "lxcfs" in by and "cgprocfs" in by and by["lxcfs"]["daemon_cpu_pct_of_one_core"]:
        md += [f"cgprocfs CPU ÷ LXCFS CPU: {by['cgprocfs']['daemon_cpu_pct_of_one_core'] / by['lxcfs']['daemon_cpu_pct_of_one_core']:.2f} "  # noqa: E501
               "(issue #5 asks cgprocfs < 25 % of one core)", ""]
    for r in results:
        if r["problems"]:
            md += [f"**{r['target']} problems:** " + "; ".join(r["problems"][:5]), ""]
        if r["log_errors"]:
            md += [f"**{r['target']} logged {len(r['log_errors'])} error line(s)**", ""]
        if r["pollers_reported"] != r["pollers"]:
            md += [f"**{r['target']}: only {r['pollers_reported']}/{r['pollers']} pollers "
                   "reported**", ""]
    if skipped:
        md += ["Skipped:", "", *[f"- {s}" for s in skipped], ""]
    if status:
        md += ["**Run interrupted by a signal.**", ""]
    md += ["Targets: " + "; ".join(f"{r['target']} {r['version']}" for r in results), ""]
    if results and any(r["series"] for r in results):
        try:
            write_chart(results, out / "poll.png")
            md += ["Chart: poll.png", ""]
        except Exception as e:
            loud(f"chart failed: {e}")
    with open(out / "poll.csv", "w") as f:
        f.write("target,round,t_s,daemon_cpu_pct\n")
        for r in runs:
            for ts, v in r["series"]:
                f.write(f"{r['target']},{r['round']},{ts:.2f},{v:.2f}\n")
    meta = run_meta() | {"args": {k: str(v) for k, v in vars(args).items()},
                         "cgroups_layout": cs.describe(), "skipped": skipped,
                         "interrupted": status != 0}
    (out / "poll.md").write_text("\n".join(md))
    (out / "poll.json").write_text(json.dumps({"meta": meta, "results": results,
                                               "runs": runs}, indent=2))
    print("\n".join(md))
    print(f"results: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
