"""A stand-in for the supervisor: embeds cgprocfs.keeper.Keeper, runs the sysinfo agent
as its child and starts a new one whenever it dies, handing it the kept fds.

usage: keeper_harness.py PIDFILE -- AGENT-COMMAND...
Writes the current agent's pid to PIDFILE (replaced atomically on each restart). SIGTERM:
stop the agent, close the kept fds, exit 0.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

from cgprocfs.keeper import Keeper


def main(argv: list[str]) -> int:
    pidfile, cmd = argv[0], argv[2:]
    keeper = Keeper()
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    child: subprocess.Popen[bytes] | None = None
    generation = 0
    try:
        while not stopping:
            if child is None or child.poll() is not None:
                pass_fds, env = keeper.child_args(prefix="sysinfo.")
                child = subprocess.Popen(cmd, pass_fds=pass_fds, env={**os.environ, **env})
                generation += 1
                with open(pidfile + ".tmp", "w") as f:
                    f.write(f"{child.pid} {generation}\n")
                os.replace(pidfile + ".tmp", pidfile)
            r, _, _ = select.select([keeper.fileno()], [], [], 0.01)
            if r:
                keeper.receive()
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            child.wait()
        keeper.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
