"""CPU and time views: /proc/cpuinfo, /proc/stat, /proc/uptime and the
/sys/devices/system/cpu/{online,possible,present} lists (design.md §5).

The container's CPUs are renumbered from 0. CPU time is the cgroup's own (user and
system), spread evenly over the visible CPUs; idle is the rest of age * CPUs, so `top`
shows the container's load as a share of the CPUs it may use."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cgprocfs.cpu import CLK_TCK, CpuView, format_cpu_list


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative ticks (USER_HZ) of the container, summed over its visible CPUs."""

    user: int
    system: int
    idle: int

    def at_least(self, other: CpuTimes | None) -> CpuTimes:
        """Never below an earlier rendering: every counter only moves forward."""
        if other is None:
            return self
        return CpuTimes(max(self.user, other.user), max(self.system, other.system),
                        max(self.idle, other.idle))


@dataclass(frozen=True)
class HostStat:
    """What the host's /proc/stat contributes: its layout and boot time, read once."""

    cpu_fields: int  # numbers on a cpu line (10 on current kernels)
    intr_fields: int
    softirq_fields: int
    btime: int


def parse_host_stat(text: str) -> HostStat:
    fields = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.strip()}
    return HostStat(
        cpu_fields=len(fields.get("cpu", [0] * 10)),
        intr_fields=len(fields.get("intr", ["0"])),
        softirq_fields=len(fields.get("softirq", ["0"])),
        btime=int(fields.get("btime", ["0"])[0]),
    )


def cpu_times(view: CpuView) -> CpuTimes:
    n = max(1, len(view.cpus))
    user = view.user_us * CLK_TCK // 1_000_000
    system = view.system_us * CLK_TCK // 1_000_000
    age_ticks = int(max(0.0, view.now - view.start) * CLK_TCK)
    return CpuTimes(user, system, max(0, age_ticks * n - user - system))


def _share(total: int, n: int, i: int) -> int:
    # CPU i's part of `total` spread over n CPUs; each part only grows as `total` does.
    return (total + n - 1 - i) // n


def render_stat(host: HostStat, view: CpuView, times: CpuTimes) -> bytes:
    n = max(1, len(view.cpus))
    pad = " 0" * max(0, host.cpu_fields - 4)

    def cpu_line(label: str, user: int, system: int, idle: int) -> str:
        # user nice system idle, then iowait irq softirq steal guest guest_nice as 0.
        return f"{label} {user} 0 {system} {idle}{pad}\n"

    lines = [cpu_line("cpu ", times.user, times.system, times.idle)]
    for i in range(n):
        lines.append(cpu_line(f"cpu{i}", _share(times.user, n, i), _share(times.system, n, i),
                              _share(times.idle, n, i)))
    lines.append("intr" + " 0" * host.intr_fields + "\n")
    lines.append("ctxt 0\n")
    lines.append(f"btime {host.btime}\n")
    lines.append(f"processes {view.threads}\n")
    lines.append(f"procs_running {max(1, view.running)}\n")
    lines.append(f"procs_blocked {view.blocked}\n")
    lines.append("softirq" + " 0" * host.softirq_fields + "\n")
    return "".join(lines).encode()


def render_uptime(view: CpuView, times: CpuTimes) -> bytes:
    age = max(0.0, view.now - view.start)
    return f"{age:.2f} {times.idle / CLK_TCK:.2f}\n".encode()


def render_cpu_list(view: CpuView) -> bytes:
    return (format_cpu_list(len(view.cpus)) + "\n").encode()


def render_cpuinfo(host_cpuinfo: str, view: CpuView) -> bytes:
    """The host's blocks for the visible CPUs, renumbered from 0; sibling and core counts
    say what the container has."""
    return _cpuinfo_for(host_cpuinfo, view.cpus)


# Pure in its arguments, and the host's text changes only every CPUINFO_MAX_AGE: every
# container with the same CPUs shows the same bytes until then.
@functools.lru_cache(maxsize=256)
def _cpuinfo_for(host_cpuinfo: str, cpus: tuple[int, ...]) -> bytes:
    blocks: dict[int, list[str]] = {}
    for block in host_cpuinfo.strip("\n").split("\n\n"):
        lines = block.splitlines()
        for line in lines:
            key, _, value = line.partition(":")
            if key.strip() == "processor":
                if value.strip().isdigit():
                    blocks[int(value)] = lines
                break
    n = len(cpus)
    out = []
    for new, cpu in enumerate(cpus):
        lines = blocks.get(cpu) or next(iter(blocks.values()), [])
        fixed = []
        for line in lines:
            key = line.partition(":")[0]
            name = key.strip()
            if name == "processor":
                line = f"{key}: {new}"
            elif name in ("siblings", "cpu cores"):
                line = f"{key}: {n}"
            elif name in ("core id", "apicid", "initial apicid"):
                line = f"{key}: {new}"
            elif name == "physical id":
                line = f"{key}: 0"
            fixed.append(line)
        out.append("\n".join(fixed) + "\n")
    return "\n".join(out).encode() + b"\n"
