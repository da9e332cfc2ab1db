"""`cgprocfs sysinfo-agent` and `cgprocfs exec`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from cgprocfs.config import Config


def agent(cfg: Config, max_age: float | None = None) -> int:
    from cgprocfs.cgroups import load_layout
    from cgprocfs.fuse.child import ENV_ARENA_FD, ENV_LOADS_FD, ENV_SUPERVISOR, die_with_supervisor
    from cgprocfs.resolve import Resolver
    from cgprocfs.snapshot import RenderOptions
    from cgprocfs.sysinfo.agent import serve
    from cgprocfs.sysinfo.values import VALUES_MAX_AGE, SysinfoSource

    if os.environ.get(ENV_SUPERVISOR):
        die_with_supervisor()  # run by `cgprocfs serve`: it holds our descriptors
    resolver = Resolver(load_layout(), use_quota=cfg.cpu_quota)
    source = SysinfoSource(resolver, RenderOptions(cfg.hide_swap),
                           VALUES_MAX_AGE if max_age is None else max_age)
    if os.environ.get(ENV_ARENA_FD) and os.environ.get(ENV_LOADS_FD):
        # Under `cgprocfs serve`: the load sampler's averages, as /proc/loadavg shows them.
        from cgprocfs.fuse.arena import Arena
        from cgprocfs.fuse.loads import SharedLoads

        arena = Arena(int(os.environ[ENV_ARENA_FD]))
        source.loads = SharedLoads(arena, int(os.environ[ENV_LOADS_FD]))
    return serve(cfg.sysinfo_socket, source)


def attach(socket_path: str, container_id: str = "") -> None:
    """Put this process under the sysinfo filter and hand its listener to the agent.
    Raises OSError (nothing installed when the agent cannot be reached)."""
    from cgprocfs.sysinfo import oci
    from cgprocfs.sysinfo.seccomp import install_listener_filter

    if not oci.reachable(socket_path):
        raise ConnectionError(f"no sysinfo agent at {socket_path}")
    fd = install_listener_filter()
    try:
        oci.send_listener(socket_path, fd, container_id or f"exec-{os.getpid()}",
                          os.getpid())
    finally:
        os.close(fd)


def exec_attached(cmd: Sequence[str], socket_path: str, require: bool) -> int:
    cmd = list(cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("cgprocfs exec: no command given (cgprocfs exec -- CMD ...)", file=sys.stderr)
        return 125
    try:
        attach(socket_path)
    except ConnectionError as exc:
        if require:
            print(f"cgprocfs exec: {exc}", file=sys.stderr)
            return 125
        print(f"cgprocfs exec: {exc}; sysinfo(2) will show the host", file=sys.stderr)
    except OSError as exc:
        # The filter may be in place with nobody answering: running CMD would give it
        # ENOSYS from sysinfo, which is worse than not starting.
        print(f"cgprocfs exec: attaching to the sysinfo agent: {exc}", file=sys.stderr)
        return 125
    try:
        os.execvp(cmd[0], cmd)
    except (FileNotFoundError, PermissionError) as exc:
        from cgprocfs.run import cannot_start

        return cannot_start("exec", exc, cmd[0])
