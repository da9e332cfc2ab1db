"""Fault injection for tests, loaded by every Python process started with this directory
on PYTHONPATH, acting only in the daemon's worker processes (CGPROCFS_SEAT set):

FAULT_KIND=raise  the renderer raises RuntimeError on its first two calls (a bug: EIO)
FAULT_KIND=odd    the first snapshot raises OddCgroupData (odd cgroup data: host file)
FAULT_KIND=crash  rendering FAULT_VIEW (default proc/uptime) crashes the worker (SIGSEGV,
                  no core file): a request that crashes every worker (the crash-loop
                  guard answers EIO)
FAULT_KIND=ring_kill_in_reply  a ring worker answering an OPEN writes the reply's header
                  over the request in its ring entry, then is SIGKILLed before it marks
                  the answer complete; once (FAULT_MARKER, a file, says it happened)
"""

import os
import signal

kind = os.environ.get("FAULT_KIND", "")

if kind and os.environ.get("CGPROCFS_SEAT"):
    from cgprocfs import resolve, views
    from cgprocfs.snapshot import OddCgroupData

    calls = {"n": 0}
    real_render = views.Renderer.render_for

    if kind == "raise":

        def render(self, view, pid):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] <= 2:
                raise RuntimeError("injected fault")
            return real_render(self, view, pid)

        views.Renderer.render_for = render  # type: ignore[method-assign]
    elif kind == "crash":
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        target = os.environ.get("FAULT_VIEW", "proc/uptime")

        def render_or_die(self, view, pid):  # type: ignore[no-untyped-def]
            if view.path == target:
                os.kill(os.getpid(), signal.SIGSEGV)
            return real_render(self, view, pid)

        views.Renderer.render_for = render_or_die  # type: ignore[method-assign]
    elif kind == "odd":
        real_snapshot = resolve.Resolver.snapshot

        def snapshot(self, pid, *args):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 1:
                raise OddCgroupData("injected odd data")
            return real_snapshot(self, pid, *args)

        resolve.Resolver.snapshot = snapshot  # type: ignore[method-assign]

if kind == "ring_kill_in_reply" and os.environ.get("CGPROCFS_ROLE") == "ring":
    from cgprocfs.fuse import abi
    from cgprocfs.fuse.ring_worker import RingWorker

    marker = os.environ["FAULT_MARKER"]
    real_reply = RingWorker._reply

    def reply_then_die(self, unique, err, payload, opcode, nodeid):  # type: ignore[no-untyped-def]
        ent = self.entry
        if opcode == abi.OPEN and ent is not None and not os.path.exists(marker):
            open(marker, "w").close()
            ent.payload[:len(payload)] = payload
            abi.OUT_HEADER.pack_into(ent.hdr, 0, abi.OUT_HEADER_SIZE + len(payload), err,
                                     unique)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_reply(self, unique, err, payload, opcode, nodeid)

    RingWorker._reply = reply_then_die  # type: ignore[method-assign]
