"""The guest runner itself: environment, exit status, cleanup on timeout, Docker lane smoke."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.guest.packages import (
    TINY_IMAGE_NAME,
    build_tiny_image_tarball,
    docker_import_script,
    docker_setup_script,
    ensure_docker_root,
)
from tests.guest.runner import REPO_ROOT, available, pidns_members, run_in_guest

pytestmark = [pytest.mark.guest]


@pytest.fixture(autouse=True)
def _guests_run_here() -> None:
    reason = available()
    if reason:
        pytest.skip(reason)


def _python() -> Path:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return venv if venv.exists() else Path(sys.executable)


def _values(output: str) -> dict[str, str]:
    """KEY=VALUE lines of a guest script's output."""
    found = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            found[key] = value
    return found


def test_guest_has_cgroup2_fuse_and_the_venv() -> None:
    script = f"""
echo FSTYPE=$(stat -f -c %T /sys/fs/cgroup)
echo CONTROLLERS=$(cat /sys/fs/cgroup/cgroup.controllers)
echo SUBTREE=$(cat /sys/fs/cgroup/cgroup.subtree_control)
[ -c /dev/fuse ] && echo FUSE=yes
echo CGPROCFS=$({_python()} -c 'import cgprocfs, cgprocfs.fuse.worker; print(cgprocfs.__version__)')
echo ROOT_RW=$(touch /etc/guest-was-here && echo yes)
echo CWD=$PWD
echo UID=$(id -u)
"""
    r = run_in_guest(script, timeout=60)
    assert r.returncode == 0, r.report()
    v = _values(r.output)
    assert v.get("FSTYPE") == "cgroup2fs", r.report()
    assert "memory" in v.get("CONTROLLERS", "").split(), r.report()
    assert "memory" in v.get("SUBTREE", "").split(), r.report()
    assert v.get("FUSE") == "yes", r.report()
    assert v.get("CGPROCFS"), r.report()  # the venv's python imports the daemon's code
    assert v.get("ROOT_RW") == "yes", r.report()
    assert v.get("CWD") == str(REPO_ROOT)
    assert v.get("UID") == "0"
    assert not Path("/etc/guest-was-here").exists(), "a guest write reached the host's root"
    assert r.outdir is None


def test_exit_status_output_env_and_guest_out(tmp_path: Path) -> None:
    script = """
echo to-stdout
echo to-stderr >&2
echo "$MY_VAR" > "$GUEST_OUT/var.txt"
exit 7
"""
    r = run_in_guest(script, timeout=60, env={"MY_VAR": "a b 'c'"}, out_parent=tmp_path)
    assert r.returncode == 7, r.report()
    assert not r.timed_out
    assert r.output.splitlines() == ["to-stdout", "to-stderr"]
    assert r.outdir is not None and r.outdir.parent == tmp_path
    assert (r.outdir / "var.txt").read_text() == "a b 'c'\n"
    assert "guest-init" in r.console
    assert r.workdir is not None and not r.workdir.exists()


def test_timeout_kills_everything_and_cleans_up() -> None:
    start = time.monotonic()
    r = run_in_guest("echo started\nsleep 1000\necho never", timeout=15)
    elapsed = time.monotonic() - start
    assert r.timed_out, r.report()
    assert r.returncode is None
    assert r.output == "started\n"
    assert 15 <= elapsed < 60, f"timeout path took {elapsed:.1f}s"
    # Every host process of the run is gone: its process group (setpriv/unshare) and its
    # pid namespace (linux.uml, which calls setsid(), and all of its helpers).
    assert r.pgid is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(r.pgid, 0)
    assert r.pidns is not None, "the runner never saw the guest's pid namespace"
    assert pidns_members(r.pidns) == []
    assert r.workdir is not None and not r.workdir.exists()


@pytest.mark.docker
def test_docker_engine_runs_a_memory_limited_container(tmp_path: Path) -> None:
    docker_root = ensure_docker_root()
    tarball = build_tiny_image_tarball()
    script = (
        "set -e\n"
        + docker_setup_script(docker_root)
        + docker_import_script(tarball)
        + f"""
echo MEMORY_MAX=$(docker run --rm --network none -m 256m {TINY_IMAGE_NAME} \\
    cat /sys/fs/cgroup/memory.max)
docker run --rm --network none -m 256m {TINY_IMAGE_NAME} free -b
"""
    )
    r = run_in_guest(script, timeout=240, out_parent=tmp_path)
    assert r.returncode == 0, r.report()
    assert r.outdir is not None and (r.outdir / "dockerd.log").exists()
    assert _values(r.output).get("MEMORY_MAX") == "268435456", r.report()
    mem = [line.split() for line in r.output.splitlines() if line.startswith("Mem:")]
    assert mem and mem[0][1].isdigit(), r.report()
    print(f"docker lane took {r.duration:.1f}s")
