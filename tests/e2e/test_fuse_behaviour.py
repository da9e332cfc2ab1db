"""The FUSE layer at its edges: offsets, write opens, vanished callers, handler faults,
start-up errors, stale mounts, signals."""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from support import (
    PYTHON,
    REPO,
    Daemon,
    MiB,
    force_unmount,
    make_cgroup,
    meminfo_kb,
    mountinfo_fstypes,
    running_daemon,
    wait_mounted,
)

FAULTS = str(Path(__file__).with_name("faults"))


def fault_env(kind: str, **extra: str) -> dict[str, str]:
    """The daemon with one worker (so call counts are the daemon's) and a fault."""
    return {**os.environ, "PYTHONPATH": FAULTS, "FAULT_KIND": kind, "CGPROCFS_WORKERS": "1",
            **extra}


def read_all(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, size):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def open_in_cgroup_then_exit(cgroup_dir: Path, path: Path) -> int:
    """A child joins `cgroup_dir`, opens `path`, hands the fd over and exits; returns the
    fd, now held by this process alone."""
    parent_sock, child_sock = socket.socketpair()
    with parent_sock, child_sock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                Path(cgroup_dir, "cgroup.procs").write_text(str(os.getpid()))
                socket.send_fds(child_sock, [b"x"], [os.open(path, os.O_RDONLY)])
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        _, fds, _, _ = socket.recv_fds(parent_sock, 1, 1)
    return fds[0]


@pytest.mark.parametrize("name", ["proc/meminfo", "proc/vmstat", "proc/swaps"])
def test_one_byte_reads_and_random_preads_reassemble_one_rendering(
    daemon: Daemon, name: str
) -> None:
    path = daemon.view(name)
    whole = read_all(path, 1 << 16)
    assert whole.endswith(b"\n") and len(whole) >= 39
    fd = os.open(path, os.O_RDONLY)
    try:
        first = b"".join(iter(lambda: os.read(fd, 1), b""))
        # Same handle, any offset: slices of the one rendering made at open. (A read at
        # offset 0 is a fresh look, like the kernel's seq_file: tested below.)
        rng = random.Random(1)
        for _ in range(300):
            off = rng.randrange(1, len(first) + 10)
            size = rng.randrange(1, 200)
            assert os.pread(fd, size, off) == first[off : off + size]
    finally:
        os.close(fd)
    # Structure matches a fresh rendering (numbers may move between opens).
    def keys(text: bytes) -> list[bytes]:
        return [ln.split(b":")[0].split()[0] for ln in text.splitlines()]

    assert keys(first) == keys(whole)


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])
def test_write_opens_fail(daemon: Daemon, flags: int) -> None:
    with pytest.raises(OSError) as exc:
        os.open(daemon.view("proc/meminfo"), flags)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)


def test_create_and_unlink_fail(daemon: Daemon) -> None:
    with pytest.raises(OSError) as exc:
        os.open(daemon.mountpoint / "proc" / "new", os.O_WRONLY | os.O_CREAT, 0o644)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        os.unlink(daemon.view("proc/meminfo"))


def test_listing_and_stat(daemon: Daemon) -> None:
    assert sorted(os.listdir(daemon.mountpoint)) == [".cgprocfs-status", "proc", "sys"]
    pressure = ["pressure"] if Path("/proc/pressure").is_dir() else []
    assert sorted(os.listdir(daemon.mountpoint / "proc")) == sorted([
        "cpuinfo", "diskstats", "loadavg", "meminfo", "stat", "swaps", "uptime", "vmstat",
        *pressure])
    # The test process sits at the root of the CPU hierarchies here: it sees every host
    # cpuN, next to the three views.
    cpu_dir = set(os.listdir(daemon.mountpoint / "sys/devices/system/cpu"))
    assert {"online", "possible", "present"} <= cpu_dir
    assert {n for n in cpu_dir if n[3:].isdigit() and n.startswith("cpu")} == {
        n for n in os.listdir("/sys/devices/system/cpu") if n[3:].isdigit() and
        n.startswith("cpu")}
    st = os.stat(daemon.view("proc/meminfo"))
    assert st.st_mode & 0o777 == 0o444
    with pytest.raises(FileNotFoundError):
        os.stat(daemon.mountpoint / "proc" / "nope")


def test_caller_that_exits_between_open_and_read_still_gets_its_bytes(daemon: Daemon) -> None:
    """A process in a 123 MiB cgroup opens meminfo, hands the fd over and exits; the
    reader (in another cgroup) reads the 123 MiB rendering, made at open."""
    with make_cgroup(123 * MiB) as cg:
        fd = open_in_cgroup_then_exit(cg.dir, daemon.view("proc/meminfo"))
        try:
            data = b"".join(iter(lambda: os.read(fd, 7), b""))
        finally:
            os.close(fd)
        assert meminfo_kb(data.decode())["MemTotal"] == 123 * 1024


def test_handler_fault_answers_eio_and_daemon_keeps_serving(root_fuse: None) -> None:
    """Inject a fault: the renderer raises on its first two calls."""
    with running_daemon(env=fault_env("raise")) as d:
        for _ in range(2):
            with pytest.raises(OSError) as exc:
                d.view("proc/meminfo").read_bytes()
            assert exc.value.errno == errno.EIO
        assert d.view("proc/meminfo").read_text().startswith("MemTotal:")
        assert d.proc.poll() is None
        assert "injected fault" in d.log()


def test_odd_cgroup_data_falls_back_to_host_file(root_fuse: None) -> None:
    """A snapshot that cannot be read (here: an injected OddCgroupData) serves the host's
    file for that open, logged once, and the next open is normal again."""
    with running_daemon(env=fault_env("odd")) as d:
        first = meminfo_kb(d.view("proc/meminfo").read_text())
        host = meminfo_kb(Path("/proc/meminfo").read_text())
        assert first["MemTotal"] == host["MemTotal"]
        assert "serving the host file" in d.log()


def _serve(args: list[str], **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cgprocfs", "serve", *args], capture_output=True,
                          text=True, timeout=30, cwd=REPO, **kw)


def test_not_root_is_a_clear_one_line_error(root_fuse: None, tmp_path: Path) -> None:
    # Drop to nobody after the imports (root's Python may not be readable by nobody).
    code = ("import os, sys, cgprocfs.cli, cgprocfs.serve; os.setgid(65534); "
            f"os.setuid(65534); sys.exit(cgprocfs.cli.main(['serve', '{tmp_path}']))")
    res = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "must run as root" in res.stderr


def test_no_dev_fuse_is_a_clear_one_line_error(root_fuse: None, tmp_path: Path) -> None:
    # A private mount namespace with an empty /dev: no /dev/fuse.
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs none /dev && exec {PYTHON} -m cgprocfs serve {tmp_path}"],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "no /dev/fuse" in res.stderr


def test_mountpoint_busy_is_a_clear_error(daemon: Daemon) -> None:
    res = _serve([str(daemon.mountpoint)])
    assert res.returncode == 1
    assert "mountpoint busy" in res.stderr and res.stderr.strip().count("\n") == 0
    # ... and the running daemon is untouched.
    assert daemon.view("proc/meminfo").read_text().startswith("MemTotal:")


def test_sigterm_unmounts_and_exits_zero(root_fuse: None) -> None:
    with running_daemon() as d:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=10) == 0
        assert str(d.mountpoint) not in mountinfo_fstypes()


def test_stale_mount_from_a_crashed_run_is_recovered(root_fuse: None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="cgprocfs-test-"))
    mp = tmp / "mnt"
    log = open(tmp / "log", "wb")  # noqa: SIM115
    first = subprocess.Popen([PYTHON, "-m", "cgprocfs", "serve", str(mp)], stdout=log,
                             stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    try:
        assert wait_mounted(mp, first)
        first.send_signal(signal.SIGKILL)
        first.wait()
        with pytest.raises(OSError) as exc:
            os.listdir(mp)
        # ENOTCONN, or ECONNABORTED for a request queued as the connection was torn down.
        assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        with running_daemon(mountpoint=mp) as d:
            assert d.view("proc/meminfo").read_text().startswith("MemTotal:")
            assert "stale mount" in d.log()
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
        force_unmount(mp)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


def test_reread_from_offset_zero_is_a_fresh_look(daemon: Daemon) -> None:
    """top, `free -s` and `vmstat N` keep the file open and re-read it from offset 0:
    each re-read must show current numbers, as the kernel's own file does."""
    reader = (
        "import mmap, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "def free():\n"
        "    os.lseek(fd, 0, os.SEEK_SET)\n"
        "    text = b''.join(iter(lambda: os.read(fd, 4096), b'')).decode()\n"
        "    return int(text.split('MemFree:')[1].split()[0])\n"
        "before = free()\n"
        "m = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
        "for off in range(0, 64 << 20, 4096): m[off] = 1\n"
        "print(before, free())\n"
    )
    with make_cgroup(256 * MiB) as cg:
        out = subprocess.run(
            ["sh", "-c", f'echo $$ > {cg.dir}/cgroup.procs && exec "$@"', "sh", PYTHON, "-c",
             reader, str(daemon.view("proc/meminfo"))],
            capture_output=True, text=True, timeout=60, check=True).stdout
        before, after = (int(x) for x in out.split())
        assert before - after >= 60 * 1024, out


def test_reread_never_shows_another_cgroups_numbers(daemon: Daemon) -> None:
    """The opener exits and the handle is re-read from 0 by a process elsewhere: the
    bytes stay those rendered for the opener (a re-read renders again only for the
    process that opened)."""
    with make_cgroup(111 * MiB) as cg:
        fd = open_in_cgroup_then_exit(cg.dir, daemon.view("proc/meminfo"))
        try:
            for _ in range(3):
                data = os.pread(fd, 65536, 0)
                assert meminfo_kb(data.decode())["MemTotal"] == 111 * 1024
        finally:
            os.close(fd)


def _worker_fds(daemon: Daemon) -> int:
    import psutil

    workers = [p for p in psutil.Process(daemon.proc.pid).children()
               if "cgprocfs.fuse.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    return int(workers[0].num_fds())


def test_kept_files_are_closed_once_nobody_reads_them(root_fuse: None) -> None:
    """A worker keeps the files it reads for every open, and closes them when the reads
    stop, even while it waits for a request that does not come."""
    from cgprocfs.kept import IDLE_S

    env = {**os.environ, "CGPROCFS_WORKERS": "1"}
    with running_daemon(env=env) as d, make_cgroup(256 * MiB) as cg:
        before = _worker_fds(d)
        views = " ".join(str(d.view(f"proc/{n}")) for n in ("meminfo", "stat", "uptime"))
        subprocess.run(["sh", "-c", f'echo $$ > {cg.dir}/cgroup.procs; cat {views} >/dev/null'],
                       check=True, timeout=30)
        during = _worker_fds(d)
        assert during > before  # the caller's /proc/PID/cgroup and its cgroup's files
        deadline = time.monotonic() + 2 * IDLE_S + 5
        while time.monotonic() < deadline and _worker_fds(d) > before:
            time.sleep(0.5)
        assert _worker_fds(d) == before, (before, during, _worker_fds(d))


def test_kept_files_setting_zero_keeps_none_and_serves_the_same(root_fuse: None) -> None:
    """kept_files = 0: every file is opened by path again; nothing stays open, and each
    view still shows its caller's container."""
    env = {**os.environ, "CGPROCFS_WORKERS": "1", "CGPROCFS_KEPT_FILES": "0"}
    with running_daemon(env=env) as d, make_cgroup(123 * MiB) as cg:
        before = _worker_fds(d)
        cats = "; echo @; ".join(f"cat {d.view(f'proc/{n}')}" for n in ("meminfo", "stat"))
        out = subprocess.run(
            ["sh", "-c", f"echo $$ > {cg.dir}/cgroup.procs; {cats}"],
            check=True, timeout=30, capture_output=True, text=True).stdout
        meminfo, stat = out.split("@\n")
        assert meminfo_kb(meminfo)["MemTotal"] == 123 * 1024
        assert stat.startswith("cpu ")
        assert _worker_fds(d) == before


def test_kept_files_setting_is_applied_on_reload(root_fuse: None, tmp_path: Path) -> None:
    """A reload (SIGHUP) starts workers with the new kept_files: 2,048, then 0."""
    conf = tmp_path / "config.toml"
    conf.write_text("kept_files = 2048\n")
    env = {**os.environ, "CGPROCFS_WORKERS": "1", "CGPROCFS_CONFIG": str(conf)}
    with running_daemon(env=env) as d, make_cgroup(200 * MiB) as cg:
        views = " ".join(str(d.view(f"proc/{n}")) for n in ("meminfo", "stat"))

        def read_grows_fds() -> bool:
            before = _worker_fds(d)
            subprocess.run(["sh", "-c", f"echo $$ > {cg.dir}/cgroup.procs; cat {views} >/dev/null"],
                           check=True, timeout=30)
            return _worker_fds(d) > before

        assert read_grows_fds()
        conf.write_text("kept_files = 0\n")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "every worker replaced" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "every worker replaced" in d.log()
        assert not read_grows_fds()
