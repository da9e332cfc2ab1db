"""The benchmarks run end to end against real mounts (kernel, LXCFS, cgprocfs) with tiny
parameters: they complete, write their files with the expected rows and ratios, find no
errors and no wrong responses, and leave no cgroup or mount behind. No timing is asserted:
the figures are only printed."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
CGPROCFS = ["--cgprocfs-rev", "worktree"]  # the code of this checkout, as the other tests


@pytest.fixture(scope="module")
def lxcfs(root_fuse: None) -> str:
    path = shutil.which("lxcfs") or ("/usr/bin/lxcfs" if Path("/usr/bin/lxcfs").exists() else "")
    if not path:
        print("lxcfs is not installed (Debian package lxcfs): benchmark tests skipped")
        pytest.skip("lxcfs is not installed (apt-get install lxcfs)")
    return path


def bench_mounts() -> set[str]:
    out = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4]
        if mnt.startswith("/tmp/cgprocfs-") and ("lxcfs-mnt" in mnt or "cgprocfs-mnt" in mnt):
            out.add(mnt)
    return out


def run(argv: list[str], out: Path, *args: str, timeout: float = 120) -> None:
    """Run a benchmark; it must succeed and leave no cgroup and no mount of its own."""
    before = bench_mounts()
    proc = subprocess.Popen([*argv, "--out", str(out), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.terminate()  # it cleans up on SIGTERM
            proc.communicate(timeout=60)
    print(stdout[-3000:])
    print(stderr[-3000:], file=sys.stderr)
    assert proc.returncode == 0, f"{argv} exited with {proc.returncode}:\n{stderr[-2000:]}"
    left = [str(p) for p in Path("/sys/fs/cgroup").rglob(f"cgprocfs-*-{proc.pid}")]
    assert not left, f"cgroups left behind: {left}"
    assert not bench_mounts() - before, f"mounts left behind: {bench_mounts() - before}"


def test_bench_quick(lxcfs: str, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    run([sys.executable, str(BENCH / "bench.py")], out, "--quick", "--duration", "0.3",
        "--lxcfs-bin", lxcfs, *CGPROCFS)
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    want = {(t, f, n, c) for t in ("kernel", "lxcfs", "cgprocfs") for f in ("meminfo", "stat")
            for n in (1, 4) for c in (1, 6)}
    assert {(r["target"], r["file"], r["readers"], r["cgroups"]) for r in rows} == want
    for r in rows:
        assert r["check"] == "ok", r["problems"]
        assert r["ops"] > 0 and r["p50_us"] is not None and r["p99_us"] is not None
        if r["target"] == "cgprocfs":
            assert r["ratio_vs_lxcfs"] is not None and r["ratio_vs_kernel"] is not None
            assert r["p99_vs_lxcfs"] is not None
        if r["target"] != "kernel":
            assert r["daemon_cpu_s_per_1k"] is not None
    # readers spread over 6 cgroups with fewer readers move between them, checked each time
    assert all(r["moves"] > 0 for r in rows if r["cgroups"] == 6 and r["readers"] == 1)
    assert data["meta"]["targets"]["lxcfs"]["cmd"][:4] == [lxcfs, "-f", "-l", "--enable-cfs"]
    md = (out / "results.md").read_text()
    assert "cgprocfs/LXCFS" in md and "| cgprocfs | meminfo | 4 |" in md
    assert ", 0 problems." in md
    for png in ("chart-1cg.png", "chart-6cg.png", "ratios.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_poll(lxcfs: str, tmp_path: Path) -> None:
    out = tmp_path / "poll"
    run([sys.executable, str(BENCH / "poll.py")], out, "--cgroups", "4", "--duration", "2",
        "--warmup", "0.5", "--rounds", "2", "--lxcfs-bin", lxcfs, *CGPROCFS)
    doc = json.loads((out / "poll.json").read_text())
    # Every other round in reverse order; one summary row per target.
    assert [(r["target"], r["round"]) for r in doc["runs"]] == [
        ("lxcfs", 1), ("cgprocfs", 1), ("cgprocfs", 2), ("lxcfs", 2)]
    results = doc["results"]
    assert [r["target"] for r in results] == ["lxcfs", "cgprocfs"]
    for r in doc["runs"]:
        assert r["pollers_reported"] == 4
        assert r["reads"] > 0 and r["measured_reads"] > 0
        assert r["errors"] == 0 and r["bad_responses"] == 0, r["problems"]
        assert r["daemon_cpu_pct_of_one_core"] is not None
        assert not r["log_errors"]
    for r in results:
        runs = [x for x in doc["runs"] if x["target"] == r["target"]]
        assert r["rounds_cpu_pct"] == [x["daemon_cpu_pct_of_one_core"] for x in runs]
        assert r["daemon_cpu_pct_of_one_core"] == min(r["rounds_cpu_pct"])  # lower middle
        assert r["reads"] == sum(x["reads"] for x in runs)
    assert "| cgprocfs |" in (out / "poll.md").read_text()
    assert (out / "poll.png").read_bytes()[:4] == b"\x89PNG"


def test_soak(root_fuse: None, tmp_path: Path) -> None:
    out = tmp_path / "soak"
    run([str(BENCH / "soak")], out, "--opens", "8000", "--cgroups", "6", "--readers", "2",
        "--churn-every", "0.3", "--churn", "2", "--move-every", "50", "--verify-every", "200",
        "--mark", "2000", *CGPROCFS)
    s = json.loads((out / "soak.json").read_text())["summary"]
    assert s["opens"] >= 8000
    assert s["errors"] == 0 and s["verification_failures"] == 0, s["problems"]
    assert s["verified_responses"] > 0
    assert s["cgroups_removed"] > 0 and s["cgroups_forced_out"] == 0
    assert s["readers_reported"] == 2
    assert s["daemon_log_error_lines"] == 0
    for k in ("rss_kib_at_mark", "rss_kib_end", "rss_growth_mib", "fds_at_mark", "fds_end"):
        assert s[k] is not None
    with open(out / "soak.csv") as f:
        samples = list(csv.DictReader(f))
    assert samples and {"opens", "rss_kib", "pss_kib", "fds"} <= set(samples[0])
    assert "RSS" in (out / "soak.md").read_text()
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
