"""FUSE over io_uring (`serve --io-uring`, docs/operation.md): the ring workers serve each
CPU's requests on that CPU, answer what a killed ring worker held, and keep every
reader's answers its own. Needs a kernel with CONFIG_FUSE_IO_URING (Linux 6.14+)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import (
    Daemon,
    make_container,
    meminfo_kb,
    parse_free_b,
    run_in_container,
    running_daemon,
)
from test_takeover import (
    FAULTS,
    assert_clean,
    children,
    kill_every_serving_process,
    readers,
    wait_for,
)

from cgprocfs.fuse import uring

PARAM = Path(uring.ENABLE_PARAM)


@pytest.fixture(scope="module")
def ring_kernel(root_fuse: None) -> Iterator[None]:
    """The kernel can serve FUSE over io_uring; the fuse module's parameter is put back
    as it was afterwards (the daemon turns it on)."""
    before = PARAM.read_text().strip() if PARAM.exists() else None
    problem = uring.unavailable()
    if problem:
        print(f"\nSKIP FUSE over io_uring tests: {problem}")
        pytest.skip(problem)
    yield
    if before is not None:
        with contextlib.suppress(OSError):
            PARAM.write_text(before)


def status(d: Daemon) -> dict:  # type: ignore[type-arg]
    return json.loads((d.mountpoint / ".cgprocfs-status").read_text())  # type: ignore[no-any-return]


def ring_workers(d: Daemon) -> dict[int, int]:
    """pid -> seat of each ring worker."""
    out = {}
    for pid in children(d.proc.pid):
        with contextlib.suppress(OSError):
            env = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
            if env.get("CGPROCFS_ROLE") == "ring":
                out[pid] = int(env["CGPROCFS_SEAT"])
    return out


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def read_on(cpu: int, path: Path, timeout: float = 30) -> str:
    return subprocess.run(["taskset", "-c", str(cpu), "cat", str(path)], check=True,
                          capture_output=True, text=True, timeout=timeout).stdout


def test_each_cpu_is_served_by_its_own_ring_worker(ring_kernel: None) -> None:
    """A container reading from CPU c is answered by the ring worker of c's group (its
    opens counter moves, no other does), with its own memory limit."""
    with running_daemon(["--io-uring"]) as d, make_container(192 << 20) as ct:
        st = status(d)
        groups = st["io_uring"]["groups"]
        assert groups == min(8, uring.possible_cpus()), st
        seat_group = {int(s): g for s, g in st["io_uring"]["seats"].items()}
        assert sorted(seat_group.values()) == list(range(groups)), st
        assert "on io_uring" in d.log()
        for cpu in cpus():
            before = status(d)["opens_by_seat"]
            for _ in range(20):
                out = run_in_container(ct, d.mountpoint,
                                       ["taskset", "-c", str(cpu), "cat", "/proc/meminfo"])
                assert meminfo_kb(out)["MemTotal"] == 192 << 10, out
            after = status(d)["opens_by_seat"]
            moved = {s: after[s] - before[s] for s in range(len(after)) if after[s] != before[s]}
            # 20 opens of meminfo, and one of the status file (read by this process,
            # which may run on any CPU).
            ring_seat = next(s for s, g in seat_group.items() if g == cpu % groups)
            assert moved.get(ring_seat, 0) >= 20, (cpu, moved, seat_group)
            assert sum(moved.values()) <= 21, (cpu, moved)


def test_free_and_uptime_in_a_container_through_the_ring(ring_kernel: None) -> None:
    with running_daemon(["--io-uring"]) as d, make_container(256 << 20) as ct:
        free = parse_free_b(run_in_container(ct, d.mountpoint, ["free", "-b"]))
        assert free["total"] == 256 << 20, free
        up = run_in_container(ct, d.mountpoint, ["uptime"])
        assert "load average" in up, up
        assert status(d)["errors"] == 0


def test_a_killed_idle_ring_worker_leaves_no_caller_waiting(ring_kernel: None) -> None:
    """SIGKILL the ring worker of a CPU while it waits, then read from that CPU at once:
    the request waits for the successor, which registers and drains its queue."""
    with running_daemon(["--io-uring"]) as d:
        for cpu in cpus():
            read_on(cpu, d.view("proc/uptime"))  # its worker is up and registered
            seat_of = ring_workers(d)
            group = status(d)["io_uring"]["groups"]
            victim = next(p for p, s in seat_of.items()
                          if status(d)["io_uring"]["seats"][str(s)] == cpu % group)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            text = read_on(cpu, d.view("proc/uptime"))
            assert len(text.split()) == 2, text
            print(f"\nCPU {cpu}: read right after the kill answered in "
                  f"{(time.monotonic() - t0) * 1000:.0f} ms")
            assert wait_for(lambda v=victim, n=group: len(ring_workers(d)) == n
                            and v not in ring_workers(d))
        assert d.proc.poll() is None


def test_a_request_held_by_a_crashing_ring_worker_is_taken_over(ring_kernel: None) -> None:
    """Rendering proc/uptime crashes the ring worker holding the request (injected
    SIGSEGV). Each successor finds the request in the ring entry's buffers and takes it
    (here crashing again); after three, the request is answered EIO through the ring and
    everything else is served."""
    env = {**os.environ, "PYTHONPATH": FAULTS, "FAULT_KIND": "crash",
           "FAULT_VIEW": "proc/uptime"}
    with running_daemon(["--io-uring"], env=env) as d:
        cpu = cpus()[-1]
        res = subprocess.run(["taskset", "-c", str(cpu), "cat", str(d.view("proc/uptime"))],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "Input/output error" in res.stderr, res
        assert read_on(cpu, d.view("proc/meminfo")).startswith("MemTotal:")
        log = d.log()
        assert log.count("left in ring entry") == 2, log
        assert "crashed 3 workers; answering EIO" in log
        assert status(d)["poisoned_requests"] == 1
        assert d.proc.poll() is None


def test_a_ring_worker_killed_halfway_through_its_reply_is_taken_over(
        ring_kernel: None, tmp_path: Path) -> None:
    """A ring worker writes its reply's header over the OPEN in its ring entry and is
    SIGKILLed before the answer is complete. Its successor answers the OPEN again from
    the copy in the seat (the entry no longer says it was an OPEN): the reader gets its
    own numbers, and later opens still reach the daemon."""
    marker = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": FAULTS, "FAULT_KIND": "ring_kill_in_reply",
           "FAULT_MARKER": str(marker)}
    with running_daemon(["--io-uring"], env=env) as d, make_container(160 << 20) as ct:
        cpu = cpus()[0]
        out = run_in_container(ct, d.mountpoint,
                               ["taskset", "-c", str(cpu), "cat", "/proc/meminfo"])
        assert marker.exists(), d.log()
        assert meminfo_kb(out)["MemTotal"] == 160 << 10, out
        assert "left in ring entry" in d.log()
        before = status(d)["opens"]
        for _ in range(3):
            out = run_in_container(ct, d.mountpoint,
                                   ["taskset", "-c", str(cpu), "cat", "/proc/meminfo"])
            assert meminfo_kb(out)["MemTotal"] == 160 << 10, out
        assert status(d)["opens"] >= before + 3  # OPEN is still sent (not ENOSYS'd)
        assert status(d)["errors"] == 0


def test_sigkill_every_serving_process_20_times_under_load(ring_kernel: None,
                                                            tmp_path: Path) -> None:
    """The takeover test of the /dev/fuse workers, on the ring: 8 readers in 4 cgroups,
    every serving process killed 20 times at random moments; zero errors, zero wrong
    answers, no reader left waiting."""
    with running_daemon(["--io-uring"]) as d, readers(d, tmp_path) as results:
        kills = kill_every_serving_process(d, random.Random(11), replaced=5)
        assert d.proc.poll() is None
        served = sum(status(d)["opens_by_seat"][int(s)]
                     for s in status(d)["io_uring"]["seats"])
        assert served > 0
    # A ring worker killed in the microseconds between the kernel handing it a request
    # and running to copy it in: the kernel fails that request (ECANCELED), with nothing
    # left for a successor to take (docs/operation.md). Any other error fails the test.
    cancelled = sum(r["errors"].pop("ECANCELED", 0) for r in results)
    if cancelled:
        print(f"\n{cancelled} ECANCELED in {kills} kills: requests handed to a ring worker "
              "that was killed before it ran")
    assert cancelled <= kills // 5, cancelled
    stall = assert_clean(results, kills=kills)
    assert stall < 60


def test_reload_replaces_the_ring_workers_under_load(ring_kernel: None,
                                                     tmp_path: Path) -> None:
    """SIGHUP three times while 8 readers read: the supervisor re-executes itself and
    replaces every worker. Each new ring worker takes its predecessor's seat; the old one
    leaves its entries holding lookups of its own and exits once the new one has taken
    them over. No read fails, no reader is left waiting."""
    with running_daemon(["--io-uring"]) as d, readers(d, tmp_path) as results:
        for round_ in range(1, 4):
            old = set(ring_workers(d))
            os.kill(d.proc.pid, signal.SIGHUP)
            assert wait_for(lambda n=round_: d.log().count("reload: every worker replaced")
                            >= n, 60), d.log()
            assert wait_for(lambda o=old: not (o & set(ring_workers(d)))), d.log()
            time.sleep(0.5)  # readers keep reading on the new ring workers
        groups = status(d)["io_uring"]["groups"]
        assert len(ring_workers(d)) == groups
        assert "did not hand over" not in d.log() and "entries parked" not in d.log()
    stall = assert_clean(results)
    assert stall < 60
