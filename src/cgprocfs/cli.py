"""Command line: serve, show, run, docker-args."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cgprocfs.serve import DEFAULT_MOUNTPOINT
from cgprocfs.views import View, available_views


def _view(name: str) -> View:
    key = name.lstrip("/")
    served = {v.path: v for v in available_views()}
    for candidate in (key, f"proc/{key}", f"sys/devices/system/cpu/{key}"):
        if candidate in served:
            return served[candidate]
    known = ", ".join(served)
    raise argparse.ArgumentTypeError(f"unknown file {name!r} (served: {known})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cgprocfs",
        description="Container-aware /proc: serves /proc files rendered from the caller's "
        "cgroup.",
    )
    p.add_argument("--log-level", default=os.environ.get("CGPROCFS_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="mount the views and serve them (foreground)")
    s.add_argument("mountpoint", nargs="?", default=DEFAULT_MOUNTPOINT)
    s.add_argument("--hide-swap", action="store_true",
                   help="report no swap inside containers (SwapTotal 0, empty /proc/swaps)")
    s.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")

    sh = sub.add_parser("show", help="print what a process would see, without FUSE")
    sh.add_argument("--pid", type=int, default=None, help="default: this process")
    sh.add_argument("--hide-swap", action="store_true")
    sh.add_argument("files", nargs="+", type=_view, metavar="FILE",
                    help="a served file: meminfo, vmstat, stat, uptime, loadavg, online, ... "
                    "(or proc/meminfo, /proc/meminfo)")

    r = sub.add_parser("run", help="run a command in a transient cgroup with the views")
    r.add_argument("--memory", "-m", help="memory limit, e.g. 256M")
    r.add_argument("--memory-swap", help="memory + swap limit (as Docker's --memory-swap)")
    r.add_argument("--cpus", type=float, help="CPU quota in CPUs, e.g. 1.5")
    r.add_argument("--cpuset", help="CPUs the command may run on, e.g. 0 or 0-1")
    r.add_argument("--hide-swap", action="store_true")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    d = sub.add_parser("docker-args", help="print the docker run -v flags for the views")
    d.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    d.add_argument("--all", action="store_true",
                   help="include views runc refuses to bind inside /proc (/proc/vmstat); "
                   "for runtimes that allow them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="cgprocfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from cgprocfs.serve import ServeOptions, StartupError, serve

        try:
            return serve(ServeOptions(args.mountpoint, hide_swap=args.hide_swap,
                                      debug_fuse=args.debug_fuse))
        except StartupError as exc:
            print(f"cgprocfs: {exc}", file=sys.stderr)
            return 1
    if args.command == "show":
        return _show(args)
    if args.command == "run":
        return _run(args)
    if args.command == "docker-args":
        mp = args.mountpoint.rstrip("/")
        views = [v for v in available_views() if args.all or v.runc_bindable]
        print(" ".join(f"-v {mp}/{v.path}:{v.host_path}:ro" for v in views))
        return 0
    raise AssertionError(args.command)


def _show(args: argparse.Namespace) -> int:
    from cgprocfs.cgroups import load_layout
    from cgprocfs.resolve import Resolver
    from cgprocfs.snapshot import RenderOptions
    from cgprocfs.views import Renderer

    pid = args.pid if args.pid is not None else os.getpid()
    if not os.path.exists(f"/proc/{pid}"):
        print(f"cgprocfs: no process {pid}", file=sys.stderr)
        return 1
    renderer = Renderer(Resolver(load_layout()), RenderOptions(hide_swap=args.hide_swap))
    out = sys.stdout.buffer
    for i, view in enumerate(args.files):
        if len(args.files) > 1:
            out.write(f"{'' if i == 0 else chr(10)}==> {view.host_path} (pid {pid}) <==\n"
                      .encode())
        out.write(renderer.render(view, pid))
    try:
        out.flush()
    except BrokenPipeError:  # `cgprocfs show ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(args: argparse.Namespace) -> int:
    from cgprocfs.run import Limits, RunError, parse_size, run

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        memory = parse_size(args.memory) if args.memory else None
        swap = parse_size(args.memory_swap) if args.memory_swap else None
        serve_args = ["--hide-swap"] if args.hide_swap else []
        limits = Limits(memory, swap, args.cpus, args.cpuset)
        return run(cmd, limits, serve_args)
    except (RunError, ValueError) as exc:
        print(f"cgprocfs run: {exc}", file=sys.stderr)
        return 125
    except OSError as exc:
        print(f"cgprocfs run: {exc}", file=sys.stderr)
        return 125
