#!/usr/bin/env python3
"""Endurance run: many opens across container cgroups that come and go, watching the
daemon's memory and open file descriptors.

Run as root:  benchmarks/soak [--opens 1000000] [--cgroups 200] [--readers 8]

--readers processes loop open -> read to EOF -> close over --files, each moving itself to a
random live cgroup every --move-every ops. Every --churn-every seconds --churn of the
--cgroups live container cgroups are replaced by new ones (new names, new memory limits);
the old ones are removed once their readers have left. Every --verify-every ops a reader
reads every file once more and checks it against its own cgroup (MemTotal = its memory
limit, CPU count = its quota). Once a second the daemon's process tree is sampled (RSS,
PSS, USS, open fds, CPU). Until --opens opens have been made. Prints figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import re
import select
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from benchlib import (
    CLK_TCK,
    READ_BUF,
    Container,
    ContainerSet,
    MiB,
    Stop,
    Target,
    add_run_args,
    check_content,
    host_memtotal_kb,
    install_stop_handlers,
    limit_for,
    log,
    loud,
    pyplot,
    require_root,
    results_dir,
    run_meta,
    save_figure,
    start_targets,
    stop_everything,
    tree_sample,
)

FILES = "meminfo,stat,uptime,loadavg,cpuinfo,vmstat"
# counters per reader in the shared array
OPS, ERRORS, VERIFIED, BAD, MOVES = range(5)
NC = 5


def reader_main(idx: int, parents: list[str], slots: object, counters: object, stop: object,
                target: str, root: str, files: list[str], move_every: int, verify_every: int,
                base_mib: int, expect_cpus: int, host_kb: int, ready_w: int,
                results: Connection) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    rng = random.Random(idx * 7919)
    paths = [os.path.join(root, "proc", f) for f in files]
    nf = len(files)
    base = idx * NC
    errs: list[str] = []
    ncg = len(slots)  # type: ignore[arg-type]
    o, r, c, rd, buf = os.open, os.read, os.close, os.O_RDONLY, READ_BUF

    def move() -> int:
        while True:
            cid = slots[rng.randrange(ncg)]  # type: ignore[index]
            try:
                for p in parents:
                    fd = os.open(f"{p}/c{cid}/cgroup.procs", os.O_WRONLY)
                    try:
                        os.write(fd, b"0")
                    finally:
                        os.close(fd)
                return int(cid)
            except OSError:
                continue  # removed meanwhile (being retired): pick another

    cur = move()
    os.write(ready_w, b"r")
    ops = errors = verified = bad = moves = 0
    while not stop[0]:  # type: ignore[index]
        for _ in range(move_every):
            ops += 1
            if ops % verify_every == 0:  # sampled verification: every file, checked
                limit = limit_for(cur, base_mib)
                for fname, path in zip(files, paths, strict=True):
                    try:
                        fd = o(path, rd)
                        data = b""
                        while b := r(fd, buf):
                            data += b
                        c(fd)
                    except OSError as e:
                        errors += 1
                        if len(errs) < 10:
                            errs.append(f"{fname} in c{cur}: {type(e).__name__}: {e}")
                        continue
                    verified += 1
                    p = check_content(target, fname, data.decode("utf-8", "replace"), limit,
                                      expect_cpus, host_kb)
                    if p:
                        bad += 1
                        if len(errs) < 10:
                            errs.append(f"c{cur} (limit {limit // MiB} MiB): {p}")
                ops += nf - 1
                continue
            try:
                fd = o(paths[ops % nf], rd)
                while r(fd, buf):
                    pass
                c(fd)
            except OSError as e:
                errors += 1
                if len(errs) < 10:
                    errs.append(f"{files[ops % nf]} in c{cur}: {type(e).__name__}: {e}")
        cur = move()
        moves += 1
        counters[base + OPS] = ops  # type: ignore[index]
        counters[base + ERRORS] = errors  # type: ignore[index]
        counters[base + VERIFIED] = verified  # type: ignore[index]
        counters[base + BAD] = bad  # type: ignore[index]
        counters[base + MOVES] = moves  # type: ignore[index]
    results.send({"idx": idx, "ops": ops, "errors": errors, "verified": verified, "bad": bad,
                  "moves": moves, "problems": errs})
    results.close()


def write_plot(rows: list[dict], path: Path, mark: int) -> None:
    plt = pyplot()
    x = [r["opens"] / 1e6 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(x, [r["rss_kib"] / 1024 for r in rows], label="RSS (sum over processes)")
    axes[0].plot(x, [r["pss_kib"] / 1024 for r in rows], label="PSS (sum)")
    axes[0].plot(x, [r["uss_kib"] / 1024 for r in rows], label="USS (sum)")
    axes[0].set_ylabel("daemon memory, MiB")
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [r["fds"] for r in rows], color="#2ca02c", label="open fds (all processes)")
    axes[1].plot(x, [r["live_cgroups"] for r in rows], color="#9467bd", lw=0.8,
                 label="live test cgroups")
    axes[1].set_ylabel("count")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    axes[2].plot(x, [r["opens_per_s"] for r in rows], color="#7f7f7f")
    axes[2].set_ylabel("opens/s")
    axes[2].set_xlabel("opens so far, millions")
    axes[2].set_ylim(bottom=0)
    for ax in axes:
        ax.axvline(mark / 1e6, color="black", lw=0.8, ls="--")
    fig.suptitle(f"soak: daemon memory and fds over {rows[-1]['opens']:,} opens "
                 f"(dashed: {mark:,}th open)", fontsize=10)
    save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--opens", type=int, default=1_000_000, help="stop after this many opens")
    ap.add_argument("--cgroups", type=int, default=200, help="live container cgroups")
    ap.add_argument("--readers", type=int, default=8, help="reader processes")
    ap.add_argument("--files", default=FILES)
    ap.add_argument("--churn-every", type=float, default=2.0, help="seconds between churns")
    ap.add_argument("--churn", type=int, default=10, help="cgroups replaced per churn")
    ap.add_argument("--move-every", type=int, default=200, help="ops between moves")
    ap.add_argument("--verify-every", type=int, default=1000, help="ops between verifications")
    ap.add_argument("--mark", type=int, default=100_000,
                    help="memory/fd growth is measured from this open on")
    ap.add_argument("--max-minutes", type=float, default=120.0, help="stop early after this")
    ap.add_argument("--target", choices=("cgprocfs", "lxcfs"), default="cgprocfs")
    add_run_args(ap, "soak")
    a = ap.parse_args(argv)
    a.files = [f.strip() for f in a.files.split(",") if f.strip()]
    if min(a.opens, a.cgroups, a.readers, a.move_every, a.verify_every) < 1 or a.churn < 0:
        ap.error("counts must be positive")
    a.churn = min(a.churn, a.cgroups)
    return a


def sample_row(t: Target, t0: float, counters: object, nreaders: int, cs: ContainerSet,
               created: int, removed: int, prev: dict | None) -> dict:
    s = tree_sample(t.pid) if t.pid else None
    tot = [sum(counters[i * NC + k] for i in range(nreaders)) for k in range(NC)]  # type: ignore[index]
    now = time.monotonic() - t0
    row = {
        "t_s": round(now, 2),
        "opens": tot[OPS],
        "opens_per_s": 0.0,
        "errors": tot[ERRORS],
        "verified": tot[VERIFIED],
        "verify_failures": tot[BAD],
        "moves": tot[MOVES],
        "live_cgroups": len(cs.live),
        "created": created,
        "removed": removed,
        "daemon_procs": s.nprocs if s else 0,
        "daemon_threads": s.nthreads if s else 0,
        "rss_kib": s.rss // 1024 if s else 0,
        "pss_kib": s.pss // 1024 if s else 0,
        "uss_kib": s.uss // 1024 if s else 0,
        "fds": s.fds if s else 0,
        "cpu_s": round(s.cpu_ticks / CLK_TCK, 2) if s else 0,
    }
    if prev and now > prev["t_s"]:
        row["opens_per_s"] = round((row["opens"] - prev["opens"]) / (now - prev["t_s"]), 1)
    return row


def _fd_spread(fds: list[int]) -> dict[str, float]:
    """Open fds after the mark: their range, and whether they trend (the mean of the last
    quarter of the samples minus that of the first): a bounded set that follows the
    containers in use moves up and down, growth shows as a trend."""
    if not fds:
        return {}
    q = max(1, len(fds) // 4)
    return {"fds_after_mark_min": min(fds), "fds_after_mark_max": max(fds),
            "fds_trend": sum(fds[-q:]) / q - sum(fds[:q]) / q}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_root("soak")
    out = results_dir(args.out, "soak")
    install_stop_handlers()
    host_kb = host_memtotal_kb()
    cs = ContainerSet("soak", base_mib=args.base_mib, cpus=args.cpus or None)
    workdir = Path(tempfile.mkdtemp(prefix="cgprocfs-soak-"))
    skipped: list[str] = []
    targets: list[Target] = []
    rows: list[dict] = []
    reports: list[dict] = []
    status = 0
    stop_reason = ""
    created = removed = forced = 0
    ctx = mp.get_context("fork")
    procs: list[mp.process.BaseProcess] = []
    conns: list[tuple[Connection, Connection]] = []
    stop = ctx.RawArray("b", 1)
    t0 = time.monotonic()
    try:
        cs.setup()
        cs.create_many(args.cgroups)
        created = args.cgroups
        next_id = args.cgroups
        slots = ctx.RawArray("q", list(range(args.cgroups)))
        targets = start_targets([args.target], workdir, out, skipped, args)
        if not targets:
            raise SystemExit(f"soak: {args.target} did not start: {skipped}")
        t = targets[0]
        files = [f for f in args.files if t.serves(f)]
        if files != args.files:
            skipped.append(f"{t.name} does not serve {sorted(set(args.files) - set(files))}")
        counters = ctx.RawArray("q", args.readers * NC)
        ready_r, ready_w = os.pipe()
        parents = [str(p) for p in cs.parents]
        for i in range(args.readers):
            rc, wc = ctx.Pipe(duplex=False)
            conns.append((rc, wc))
            p = ctx.Process(
                target=reader_main, daemon=True,
                args=(i, parents, slots, counters, stop, t.name, t.root, files, args.move_every,
                      args.verify_every, args.base_mib, cs.expect_cpus, host_kb, ready_w, wc),
            )
            p.start()
            wc.close()
            procs.append(p)
        os.close(ready_w)
        ready, deadline = 0, time.monotonic() + 60
        while ready < args.readers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready}/{args.readers} readers got ready")
            if select.select([ready_r], [], [], 0.5)[0]:
                ready += len(os.read(ready_r, 4096))
        os.close(ready_r)
        log(f"{args.readers} readers over {args.cgroups} live cgroups; churn {args.churn} every "
            f"{args.churn_every:g} s; target {args.opens:,} opens", "soak")
        t0 = time.monotonic()
        retiring: list[tuple[float, Container]] = []
        rng = random.Random(1)
        next_sample, next_churn, next_log = t0, t0 + args.churn_every, t0 + 30
        deadline = t0 + args.max_minutes * 60
        while True:
            now = time.monotonic()
            if now >= next_sample:
                rows.append(sample_row(t, t0, counters, args.readers, cs, created, removed,
                                       rows[-1] if rows else None))
                next_sample += 1.0
                if rows[-1]["opens"] >= args.opens:
                    stop_reason = f"{args.opens:,} opens reached"
                    break
            if now >= next_log:
                r = rows[-1]
                log(f"{r['opens']:,} opens ({r['opens_per_s']:,.0f}/s), RSS "
                    f"{r['rss_kib'] / 1024:.1f} MiB, fds {r['fds']}, errors {r['errors']}, "
                    f"bad {r['verify_failures']}, cgroups created {created} removed {removed}",
                    "soak")
                next_log += 30
            if now >= deadline:
                stop_reason = f"--max-minutes {args.max_minutes:g} reached"
                break
            if not t.alive():
                stop_reason = f"daemon died (status {t.proc.returncode})"  # type: ignore[union-attr]
                loud(stop_reason)
                break
            if any(not p.is_alive() for p in procs):
                stop_reason = "a reader died"
                loud(stop_reason)
                break
            if args.churn and now >= next_churn:
                for slot in rng.sample(range(args.cgroups), args.churn):
                    old = cs.live[slots[slot]]
                    cs.create(next_id)
                    slots[slot] = next_id
                    next_id += 1
                    created += 1
                    retiring.append((now, old))
                next_churn += args.churn_every
            keep = []
            for since, ct in retiring:
                if cs.try_remove(ct):
                    removed += 1
                elif now - since > 60:
                    loud(f"cgroup c{ct.cg_id} still busy after 60 s; moving its processes out")
                    cs.force_remove(ct)
                    forced += 1
                else:
                    keep.append((since, ct))
            retiring = keep
            time.sleep(0.05)
    except Stop as e:
        loud(f"interrupted by signal {e.args[0]}; cleaning up")
        status = 130
        stop_reason = f"signal {e.args[0]}"
    except RuntimeError as e:
        loud(str(e))
        status = 1
        stop_reason = str(e)
    finally:
        stop[0] = 1
        for rc, _ in conns:
            with contextlib.suppress(EOFError, OSError):
                if rc.poll(30):
                    reports.append(rc.recv())
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()  # our own reader, by its pid
                p.join(timeout=5)
        stop_everything(targets, cs, workdir)

    total_opens = sum(int(r["ops"]) for r in reports) or (rows[-1]["opens"] if rows else 0)
    errors = sum(int(r["errors"]) for r in reports)
    verified = sum(int(r["verified"]) for r in reports)
    bad = sum(int(r["bad"]) for r in reports)
    problems = [p for r in reports for p in r["problems"]]
    log_errors = targets[0].log_errors() if targets else []
    served = None
    if targets and targets[0].logfile and targets[0].logfile.exists():
        m = re.findall(r"(\d+) opens served, (\d+) errors", targets[0].logfile.read_text())
        served = [tuple(map(int, x)) for x in m] or None
    at_mark = next((r for r in rows if r["opens"] >= args.mark), None)
    last = rows[-1] if rows else None
    first = rows[0] if rows else None
    summary: dict[str, object] = {
        "target": targets[0].name if targets else args.target,
        "version": targets[0].version if targets else "",
        "stop_reason": stop_reason,
        "duration_s": last["t_s"] if last else 0,
        "opens": total_opens,
        "readers_reported": len(reports),
        "cgroups_live": args.cgroups,
        "cgroups_created": created,
        "cgroups_removed": removed,
        "cgroups_forced_out": forced,
        "errors": errors,
        "verified_responses": verified,
        "verification_failures": bad,
        "problems": problems[:30],
        "daemon_log_error_lines": len(log_errors),
        "daemon_log_errors": log_errors[:10],
        "daemon_says_opens_errors": served,
    }
    if at_mark and last:
        for k in ("rss_kib", "pss_kib", "uss_kib"):
            summary[f"{k}_at_mark"] = at_mark[k]
            summary[f"{k}_end"] = last[k]
            summary[f"{k[:3]}_growth_mib"] = round((last[k] - at_mark[k]) / 1024, 2)
        summary.update(mark=args.mark, opens_at_mark_sample=at_mark["opens"],
                       fds_start=first["fds"] if first else None, fds_at_mark=at_mark["fds"],
                       fds_end=last["fds"], fds_max=max(r["fds"] for r in rows),
                       fds_growth=last["fds"] - at_mark["fds"],
                       **_fd_spread([r["fds"] for r in rows if r["opens"] >= at_mark["opens"]]),
                       daemon_procs_end=last["daemon_procs"],
                       daemon_cpu_s=last["cpu_s"] - (first["cpu_s"] if first else 0),
                       mean_opens_per_s=round(last["opens"] / last["t_s"], 1) if last["t_s"] else 0)
    with open(out / "soak.csv", "w") as f:
        if rows:
            f.write(",".join(rows[0]) + "\n")
            for r in rows:
                f.write(",".join(str(v) for v in r.values()) + "\n")

    def g(k: str, fmt: str = "") -> str:
        v = summary.get(k)
        return "—" if v is None else format(v, fmt)

    md = [
        f"# soak: {summary['target']} ({summary['version']})",
        "",
        f"{args.readers} readers, open → read to EOF → close over {', '.join(files if targets else args.files)}; "  # noqa: E501
        f"{args.cgroups} live container-like cgroups (memory limit {args.base_mib} + id % 128 MiB, "
        f"{args.cpus:g}-CPU quota), {args.churn} replaced every {args.churn_every:g} s; readers "
        f"move to a random live cgroup every {args.move_every} ops; every {args.verify_every} "
        "ops a reader reads every file once more and checks it against its own cgroup.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| stopped because | {stop_reason} |",
        f"| duration | {g('duration_s', '.0f')} s |",
        f"| opens | {total_opens:,} (mean {g('mean_opens_per_s', ',.0f')}/s) |",
        f"| cgroups created (incl. the {args.cgroups} at the start) / removed during the run "
        f"| {created} / {removed} (forced out: {forced}) |",
        f"| errors (failed open/read/close) | {errors} |",
        f"| verified responses / wrong for their caller | {verified:,} / {bad} |",
        f"| daemon RSS (sum over its processes) at open #{g('opens_at_mark_sample', ',')} → end "
        f"| {g('rss_kib_at_mark', ',')} KiB → {g('rss_kib_end', ',')} KiB: "
        f"**{g('rss_growth_mib', '+.2f')} MiB** (issue #5 asks < 5 MiB) |",
        f"| daemon PSS (sum) at mark → end | {g('pss_kib_at_mark', ',')} KiB → "
        f"{g('pss_kib_end', ',')} KiB: {g('pss_growth_mib', '+.2f')} MiB |",
        f"| daemon USS (sum) at mark → end | {g('uss_kib_at_mark', ',')} KiB → "
        f"{g('uss_kib_end', ',')} KiB: {g('uss_growth_mib', '+.2f')} MiB |",
        f"| daemon open fds: start / at mark / end / max | {g('fds_start')} / {g('fds_at_mark')} "
        f"/ {g('fds_end')} / {g('fds_max')} (growth from mark: **{g('fds_growth', '+d')}**) |",
        f"| daemon open fds after the mark: min / max; mean of the last quarter minus the first "
        f"(each worker keeps up to `kept_files` files open, 2,048 by default, closed after "
        f"5 s unused) | "
        f"{g('fds_after_mark_min')} / {g('fds_after_mark_max')}; "
        f"**{g('fds_trend', '+.0f')}** |",
        f"| daemon processes at the end | {g('daemon_procs_end')} |",
        f"| daemon CPU seconds | {g('daemon_cpu_s', '.1f')} |",
        f"| daemon log error lines | {len(log_errors)} |",
        "",
    ]
    if problems:
        md += ["**Problems (first ones):**", "", *[f"- {p}" for p in problems[:15]], ""]
    if skipped:
        md += ["Skipped:", "", *[f"- {s}" for s in skipped], ""]
    if rows:
        try:
            write_plot(rows, out / "soak.png", args.mark)
            md += ["Plot: soak.png; samples: soak.csv (one row a second)", ""]
        except Exception as e:
            loud(f"plot failed: {e}")
    meta = run_meta() | {"args": {k: str(v) for k, v in vars(args).items()},
                         "cgroups_layout": cs.describe()}
    (out / "soak.md").write_text("\n".join(md))
    (out / "soak.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    print("\n".join(md))
    print(f"results: {out}")
    if errors or bad:
        loud(f"{errors} errors, {bad} wrong responses; see soak.md")
    return status


if __name__ == "__main__":
    sys.exit(main())
