"""`python -m cgprocfs.sysinfo [--socket PATH]`: the agent, as `cgprocfs sysinfo-agent`."""

import sys

from cgprocfs.cli import main

raise SystemExit(main(["sysinfo-agent", *sys.argv[1:]]))
