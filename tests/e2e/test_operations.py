"""Operator commands: configuration (file < environment < flags, check-config), SIGHUP
reload with the mount kept, `status`, `doctor` (with faked problems), `install-service`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support import (
    ALL_VIEW_FILES,
    PYTHON,
    REPO,
    Daemon,
    make_container,
    run_in_container,
    running_daemon,
)


def cgprocfs(*args: str, env: dict[str, str] | None = None,
             **kw: object) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CGPROCFS_")}
    full_env.update(env or {})
    return subprocess.run([PYTHON, "-m", "cgprocfs", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=full_env, **kw)  # type: ignore[call-overload]


def test_check_config_layers_file_env_and_flags(tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text('mountpoint = "/srv/views"\nhide_swap = true\nviews = ["proc/meminfo"]\n'
                    "limits_max_age = 0.5\nkept_files = 256\n")
    res = cgprocfs("--config", str(conf), "check-config")
    assert res.returncode == 0, res.stderr
    assert 'mountpoint = "/srv/views"' in res.stdout
    assert "hide_swap = true" in res.stdout and 'views = ["proc/meminfo"]' in res.stdout
    assert "kept_files = 256" in res.stdout
    # The environment beats the file; flags beat both.
    res = cgprocfs("--config", str(conf), "check-config",
                   env={"CGPROCFS_HIDE_SWAP": "false", "CGPROCFS_LOG_LEVEL": "debug"})
    assert "hide_swap = false" in res.stdout and 'log_level = "debug"' in res.stdout
    res = cgprocfs("--config", str(conf), "--log-level", "error", "check-config",
                   env={"CGPROCFS_LOG_LEVEL": "debug"})
    assert 'log_level = "error"' in res.stdout
    # And CGPROCFS_CONFIG names the file.
    res = cgprocfs("check-config", env={"CGPROCFS_CONFIG": str(conf)})
    assert 'mountpoint = "/srv/views"' in res.stdout


@pytest.mark.parametrize(("text", "message"), [
    ("hide_swap = 3\n", "hide_swap must be true or false"),
    ('views = ["proc/nope"]\n', "unknown views"),
    ('mountpoint = "relative"\n', "absolute path"),
    ("limits_max_age = -1\n", "between 0 and 60"),
    ("kept_files = -1\n", "kept_files must be between 0 and 16384"),
    ("kept_files = 1.5\n", "kept_files must be a whole number"),
    ("colour = 1\n", "unknown setting 'colour'"),
    ("hide_swap = \n", "not valid TOML"),
])
def test_bad_configuration_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(text)
    res = cgprocfs("--config", str(conf), "check-config")
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    res = cgprocfs("--config", str(tmp_path / "absent.toml"), "check-config")
    assert res.returncode == 2 and "does not exist" in res.stderr


def sighup_and_wait(d: Daemon, text: str, timeout: float = 60) -> bool:
    """SIGHUP the daemon; True once `text` appears in its log."""
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while text not in d.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    return text in d.log()


def test_sighup_rereads_the_configuration_and_keeps_the_mount(root_fuse: None,
                                                              tmp_path: Path) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text("cpu_quota = true\n")
    env = {**os.environ, "CGPROCFS_CONFIG": str(conf)}
    with running_daemon(env=env) as d, make_container(256 << 20) as ct:
        ct.set_cpus(1.0)

        def online() -> str:
            return run_in_container(ct, d.mountpoint, ["cat", "/sys/devices/system/cpu/online"],
                                    views=ALL_VIEW_FILES).strip()

        assert online() == "0"
        conf.write_text("cpu_quota = false\n")
        # SIGHUP re-reads everything: the supervisor re-executes and new workers start.
        assert sighup_and_wait(d, "reload: every worker replaced")
        want = "0" if len(os.sched_getaffinity(0)) == 1 else f"0-{len(os.sched_getaffinity(0)) - 1}"
        assert online() == want
        # A broken file is refused and the running settings stay.
        conf.write_text("cpu_quota = perhaps\n")
        assert sighup_and_wait(d, "not reloading")
        assert online() == want
        assert d.proc.poll() is None


def test_status_served_stale_and_unmounted(root_fuse: None, tmp_path: Path) -> None:
    with running_daemon() as d:
        res = cgprocfs("status", str(d.mountpoint))
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"served by pid {d.proc.pid}" in res.stdout
        assert "proc/meminfo" in res.stdout and "opens:" in res.stdout
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        res = cgprocfs("status", str(d.mountpoint))
        assert res.returncode == 2 and "STALE" in res.stdout, res.stdout
    res = cgprocfs("status", str(tmp_path))
    assert res.returncode == 1 and "not mounted" in res.stdout


def test_doctor_reports_this_host_and_finds_faked_problems(root_fuse: None) -> None:
    res = cgprocfs("doctor")
    assert res.returncode == 0, res.stdout
    layout = "hybrid (v1 controllers + cgroup2)" if Path("/sys/fs/cgroup/memory").is_dir() \
        else "cgroup v2"
    assert f"ok      cgroups: {layout}" in res.stdout, res.stdout
    assert "ok      /dev/fuse opens read-write" in res.stdout
    # Faked: no /dev/fuse (an empty /dev in a private mount namespace).
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none /dev && exec {PYTHON} -m cgprocfs doctor"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert res.returncode == 1
    assert "PROBLEM /dev/fuse exists" in res.stdout and "fix: modprobe fuse" in res.stdout


def test_doctor_finds_a_stale_mount(root_fuse: None, tmp_path: Path) -> None:
    with running_daemon() as d:
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        res = cgprocfs("doctor", env={"CGPROCFS_MOUNTPOINT": str(d.mountpoint)})
        assert res.returncode == 1
        # ENOTCONN once the connection is gone; ECONNABORTED for doctor's own request when
        # it was queued while the last worker was exiting. Both are a dead daemon's mount.
        assert ("Transport endpoint is not connected" in res.stdout
                or "Software caused connection abort" in res.stdout), res.stdout
        assert "fix: restart the daemon" in res.stdout


def test_install_service_writes_a_unit_for_this_install(tmp_path: Path) -> None:
    res = cgprocfs("install-service", "--root", str(tmp_path), "--no-reload")
    assert res.returncode == 0, res.stderr
    unit = (tmp_path / "etc/systemd/system/cgprocfs.service").read_text()
    exe = shutil.which("cgprocfs") or str(Path(PYTHON).with_name("cgprocfs"))
    assert f"ExecStart={exe} serve" in unit
    repo_unit = (REPO / "systemd/cgprocfs.service").read_text()
    assert unit == repo_unit.replace("/opt/cgprocfs/bin/cgprocfs", exe)
    if shutil.which("systemd-analyze"):
        check = subprocess.run(["systemd-analyze", "verify",
                                str(tmp_path / "etc/systemd/system/cgprocfs.service")],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr
