"""Real parts for the sysinfo tests: an agent (alone or under a restarting supervisor),
a caller attached with `cgprocfs exec` inside a test cgroup, static busybox, a 32-bit
static caller built with gcc -m32, and an OCI bundle for runc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from support import PYTHON, REPO, Container, stop_process

E2E = Path(__file__).resolve().parent
SYSINFO_C = r"""
#include <stdio.h>
#include <sys/sysinfo.h>
#include <unistd.h>
int main(void) {
    struct sysinfo s;
    if (sysinfo(&s) != 0) { perror("sysinfo"); return 1; }
    printf("size %u\nuptime %ld\nload1 %lu\ntotalram %lu\nfreeram %lu\nsharedram %lu\n"
           "totalswap %lu\nprocs %u\nmem_unit %u\nphys_pages %ld\npagesize %ld\n",
           (unsigned)sizeof s, (long)s.uptime, (unsigned long)s.loads[0],
           (unsigned long)s.totalram, (unsigned long)s.freeram, (unsigned long)s.sharedram,
           (unsigned long)s.totalswap, (unsigned)s.procs, s.mem_unit,
           sysconf(_SC_PHYS_PAGES), sysconf(_SC_PAGESIZE));
    return 0;
}
"""


def wait_reachable(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the sysinfo agent did not come up:\n{log.read_text()}")


@dataclass
class Agent:
    socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes]  # the agent, or the supervisor harness running it
    pidfile: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def agent_pid(self) -> tuple[int, int]:
        """(pid, generation) of the agent the harness runs now."""
        assert self.pidfile is not None
        pid, gen = self.pidfile.read_text().split()
        return int(pid), int(gen)


@contextlib.contextmanager
def running_agent(supervised: bool = False, args: Sequence[str] = ()) -> Iterator[Agent]:
    """`cgprocfs sysinfo-agent` on a fresh socket (under keeper_harness.py if
    `supervised`); stopped and removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="cgprocfs-sysinfo-"))
    sock = tmp / "seccomp.sock"
    log_path = tmp / "agent.log"
    cmd = [PYTHON, "-m", "cgprocfs", "--log-level", "debug", "sysinfo-agent", "--socket",
           str(sock), *args]
    pidfile = tmp / "agent.pid" if supervised else None
    if pidfile is not None:
        cmd = [PYTHON, str(E2E / "keeper_harness.py"), str(pidfile), "--", *cmd]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    agent = Agent(sock, log_path, proc, pidfile)
    try:
        wait_reachable(sock, proc, log_path)
        yield agent
    finally:
        stop_process(proc)
        keep = os.environ.get("CGPROCFS_TEST_LOGDIR")
        if keep:
            with contextlib.suppress(OSError):
                shutil.copy(log_path, Path(keep) / f"sysinfo-agent-{proc.pid}.log")
        shutil.rmtree(tmp, ignore_errors=True)


def attached(ct: Container, sock: Path, cmd: Sequence[str]) -> list[str]:
    """A command line that joins `ct` and runs `cmd` attached with `cgprocfs exec`."""
    join = " && ".join(f"echo $$ > {p}" for p in ct.procs_files)
    return ["sh", "-c", f'{join} && exec "$@"', "sh", PYTHON, "-m", "cgprocfs", "exec",
            "--require", "--socket", str(sock), "--", *cmd]


def parse_fields(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.strip())}


def build_caller(out: Path, m32: bool) -> Path | str:
    """A static C program printing its struct sysinfo; a str: why it cannot be built."""
    src = out / "sysinfo.c"
    src.write_text(SYSINFO_C)
    exe = out / ("sysinfo32" if m32 else "sysinfo64")
    if shutil.which("gcc") is None:
        return "gcc is not installed"
    cmd = ["gcc", *(["-m32"] if m32 else []), "-static", "-O2", "-o", str(exe), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return f"gcc {'-m32 ' if m32 else ''}-static failed (gcc-multilib?): {res.stderr[-300:]}"
    return exe


def static_busybox() -> Path:
    """A statically linked busybox (the host's if static, else busybox-static's, cached)."""
    import sys

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.guest.packages import DEFAULT_CACHE, _static_busybox

    return _static_busybox(DEFAULT_CACHE)


def oci_bundle(bundle: Path, busybox: Path, args: Sequence[str], cgroups_path: str,
               memory: int, listener: Path | None, binds: Sequence[tuple[str, str]] = (),
               extra: Sequence[tuple[Path, str]] = ()) -> None:
    """An OCI bundle whose rootfs is static busybox (plus `extra` files), limited to
    `memory`, with the sysinfo notify rule and listenerPath when `listener` is given, and
    `binds` (host path, container path) bound read-only."""
    rootfs = bundle / "rootfs"
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy(busybox, rootfs / "bin" / "busybox")
    for applet in ("sh", "free", "uptime", "cat", "head", "nproc", "top"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    for src, name in extra:
        shutil.copy(src, rootfs / name)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = list(args)
    spec["root"]["readonly"] = False
    linux = spec["linux"]
    linux["cgroupsPath"] = cgroups_path
    linux.setdefault("resources", {})["memory"] = {"limit": memory}
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] != "network"]
    if listener is not None:
        linux["seccomp"] = {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "listenerPath": str(listener),
            "syscalls": [{"names": ["sysinfo"], "action": "SCMP_ACT_NOTIFY"}],
        }
    spec["mounts"] += [{"destination": dst, "type": "bind", "source": src,
                        "options": ["bind", "ro"]} for src, dst in binds]
    (bundle / "config.json").write_text(json.dumps(spec, indent=1))
