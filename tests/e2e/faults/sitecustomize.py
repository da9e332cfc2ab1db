"""`cgprocfs` with a fault injected, for tests: FAULT_KIND=raise (default) makes the
renderer raise RuntimeError on its first two calls (a bug: EIO expected); FAULT_KIND=odd
makes the first snapshot raise OddCgroupData (odd cgroup data: host file expected)."""

import os
import sys

from cgprocfs import cli, resolve, views
from cgprocfs.snapshot import OddCgroupData

calls = {"n": 0}
kind = os.environ.get("FAULT_KIND", "raise")

if kind == "raise":
    real_render = views.Renderer.render_for

    def render(self, view, pid):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("injected fault")
        return real_render(self, view, pid)

    views.Renderer.render_for = render  # type: ignore[method-assign]
else:
    real_snapshot = resolve.Resolver.snapshot

    def snapshot(self, pid, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise OddCgroupData("injected odd data")
        return real_snapshot(self, pid, *args)

    resolve.Resolver.snapshot = snapshot  # type: ignore[method-assign]

sys.exit(cli.main(sys.argv[1:]))
