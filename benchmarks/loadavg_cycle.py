"""Cost of one loadavg sampling cycle with many tracked cgroups.

usage (root): python benchmarks/loadavg_cycle.py [--cgroups 300] [--cycles 5]

Creates N cgroups (beneath this process's own, in the CPU accounting hierarchy), each
holding one sleeping process, lets the daemon's LoadTracker track
them all (as if each had been read), then times sampling cycles: CPU seconds per cycle.
Prints figures only. Removes every cgroup and process it made.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import make_container

from cgprocfs.cgroups import load_layout
from cgprocfs.loadavg import LoadTracker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cgroups", type=int, default=300)
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    layout = load_layout()
    acct = layout.for_controller("cpuacct") or layout.for_controller("cpu")
    assert acct is not None
    procs: list[subprocess.Popen[bytes]] = []
    contexts = []
    tracker = LoadTracker()
    try:
        for _ in range(args.cgroups):
            cm = make_container()
            ct = cm.__enter__()
            contexts.append(cm)
            p = subprocess.Popen(["sh", "-c", " && ".join(
                f"echo $$ > {f}" for f in ct.procs_files) + " && exec sleep 600"])
            procs.append(p)
            d = ct.dirs["cpuacct"] if "cpuacct" in ct.dirs else ct.dirs["cpu"]
            tracker.read(str(d), acct.version)
        time.sleep(0.5)
        cpu = []
        for _ in range(args.cycles):
            n = tracker.sample()
            cpu.append(tracker.last_cycle_cpu)
        print(f"{n} cgroups tracked, {len(procs)}"
              f" processes; one sampling cycle: min {min(cpu)*1000:.1f} ms, "
              f"median {sorted(cpu)[len(cpu)//2]*1000:.1f} ms, max {max(cpu)*1000:.1f} ms CPU")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
        for cm in reversed(contexts):
            cm.__exit__(None, None, None)


if __name__ == "__main__":
    main()
