"""The deployment files in docker/: Kubernetes manifests validated against the Kubernetes
OpenAPI schemas (kubernetes-validate), the settings each deployment needs, the workload
binds against `cgprocfs docker-args` (one source of truth), compose.yaml, and the
Dockerfile's structure and build context. No root, no container engine, no network."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy import dockerfile

REPO = dockerfile.REPO_ROOT
DOCKER = REPO / "docker"
K8S = DOCKER / "kubernetes"
MANIFESTS = sorted(K8S.glob("*.yaml"))
MOUNT = "/var/lib/cgprocfs"
# The oldest schema kubernetes-validate ships and the newest: the manifests must use
# nothing removed since or added after.
K8S_VERSIONS = (kubernetes_validate.utils.all_versions()[0],
                kubernetes_validate.utils.latest_version())  # fmt: skip


def docker_args() -> list[tuple[str, str, str]]:
    """(source, target, mode) of every -v flag `python -m cgprocfs docker-args` prints."""
    out = subprocess.run(
        [sys.executable, "-m", "cgprocfs", "docker-args"],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    words = shlex.split(out)
    assert words and words[::2] == ["-v"] * (len(words) // 2), out
    binds = []
    for spec in words[1::2]:
        source, target, mode = spec.split(":")
        binds.append((source, target, mode))
    return binds


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict[str, Any]:
    found = [d for d in load_all(path) if d["kind"] == kind]
    assert len(found) == 1, f"{path.name}: {len(found)} {kind}"
    return found[0]


# /sys/block/<dev>/stat: one view per block device of the machine docker-args runs on.
# A manifest meant for any host cannot name devices (a hostPath of type File for a disk a
# node lacks keeps the pod from starting), so the examples carry every other view.
PER_DEVICE = re.compile(r"/sys/block/[^/]+/stat")


@pytest.fixture(scope="module")
def all_binds() -> list[tuple[str, str, str]]:
    return docker_args()


@pytest.fixture(scope="module")
def binds(all_binds: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The docker-args binds that are the same on every host."""
    return [b for b in all_binds if not PER_DEVICE.fullmatch(b[1])]


@pytest.fixture(scope="module")
def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one(K8S / "daemonset.yaml", "DaemonSet")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


# ---- Kubernetes: schema ----------------------------------------------------------------


def test_manifests_exist() -> None:
    assert {p.name for p in MANIFESTS} >= {"daemonset.yaml", "pod-example.yaml"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path: Path, version: str) -> None:
    docs = load_all(path)
    assert docs, path
    for doc in docs:
        # strict: a misspelt or misplaced field (hostPid, mountpropagation) is an error,
        # not silently dropped by the API server.
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misspelt_field() -> None:
    ds = one(K8S / "daemonset.yaml", "DaemonSet")
    bad = copy.deepcopy(ds)
    spec = bad["spec"]["template"]["spec"]
    spec["hostPid"] = spec.pop("hostPID")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


# ---- Kubernetes: the DaemonSet ---------------------------------------------------------


def volume_mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        m for m in container.get("volumeMounts", []) if m["mountPath"] == path
    ]
    assert len(found) == 1, f"{container['name']}: no single volumeMount at {path}"
    return found[0]


def host_path(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (vol,) = [v for v in spec["volumes"] if v["name"] == name]
    hp: dict[str, Any] = vol["hostPath"]
    return hp


def test_daemonset_runs_privileged_in_the_host_pid_namespace(pod_spec: dict[str, Any]) -> None:
    assert pod_spec["hostPID"] is True
    for c in pod_spec["initContainers"] + pod_spec["containers"]:
        assert c["securityContext"]["privileged"] is True, c["name"]
    assert pod_spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod_spec["tolerations"]  # every taint
    assert pod_spec["terminationGracePeriodSeconds"] >= 15
    assert pod_spec.get("automountServiceAccountToken") is False  # no API access needed


def test_daemonset_shares_the_mount_with_the_node(pod_spec: dict[str, Any]) -> None:
    """The mountpoint's parent, /var/lib, is shared Bidirectional with the node, so the
    FUSE mount reaches it and a dead one can be detached from inside the pod."""
    for c in pod_spec["initContainers"] + pod_spec["containers"]:
        m = volume_mount(c, "/var/lib")
        assert m["mountPropagation"] == "Bidirectional", c["name"]
        assert not m.get("readOnly"), c["name"]
        assert host_path(pod_spec, m["name"])["path"] == "/var/lib"
    (main,) = pod_spec["containers"]
    fuse = volume_mount(main, "/dev/fuse")
    assert host_path(pod_spec, fuse["name"]) == {"path": "/dev/fuse", "type": "CharDevice"}
    cgroup = volume_mount(main, "/sys/fs/cgroup")
    assert cgroup["readOnly"] is True
    assert host_path(pod_spec, cgroup["name"])["path"] == "/sys/fs/cgroup"


def test_daemonset_command_serves_the_default_mountpoint(pod_spec: dict[str, Any]) -> None:
    (main,) = pod_spec["containers"]
    cmd = main["command"]
    # The image's entrypoint, in the node's cgroup namespace (hostPID: /proc/1 is init).
    assert cmd[:3] == ["nsenter", "--cgroup=/proc/1/ns/cgroup", "--"], cmd
    df = dockerfile.load()
    entrypoint = df.final.last("ENTRYPOINT")
    image_cmd = df.final.last("CMD")
    assert entrypoint and image_cmd
    assert cmd[3:] == (entrypoint.exec_form() or []) + (image_cmd.exec_form() or [])
    assert cmd[-1] == MOUNT
    assert "args" not in main
    assert main["image"] == pod_spec["initContainers"][0]["image"]


def test_daemonset_init_container_detaches_a_stale_mount(pod_spec: dict[str, Any]) -> None:
    (init,) = pod_spec["initContainers"]
    assert init["command"][:2] == ["sh", "-c"]
    script = init["command"][2]
    assert f"M={MOUNT}" in script
    assert 'ls "$M"' in script and "not connected" in script
    assert 'umount -l "$M"' in script
    # The script is valid POSIX sh.
    done = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("state", ["missing", "empty", "served"])
def test_daemonset_init_container_leaves_a_healthy_mountpoint_alone(
    pod_spec: dict[str, Any], tmp_path: Path, state: str
) -> None:
    """On a node's first start (no /var/lib/cgprocfs yet), after a clean stop (an empty
    directory) and with files present, the script exits 0 without unmounting anything.
    (The dead-mount case needs root and FUSE: the guest image lane runs it.)"""
    script = pod_spec["initContainers"][0]["command"][2]
    mount = tmp_path / "cgprocfs"
    if state != "missing":
        mount.mkdir()
    if state == "served":
        (mount / "proc").mkdir()
        (mount / "proc" / "meminfo").write_text("MemTotal: 1 kB\n")
    assert script.count(f"M={MOUNT}\n") == 1
    script = script.replace(f"M={MOUNT}\n", f"M={mount}\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "umount").write_text("#!/bin/sh\necho UMOUNT CALLED; exit 99\n")
    (fake_bin / "umount").chmod(0o755)
    done = subprocess.run(
        ["sh", "-c", script],
        capture_output=True,
        text=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UMOUNT CALLED" not in done.stdout


def test_daemonset_liveness_probe_reads_a_view(pod_spec: dict[str, Any]) -> None:
    (main,) = pod_spec["containers"]
    probe = main["livenessProbe"]
    cmd = probe["exec"]["command"]
    assert cmd[-1] == f"{MOUNT}/proc/meminfo"
    # Same check as the image's HEALTHCHECK.
    health = dockerfile.load().final.last("HEALTHCHECK")
    assert health is not None and health.exec_form() == cmd
    # A liveness restart is a new FUSE connection that breaks every pod's binds: the
    # probe must tolerate a slow daemon for a while.
    assert probe["failureThreshold"] * probe["periodSeconds"] >= 60
    assert main["resources"]["requests"]["memory"]
    assert main["resources"]["limits"]["memory"]


def test_daemonset_is_not_rolled_automatically() -> None:
    ds = one(K8S / "daemonset.yaml", "DaemonSet")
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"


# ---- Kubernetes: the pod example -------------------------------------------------------


def test_pod_example_mounts_exactly_the_docker_args_binds(
    binds: list[tuple[str, str, str]],
) -> None:
    pod = one(K8S / "pod-example.yaml", "Pod")
    spec = pod["spec"]
    (app,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    got = []
    for m in app["volumeMounts"]:
        hp = volumes[m["name"]]["hostPath"]
        # Views are files; the cpu directory view is bound whole.
        want = "Directory" if m["mountPath"] == "/sys/devices/system/cpu" else "File"
        assert hp["type"] == want, m
        got.append((hp["path"], m["mountPath"], "ro" if m.get("readOnly") else "rw"))
    expected = "\n".join(f"{s} -> {t}" for s, t, _ in binds)
    assert got == binds, f"pod-example.yaml must mount, in order:\n{expected}"
    assert len(volumes) == len(binds)
    limits = app["resources"]["limits"]
    assert limits["memory"] == "256Mi"


# ---- Compose ---------------------------------------------------------------------------


def test_compose_daemon_service(compose: dict[str, Any]) -> None:
    svc = compose["services"]["cgprocfs"]
    assert svc["privileged"] is True
    assert svc["pid"] == "host"
    assert svc["cgroup"] == "host"
    assert any(d.split(":")[0] == "/dev/fuse" for d in svc["devices"])
    vols = {v["target"]: v for v in svc["volumes"]}
    assert vols["/var/lib"]["source"] == "/var/lib"
    assert vols["/var/lib"]["type"] == "bind"
    assert vols["/var/lib"]["bind"]["propagation"] == "rshared"
    assert vols["/sys/fs/cgroup"]["source"] == "/sys/fs/cgroup"
    assert vols["/sys/fs/cgroup"]["read_only"] is True
    assert svc["stop_signal"] == "SIGTERM"
    build = svc["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == dockerfile.DOCKERFILE


def test_compose_workload_binds_exactly_the_docker_args(
    compose: dict[str, Any], binds: list[tuple[str, str, str]]
) -> None:
    svc = compose["services"]["workload"]
    expected = [f"{s}:{t}:{m}" for s, t, m in binds]
    listing = "\n".join(f"      - {e}" for e in expected)
    assert svc["volumes"] == expected, f"compose.yaml workload volumes must be:\n{listing}"
    assert svc["mem_limit"] == "256m"
    assert svc["memswap_limit"] == "256m"
    dep = svc["depends_on"]["cgprocfs"]
    assert dep["condition"] == "service_healthy"
    assert dep["restart"] is True
    assert "free -m" in " ".join(svc["command"])


def test_binds_come_from_the_daemons_mountpoint(
    all_binds: list[tuple[str, str, str]], binds: list[tuple[str, str, str]]
) -> None:
    assert binds
    for source, target, mode in all_binds:
        assert source == f"{MOUNT}{target}", source
        assert mode == "ro"
    assert ("/var/lib/cgprocfs/proc/meminfo", "/proc/meminfo", "ro") in binds
    assert all(t != "/proc/vmstat" for _, t, _ in binds)  # runc refuses it


# ---- Dockerfile ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def df() -> dockerfile.Dockerfile:
    return dockerfile.load()


def test_dockerfile_stage(df: dockerfile.Dockerfile) -> None:
    assert [a.args.split("=")[0] for a in df.args] == ["PYTHON_IMAGE"]
    assert df.args[0].args == "PYTHON_IMAGE=python:3.11-slim-bookworm"
    # One stage: cgprocfs is pure Python (its own FUSE protocol, no libfuse), so there is
    # nothing to compile and no Debian package to add.
    assert [s.base for s in df.stages] == ["${PYTHON_IMAGE}"]
    final = df.final
    runs = " ".join(i.args for i in final.find("RUN"))
    for word in ("apt-get", "fuse", "gcc", "pkg-config"):
        assert word not in runs, word
    assert "python -m venv /opt/cgprocfs" in runs
    assert "/opt/cgprocfs/bin/pip install" in runs
    # The build context is copied to a temporary place and removed after the install.
    copies = final.find("COPY")
    assert copies and all("from" not in c.flags for c in copies)
    src = copies[0].body.split()[-1].rstrip("/")
    assert all(c.body.split()[-1].startswith(src) for c in copies), src
    assert f"rm -rf {src}" in runs
    assert "/opt/cgprocfs/bin/cgprocfs --help" in runs
    assert final.find("USER") == []  # root: see the header


def test_dockerfile_runtime_metadata(df: dockerfile.Dockerfile) -> None:
    final = df.final
    entrypoint = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    stop = final.last("STOPSIGNAL")
    health = final.last("HEALTHCHECK")
    assert entrypoint and entrypoint.exec_form() == ["/opt/cgprocfs/bin/cgprocfs", "serve"]
    assert cmd and cmd.exec_form() == [MOUNT]
    assert stop and stop.args == "SIGTERM"
    assert health is not None
    check = health.exec_form()
    assert check and check[-1] == f"{MOUNT}/proc/meminfo"
    assert set(health.flags) == {"interval", "timeout", "start-period", "retries"}


def test_dockerfile_copies_only_context_files_the_dockerignore_keeps(
    df: dockerfile.Dockerfile,
) -> None:
    rules = dockerfile.ignore_rules(dockerfile.DOCKERIGNORE.read_text())
    sources = []
    for stage in df.stages:
        for copy_ in stage.find("COPY") + stage.find("ADD"):
            if "from" in copy_.flags:
                continue
            *srcs, _dest = copy_.body.split()
            sources += srcs
    assert sources, "no COPY from the build context"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the build context (repo root)"
        assert not dockerfile.is_ignored(src, rules), f"COPY {src}: excluded by dockerignore"
    # pyproject's readme must be in the context too, or the build fails.
    assert "README.md" in sources


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("pyproject.toml", False),
        ("README.md", False),
        ("src/cgprocfs/cli.py", False),
        ("src/cgprocfs/__pycache__/cli.cpython-311.pyc", True),
        ("src/cgprocfs.egg-info/PKG-INFO", True),
        (".venv/bin/python", True),
        (".git/HEAD", True),
        (".cache/guest/docker-root/usr/sbin/dockerd", True),
        ("benchmarks/results/x.json", True),
        ("tests/unit/test_cpu_render.py", True),
    ],
)
def test_dockerignore(path: str, ignored: bool) -> None:
    rules = dockerfile.ignore_rules(dockerfile.DOCKERIGNORE.read_text())
    assert dockerfile.is_ignored(path, rules) is ignored


def test_dockerfile_parser_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="unknown instruction"):
        dockerfile.parse("FROM x\nRUNN true\n")
    with pytest.raises(ValueError, match="before FROM"):
        dockerfile.parse("RUN true\nFROM x\n")
    with pytest.raises(ValueError, match="continuation"):
        dockerfile.parse("FROM x\nRUN true \\\n")
    parsed = dockerfile.parse("ARG B=x\nFROM $B AS one\n# c\nRUN a \\\n  # c\n  b\nFROM one\n")
    assert [s.name for s in parsed.stages] == ["one", None]
    assert parsed.stages[0].find("RUN")[0].args == "a b"
