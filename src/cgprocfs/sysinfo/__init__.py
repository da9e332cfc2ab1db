"""sysinfo(2) from the container's point of view, by seccomp user notification.

Files cannot reach programs that never open them: busybox free/uptime/top, glibc's
sysconf(_SC_PHYS_PAGES) and getloadavg(), Go's Sysinfo ask the kernel with sysinfo(2).
A seccomp filter on the container turns each such call into a notification; the agent
(`agent.py`) answers it from the same snapshot code as /proc/meminfo, /proc/uptime and
/proc/loadavg. See docs/sysinfo.md.
"""
