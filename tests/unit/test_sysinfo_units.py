"""Pure parts of the sysinfo agent: struct layouts, the BPF filter's decisions, the OCI
state, the keeper protocol, the runtime shim's edit, the in-flight page."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cgprocfs import keeper
from cgprocfs.sysinfo import oci
from cgprocfs.sysinfo.inflight import InFlight
from cgprocfs.sysinfo.layout import SysinfoValues, pack32, pack64, unpack32, unpack64
from cgprocfs.sysinfo.seccomp import (
    AUDIT_ARCH_I386,
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_USER_NOTIF,
    filter_program,
)
from cgprocfs.sysinfo.shim import restore_listener_path

V = SysinfoValues(uptime=12.3, loads=(1.5, 0.25, 0.0), totalram=268435456, freeram=1 << 27,
                  sharedram=4096, bufferram=0, totalswap=0, freeswap=0, procs=7)


class Sysinfo64(ctypes.Structure):
    """glibc's struct sysinfo on a 64-bit machine, laid out by ctypes."""

    _fields_ = [("uptime", ctypes.c_long), ("loads", ctypes.c_ulong * 3),
                ("totalram", ctypes.c_ulong), ("freeram", ctypes.c_ulong),
                ("sharedram", ctypes.c_ulong), ("bufferram", ctypes.c_ulong),
                ("totalswap", ctypes.c_ulong), ("freeswap", ctypes.c_ulong),
                ("procs", ctypes.c_ushort), ("pad", ctypes.c_ushort),
                ("totalhigh", ctypes.c_ulong), ("freehigh", ctypes.c_ulong),
                ("mem_unit", ctypes.c_uint), ("_f", ctypes.c_char * 0)]


def test_pack64_matches_the_c_layout_and_the_kernel_sizes() -> None:
    data = pack64(V)
    assert len(data) == ctypes.sizeof(Sysinfo64) == 112
    s = Sysinfo64.from_buffer_copy(data)
    assert (s.uptime, s.totalram, s.freeram, s.sharedram, s.procs, s.mem_unit) == \
        (13, 268435456, 1 << 27, 4096, 7, 1)  # a started second counts, as in the kernel
    assert list(s.loads) == [98304, 16384, 0]
    # The kernel's own answer unpacks with the same layout.
    libc = ctypes.CDLL(None)
    mine = Sysinfo64()
    assert libc.sysinfo(ctypes.byref(mine)) == 0
    fields = unpack64(bytes(mine))
    assert fields["totalram"] * fields["mem_unit"] == os.sysconf("SC_PHYS_PAGES") * \
        os.sysconf("SC_PAGE_SIZE")


def test_pack32_bytes_when_they_fit_pages_when_not() -> None:
    small = unpack32(pack32(V))
    assert len(pack32(V)) == 64
    assert small["mem_unit"] == 1 and small["totalram"] == 268435456 and small["procs"] == 7
    big = SysinfoValues(1.0, (0.0, 0.0, 0.0), 16 << 30, 8 << 30, 0, 0, 0, 0, 70000)
    f = unpack32(pack32(big))
    assert f["mem_unit"] == 4096 and f["totalram"] == (16 << 30) // 4096
    assert f["freeram"] == (8 << 30) // 4096 and f["procs"] == 0xFFFF


def run_bpf(prog: list[tuple[int, int, int, int]], nr: int, arch: int) -> int:
    """A tiny classic-BPF interpreter for the three opcodes the filter uses."""
    data = {0: nr, 4: arch}
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x20:
            acc = data[k]
            pc += 1
        elif code == 0x15:
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x}")


@pytest.mark.parametrize(("nr", "arch", "want"), [
    (99, AUDIT_ARCH_X86_64, SECCOMP_RET_USER_NOTIF),     # sysinfo
    (116, AUDIT_ARCH_I386, SECCOMP_RET_USER_NOTIF),      # i386 sysinfo
    (99, AUDIT_ARCH_I386, SECCOMP_RET_ALLOW),            # i386 statfs
    (116, AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW),         # x86_64 setgroups
    (0x40000000 | 99, AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW),  # x32: left to the kernel
    (0, AUDIT_ARCH_X86_64, SECCOMP_RET_ALLOW),
    (99, 0xDEAD, SECCOMP_RET_ALLOW),
])
def test_filter_checks_arch_then_number(nr: int, arch: int, want: int) -> None:
    assert run_bpf(filter_program("x86_64"), nr, arch) == want


def test_oci_state_takes_the_seccomp_fd_and_closes_the_rest() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    state = {"ociVersion": "1.0.2", "fds": ["other", "seccompFd"], "pid": 42,
             "state": {"id": "abc", "pid": 42}}
    got = oci.parse_state(json.dumps(state).encode(), [r1, r2])
    assert (got.fd, got.container_id, got.pid) == (r2, "abc", 42)
    with pytest.raises(OSError):
        os.fstat(r1)  # closed
    os.close(r2)
    r3, w3 = os.pipe()
    with pytest.raises(oci.ProtocolError):
        oci.parse_state(b'{"fds": []}', [r3])
    with pytest.raises(OSError):
        os.fstat(r3)
    for fd in (w1, w2, w3):
        os.close(fd)


def test_oci_receive_reads_fds_and_tells_probes_apart() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    oci_state = json.dumps({"fds": ["seccompFd"], "pid": 1, "state": {"id": "x"}}).encode()
    import array
    a.sendmsg([oci_state], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    a.close()
    got = oci.receive_state(b)
    assert got is not None and got.container_id == "x"
    os.write(w, b"hi")
    assert os.read(got.fd, 2) == b"hi"
    for fd in (r, w, got.fd):
        os.close(fd)
    c, d = socket.socketpair()
    c.close()
    assert oci.receive_state(d) is None


def test_keeper_holds_fds_for_the_next_generation() -> None:
    k = keeper.Keeper()
    pass_fds, env = k.child_args()
    # A child keeps a pipe's read end, replaces it, keeps and drops another.
    code = """
import os, sys
from cgprocfs import keeper
r, w = os.pipe(); os.write(w, b"kept")
assert keeper.keep("sysinfo.a", r)
r2, _ = os.pipe(); assert keeper.keep("sysinfo.b", r2); assert keeper.drop("sysinfo.b")
assert keeper.keep("other.c", r2)
print(keeper.kept_fds())
"""
    res = subprocess.run([sys.executable, "-c", code], pass_fds=pass_fds,
                         env={**os.environ, **env}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "{}"
    assert k.receive() == 4
    assert sorted(k.fds) == ["other.c", "sysinfo.a"]
    pass_fds, env = k.child_args(prefix="sysinfo.")
    kept = keeper.kept_fds(env)
    assert list(kept) == ["sysinfo.a"] and kept["sysinfo.a"] in pass_fds
    res = subprocess.run(
        [sys.executable, "-c", "import os; from cgprocfs import keeper; "
         "print(os.read(keeper.kept_fds()['sysinfo.a'], 4).decode())"],
        pass_fds=pass_fds, env={**os.environ, **env}, capture_output=True, text=True)
    assert res.stdout.strip() == "kept", res.stderr
    k.close()


def test_keeper_client_without_supervisor_is_a_no_op() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CGPROCFS_KEEP")}
    code = ("import os; from cgprocfs import keeper; r, w = os.pipe(); "
            "print(keeper.keep('x', r), keeper.drop('x'), keeper.kept_fds())")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True)
    assert res.stdout.strip() == "False False {}", res.stderr


def test_inflight_page_survives_its_writer() -> None:
    page = InFlight.create()
    assert page.pending() is None
    page.begin("sysinfo.listener.abc.1234")
    page.mm[256:264] = (7).to_bytes(8, "little")  # as the kernel's RECV would write
    again = InFlight(os.dup(page.fd))
    pending = again.pending()
    assert pending is not None and pending[0] == "sysinfo.listener.abc.1234"
    page.clear()
    assert again.pending() is None


def test_shim_restores_listener_path_only_for_notify_rules(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "config.json")
    spec = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["sysinfo"], "action": "SCMP_ACT_NOTIFY"}]}}}
    with open(path, "w") as f:
        json.dump(spec, f)
    assert restore_listener_path(path, "/run/x.sock")
    with open(path) as f:
        assert json.load(f)["linux"]["seccomp"]["listenerPath"] == "/run/x.sock"
    assert not restore_listener_path(path, "/run/y.sock")  # already set: left alone
    with open(path, "w") as f:
        json.dump({"linux": {"seccomp": {"syscalls": [{"names": ["read"],
                                                       "action": "SCMP_ACT_ALLOW"}]}}}, f)
    assert not restore_listener_path(path, "/run/x.sock")


def test_shipped_profile_is_docker_default_plus_the_notify_rule() -> None:
    here = os.path.dirname(__file__)
    with open(os.path.join(here, "..", "..", "docker", "seccomp-sysinfo.json")) as f:
        profile = json.load(f)
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["listenerPath"] == "/run/cgprocfs/seccomp.sock"
    rules = [r for r in profile["syscalls"] if "sysinfo" in r["names"]]
    assert rules == [{"names": ["sysinfo"], "action": "SCMP_ACT_NOTIFY"}]
    allowed = {n for r in profile["syscalls"] if r["action"] == "SCMP_ACT_ALLOW"
               for n in r["names"]}
    assert {"read", "openat", "clone", "execve"} <= allowed


def test_listeners_take_synchronous_wake_ups_where_the_kernel_has_them() -> None:
    """The flag that makes a round trip ~7 µs instead of ~50 µs exists from Linux 6.6;
    older kernels say EINVAL, which sync_wake_up reports as False (the agent goes on)."""
    code = ("from cgprocfs.sysinfo.seccomp import install_listener_filter, sync_wake_up\n"
            "print(sync_wake_up(install_listener_filter()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert out == str((major, minor) >= (6, 6))
