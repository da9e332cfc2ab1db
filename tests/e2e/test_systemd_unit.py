"""systemd/cgprocfs.service: the unit verifies, and its own ExecStart line, run under a
small sd_notify listener, mounts, signals READY=1 only once mounted, and unmounts on
SIGTERM (systemd itself does not run on this machine)."""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import REPO, mountinfo_fstypes

UNIT = REPO / "systemd" / "cgprocfs.service"
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    return cp


def exec_start(mountpoint: Path) -> list[str]:
    argv = shlex.split(unit()["Service"]["ExecStart"])
    assert argv[0] == "/opt/cgprocfs/bin/cgprocfs" and argv[1] == "serve"
    # The documented install puts the venv at /opt/cgprocfs; here it is the repo's.
    return [str(VENV_BIN / "cgprocfs"), *argv[1:-1], str(mountpoint)]


def test_unit_declares_what_operators_rely_on() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "notify"
    assert svc["OOMScoreAdjust"] == "-1000"
    assert svc["Restart"] == "on-failure"
    assert "umount -l /var/lib/cgprocfs" in svc["ExecStopPost"]
    assert svc["ExecStart"].split()[-1] == "/var/lib/cgprocfs"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # Verify the unit as installed: point ExecStart at an existing binary.
    text = UNIT.read_text().replace("/opt/cgprocfs/bin/cgprocfs", str(VENV_BIN / "cgprocfs"))
    copy = tmp_path / "cgprocfs.service"
    copy.write_text(text)
    res = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cgprocfs.service" not in res.stderr, res.stderr


def test_exec_start_notifies_ready_once_mounted_and_unmounts_on_sigterm(
    root_fuse: None,
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cgprocfs-unit-"))
    mp = tmp / "mnt"
    sock_path = tmp / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(20)
    proc = subprocess.Popen(exec_start(mp), env={**os.environ, "NOTIFY_SOCKET": str(sock_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        msg = listener.recv(4096).decode()
        assert "READY=1" in msg, msg
        # READY must mean usable: the mount answers at the moment READY arrives.
        assert mountinfo_fstypes().get(str(mp)) == "fuse.cgprocfs"
        assert (mp / "proc/meminfo").read_text().startswith("MemTotal:")
        assert f"MAINPID={proc.pid}" in msg
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(timeout=15) == 0
        assert str(mp) not in mountinfo_fstypes()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        if str(mp) in mountinfo_fstypes():
            subprocess.run(["umount", "-l", str(mp)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
