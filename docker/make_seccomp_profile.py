"""Make docker/seccomp-sysinfo.json: Docker's default seccomp profile with sysinfo(2)
handed to the cgprocfs sysinfo agent (SCMP_ACT_NOTIFY + listenerPath).

usage: python docker/make_seccomp_profile.py DEFAULT.json [SOCKET] > docker/seccomp-sysinfo.json

DEFAULT.json is moby's profiles/seccomp/default.json (the shipped file was made from
github.com/moby/profiles/seccomp v0.2.3, as vendored by moby). sysinfo leaves the allow
list (libseccomp refuses two actions for one syscall) and gets its own notify rule;
everything else is Docker's default, unchanged.
"""

from __future__ import annotations

import json
import sys
from typing import Any

DEFAULT_SOCKET = "/run/cgprocfs/seccomp.sock"


def with_sysinfo_notify(profile: dict[str, Any], socket: str) -> dict[str, Any]:
    out = dict(profile)
    rules = []
    for rule in profile["syscalls"]:
        names = [n for n in rule.get("names", []) if n != "sysinfo"]
        if names:
            rules.append({**rule, "names": names})
    rules.append({"names": ["sysinfo"], "action": "SCMP_ACT_NOTIFY"})
    out["syscalls"] = rules
    out["listenerPath"] = socket
    out["listenerMetadata"] = "cgprocfs-sysinfo"
    return out


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        profile = json.load(f)
    socket = argv[1] if len(argv) > 1 else DEFAULT_SOCKET
    json.dump(with_sysinfo_notify(profile, socket), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
