"""The leader spins only on a CPU nobody else wants: CpuContention compares the kernel's
count of runnable tasks (/proc/loadavg) with the CPUs, at most every CONTENTION_CHECK_S."""

from __future__ import annotations

import os

from cgprocfs.fuse.worker import CONTENTION_CHECK_S, CpuContention


def test_contention_is_the_kernels_runnable_count_against_the_cpus() -> None:
    c = CpuContention()
    assert c.cpus == os.cpu_count()
    c.cpus = 0  # this test is running, so at least one task is runnable
    assert c.now(1000.0) is True
    c.cpus = 1 << 20
    assert c.now(1000.0 + 2 * CONTENTION_CHECK_S) is False
    assert c.fd is not None
    os.close(c.fd)


def test_the_count_is_looked_at_again_only_after_the_check_interval() -> None:
    c = CpuContention()
    c.cpus = 0
    assert c.now(50.0) is True
    c.cpus = 1 << 20
    assert c.now(50.0 + CONTENTION_CHECK_S / 2) is True  # the earlier answer
    assert c.now(50.0 + 2 * CONTENTION_CHECK_S) is False
    assert c.fd is not None
    os.close(c.fd)


def test_an_unreadable_count_never_reports_contention() -> None:
    c = CpuContention()
    assert c.fd is not None
    os.close(c.fd)
    c.fd = os.open("/dev/null", os.O_RDONLY)  # reads nothing: no count
    c.cpus = 0
    assert c.now(10.0) is False
    os.close(c.fd)
