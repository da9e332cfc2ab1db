"""sysinfo(2) latency through the agent against the native call, and the agent's CPU.

usage (root): python benchmarks/sysinfo_bench.py [--calls 20000] [--max-age 0.05 0]

For each --max-age (how long the agent reuses one container's figures; 0 = a fresh
snapshot per call) it starts a private agent, makes a 256 MiB test cgroup (memory, cpu,
cpuacct), runs a Python caller there attached with `cgprocfs exec`, and times each
sysinfo() from the caller's side (ctypes, perf_counter_ns). The native row is the same
loop in this process, unfiltered. Agent CPU is utime+stime of the agent process over the
caller's run, per 1,000 calls. Prints a table; cleans up its cgroups and processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support import make_container, stop_process  # noqa: E402

from cgprocfs.sysinfo.oci import reachable  # noqa: E402

LOOP = r"""
import ctypes, json, struct, sys, time
n = int(sys.argv[1])
f = ctypes.CDLL(None).sysinfo
buf = ctypes.create_string_buffer(112)
for _ in range(500):
    f(buf)
pc = time.perf_counter_ns
lat = []
for _ in range(n):
    t = pc(); r = f(buf); lat.append(pc() - t)
    if r != 0:
        raise SystemExit("sysinfo failed")
lat.sort()
print(json.dumps({"p50": lat[n // 2] / 1000, "p99": lat[n * 99 // 100] / 1000,
                  "totalram": struct.unpack_from("<Q", buf.raw, 32)[0]}))
"""

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def loop(calls: int, prefix: list[str]) -> dict[str, float]:
    out = subprocess.run([*prefix, sys.executable, "-c", LOOP, str(calls)],
                         capture_output=True, text=True, check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def through_agent(calls: int, max_age: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="cgprocfs-sibench-"))
    sock = tmp / "seccomp.sock"
    with open(tmp / "agent.log", "wb") as logf:
        agent = subprocess.Popen(
            [sys.executable, "-m", "cgprocfs", "sysinfo-agent", "--socket", str(sock),
             "--values-max-age", str(max_age)],
            stdout=logf, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not reachable(str(sock)):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((tmp / "agent.log").read_text())
            time.sleep(0.05)
        with make_container(memory=256 << 20) as ct:
            join = " && ".join(f"echo $$ > {p}" for p in ct.procs_files)
            prefix = ["sh", "-c", f'{join} && exec "$@"', "sh", sys.executable, "-m",
                      "cgprocfs", "exec", "--require", "--socket", str(sock), "--"]
            before = cpu_seconds(agent.pid)
            res = loop(calls, prefix)
            res["cpu_ms_per_1k"] = (cpu_seconds(agent.pid) - before) * 1000 / (calls + 500) \
                * 1000
            return res
    finally:
        stop_process(agent)
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--max-age", type=float, nargs="+", default=[0.05, 0.0])
    args = ap.parse_args()
    native = loop(args.calls, [])
    print(f"{args.calls} sysinfo() calls per row, timed by the caller (Python ctypes)")
    print("| path | p50 µs | p99 µs | agent CPU ms / 1,000 calls | totalram |")
    print("|---|---|---|---|---|")
    print(f"| native (host answer) | {native['p50']:.1f} | {native['p99']:.1f} | - | "
          f"{native['totalram']} |")
    for age in args.max_age:
        r = through_agent(args.calls, age)
        print(f"| agent, figures reused {age * 1000:g} ms | {r['p50']:.1f} | {r['p99']:.1f} "
              f"| {r['cpu_ms_per_1k']:.1f} | {r['totalram']} |")


if __name__ == "__main__":
    main()
