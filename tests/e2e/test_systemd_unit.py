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
import sys
import tempfile
import time
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
    # The connection survives restarts in systemd's descriptor store; an ExecStopPost
    # unmount would undo that on every restart.
    assert int(svc["FileDescriptorStoreMax"]) >= 4
    assert "ExecStopPost" not in svc
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


def test_restart_through_the_descriptor_store_keeps_the_mount(root_fuse: None,
                                                              tmp_path: Path) -> None:
    """systemd's side of FDSTORE/LISTEN_FDS played by this test (no systemd runs here):
    the unit's ExecStart stores its descriptors, gets SIGTERM while a reader loops, keeps
    the mount; a second ExecStart receives them as LISTEN_FDS and serves the same
    connection. The reader sees no error."""
    mp = tmp_path / "mnt"
    sock_path = tmp_path / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(20)
    store: dict[str, int] = {}
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "FDSTORE": "8"}
    first = subprocess.Popen(exec_start(mp), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    second: subprocess.Popen[bytes] | None = None
    reader: subprocess.Popen[str] | None = None
    stop = tmp_path / "stop"
    try:
        while True:
            msg, fds, _, _ = socket.recv_fds(listener, 4096, 4)
            text = msg.decode()
            if "FDSTORE=1" in text:
                store[text.split("FDNAME=")[1].strip()] = fds[0]
            if "READY=1" in text:
                break
        assert sorted(store) == sorted(["cgprocfs-fuse", "cgprocfs-arena",
                                        "cgprocfs-loads-r", "cgprocfs-loads-w"])
        script = ("import os, sys, time\n"
                  "n = err = 0\n"
                  f"while not os.path.exists({str(stop)!r}):\n"
                  "    try:\n"
                  f"        data = open({str(mp / 'proc/meminfo')!r}).read()\n"
                  "        assert data.startswith('MemTotal:')\n"
                  "        n += 1\n"
                  "    except OSError as e:\n"
                  "        err += 1; print(e, file=sys.stderr)\n"
                  "print(n, err)\n")
        reader = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(0.5)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=15) == 0
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert mountinfo_fstypes().get(str(mp)) == "fuse.cgprocfs"  # kept for the restart
        time.sleep(0.3)  # the reader waits meanwhile

        order = ["cgprocfs-fuse", "cgprocfs-arena", "cgprocfs-loads-r", "cgprocfs-loads-w"]

        def as_listen_fds() -> None:  # what systemd does between fork and exec
            for i, name in enumerate(order):
                os.dup2(store[name], 3 + i)

        env2 = {**env, "LISTEN_FDS": str(len(order)), "LISTEN_FDNAMES": ":".join(order)}
        second = subprocess.Popen(["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh",
                                   *exec_start(mp)], env=env2, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  preexec_fn=as_listen_fds, close_fds=False)
        while "READY=1" not in listener.recv(4096).decode():
            pass
        time.sleep(0.5)
        stop.touch()
        out, _ = reader.communicate(timeout=30)
        n, err = map(int, out.split())
        assert n > 0 and err == 0, out
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=15)
        log = second.stdout.read().decode() if second.stdout else ""
        assert "taking over" in log and "descriptor store" in log, log
    finally:
        stop.touch()
        for p in (first, second, reader):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for fd in store.values():
            os.close(fd)
        listener.close()
        if str(mp) in mountinfo_fstypes():
            subprocess.run(["umount", "-l", str(mp)], check=False)
