"""`python -m cgprocfs.sysinfo.shim RUNC-ARGS...`: runc, with listenerPath restored.

Docker before 23.0 passes a seccomp profile's SCMP_ACT_NOTIFY rules to runc but drops its
`listenerPath`, and runc then refuses the container ("listenerPath is not set"). Registered
as a Docker runtime (`"runtimes": {"cgprocfs": {"path": ...}}` in daemon.json, then
`docker run --runtime cgprocfs --security-opt seccomp=seccomp-sysinfo.json`), this sets
listenerPath in the bundle's config.json on `create`/`run` when a notify rule is there and
no listenerPath is, then execs the real runc ($CGPROCFS_RUNC, default `runc`) unchanged.
"""

from __future__ import annotations

import json
import os
import sys

from cgprocfs.config import Config


def _bundle(args: list[str]) -> str | None:
    if "create" not in args and "run" not in args:
        return None
    for i, a in enumerate(args):
        if a in ("--bundle", "-b") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--bundle="):
            return a.split("=", 1)[1]
    return os.getcwd()


def restore_listener_path(config_path: str, socket_path: str) -> bool:
    """Set linux.seccomp.listenerPath when a notify rule needs it; True if changed."""
    with open(config_path) as f:
        spec = json.load(f)
    seccomp = spec.get("linux", {}).get("seccomp") or {}
    notify = any(r.get("action") == "SCMP_ACT_NOTIFY" for r in seccomp.get("syscalls") or [])
    if not notify or seccomp.get("listenerPath"):
        return False
    seccomp["listenerPath"] = socket_path
    tmp = config_path + ".cgprocfs"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, config_path)
    return True


def main(argv: list[str]) -> int:
    bundle = _bundle(argv)
    if bundle is not None:
        config = os.path.join(bundle, "config.json")
        socket_path = os.environ.get("CGPROCFS_SYSINFO_SOCKET", Config().sysinfo_socket)
        try:
            restore_listener_path(config, socket_path)
        except (OSError, ValueError) as exc:
            print(f"cgprocfs shim: {config}: {exc}", file=sys.stderr)
    runc = os.environ.get("CGPROCFS_RUNC", "runc")
    os.execvp(runc, [runc, *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
