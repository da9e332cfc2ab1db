"""The Docker lane: a real Docker engine in the cgroup v2 guest, `cgprocfs serve` on the
guest, and containers started with the flags `cgprocfs docker-args` prints (the way users
run it). Inside: procps free, `vmstat -s` and /proc/swaps show the container's limit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import parse_free_b

from tests.guest.packages import TINY_IMAGE_NAME, docker_engine_script
from tests.guest.runner import available, output_section, report_with_logs, run_in_guest

pytestmark = [pytest.mark.guest, pytest.mark.docker]


def test_docker_containers_see_their_limit_through_the_views(tmp_path: Path) -> None:
    reason = available()
    if reason:
        pytest.skip(reason)
    engine = docker_engine_script()
    img = TINY_IMAGE_NAME
    script = (
        "set -e\n. tests/guest/prepare_v2.sh\n"
        + engine
        + f"""
.venv/bin/cgprocfs serve /var/lib/cgprocfs >"$CGPROCFS_TEST_LOGDIR/daemon-docker.log" 2>&1 &
for _ in $(seq 100); do [ -e /var/lib/cgprocfs/proc/meminfo ] && break; sleep 0.1; done
ARGS=$(.venv/bin/cgprocfs docker-args)
echo "=== args"; echo "$ARGS"
# The guest's own cpuinfo lacks fields procps vmstat needs: bind the patched copy instead.
ARGS=$(echo "$ARGS" | sed 's| *-v [^ ]*/proc/cpuinfo:/proc/cpuinfo:ro||')
# /run/cpuinfo: the guest's cpuinfo with the fields procps vmstat needs (prepare_v2.sh).
# /usr/bin/free is procps (it reads /proc/meminfo); busybox's applet asks sysinfo(2).
echo "=== limited"
docker run --rm --network none -m 256m --memory-swap 256m $ARGS \\
    -v /run/cpuinfo:/proc/cpuinfo:ro {img} \\
    sh -c '/usr/bin/free -b; echo "--- swaps"; cat /proc/swaps
           echo "--- vmstat"; /usr/bin/vmstat -s'
echo "=== unlimited"
docker run --rm --network none $ARGS {img} /usr/bin/free -b
echo "=== guest"
grep MemTotal /proc/meminfo
"""
    )
    r = run_in_guest(script, timeout=400, out_parent=tmp_path)
    report = report_with_logs(r)
    assert r.returncode == 0, report
    args = output_section(r.output, "args")
    for view in ("meminfo", "swaps"):
        assert f"/var/lib/cgprocfs/proc/{view}:/proc/{view}:ro" in args, report
    # runc refuses binds over /proc/vmstat (not on its allow-list): docker-args leaves it
    # out; vmstat -s still shows the container's memory, which it reads from meminfo.
    assert "/proc/vmstat" not in args, report

    limited = output_section(r.output, "limited")
    free = parse_free_b(limited)
    assert free["total"] == 268435456, report
    assert free["used"] < 64 << 20, report
    assert free["swap_total"] == 0, report
    swaps = limited.split("--- swaps\n")[1].split("--- vmstat")[0].strip().splitlines()
    assert len(swaps) == 1 and swaps[0].startswith("Filename"), report
    vmstat = limited.split("--- vmstat\n")[1]
    assert re.search(r"^\s*262144 K total memory$", vmstat, re.M), report
    assert re.search(r"^\s*0 K total swap$", vmstat, re.M), report

    guest_total_kb = int(output_section(r.output, "guest").split()[1])
    unlimited = parse_free_b(output_section(r.output, "unlimited"))
    assert unlimited["total"] == guest_total_kb * 1024, report
    print(f"docker lane took {r.duration:.0f} s")


def test_docker_sysinfo_through_the_seccomp_profile(tmp_path: Path) -> None:
    """docker/seccomp-sysinfo.json (Docker's default profile + a notify rule for sysinfo)
    hands each container's listener to the sysinfo agent: busybox free, which asks
    sysinfo(2), shows the 256 MiB limit and agrees with procps free. Debian's Docker 20.10
    drops the profile's listenerPath, so the container runs with the cgprocfs runtime shim
    (which restores it) there; Docker >= 23 needs no shim."""
    reason = available()
    if reason:
        pytest.skip(reason)
    engine = docker_engine_script()
    img = TINY_IMAGE_NAME
    repo = Path(__file__).resolve().parents[2]
    script = (
        "set -e\n. tests/guest/prepare_v2.sh\n"
        f"""
mkdir -p /etc/docker
printf '#!/bin/sh\\nexec {repo}/.venv/bin/python -m cgprocfs.sysinfo.shim "$@"\\n' \\
    > /run/cgprocfs-runc
chmod +x /run/cgprocfs-runc
echo '{{"runtimes": {{"cgprocfs": {{"path": "/run/cgprocfs-runc"}}}}}}' \\
    > /etc/docker/daemon.json
"""
        + engine
        + f"""
.venv/bin/cgprocfs serve /var/lib/cgprocfs >"$CGPROCFS_TEST_LOGDIR/daemon-sysinfo.log" 2>&1 &
.venv/bin/cgprocfs --log-level debug sysinfo-agent \\
    >"$CGPROCFS_TEST_LOGDIR/sysinfo-agent.log" 2>&1 &
for _ in $(seq 100); do
    [ -e /var/lib/cgprocfs/proc/meminfo ] && [ -S /run/cgprocfs/seccomp.sock ] && break
    sleep 0.1
done
VERSION=$(docker version --format '{{{{.Server.Version}}}}')
echo "=== version"; echo "$VERSION"
RUNTIME=""
[ "${{VERSION%%.*}}" -lt 23 ] && RUNTIME="--runtime cgprocfs"
echo "=== attached"
docker run --rm --network none -m 256m --memory-swap 256m $RUNTIME \\
    --security-opt seccomp=docker/seccomp-sysinfo.json \\
    -v /var/lib/cgprocfs/proc/meminfo:/proc/meminfo:ro {img} \\
    sh -c 'busybox free -b >/dev/null; /usr/bin/free -b >/dev/null
           busybox free -b; echo ---; /usr/bin/free -b'
echo "=== default"
docker run --rm --network none -m 256m {img} busybox free -b
echo "=== agent"
cat "$CGPROCFS_TEST_LOGDIR/sysinfo-agent.log"
"""
    )
    r = run_in_guest(script, timeout=400, out_parent=tmp_path)
    report = report_with_logs(r)
    assert r.returncode == 0, report
    bb_text, pp_text = output_section(r.output, "attached").split("---\n")
    bb, pp = parse_free_b(bb_text), parse_free_b(pp_text)
    assert bb["total"] == 268435456 == pp["total"], report
    for col in ("used", "free", "buff/cache", "available"):
        assert abs(bb[col] - pp[col]) <= 2 << 20, (col, report)
    # Without the profile, busybox free sees the guest's memory.
    assert parse_free_b(output_section(r.output, "default"))["total"] != 268435456, report
    assert "listener sysinfo.listener." in output_section(r.output, "agent"), report
    print(f"docker {output_section(r.output, 'version').strip()}: sysinfo lane took "
          f"{r.duration:.0f} s")
