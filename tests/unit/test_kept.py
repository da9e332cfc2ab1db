"""Kept files: re-read from offset 0, they show what a new open would, never what a gone
process or a removed cgroup had."""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import pytest
from support import memory_hierarchy

from cgprocfs.kept import IDLE_S, KeptFiles, capped_max_files


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_kept_file_is_read_anew_each_time() -> None:
    files = KeptFiles()
    path = f"/proc/{os.getpid()}/stat"
    before = int(files.read(path).rsplit(")", 1)[1].split()[11])  # utime, in ticks
    spent = time.process_time()
    while time.process_time() - spent < 0.3:
        pass
    after = int(files.read(path).rsplit(")", 1)[1].split()[11])
    assert len(files) == 1
    assert after > before
    files.close_all()


def test_a_gone_process_reads_as_missing_like_a_new_open() -> None:
    files = KeptFiles()
    child = subprocess.Popen(["sleep", "60"])
    path = f"/proc/{child.pid}/cgroup"
    assert files.read(path) == Path(path).read_text()
    files.note(path, "noted")
    assert files.read_noted(path)[1] == "noted"
    child.kill()
    child.wait()
    with pytest.raises(FileNotFoundError):
        files.read(path)
    assert files.read_optional(path) is None
    assert len(files) == 0  # its descriptor was closed, not kept


def test_a_cgroup_recreated_at_the_same_path_is_reopened(root_fuse: None) -> None:
    _, root = memory_hierarchy()
    d = Path(root) / f"cgprocfs-kept-test-{os.getpid()}"
    files = KeptFiles()
    try:
        d.mkdir()
        procs = str(d / "cgroup.procs")
        assert files.read(procs) == ""
        files.note(procs, "the first cgroup")
        d.rmdir()
        with pytest.raises(FileNotFoundError):
            files.read(procs)  # removed: no stale answer from the kept descriptor
        d.mkdir()
        text, note = files.read_noted(procs)
        assert text == "" and note is None  # a new descriptor, without the old note
    finally:
        files.close_all()
        if d.exists():
            d.rmdir()


def test_at_most_max_files_are_kept_and_idle_ones_are_closed(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        (tmp_path / f"f{i}").write_text(f"content {i}")
        paths.append(str(tmp_path / f"f{i}"))
    base = open_fds()
    files = KeptFiles(max_files=2)
    for p in paths:
        files.read(p)
    assert len(files) == 2 and open_fds() == base + 2  # the least recently used went
    assert files.close_idle(time.monotonic()) == 0  # all in use
    assert files.close_idle(time.monotonic() + IDLE_S + 1) == 2
    assert len(files) == 0 and open_fds() == base


def test_no_descriptor_is_kept_when_none_may_be(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    base = open_fds()
    files = KeptFiles(max_files=0)
    assert files.read(str(tmp_path / "f")) == "x"
    assert len(files) == 0 and open_fds() == base


def test_the_setting_is_capped_by_a_quarter_of_the_descriptor_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert capped_max_files(100) == 100
        assert capped_max_files(2048) == 256
        assert capped_max_files(0) == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
