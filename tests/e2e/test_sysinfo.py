"""sysinfo(2) from the container's point of view (docs/sysinfo.md): busybox free and
uptime, getconf and Python's sysconf/getloadavg, a 32-bit static caller, runc with
listenerPath, and callers that keep calling while the agent is killed and restarted."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import (
    PYTHON,
    REPO,
    Container,
    Daemon,
    make_container,
    memory_hierarchy,
    own_cgroup_path,
    parse_free_b,
    running_daemon,
)
from sysinfo_support import (
    attached,
    build_caller,
    oci_bundle,
    parse_fields,
    running_agent,
    static_busybox,
)

MiB = 1 << 20
LIMIT = 256 * MiB
PAGE = os.sysconf("SC_PAGE_SIZE")
# busybox free and procps free are two programs run one after the other: each one's own
# memory (heap, stack, page tables) is charged to the container while it reads, so their
# figures can differ by that much (the same-moment comparison is exact: see
# test_sysinfo_and_meminfo_come_from_one_snapshot).
TOOL_FOOTPRINT = 2 * MiB


def cgprocfs_run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cgprocfs", "run", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def parse_busybox_free(text: str) -> dict[str, int]:
    """busybox free -b has the same columns as procps': total used free shared
    buff/cache available."""
    return parse_free_b(text)


def host_uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def test_run_busybox_free_agrees_with_procps_free(root_fuse: None) -> None:
    # Both tools run once first, so page cache they pull in is charged before the
    # compared runs, not between them.
    script = "busybox free -b >/dev/null; free -b >/dev/null; " \
             "busybox free -b; echo ---; free -b; echo ---; grep Shmem: /proc/meminfo"
    res = cgprocfs_run("--memory", "256M", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    bb_text, pp_text, shmem = res.stdout.split("---\n")
    bb, pp = parse_busybox_free(bb_text), parse_free_b(pp_text)
    host = parse_free_b(subprocess.run(["busybox", "free", "-b"], capture_output=True,
                                       text=True, check=True).stdout)
    assert bb["total"] == LIMIT == pp["total"], res.stdout
    assert host["total"] != LIMIT
    assert bb["shared"] == pp["shared"], res.stdout
    assert bb["swap_total"] == pp["swap_total"], res.stdout
    for col in ("used", "free", "buff/cache", "available"):
        assert abs(bb[col] - pp[col]) <= TOOL_FOOTPRINT, (col, res.stdout)
    # busybox's used is total - free - buff/cache, procps 4's is total - available: the
    # same when the container has no shared memory (tmpfs), as here.
    assert int(shmem.split()[1]) < 1024, shmem
    assert 0 <= bb["used"] < 64 * MiB, res.stdout


def test_sysinfo_and_meminfo_come_from_one_snapshot(root_fuse: None) -> None:
    """One process reads sysinfo(2) and /proc/meminfo back to back: the same figures,
    to the page (a caller whose memory does not move between the two reads)."""
    code = textwrap.dedent("""
        import ctypes, json, struct, time
        buf = ctypes.create_string_buffer(112)
        libc = ctypes.CDLL(None)
        out = []
        for _ in range(5):
            time.sleep(0.1)  # past the agent's reuse of one snapshot (VALUES_MAX_AGE)
            # meminfo first: opening a file charges kernel memory to the caller's cgroup
            # (in batches of 64 pages), sysinfo(2) charges nothing.
            with open("/proc/meminfo") as f:
                text = f.read()
            assert libc.sysinfo(buf) == 0
            f = struct.unpack_from("<6Q", buf.raw, 32)
            unit = struct.unpack_from("<I", buf.raw, 104)[0]
            kb = {}
            for line in text.splitlines():
                k, v = line.split(":")
                kb[k] = int(v.split()[0])
            out.append({"sys": [x * unit for x in f], "meminfo": [kb[k] * 1024 for k in (
                "MemTotal", "MemFree", "Shmem", "Buffers", "SwapTotal", "SwapFree")]})
        print(json.dumps(out))
    """)
    res = cgprocfs_run("--memory", "256M", "--", "python3", "-c", code)
    assert res.returncode == 0, res.stderr
    pairs = json.loads(res.stdout)
    assert all(p["sys"][0] == LIMIT for p in pairs), pairs
    # The caller's own memory settles after its first rounds; one exact agreement of every
    # field in the same round is what "one snapshot" means.
    assert any(all(abs(a - b) <= PAGE for a, b in zip(p["sys"], p["meminfo"], strict=True))
               for p in pairs), pairs


def test_run_getconf_python_sysconf_loadavg_and_busybox_uptime(root_fuse: None) -> None:
    # The container must be visibly younger than the machine.
    while host_uptime() < 70:
        time.sleep(1)
    code = ("import os, json; print(json.dumps({'phys': os.sysconf('SC_PHYS_PAGES'), "
            "'avphys': os.sysconf('SC_AVPHYS_PAGES'), 'page': os.sysconf('SC_PAGE_SIZE'), "
            "'load': os.getloadavg()}))")
    burn = "while :; do :; done"
    script = (
        f"for i in 1 2 3; do sh -c '{burn}' & done; sleep 1; "
        f"getconf _PHYS_PAGES; getconf PAGESIZE; python3 -c \"{code}\"; "
        "echo ---; cat /proc/loadavg; busybox uptime; cat /proc/uptime"
    )  # `run` kills the burners with the cgroup
    res = cgprocfs_run("--memory", "256M", "--", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    head, tail = res.stdout.split("---\n")
    phys, pagesize, pyline = head.splitlines()
    assert int(phys) * int(pagesize) == LIMIT, res.stdout
    py = json.loads(pyline)
    assert py["phys"] * py["page"] == LIMIT, py
    assert 0 < py["avphys"] <= py["phys"], py
    loadavg, bb_uptime, uptime = tail.splitlines()
    # Three burners from the container's first look: 3.00 in the view and in sysinfo (the
    # agent and the daemon each start their averages from the count they first see; a
    # shell that has just forked the caller may still be runnable then: one more).
    view_loads = [float(x) for x in loadavg.split()[:3]]
    for got in (py["load"], view_loads):
        assert all(2.5 <= x <= 4.5 for x in got), (got, res.stdout)
        assert max(got) - min(got) < 0.5, (got, res.stdout)
    assert re.search(r"up 0 min,", bb_uptime), bb_uptime  # the host has been up > 1 min
    assert float(uptime.split()[0]) < 30, uptime


def test_32bit_static_caller_gets_its_layout(root_fuse: None, tmp_path: Path) -> None:
    exe = build_caller(tmp_path, m32=True)
    if isinstance(exe, str):
        pytest.skip(exe)
    try:
        host = subprocess.run([str(exe)], capture_output=True, text=True)
    except OSError as exc:
        if exc.errno != errno.ENOEXEC:
            raise
        pytest.skip("this kernel cannot run 32-bit binaries (no IA32 emulation)")
    assert host.returncode == 0, host.stderr
    native = parse_fields(host.stdout)
    assert native["size"] == 64
    assert native["totalram"] * native["mem_unit"] != LIMIT
    res = cgprocfs_run("--memory", "256M", "--", str(exe))
    assert res.returncode == 0, res.stderr
    got = parse_fields(res.stdout)
    assert got["mem_unit"] == 1 and got["totalram"] == LIMIT, got
    assert 0 < got["freeram"] <= LIMIT, got
    assert got["phys_pages"] * got["pagesize"] == LIMIT, got
    assert got["uptime"] < 30 and 1 <= got["procs"] < 50, got


def test_agent_answers_64bit_static_caller_and_leaves_root_callers_alone(
        root_fuse: None, tmp_path: Path) -> None:
    """A static binary (no libc to intercept) in a limited cgroup sees the limit; a
    caller attached while in the root memory cgroup gets the kernel's own answer."""
    exe = build_caller(tmp_path, m32=False)
    if isinstance(exe, str):
        pytest.skip(exe)
    native = parse_fields(subprocess.run([str(exe)], capture_output=True, text=True,
                                         check=True).stdout)
    with running_agent() as agent, make_container(memory=LIMIT) as ct:
        res = subprocess.run(attached(ct, agent.socket, [str(exe)]), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr + agent.log()
        got = parse_fields(res.stdout)
        assert got["totalram"] == LIMIT and got["mem_unit"] == 1, got
        version, _ = memory_hierarchy()
        if own_cgroup_path(version) == "/":
            root = subprocess.run(
                [PYTHON, "-m", "cgprocfs", "exec", "--require", "--socket",
                 str(agent.socket), "--", str(exe)], capture_output=True, text=True,
                timeout=60, cwd=REPO)
            assert root.returncode == 0, root.stderr
            assert parse_fields(root.stdout)["totalram"] == native["totalram"]
        assert "Traceback" not in agent.log(), agent.log()


def test_exec_without_agent(root_fuse: None, tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    res = subprocess.run([PYTHON, "-m", "cgprocfs", "exec", "--socket", missing, "--",
                          "getconf", "_PHYS_PAGES"], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.returncode == 0 and int(res.stdout) == os.sysconf("SC_PHYS_PAGES"), res
    assert "no sysinfo agent" in res.stderr
    res = subprocess.run([PYTHON, "-m", "cgprocfs", "exec", "--require", "--socket", missing,
                          "--", "true"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 125 and "no sysinfo agent" in res.stderr


CALL_LOOP = textwrap.dedent("""
    import ctypes, json, struct, sys, time
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(112)
    end = time.monotonic() + float(sys.argv[1])
    calls, errors, wrong, gap = 0, {}, [], 0.0
    while time.monotonic() < end:
        ctypes.memset(buf, 0xAB, 112)
        t = time.monotonic()
        r = libc.sysinfo(buf)
        gap = max(gap, time.monotonic() - t)
        calls += 1
        if r != 0:
            e = ctypes.get_errno()
            errors[e] = errors.get(e, 0) + 1
            continue
        total, unit = struct.unpack_from("<Q", buf.raw, 32)[0], \\
            struct.unpack_from("<I", buf.raw, 104)[0]
        if total * unit != int(sys.argv[2]) and len(wrong) < 5:
            wrong.append(buf.raw.hex())
    print(json.dumps({"calls": calls, "errors": errors, "wrong": wrong, "gap": gap}))
""")


def _wait_for(done: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)


def _call_loop_while_killing(ct: Container, sock: Path, kill_agent: Callable[[], None],
                             log: Callable[[], str]) -> dict[str, Any]:
    """CALL_LOOP (6 s of sysinfo calls, checked against LIMIT) attached in `ct` through
    `sock` while `kill_agent` (SIGKILL the agent, wait for the next one) runs three times,
    1 s apart; the loop must exit 0. Its result: calls, errors, wrong, gap."""
    caller = subprocess.Popen(attached(ct, sock, ["python3", "-c", CALL_LOOP, "6",
                                                  str(LIMIT)]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        for _ in range(3):
            kill_agent()
            time.sleep(1.0)
        out, err = caller.communicate(timeout=60)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    assert caller.returncode == 0, err + log()
    result: dict[str, Any] = json.loads(out)
    print(f"calls {result['calls']}, longest call {result['gap'] * 1000:.0f} ms")
    return result


def test_agent_restarts_leave_callers_waiting_not_failing(root_fuse: None) -> None:
    """Kill the agent (SIGKILL) three times while a container calls sysinfo in a loop:
    the supervisor keeps the listener, the in-flight page and the socket, so callers
    wait during the gap and every call returns the container's figures."""
    with running_agent(supervised=True) as agent, make_container(memory=LIMIT) as ct:

        def kill_agent() -> None:
            pid, gen = agent.agent_pid()
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: agent.agent_pid()[1] != gen)

        result = _call_loop_while_killing(ct, agent.socket, kill_agent, agent.log)
        assert agent.agent_pid()[1] == 4, agent.log()
        assert result["errors"] == {}, result  # no ENOSYS (38), no other error
        assert result["wrong"] == [], result
        assert result["calls"] > 100, result
        # A new listener after the restarts is served too.
        res = subprocess.run(attached(ct, agent.socket, ["getconf", "_PHYS_PAGES"]),
                             capture_output=True, text=True, timeout=60)
        assert int(res.stdout) * PAGE == LIMIT, res


def test_the_daemons_own_agent_survives_sigkill(root_fuse: None, tmp_path: Path) -> None:
    """`cgprocfs serve` runs the agent as one of its processes and keeps its descriptors:
    SIGKILL to the agent three times while a container loops on sysinfo: no ENOSYS, no
    wrong figure."""
    sock = tmp_path / "seccomp.sock"
    env = {**os.environ, "CGPROCFS_SYSINFO_SOCKET": str(sock)}

    def agent_pid(d: Daemon) -> int | None:
        for task in Path(f"/proc/{d.proc.pid}/task").iterdir():
            for c in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if b"sysinfo-agent" in Path(f"/proc/{c}/cmdline").read_bytes():
                        return int(c)
        return None

    with running_daemon(env=env, sysinfo=True) as d, make_container(memory=LIMIT) as ct:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        def kill_agent() -> None:
            old = agent_pid(d)
            assert old is not None, d.log()
            os.kill(old, signal.SIGKILL)
            _wait_for(lambda: agent_pid(d) not in (None, old))

        result = _call_loop_while_killing(ct, sock, kill_agent, d.log)
        assert result["errors"] == {}, result
        assert result["wrong"] == [], result
        assert "sysinfo" in d.log() and "ended with signal 9" in d.log()


def _runc_cgroups_path(name: str) -> str:
    version, _ = memory_hierarchy()
    if version == 1:
        return name  # runc puts a relative path beneath its own cgroup, per hierarchy
    own = own_cgroup_path(2)
    parent = own.rsplit("/", 1)[0] if own != "/" else ""
    return f"{parent}/{name}"


def test_runc_hands_its_listener_to_the_agent(daemon: Daemon, tmp_path: Path) -> None:
    """runc (the OCI listenerPath protocol) with a busybox-only rootfs: busybox free,
    uptime and a static caller see the container; /proc/meminfo is our view."""
    import shutil

    if shutil.which("runc") is None:
        pytest.skip("runc is not installed (apt-get install runc)")
    exe = build_caller(tmp_path, m32=False)
    if isinstance(exe, str):
        pytest.skip(exe)
    name = f"cgprocfs-runc-{uuid.uuid4().hex[:8]}"
    # head, not cat: busybox cat copies with sendfile(2), which reads 0 bytes from the
    # view (reported to the FUSE layer).
    script = ("free -b; echo ---; head -n 100 /proc/meminfo; echo ---; uptime; echo ---; "
              "/sysinfo64")
    with running_agent() as agent:
        bundle = tmp_path / "bundle"
        binds = [(str(daemon.view(v)), f"/{v}") for v in ("proc/meminfo", "proc/uptime")]
        oci_bundle(bundle, static_busybox(), ["sh", "-c", script], _runc_cgroups_path(name),
                   LIMIT, agent.socket, binds, extra=[(Path(exe), "sysinfo64")])
        state = tempfile.mkdtemp(prefix="cgprocfs-runc-")
        try:
            res = subprocess.run(["runc", "--root", state, "run", "--bundle", str(bundle),
                                  name], capture_output=True, text=True, timeout=120)
        finally:
            subprocess.run(["runc", "--root", state, "delete", "--force", name],
                           capture_output=True)
            subprocess.run(["rm", "-rf", state])
        assert res.returncode == 0, res.stderr + agent.log()
        free_text, meminfo, uptime, static = res.stdout.split("---\n")
        free = parse_busybox_free(free_text)
        kb = {ln.split(":")[0]: int(ln.split()[1]) for ln in meminfo.splitlines()}
        assert "MemTotal" in kb, res.stdout + res.stderr
        assert free["total"] == LIMIT == kb["MemTotal"] * 1024, res.stdout
        assert abs(free["free"] - kb["MemFree"] * 1024) <= TOOL_FOOTPRINT, res.stdout
        assert abs(free["available"] - kb["MemAvailable"] * 1024) <= TOOL_FOOTPRINT
        assert re.search(r"up 0 min,", uptime), uptime
        got = parse_fields(static)
        assert got["totalram"] == LIMIT and got["uptime"] < 60, got
        assert f"for {name}" in agent.log(), agent.log()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
