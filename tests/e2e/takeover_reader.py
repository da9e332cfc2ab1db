"""A reader for the takeover tests: joins a container's cgroups, then reads meminfo, stat
and uptime through the mount in a loop until STOP_FILE exists, checking every answer
against its own container; prints a JSON summary.

usage: takeover_reader.py MOUNT PROCS_FILES(comma-separated) MEMORY_LIMIT STOP_FILE
"""

import errno
import json
import os
import sys
import time

mount, procs, limit, stop = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
for p in procs:
    with open(p, "w") as f:
        f.write(str(os.getpid()))

want_total = f"MemTotal:{limit // 1024:>15} kB"
errors: dict[str, int] = {}
wrong: list[str] = []
reads = 0
max_stall = 0.0
files = ("proc/meminfo", "proc/stat", "proc/uptime")


def check(name: str, data: bytes) -> str | None:
    text = data.decode()
    if name == "proc/meminfo":
        first = text.split("\n", 1)[0]
        return None if first == want_total else f"meminfo first line {first!r}"
    if name == "proc/stat":
        return None if text.startswith("cpu ") and "\nbtime " in text else "stat " + text[:40]
    parts = text.split()
    ok = len(parts) == 2 and all(float(x) >= 0 for x in parts)
    return None if ok else f"uptime {text!r}"


i = 0
while not os.path.exists(stop):
    name = files[i % len(files)]
    i += 1
    t0 = time.monotonic()
    try:
        fd = os.open(f"{mount}/{name}", os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
        bad = check(name, b"".join(chunks))
        if bad and len(wrong) < 5:
            wrong.append(bad)
        elif bad:
            wrong.append("...")
    except OSError as exc:
        key = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        errors[key] = errors.get(key, 0) + 1
    max_stall = max(max_stall, time.monotonic() - t0)
    if i == 1:  # tell the test this reader is reading (a slow machine starts them late)
        open(f"{stop}.started-{os.getpid()}", "w").close()
    reads += 1

print(json.dumps({"reads": reads, "errors": errors, "wrong": wrong, "max_stall": max_stall}))
