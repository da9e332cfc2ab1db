"""The image lane: the daemon itself runs as a container, the way docker/compose.yaml and
docker/kubernetes/daemonset.yaml run it, in a real Docker engine in the cgroup v2 guest.

There is no registry here, so ``FROM python:3.11-slim-bookworm`` cannot be pulled: the
image is an equivalent root filesystem assembled from this machine's files
(tests/deploy/image_rootfs.py), imported, and given the ENTRYPOINT, CMD, STOPSIGNAL,
HEALTHCHECK, ... lines of docker/Dockerfile's final stage, verbatim, by a one-stage
build. What runs in the guest:

1. the Compose shape (compose.yaml's daemon service turned into docker run flags:
   privileged, host pid and cgroup namespaces, /dev/fuse, /var/lib shared rshared, the
   host's /sys/fs/cgroup read-only) with the image's own CMD: the mount appears on the
   guest, HEALTHCHECK turns healthy, a ``-m 256m`` workload bound with the flags
   ``cgprocfs docker-args`` prints sees 256 MiB in procps ``free``; after a SIGKILL the
   guest's mount is dead (ENOTCONN) and ``docker start`` of the same container (what a
   restart policy does) detaches it and mounts again; ``docker stop`` (STOPSIGNAL) makes
   the daemon unmount and exit 0;
2. the Kubernetes shape (daemonset.yaml's containers turned into docker run flags, with a
   *private* cgroup namespace): the DaemonSet's command (nsenter into the node's cgroup
   namespace) serves a workload its 256 MiB, its liveness probe command passes, and after
   a SIGKILL the init container's script detaches the dead mount for the guest.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import parse_free_b

from tests.deploy import dockerfile
from tests.deploy.image_rootfs import build_daemon_rootfs_tarball
from tests.guest.packages import TINY_IMAGE_NAME, docker_engine_script
from tests.guest.runner import available, output_section, report_with_logs, run_in_guest

pytestmark = [pytest.mark.guest, pytest.mark.docker]

IMAGE = "cgprocfs:lane"
DAEMONSET = dockerfile.REPO_ROOT / "docker" / "kubernetes" / "daemonset.yaml"
COMPOSE = dockerfile.REPO_ROOT / "docker" / "compose.yaml"
MOUNT = "/var/lib/cgprocfs"
# The python base image's own configuration, which the Dockerfile's ENV PATH=...:$PATH
# builds on (an imported rootfs has no configuration at all).
BASE_IMAGE_CONFIG = ("ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "ENV LANG=C.UTF-8")  # fmt: skip


def daemonset_pod() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    pod: dict[str, Any] = ds["spec"]["template"]["spec"]
    return pod


def compose_run_flags() -> str:
    """docker run flags for compose.yaml's daemon service (what Compose would do)."""
    svc = yaml.safe_load(COMPOSE.read_text())["services"]["cgprocfs"]
    flags = []
    for key, value in svc.items():
        if key in ("build", "image", "restart", "stop_signal", "stop_grace_period"):
            continue  # the image is the lane's; restart and stop are exercised by hand
        if key == "privileged":
            flags.append("--privileged" if value else "")
        elif key == "pid":
            flags.append(f"--pid {value}")
        elif key == "cgroup":
            flags.append(f"--cgroupns {value}")
        elif key == "devices":
            flags += [f"--device {d}" for d in value]
        elif key == "volumes":
            for v in value:
                opts = [o for o in (v.get("bind", {}).get("propagation"),
                                    "ro" if v.get("read_only") else None) if o]  # fmt: skip
                flags.append(f"-v {v['source']}:{v['target']}" + "".join(f":{o}" for o in opts))
        else:
            raise AssertionError(f"compose.yaml: the lane does not know how to run {key!r}")
    return " ".join(f for f in flags if f)


def daemonset_run_flags(pod: dict[str, Any], container: dict[str, Any]) -> str:
    """docker run flags for one container of the DaemonSet's pod (what the kubelet would
    ask the runtime for), the command left out."""
    flags = ["--pid host"] if pod.get("hostPID") else []
    sc = container.get("securityContext", {})
    if sc.get("privileged"):
        flags.append("--privileged")
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    host_paths = {v["name"]: v["hostPath"] for v in pod["volumes"]}
    for m in container.get("volumeMounts", []):
        hp = host_paths[m["name"]]
        if hp.get("type") == "CharDevice":
            flags.append(f"--device {hp['path']}:{m['mountPath']}")
            continue
        opts = []
        if m.get("mountPropagation") == "Bidirectional":
            opts.append("rshared")
        if m.get("readOnly"):
            opts.append("ro")
        flags.append(f"-v {hp['path']}:{m['mountPath']}" + "".join(f":{o}" for o in opts))
    # containerd and CRI-O give a container a private cgroup namespace on cgroup v2 (some
    # not when privileged); the DaemonSet's command must work either way: the harder one.
    flags.append("--cgroupns private")
    return " ".join(flags)


def import_script(tarball: Path) -> str:
    """Import the rootfs, then give it the final stage's metadata with a one-stage build
    (``docker import --change`` refuses STOPSIGNAL on Docker 20.10; a build with no RUN
    needs no network)."""
    lines = ["FROM cgprocfs-rootfs:lane", *BASE_IMAGE_CONFIG, *dockerfile.load().metadata()]
    return (
        f"docker import {shlex.quote(str(tarball))} cgprocfs-rootfs:lane >/dev/null\n"
        "mkdir -p /tmp/image-context\n"
        "cat >/tmp/image-context/Dockerfile <<'DOCKERFILE'\n"
        + "\n".join(lines)
        + f"\nDOCKERFILE\ndocker build -q -t {IMAGE} /tmp/image-context >/dev/null\n"
    )


def test_daemon_image_serves_containers(tmp_path: Path) -> None:
    reason = available()
    if reason:
        pytest.skip(reason)
    engine = docker_engine_script()
    rootfs = build_daemon_rootfs_tarball()

    pod = daemonset_pod()
    init_script = pod["initContainers"][0]["command"][2]
    main = pod["containers"][0]
    ds_command = main["command"]
    probe = main["livenessProbe"]["exec"]["command"]
    assert pod["initContainers"][0]["command"][:2] == ["sh", "-c"]
    init_flags = daemonset_run_flags(pod, pod["initContainers"][0])
    daemon_set_flags = daemonset_run_flags(pod, main)

    script = (
        "set -e\n"
        'LOGS="$GUEST_OUT/daemon-logs"; mkdir -p "$LOGS"\n'
        + engine
        + f"""
# The rshared bind needs a shared mount at its source: systemd makes / shared at boot;
# this guest's init leaves it private.
mount --make-rshared /
t0=$(date +%s)
{import_script(rootfs)}
echo "=== import"; echo "$(( $(date +%s) - t0 )) s"
ARGS=$(.venv/bin/cgprocfs docker-args)

# Reads through the mount (a stat may be answered from cache by a dead mount).
wait_mount() {{
    for _ in $(seq 300); do
        grep -q ^MemTotal: {MOUNT}/proc/meminfo 2>/dev/null && return 0; sleep 0.2
    done
    echo "no working {MOUNT} on the guest"; docker logs "$1" 2>&1 | tail -n 30; return 1
}}
workload() {{
    docker run --rm --network none -m 256m --memory-swap 256m $ARGS \\
        {TINY_IMAGE_NAME} /usr/bin/free -b
}}
fuse_mounts() {{ grep -c " {MOUNT} .* - fuse" /proc/self/mountinfo || true; }}

# ---- 1. Docker / Compose shape: the image's ENTRYPOINT, CMD, HEALTHCHECK, STOPSIGNAL --
docker run -d --name cgprocfs {compose_run_flags()} --health-interval 2s \\
    {IMAGE} >/dev/null
wait_mount cgprocfs
for _ in $(seq 60); do
    h=$(docker inspect -f '{{{{.State.Health.Status}}}}' cgprocfs)
    [ "$h" = healthy ] && break; sleep 1
done
echo "=== health"; echo "$h"
echo "=== guest mount"; grep " {MOUNT} " /proc/self/mountinfo
echo "=== workload docker"; workload
# What a crash followed by --restart unless-stopped does: the same container again.
docker kill -s KILL cgprocfs >/dev/null; docker wait cgprocfs >/dev/null || true
echo "=== after kill"; ls {MOUNT} 2>&1 || true
docker start cgprocfs >/dev/null
wait_mount cgprocfs
echo "=== after restart"; ls {MOUNT}; fuse_mounts
docker stop cgprocfs >/dev/null
echo "=== stop"
docker inspect -f 'exit={{{{.State.ExitCode}}}}' cgprocfs
fuse_mounts
docker logs cgprocfs >"$LOGS/docker-shape.log" 2>&1

# ---- 2. Kubernetes shape: the DaemonSet's command, probe, and init container ---------
docker run -d --name ds {daemon_set_flags} \\
    --entrypoint {shlex.quote(ds_command[0])} {IMAGE} {shlex.join(ds_command[1:])} >/dev/null
wait_mount ds
echo "=== liveness"; docker exec ds {shlex.join(probe)} && echo "probe ok"
echo "=== daemon cgroup ns"
echo "guest $(readlink /proc/1/ns/cgroup)"
echo "daemon $(readlink /proc/$(docker inspect -f '{{{{.State.Pid}}}}' ds)/ns/cgroup)"
echo "=== workload kubernetes"; workload
docker logs ds >"$LOGS/kubernetes-shape.log" 2>&1
docker kill -s KILL ds >/dev/null; docker wait ds >/dev/null || true
echo "=== stale"; ls {MOUNT} 2>&1 || true
echo "=== init container"
docker run --rm {init_flags} --entrypoint sh {IMAGE} \\
    -c {shlex.quote(init_script)}
echo "--- guest"; ls {MOUNT} >/dev/null && echo listable; fuse_mounts
echo "=== end"
"""
    )
    r = run_in_guest(script, timeout=400, out_parent=tmp_path)
    report = report_with_logs(r)
    assert r.returncode == 0, report
    print(r.output)  # shown with -s, and by pytest if an assertion below fails
    imported = output_section(r.output, "import").strip()
    print(f"image lane took {r.duration:.0f} s (docker import {imported})")

    # 1. Docker / Compose shape.
    assert output_section(r.output, "health").strip() == "healthy", report
    assert "fuse.cgprocfs" in output_section(r.output, "guest mount"), report
    assert parse_free_b(output_section(r.output, "workload docker"))["total"] == 268435456, report
    assert "Transport endpoint is not connected" in output_section(r.output, "after kill"), report
    # The restarted container detached the dead mount for the guest and mounted again.
    restarted = output_section(r.output, "after restart").split()
    assert "proc" in restarted and restarted[-1] == "1", report
    assert output_section(r.output, "stop").split() == ["exit=0", "0"], report  # unmounted
    assert r.outdir is not None, report
    log = (r.outdir / "daemon-logs" / "docker-shape.log").read_text()
    assert "stale mount from a crashed run" in log, report  # the daemon's own detach

    # 2. Kubernetes shape.
    assert "probe ok" in output_section(r.output, "liveness"), report
    ns = dict(ln.split() for ln in output_section(r.output, "daemon cgroup ns").splitlines())
    assert ns["daemon"] == ns["guest"], report  # nsenter: the node's cgroup namespace
    free = parse_free_b(output_section(r.output, "workload kubernetes"))
    assert free["total"] == 268435456, report
    assert "Transport endpoint is not connected" in output_section(r.output, "stale"), report
    init = output_section(r.output, "init container")
    assert "umount -l" in init, report
    assert init.split()[-2:] == ["listable", "0"], report
