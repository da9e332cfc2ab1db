"""Shared fixtures. Tests that need root, FUSE and writable cgroups skip with a printed
reason only when the machine truly lacks them (CI runs as root with /dev/fuse)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Daemon, memory_hierarchy, running_daemon


def _missing_capability() -> str | None:
    if os.geteuid() != 0:
        return "needs root (run the suite as root: bash scripts/setup.sh test)"
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    try:
        memory_hierarchy()
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def root_fuse() -> None:
    reason = _missing_capability()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def daemon(root_fuse: None) -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d
        # A test run must not have made the shared daemon log errors.
        assert d.proc.poll() is None, f"daemon died:\n{d.log()}"
