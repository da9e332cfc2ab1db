"""Run a bash script as root inside a user-mode-linux guest with a real cgroup v2 hierarchy.

The host runs cgroup v1; the guest (Debian's ``user-mode-linux`` kernel, 6.1) mounts cgroup2 at
/sys/fs/cgroup with the memory, cpu, io and pids controllers enabled for children, and has
/dev/fuse.  The guest's root is the host's root filesystem (hostfs, read-only) under a tmpfs
overlay, so everything installed on the host -- the project's .venv included -- is there, and
whatever the guest writes vanishes with it.

Module use::

    from tests.guest.runner import run_in_guest
    r = run_in_guest("cat /sys/fs/cgroup/cgroup.controllers", timeout=60)
    assert r.returncode == 0, r.output + r.console

CLI (from the repository root)::

    python -m tests.guest.runner [--timeout S] [--mem 2G] [--env K=V]... -- CMD ARGS...

See docs/guest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
UML_MODULES = Path("/usr/lib/uml/modules")
GUEST_SHARE = "/mnt/guest-out"  # where the runner's host temp dir appears inside the guest
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def uml_binary() -> str | None:
    """Path of the user-mode-linux kernel, or None when it is not installed."""
    found = shutil.which("linux.uml") or shutil.which("linux")
    if found is None and os.access("/usr/bin/linux.uml", os.X_OK):
        found = "/usr/bin/linux.uml"
    return found


def available() -> str | None:
    """None when guests can run here, else the reason they cannot."""
    if uml_binary() is None:
        return "user-mode-linux is not installed (no linux.uml; apt-get install user-mode-linux)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    if os.geteuid() != 0:
        return "the guest runner needs root (unshare --pid, hostfs writes)"
    return _host_cpu_problem()


# Debian's user-mode-linux 6.1 sizes its FPU register buffer for the host CPUs it knew;
# on a host whose XSAVE area is larger (AMX: Sapphire Rapids and later) the kernel
# refuses its PTRACE_SETREGSET and the guest's init dies at once ("userspace - ptrace set
# fp regs failed, errno = 14", then a panic). Nothing the tests do can change that: the
# guest cannot run on such a host. Any other failure to boot is not excused here: the
# guest tests then run and fail with the console in their report.
_FPU_REFUSED = re.compile(r"ptrace (?:set|get) fp regs failed[^\n]*")
PROBE_TIMEOUT_S = 30.0


@functools.cache
def _host_cpu_problem() -> str | None:
    """Boot one guest (once per process) and return why guests cannot run on this host
    CPU, or None."""
    r = run_in_guest("exit 0", timeout=PROBE_TIMEOUT_S, mem="256M")
    found = _FPU_REFUSED.search(r.console) if r.returncode != 0 else None
    if found is None:
        return None
    return (f"user-mode-linux 6.1 cannot run a guest on this host CPU: its init died with "
            f"{found.group(0).strip()!r} (the host's XSAVE area, AMX, is larger than "
            f"this UML kernel handles; see docs/guest.md)")


@dataclass
class GuestResult:
    returncode: int | None
    """Exit status of the script; None if it never finished (timeout, guest crash)."""
    output: str
    """Everything the script printed, stdout and stderr interleaved."""
    console: str
    """The guest's console: kernel messages and the init's own log, for debugging."""
    outdir: Path | None
    """Copy of $GUEST_OUT, owned by the caller; None if the script left nothing there."""
    timed_out: bool
    duration: float
    """Wall-clock seconds from starting the guest until it and its helpers were gone."""
    pgid: int | None = None
    """Host process group of the run (diagnostic: it is empty when this returns)."""
    pidns: str | None = None
    """The guest's host pid namespace, "pid:[N]" (diagnostic: empty when this returns)."""
    workdir: Path | None = None
    """The runner's temp dir on the host (diagnostic: already removed when this returns)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def report(self) -> str:
        """Human-readable summary for assertion messages."""
        state = "timed out" if self.timed_out else f"exit status {self.returncode}"
        return (
            f"guest {state} after {self.duration:.1f}s\n"
            f"--- output ---\n{self.output}\n--- console ---\n{self.console}"
        )


# The guest's init.  Stage 1 runs on the read-only hostfs root: it builds a tmpfs+overlay root
# and pivots into it.  Stage 2 mounts the usual filesystems, cgroup2 and the host share, then
# runs the script with its output going straight to a file in the share (hostfs writes go
# through to the host at once, so a timed-out run still leaves its output behind).
_INIT = r"""#!/bin/bash
# Generated by tests/guest/runner.py: the init of a user-mode-linux guest.
export PATH=@PATH@
SHARE_HOST=@SHARE_HOST@
SHARE=@SHARE@
REPO=@REPO@
log() { echo "guest-init: $*"; }
die() { log "FATAL: $*"; halt_now; }
halt_now() {
    poweroff -f >/dev/null 2>&1
    busybox poweroff -f >/dev/null 2>&1
    echo o > /proc/sysrq-trigger
    sleep 5
    exit 1
}

KVER=$(uname -r)
MODDIR=
for d in @MODULES@/"$KVER" @MODULES@/* /lib/modules/"$KVER"; do
    if [ -f "$d/modules.dep" ]; then MODDIR=$d; break; fi
done

insmod_file() {
    if command -v insmod >/dev/null 2>&1; then insmod "$1" && return 0; fi
    if command -v busybox >/dev/null 2>&1; then busybox insmod "$1" && return 0; fi
    python3 -c 'import ctypes, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
libc = ctypes.CDLL(None, use_errno=True)
if libc.syscall(313, fd, b"", 0) != 0:  # finit_module
    sys.exit(os.strerror(ctypes.get_errno()))' "$1"
}

# load_module NAME: load a module and what it depends on, from modules.dep.
load_module() {
    local name=$1 line path dep
    grep -q "^${name//-/_} " /proc/modules 2>/dev/null && return 0
    [ -n "$MODDIR" ] || { log "no module dir for $KVER"; return 1; }
    grep -q -E "(^|/)${name}\.ko$" "$MODDIR/modules.builtin" 2>/dev/null && return 0
    line=$(grep -m1 -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$MODDIR/modules.dep") || {
        log "module $name not found in $MODDIR"; return 1; }
    path=${line%%:*}
    for dep in ${line#*:}; do
        dep=${dep##*/}; load_module "${dep%%.ko*}" || true
    done
    insmod_file "$MODDIR/$path"
}

if [ "$$" = 1 ] && [ -z "$GUEST_STAGE2" ]; then
    # ---- stage 1: writable root ---------------------------------------------------------
    mount -t proc proc /proc || die "mount /proc"
    load_module overlay || die "cannot load overlay.ko"
    mount -t tmpfs -o mode=0755 tmpfs /tmp || die "tmpfs for the overlay"
    mkdir -p /tmp/.guest/upper /tmp/.guest/work /tmp/.guest/root
    mount -t overlay overlay \
        -o lowerdir=/,upperdir=/tmp/.guest/upper,workdir=/tmp/.guest/work /tmp/.guest/root \
        || die "overlay mount"
    cd /tmp/.guest/root || die "cd new root"
    mkdir -p .oldroot
    pivot_root . .oldroot || die "pivot_root"
    cd /
    export GUEST_STAGE2=1
    exec /bin/bash "$0"
fi

# ---- stage 2: the guest's filesystems ----------------------------------------------------
mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib
# The repository may live under a directory just covered by a tmpfs (a CI clone in /tmp):
# show it again, straight from the host.
if [ ! -e "$REPO/pyproject.toml" ]; then
    mkdir -p "$REPO" && mount -t hostfs -o "$REPO" none "$REPO" || die "hostfs mount of $REPO"
fi
umount -l /.oldroot 2>/dev/null
rmdir /.oldroot 2>/dev/null
echo guest > /proc/sys/kernel/hostname
ip link set lo up 2>/dev/null

# modprobe/modinfo inside the guest look in /lib/modules/$(uname -r).
if [ -n "$MODDIR" ] && [ ! -e "/lib/modules/$KVER" ]; then
    mkdir -p "/lib/modules/$KVER" && mount --bind "$MODDIR" "/lib/modules/$KVER"
    MODDIR=/lib/modules/$KVER
fi

mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup 2>/dev/null \
    || mount -t cgroup2 cgroup2 /sys/fs/cgroup || log "cannot mount cgroup2"
for c in $(cat /sys/fs/cgroup/cgroup.controllers 2>/dev/null); do
    echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null \
        || log "cannot enable controller $c"
done

load_module fuse || log "cannot load fuse"
[ -c /dev/fuse ] || log "/dev/fuse is missing"

mkdir -p "$SHARE"
mount -t hostfs -o "$SHARE_HOST" none "$SHARE" || die "hostfs mount of $SHARE_HOST"

# ---- the script ---------------------------------------------------------------------------
cd "$REPO" || cd /
log "running the script"
# A clean environment: the kernel hands init its unknown boot parameters (mem=...) as variables.
env -i PATH="$PATH" HOME=/root TERM=dumb LANG=C.UTF-8 GUEST=1 GUEST_OUT="$SHARE/out" \
    GUEST_REPO="$REPO" bash -c '. "$1" && exec bash "$2"' guest "$SHARE/env.sh" \
    "$SHARE/script.sh" </dev/null >"$SHARE/output" 2>&1
status=$?
echo "$status" > "$SHARE/status.tmp" && mv "$SHARE/status.tmp" "$SHARE/status"
log "script exited with status $status"
sync
halt_now
"""


def output_section(output: str, name: str) -> str:
    """The lines a guest script printed after `=== name` and before the next `=== `."""
    m = re.search(rf"^=== {re.escape(name)}\n(.*?)(?=^=== |\Z)", output, re.S | re.M)
    assert m, f"no section {name} in:\n{output}"
    return m.group(1)


def report_with_logs(r: GuestResult, logs_dir: str = "daemon-logs") -> str:
    """`r.report()` followed by every log the script left in $GUEST_OUT/<logs_dir>."""
    text = r.report()
    if r.outdir and (r.outdir / logs_dir).is_dir():
        for log in sorted((r.outdir / logs_dir).iterdir()):
            text += f"\n----- {log.name} -----\n{log.read_text(errors='replace')[-4000:]}"
    return text


def _check_path(p: Path) -> str:
    s = str(p)
    if any(c in s for c in " ,\t\n\"'\\"):
        raise ValueError(f"unusable path for the guest (no spaces, commas or quotes): {s!r}")
    return s


def _uml_tmpdir(workdir: Path) -> str:
    """Where UML keeps its memory file: /dev/shm when it is a writable tmpfs, else workdir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with contextlib.suppress(OSError), open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[1] == "/dev/shm" and parts[2] == "tmpfs":
                    return str(shm)
    return str(workdir)


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        pass
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _pidns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def pidns_members(pidns: str) -> list[int]:
    """Host pids of the processes that are in the pid namespace ``pidns`` ("pid:[N]")."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _pidns(int(entry.name)) == pidns:
            members.append(int(entry.name))
    return members


class _Guest:
    """The host side of one guest: setpriv -> unshare (our child, leader of process group
    ``pgid``) -> linux.uml, pid 1 of a new pid namespace.  UML calls setsid(), so it leaves
    our process group; killing it (the namespace's init) kills every process in the
    namespace, and unshare exits once it has reaped it."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pgid = proc.pid
        self.uml_pid: int | None = None
        self.pidns: str | None = None

    def _discover(self) -> None:
        if self.uml_pid is not None:
            return
        kids = _children(self.proc.pid)
        if kids:
            ns = _pidns(kids[0])
            if ns is not None and ns != _pidns(os.getpid()):
                self.uml_pid, self.pidns = kids[0], ns

    def wait(self, timeout: float) -> bool:
        """Wait for the guest to power off; False on timeout."""
        end = time.monotonic() + timeout
        while self.proc.poll() is None:
            self._discover()
            left = end - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=min(left, 0.05 if self.uml_pid is None else 0.5))
        return True

    def stop(self) -> None:
        """Kill whatever is left and wait until none of it exists any more."""
        if self.proc.poll() is None:
            self._discover()
            targets = [self.uml_pid] if self.uml_pid is not None else _children(self.proc.pid)
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pgid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                if self.pidns is None or not pidns_members(self.pidns):
                    return
            time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


_WORKDIR_PREFIX = "cgprocfs-guest-run-"


def _sweep_stale_workdirs() -> None:
    """Remove temp dirs of runners that were killed before they could clean up (SIGKILL):
    each workdir names its owner's pid in ``owner``."""
    for d in Path(tempfile.gettempdir()).glob(_WORKDIR_PREFIX + "*"):
        try:
            pid = int((d / "owner").read_text())
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                if time.time() - d.stat().st_mtime > 3600:
                    shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def run_in_guest(
    script: str,
    *,
    timeout: float = 120,
    mem: str = "2G",
    env: Mapping[str, str] | None = None,
    out_parent: Path | None = None,
) -> GuestResult:
    """Boot a user-mode-linux guest, run ``script`` with bash as root in it, power it off.

    ``env`` is exported in the guest before the script runs (on top of PATH, HOME=/root,
    GUEST=1, GUEST_REPO=<repo root> and GUEST_OUT).  The script starts in the repository root.

    Files the script leaves in ``$GUEST_OUT`` are moved to ``outdir``, a new directory made
    under ``out_parent`` (default: the system temp dir) that the caller owns and removes;
    ``outdir`` is None if the script left nothing there.  Everything else the runner made --
    its temp dir and every host process of the guest -- is gone when this returns, on timeout
    and on KeyboardInterrupt too.
    """
    uml = uml_binary()
    if uml is None:
        raise RuntimeError("user-mode-linux is not installed (no linux.uml)")
    env = dict(env or {})
    for key in env:
        if not key.isidentifier():
            raise ValueError(f"bad environment variable name: {key!r}")

    _sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
    start = time.monotonic()
    guest: _Guest | None = None
    timed_out = False
    try:
        share = _check_path(workdir)
        repo = _check_path(REPO_ROOT)
        (workdir / "owner").write_text(str(os.getpid()))
        (workdir / "out").mkdir()
        init = workdir / "init"
        init.write_text(
            _INIT.replace("@PATH@", shlex.quote(GUEST_PATH))
            .replace("@SHARE_HOST@", shlex.quote(share))
            .replace("@SHARE@", shlex.quote(GUEST_SHARE))
            .replace("@REPO@", shlex.quote(repo))
            .replace("@MODULES@", shlex.quote(str(UML_MODULES)))
        )
        init.chmod(0o755)
        (workdir / "script.sh").write_text(script if script.endswith("\n") else script + "\n")
        (workdir / "env.sh").write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        )

        cmd = [
            "unshare", "--pid", "--fork", "--kill-child",
            uml,
            f"mem={mem}",
            "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro",
            f"init={init}",
            "con=null", "con0=null,fd:1",
            "quiet",
        ]  # fmt: skip
        if shutil.which("setpriv"):
            # If this Python process dies, unshare dies, and --kill-child takes the guest down.
            cmd = ["setpriv", "--pdeathsig", "KILL", *cmd]
        host_env = dict(os.environ)
        host_env["TMPDIR"] = _uml_tmpdir(workdir)
        with open(workdir / "console", "wb") as console:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=host_env,
                cwd="/",
                start_new_session=True,
            )
        guest = _Guest(proc)
        try:
            timed_out = not guest.wait(timeout)
        finally:
            guest.stop()
        duration = time.monotonic() - start

        status_text = _read(workdir / "status").strip()
        returncode = int(status_text) if status_text.lstrip("-").isdigit() else None
        if timed_out:
            returncode = None
        outdir: Path | None = None
        guest_out = workdir / "out"
        if any(guest_out.iterdir()):
            if out_parent is not None:
                out_parent.mkdir(parents=True, exist_ok=True)
            outdir = Path(tempfile.mkdtemp(prefix="cgprocfs-guest-out-", dir=out_parent))
            for item in guest_out.iterdir():
                shutil.move(str(item), str(outdir / item.name))
        return GuestResult(
            returncode=returncode,
            output=_read(workdir / "output"),
            console=_read(workdir / "console"),
            outdir=outdir,
            timed_out=timed_out,
            duration=duration,
            pgid=guest.pgid,
            pidns=guest.pidns,
            workdir=workdir,
        )
    finally:
        if guest is not None:
            guest.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.guest.runner",
        description="Run a command as root in a user-mode-linux cgroup v2 guest.",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds (default 120)")
    parser.add_argument("--mem", default="2G", help="guest memory (default 2G)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="export K=V in the guest"
    )
    parser.add_argument("--console", action="store_true", help="print the guest console too")
    parser.add_argument("--out", type=Path, help="keep $GUEST_OUT under this directory")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (use: -- CMD ARGS...)")
    reason = available()
    if reason is not None:
        print(f"guest: {reason}", file=sys.stderr)
        return 125
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--env wants K=V, got {item!r}")
        env[key] = value

    result = run_in_guest(
        shlex.join(command), timeout=args.timeout, mem=args.mem, env=env, out_parent=args.out
    )
    sys.stdout.write(result.output)
    sys.stdout.flush()
    if args.console or result.returncode is None:
        sys.stderr.write(result.console)
    if result.outdir is not None:
        print(f"guest: files from $GUEST_OUT are in {result.outdir}", file=sys.stderr)
    if result.timed_out:
        print(f"guest: timed out after {result.duration:.1f}s", file=sys.stderr)
        return 124
    if result.returncode is None:
        print("guest: the guest stopped without an exit status (see console)", file=sys.stderr)
        return 125
    print(f"guest: exit status {result.returncode} in {result.duration:.1f}s", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
