"""Command line: serve, show, run, exec, sysinfo-agent, docker-args."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cgprocfs.config import Config, ConfigError, to_toml
from cgprocfs.config import load as load_config
from cgprocfs.serve import DEFAULT_MOUNTPOINT
from cgprocfs.views import View, available_views, bind_targets


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
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"],
                   help="default: from the configuration (info)")
    p.add_argument("--config", default=None,
                   help="configuration file (default: $CGPROCFS_CONFIG or "
                   "/etc/cgprocfs/config.toml if present)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="mount the views and serve them (foreground)")
    s.add_argument("mountpoint", nargs="?", default=None,
                   help=f"default: from the configuration ({DEFAULT_MOUNTPOINT})")
    s.add_argument("--hide-swap", action="store_true", default=None,
                   help="report no swap inside containers (SwapTotal 0, empty /proc/swaps)")
    s.add_argument("--no-cpu-quota", dest="cpu_quota", action="store_false", default=None,
                   help="count visible CPUs from cpusets only, ignoring CFS quotas")
    s.add_argument("--io-uring", dest="io_uring", action="store_true", default=None,
                   help="serve through FUSE over io_uring where the kernel has it: each "
                   "request on the caller's CPU (docs/operation.md)")
    s.add_argument("--debug-fuse", action="store_true", help="log every FUSE request")
    s.add_argument("--no-sysinfo", dest="sysinfo", action="store_false",
                   help="do not run the sysinfo(2) agent (docs/sysinfo.md)")

    c = sub.add_parser("check-config", help="validate the configuration and print it")
    c.add_argument("--quiet", "-q", action="store_true")

    st = sub.add_parser("status", help="is the mount up, who serves it, how is it going")
    st.add_argument("mountpoint", nargs="?", default=None)

    sub.add_parser("doctor", help="check this host for what cgprocfs needs")

    i = sub.add_parser("install-service", help="install the systemd unit for this install")
    i.add_argument("--root", default="/", help="install below this root (for packaging)")
    i.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")

    sh = sub.add_parser("show", help="print what a process would see, without FUSE")
    sh.add_argument("--pid", type=int, default=None, help="default: this process")
    sh.add_argument("--hide-swap", action="store_true", default=None)
    sh.add_argument("files", nargs="+", type=_view, metavar="FILE",
                    help="a served file: meminfo, vmstat, stat, uptime, loadavg, online, ... "
                    "(or proc/meminfo, /proc/meminfo)")

    r = sub.add_parser("run", help="run a command in a transient cgroup with the views")
    r.add_argument("--memory", "-m", help="memory limit, e.g. 256M")
    r.add_argument("--memory-swap", help="memory + swap limit (as Docker's --memory-swap)")
    r.add_argument("--cpus", type=float, help="CPU quota in CPUs, e.g. 1.5")
    r.add_argument("--cpuset", help="CPUs the command may run on, e.g. 0 or 0-1")
    r.add_argument("--hide-swap", action="store_true", default=None)
    r.add_argument("--no-sysinfo", action="store_true",
                   help="leave sysinfo(2) alone (busybox free, getconf _PHYS_PAGES then show "
                   "the host)")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    a = sub.add_parser("sysinfo-agent",
                       help="answer sysinfo(2) of attached containers (seccomp notify)")
    a.add_argument("--socket", default=None,
                   help="unix socket taking seccomp listeners (OCI listenerPath); "
                   "default: from the configuration (/run/cgprocfs/seccomp.sock)")
    a.add_argument("--hide-swap", action="store_true", default=None)
    a.add_argument("--no-cpu-quota", dest="cpu_quota", action="store_false", default=None)
    a.add_argument("--values-max-age", type=float, default=None,
                   help="seconds one container's figures may be reused (default 0.05; "
                   "0: a fresh snapshot for every call)")

    e = sub.add_parser("exec", help="attach this process to the sysinfo agent, then exec CMD")
    e.add_argument("--socket", default=None, help="the agent's socket (as sysinfo-agent)")
    e.add_argument("--require", action="store_true",
                   help="fail (exit 125) instead of running CMD unattached when no agent "
                   "answers")
    e.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")

    d = sub.add_parser("docker-args", help="print the docker run -v flags for the views")
    d.add_argument("--mountpoint", default=DEFAULT_MOUNTPOINT)
    d.add_argument("--all", action="store_true",
                   help="include views runc refuses to bind inside /proc (/proc/vmstat); "
                   "for runtimes that allow them")
    return p


def _config(args: argparse.Namespace) -> Config:
    overrides = {
        "mountpoint": getattr(args, "mountpoint", None),
        "hide_swap": getattr(args, "hide_swap", None),
        "cpu_quota": getattr(args, "cpu_quota", None),
        "io_uring": getattr(args, "io_uring", None),
        "sysinfo_socket": getattr(args, "socket", None),
        "log_level": args.log_level,
    }
    cfg = load_config(args.config, overrides=overrides)
    cfg.check(tuple(v.path for v in available_views()))
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"cgprocfs: configuration: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper()),
        format="cgprocfs[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args, cfg)
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    if args.command == "serve":
        from cgprocfs.serve import ServeOptions, StartupError, serve

        try:
            return serve(ServeOptions(cfg, debug_fuse=args.debug_fuse, sysinfo=args.sysinfo))
        except StartupError as exc:
            print(f"cgprocfs: {exc}", file=sys.stderr)
            return 1
    if args.command == "check-config":
        if not args.quiet:
            print(to_toml(cfg), end="")
        return 0
    if args.command == "status":
        from cgprocfs.admin import status

        return status(cfg.mountpoint)
    if args.command == "doctor":
        from cgprocfs.admin import doctor

        return doctor(cfg.mountpoint)
    if args.command == "install-service":
        from cgprocfs.admin import install_service

        return install_service(args.root, reload=not args.no_reload)
    if args.command == "show":
        return _show(args, cfg)
    if args.command == "run":
        return _run(args, cfg)
    if args.command == "sysinfo-agent":
        from cgprocfs.sysinfo.cli import agent

        return agent(cfg, args.values_max_age)
    if args.command == "exec":
        from cgprocfs.sysinfo.cli import exec_attached

        return exec_attached(args.cmd, cfg.sysinfo_socket, args.require)
    if args.command == "docker-args":
        mp = args.mountpoint.rstrip("/")
        views = tuple(v for v in available_views() if args.all or v.runc_bindable)
        print(" ".join(f"-v {mp}/{src}:{dst}:ro" for src, dst in bind_targets(views)))
        return 0
    raise AssertionError(args.command)


def _show(args: argparse.Namespace, cfg: Config) -> int:
    from cgprocfs.cgroups import load_layout
    from cgprocfs.resolve import Resolver
    from cgprocfs.snapshot import RenderOptions
    from cgprocfs.views import Renderer

    pid = args.pid if args.pid is not None else os.getpid()
    if not os.path.exists(f"/proc/{pid}"):
        print(f"cgprocfs: no process {pid}", file=sys.stderr)
        return 1
    renderer = Renderer(Resolver(load_layout(), use_quota=cfg.cpu_quota),
                        RenderOptions(hide_swap=cfg.hide_swap))
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


def _run(args: argparse.Namespace, cfg: Config) -> int:
    from cgprocfs.run import Limits, RunError, parse_size, run

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    try:
        memory = parse_size(args.memory) if args.memory else None
        swap = parse_size(args.memory_swap) if args.memory_swap else None
        serve_args = ["--hide-swap"] if cfg.hide_swap else []
        limits = Limits(memory, swap, args.cpus, args.cpuset)
        return run(cmd, limits, serve_args,
                   None if args.no_sysinfo else cfg.sysinfo_socket)
    except (RunError, ValueError) as exc:
        print(f"cgprocfs run: {exc}", file=sys.stderr)
        return 125
    except OSError as exc:
        print(f"cgprocfs run: {exc}", file=sys.stderr)
        return 125
