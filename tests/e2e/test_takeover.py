"""Zero-downtime restarts (docs/operation.md, "Restarts and upgrades"): the supervisor
holds the FUSE connection, so killing every serving process, replacing them with a new
build, or a request that crashes them never shows a reader an error."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import PYTHON, REPO, Container, Daemon, make_container, meminfo_kb, running_daemon

READER = str(Path(__file__).with_name("takeover_reader.py"))

# user-mode-linux (the cgroup v2 guest) has no fast GUP. The kernel pins a worker's memory
# to copy a request in or a reply out by the slow path, which gives up when a SIGKILL is
# pending even if the pages are present (mm/gup.c, __get_user_pages), and FUSE then fails
# that one request with EIO, before any successor can take it. Kernels with fast GUP
# (x86-64, arm64: the host lane) pin the worker's pre-faulted seat without that check, so
# there a reader must see no error at all.
KILL_MAY_FAIL_ITS_REQUEST = "User Mode Linux" in Path("/proc/cpuinfo").read_text()
FAULTS = str(Path(__file__).with_name("faults"))
LIMITS = (128 << 20, 192 << 20, 256 << 20, 320 << 20)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(p) for p in (task / "children").read_text().split()]
    return out


def process_state(pid: int) -> str:
    """R, S, T (stopped), ... from /proc/PID/stat (the field after the command name)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def wait_for(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def readers(d: Daemon, tmp: Path, per_container: int = 2) -> Iterator[list[dict]]:  # type: ignore[type-arg]
    """8 readers in 4 containers looping until the block ends; yields the list their
    summaries are appended to when they stop."""
    stop = tmp / "stop"
    results: list[dict] = []  # type: ignore[type-arg]
    with contextlib.ExitStack() as stack:
        cts: list[tuple[Container, int]] = [
            (stack.enter_context(make_container(lim)), lim) for lim in LIMITS]
        procs = [
            subprocess.Popen([PYTHON, READER, str(d.mountpoint),
                              ",".join(str(p) for p in ct.procs_files), str(lim), str(stop)],
                             stdout=subprocess.PIPE, text=True)
            for ct, lim in cts for _ in range(per_container)]
        try:
            # All readers inside their containers and reading (on a slow guest, starting
            # 16 Python processes takes seconds).
            deadline = time.monotonic() + 120
            while len(list(tmp.glob("stop.started-*"))) < len(procs) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            yield results
        finally:
            stop.touch()
            for p in procs:
                out, _ = p.communicate(timeout=60)
                results.append(json.loads(out) if out.strip() else {"crashed": p.returncode})


def assert_no_errors(errors: dict[str, int], kills: int) -> None:
    """No error at all (no ENOTCONN, no ECONNABORTED, nothing); on a kernel without fast
    GUP, at most one EIO per worker killed (KILL_MAY_FAIL_ITS_REQUEST), and said so."""
    if errors and KILL_MAY_FAIL_ITS_REQUEST and set(errors) == {"EIO"} \
            and errors["EIO"] <= kills:
        print(f"\n{errors['EIO']} EIO of {kills} worker kills: requests failed by the "
              "kernel while it copied them (user-mode-linux has no fast GUP)")
        return
    assert errors == {}, errors


def assert_clean(results: list[dict], n: int = 8, kills: int = 0  # type: ignore[type-arg]
                 ) -> float:
    assert len(results) == n
    for r in results:
        assert "crashed" not in r, r
        assert r["reads"] > 0, r
        assert_no_errors(r["errors"], kills)
        assert r["wrong"] == [], r
    stall = max(r["max_stall"] for r in results)
    print(f"\n{sum(r['reads'] for r in results)} reads by {n} readers, longest stall "
          f"{stall * 1000:.0f} ms")
    return float(stall)


def kill_every_serving_process(d: Daemon, rng: random.Random, replaced: int,
                               times: int = 20) -> int:
    """SIGKILL every child of the supervisor `times` times at random moments, each time
    waiting until at least `replaced` new ones run (the supervisor starts them again at
    once); returns how many processes were killed."""
    kills = 0
    for _ in range(times):
        time.sleep(rng.uniform(0.05, 0.6))
        victims = children(d.proc.pid)
        assert victims, d.log()
        kills += len(victims)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda v=set(victims): len(set(children(d.proc.pid)) - v)
                        >= replaced), d.log()
    return kills


def test_sigkill_every_serving_process_20_times_under_load(root_fuse: None,
                                                            tmp_path: Path) -> None:
    """8 readers in 4 cgroups; every worker and the sampler get SIGKILL 20 times at
    random moments: zero errors, zero wrong answers."""
    with running_daemon() as d, readers(d, tmp_path) as results:
        kills = kill_every_serving_process(d, random.Random(7), replaced=3)
        assert d.proc.poll() is None
    stall = assert_clean(results, kills=kills)
    status = json.loads((d.mountpoint / ".cgprocfs-status").read_text()) \
        if d.proc.poll() is None else None
    assert status is None or status["worker_restarts"] >= 40
    assert stall < 60  # a stall is reported, not judged; this only catches a hang


def test_upgrade_to_another_build_under_load(root_fuse: None, tmp_path: Path) -> None:
    """The daemon runs from a copy of the package; the copy is changed on disk (a new log
    line), SIGHUP: the supervisor re-executes itself and replaces every worker with the
    new build while 8 readers read. No read fails."""
    build = tmp_path / "build"
    shutil.copytree(REPO / "src" / "cgprocfs", build / "cgprocfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(build)}
    with running_daemon(env=env) as d, readers(d, tmp_path) as results:
        old = set(children(d.proc.pid))
        worker = build / "cgprocfs" / "fuse" / "worker.py"
        text = worker.read_text()
        marker = 'log.debug("worker seat %d serving", worker.seat)'
        assert marker in text
        worker.write_text(text.replace(
            marker, 'log.info("worker seat %d serving (build B)", worker.seat)'))
        os.kill(d.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload: every worker replaced" in d.log(), 60), d.log()
        time.sleep(1.0)  # readers keep reading on the new build
        new = set(children(d.proc.pid))
        assert not (old & new), (old, new)
        assert d.log().count("(build B)") >= 2, d.log()
    assert_clean(results)


def test_handle_opened_before_a_takeover_reads_its_own_bytes(root_fuse: None) -> None:
    """A file opened and partly read, then every worker is killed: the rest of the read
    continues the same bytes (they live in the supervisor's arena); a re-read from 0
    renders again for the reader. (A handle naming no live slot is EBADF: unit-tested
    in tests/unit/test_arena.py; the kernel never lets a caller forge one.)"""
    with running_daemon(["--debug-fuse"]) as d, make_container(192 << 20) as ct:
        script = (
            "import os, sys, time\n"
            "for p in sys.argv[2].split(','): open(p, 'w').write(str(os.getpid()))\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "head = os.read(fd, 100)\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "rest = b''\n"
            "while chunk := os.read(fd, 37): rest += chunk\n"
            "again = os.pread(fd, 65536, 0)\n"
            "sys.stdout.write((head + rest).decode() + '\\0' + again.decode())\n"
        )
        p = subprocess.Popen([PYTHON, "-c", script, str(d.view("proc/meminfo")),
                              ",".join(str(x) for x in ct.procs_files)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "ready"
        victims = children(d.proc.pid)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        # The takeover is complete once the new processes run and the killed ones are
        # gone (a killed worker still queued for the CPU could otherwise be handed the
        # next request by the kernel and fail it: see docs/operation.md).
        assert wait_for(lambda: len(set(children(d.proc.pid)) - set(victims)) >= 3
                        and not any(Path(f"/proc/{v}").exists() for v in victims))
        out, _ = p.communicate("go\n", timeout=30)
        assert p.returncode == 0 and "\0" in out, d.log()
        first, again = out.split("\0")
        for text in (first, again):
            kb = meminfo_kb(text)
            assert kb["MemTotal"] == 192 << 10, text
            assert len(text.splitlines()) == len(Path("/proc/meminfo").read_text().splitlines())


def test_a_request_that_crashes_every_worker_is_answered_eio(root_fuse: None) -> None:
    """The crash-loop guard: opening proc/uptime crashes the worker that renders it
    (injected SIGSEGV); after three crashes that request is answered EIO and the mount
    goes on serving everything else. (SIGKILLs from outside are not counted: the 20-kill
    test above must see no error at all.)"""
    env = {**os.environ, "PYTHONPATH": FAULTS, "FAULT_KIND": "crash",
           "FAULT_VIEW": "proc/uptime"}
    with running_daemon(env=env) as d:
        with pytest.raises(OSError) as exc:
            d.view("proc/uptime").read_bytes()
        assert exc.value.errno == 5  # EIO
        assert d.view("proc/meminfo").read_text().startswith("MemTotal:")
        status = json.loads((d.mountpoint / ".cgprocfs-status").read_text())
        assert status["poisoned_requests"] == 1
        assert status["worker_restarts"] >= 3
        assert "crashed 3 workers; answering EIO" in d.log()
        assert d.proc.poll() is None


def test_the_supervisor_dying_leaves_a_dead_mount_the_next_start_recovers(
        root_fuse: None, tmp_path: Path) -> None:
    """The documented failure mode when the holder itself dies (SIGKILL): its workers
    follow it, the mount answers ENOTCONN, and the next `serve` on the same mountpoint
    detaches the dead mount and serves again."""
    mp = tmp_path / "mnt"
    with running_daemon(mountpoint=mp) as d:
        workers = children(d.proc.pid)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        assert wait_for(lambda: not any(Path(f"/proc/{w}").exists() for w in workers))
        with pytest.raises(OSError) as exc:
            os.listdir(mp)
        assert exc.value.errno == 107  # ENOTCONN
        with running_daemon(mountpoint=mp) as d2:
            assert d2.view("proc/meminfo").read_text().startswith("MemTotal:")
            assert "stale mount" in d2.log()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-s"]))


def status_of(d: Daemon) -> dict:  # type: ignore[type-arg]
    return json.loads((d.mountpoint / ".cgprocfs-status").read_text())  # type: ignore[no-any-return]


def opens_since(d: Daemon, before: list[int]) -> list[int]:
    return [a - b for a, b in zip(status_of(d)["opens_by_seat"], before, strict=True)]


def read_sequentially(d: Daemon, n: int, pause: float = 0.0) -> None:
    for _ in range(n):
        with open(d.mountpoint / "proc" / "meminfo", "rb") as f:
            assert f.read().startswith(b"MemTotal:")
        time.sleep(pause)


def test_a_lone_reader_is_served_by_the_leader_and_load_wakes_the_others(
        root_fuse: None, tmp_path: Path) -> None:
    """Parking (docs/operation.md): one worker reads /dev/fuse while one would do, so a
    lone reader's requests do not take turns among cold workers; readers queuing up
    wake the parked ones."""
    with running_daemon() as d:
        read_sequentially(d, 50)  # the workers have elected a leader
        before = status_of(d)["opens_by_seat"]
        # Paced like a poller (a spinning worker would otherwise catch every next open).
        read_sequentially(d, 400, pause=0.002)
        lone = opens_since(d, before)
        print(f"\nopens by seat, one reader: {lone}")
        assert sum(lone) == 400
        assert max(lone) >= 0.8 * 400  # round robin among 2+ workers would give <= 50 %
        before = status_of(d)["opens_by_seat"]
        with readers(d, tmp_path, per_container=4) as results:
            time.sleep(2.0)
        busy = opens_since(d, before)
        print(f"opens by seat, 16 readers: {busy}")
        assert_clean(results, 16)
        assert len([n for n in busy if n >= 0.02 * sum(busy)]) >= 2, busy


def test_a_stopped_leader_is_replaced_while_requests_wait(root_fuse: None,
                                                          tmp_path: Path) -> None:
    """A leader that answers nothing while requests wait (stopped here; stuck in a slow
    cgroup read in the field) is replaced by a parked worker within two 100 ms checks.
    The new leader serves a lone reader (not one request per check, as a parked worker
    that only answered what waited at its checks did), and the old one parks when it
    comes back. (A request the stuck leader holds waits for it:
    the leader is stopped between requests here.)"""
    with running_daemon() as d, make_container(256 << 20) as ct:
        read_sequentially(d, 50)  # the workers have elected a leader
        stopped = status_of(d)["leader"]["pid"]
        assert stopped in children(d.proc.pid), d.log()
        before = status_of(d)["opens_by_seat"]
        stop = tmp_path / "stop"
        os.kill(stopped, signal.SIGSTOP)
        try:
            # No request until it has stopped: woken by the signal but not yet run, a
            # leader blocked in read() still takes a request that came meanwhile (the
            # kernel tests for one before the signal), then stops holding it.
            assert wait_for(lambda: process_state(stopped) == "T", timeout=10)
            reader = subprocess.Popen([PYTHON, READER, str(d.mountpoint),
                                       ",".join(str(p) for p in ct.procs_files),
                                       str(256 << 20), str(stop)],
                                      stdout=subprocess.PIPE, text=True)
            try:
                assert wait_for(lambda: status_of(d)["leader"]["pid"] not in (stopped, 0),
                                timeout=10), d.log()
                time.sleep(1.0)
                now = status_of(d)
                served = opens_since(d, before)
                # A rate, printed only (no timing is asserted): one request answered per
                # 100 ms check, as before, gave a lone reader ~2 opens a second.
                print(f"\nopens by seat in the ~1 s after the leader stopped: {served}")
                assert sum(served) > 0, d.log()
                # All of them by the new leader: the stopped one answered none.
                assert served[now["leader"]["seat"]] == sum(served), (served, now)
            finally:
                stop.touch()
                out, _ = reader.communicate(timeout=60)
        finally:
            os.kill(stopped, signal.SIGCONT)
        read_sequentially(d, 50)  # both workers alive, one leads
        assert status_of(d)["leader"]["pid"] in children(d.proc.pid), d.log()
        r = json.loads(out)
        print(f"{r['reads']} reads by one reader, longest stall "
              f"{r['max_stall'] * 1000:.0f} ms")
        assert r["wrong"] == [] and r["reads"] > 0 and r["errors"] == {}, r
        assert "took no request" in d.log(), d.log()


def test_killing_the_leader_of_a_lone_reader_hands_over(root_fuse: None,
                                                        tmp_path: Path) -> None:
    """The parked workers must not wait for the leader's successor: the supervisor
    wakes one the moment the leader dies. A lone reader sees no error and the mount
    gets a new leader each time."""
    with running_daemon() as d, make_container(256 << 20) as ct:
        stop = tmp_path / "stop"
        reader = subprocess.Popen([PYTHON, READER, str(d.mountpoint),
                                   ",".join(str(p) for p in ct.procs_files), str(256 << 20),
                                   str(stop)], stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            for _ in range(5):
                leader = status_of(d)["leader"]["pid"]
                assert leader in children(d.proc.pid), d.log()
                os.kill(leader, signal.SIGKILL)
                assert wait_for(lambda old=leader: status_of(d)["leader"]["pid"]
                                not in (old, 0)), d.log()
                time.sleep(0.3)
        finally:
            stop.touch()
            out, _ = reader.communicate(timeout=60)
        r = json.loads(out)
        print(f"\n{r['reads']} reads by one reader across 5 leader kills, longest stall "
              f"{r['max_stall'] * 1000:.0f} ms")
        assert r["wrong"] == [] and r["reads"] > 0, r
        assert_no_errors(r["errors"], kills=5)
