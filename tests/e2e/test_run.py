"""`cgprocfs run`: the one-command demo, and its clean-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

from support import (
    PYTHON,
    REPO,
    memory_hierarchy,
    mountinfo_fstypes,
    own_cgroup_path,
    parse_free_b,
)


def leftovers() -> tuple[list[str], list[str]]:
    version, mnt = memory_hierarchy()
    own = own_cgroup_path(version)
    bases = {Path(mnt + (own if own != "/" else ""))}
    if version == 2 and own != "/":
        bases.add(Path(mnt + (own.rsplit("/", 1)[0] or "")))
    cgroups = [str(p) for b in bases for p in b.glob("cgprocfs-run-*")]
    mounts = [m for m, t in mountinfo_fstypes().items()
              if t == "fuse.cgprocfs" and m.startswith("/run/cgprocfs/")]
    return cgroups, mounts


def cgprocfs_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cgprocfs", "run", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_run_free_shows_256_mib_and_leaves_nothing_behind(root_fuse: None) -> None:
    before = leftovers()
    res = cgprocfs_run("--memory", "256M", "--", "free", "-b")
    assert res.returncode == 0, res.stderr
    free = parse_free_b(res.stdout)
    assert free["total"] == 268435456, res.stdout
    assert free["used"] < 32 << 20
    assert leftovers() == before


def test_run_propagates_exit_status_and_cleans_up(root_fuse: None) -> None:
    before = leftovers()
    assert cgprocfs_run("--memory", "64M", "--", "sh", "-c", "exit 7").returncode == 7
    # Killed by a signal: 128 + signal number, like a shell.
    res = cgprocfs_run("--memory", "64M", "--", "sh", "-c", "kill -9 $$")
    assert res.returncode == 137
    # A background child left running is killed with the cgroup.
    res = cgprocfs_run("--memory", "64M", "--", "sh", "-c", "sleep 300 & exit 0")
    assert res.returncode == 0
    assert leftovers() == before


def test_run_command_not_found_and_bad_size(root_fuse: None) -> None:
    before = leftovers()
    res = cgprocfs_run("--memory", "64M", "--", "/nonexistent/cmd")
    assert res.returncode == 127, res
    assert res.stderr.strip()
    res = cgprocfs_run("--memory", "lots", "--", "true")
    assert res.returncode == 125 and "not a size" in res.stderr
    assert leftovers() == before


def test_run_oom_inside_the_limit_is_reported_in_vmstat(root_fuse: None) -> None:
    """A process that exceeds the limit is OOM-killed; oom_kill in the cgroup's vmstat
    counts it (from memory.events / memory.oom_control)."""
    script = (
        "python3 -c 'b = bytearray(200 << 20)' 2>/dev/null; "
        "grep '^oom_kill ' /proc/vmstat"
    )
    res = cgprocfs_run("--memory", "64M", "--memory-swap", "64M", "--", "sh", "-c", script,
                       timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "oom_kill 1", res.stdout
