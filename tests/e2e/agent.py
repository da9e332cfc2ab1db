"""Runs inside a test container: performs steps and reports what the tools inside see.

usage: agent.py STEP...   steps: free | alloc MiB | write MiB PATH | vmstat | psutil | cat FILE
Prints one JSON object per step, one per line.
"""

import json
import mmap
import os
import subprocess
import sys

MiB = 1 << 20
held = []


def main(argv: list[str]) -> None:
    i = 0
    while i < len(argv):
        step = argv[i]
        i += 1
        if step == "free":
            out = subprocess.run(["free", "-b"], capture_output=True, text=True, check=True)
            result = {"free": out.stdout}
        elif step == "alloc":
            n = int(argv[i]) * MiB
            i += 1
            # Private: a shared anonymous mapping would be shmem, not anonymous memory.
            m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            for off in range(0, n, 4096):
                m[off] = 1
            held.append(m)
            result = {"alloc": n}
        elif step == "write":
            n, path = int(argv[i]) * MiB, argv[i + 1]
            i += 2
            chunk = b"x" * MiB
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            for _ in range(n // MiB):
                os.write(fd, chunk)
            os.fsync(fd)
            os.close(fd)
            result = {"write": n}
        elif step == "vmstat":
            out = subprocess.run(["vmstat", "-s"], capture_output=True, text=True, check=True)
            result = {"vmstat": out.stdout}
        elif step == "psutil":
            import psutil

            result = {"psutil": psutil.virtual_memory()._asdict(),
                      "swap": psutil.swap_memory()._asdict()}
        elif step == "cat":
            with open(argv[i]) as f:
                result = {"cat": f.read()}
            i += 1
        else:
            raise SystemExit(f"unknown step {step}")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
