#!/usr/bin/env bash
# One entry point for the README's two commands.
#   bash scripts/setup.sh demo   install, mount, show `free` inside a 256 MiB scope next to the host's
#   bash scripts/setup.sh test   install, run the full test suite (host v1 lane, guest v2 lane, Docker lane)
#   bash scripts/setup.sh install  only install (Debian packages + .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# cgprocfs itself needs only python3 and python3-venv (pure Python, no libfuse: it mounts
# with mount(2) and speaks the FUSE protocol itself). The rest is for the tests and
# benchmarks: gcc and gcc-multilib build the static (and 32-bit) sysinfo(2) callers,
# python3-dev lets pip build a test dependency from source where no wheel fits.
DEB_PACKAGES=(
  python3 python3-venv python3-dev gcc
  procps busybox htop sysstat lxcfs user-mode-linux strace tmux util-linux
  runc gcc-multilib
)

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "cgprocfs: this must run as root (it mounts FUSE and creates cgroups)" >&2
    exit 1
  fi
}

install_debian() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # lxcfs is only the benchmark's reference: keep its service from taking /var/lib/lxcfs.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    rm -f /usr/sbin/policy-rc.d
  fi
}

# The venv is made from the interpreter the Debian packages above installed, not from
# whichever python3 comes first on PATH: a self-built one (pyenv's, say) is often built
# without PGO and LTO, and the daemon is interpreter-bound. Measured on the test VM:
# pyenv's 3.11.7 (shared libpython, no PGO/LTO) took 0.88 s for an interpreter loop that
# Debian's 3.11.2 ran in 0.65, and `top`-like polling cost the daemon 26-28 % of a core
# against 22-24 %. PYTHON=/path/to/python3 overrides.
PYTHON=${PYTHON:-/usr/bin/python3}

install_python() {
  local want
  want=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
  # A venv's python is a symlink to the interpreter it was made from.
  if [ -x .venv/bin/python ] && [ "$(realpath .venv/bin/python)" != "$want" ]; then
    echo "==> .venv was made from another interpreter; making it anew from $want"
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv ($want)"
    "$PYTHON" -m venv .venv
  fi
  echo "==> pip install -e .[test,bench]"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[test,bench]"
}

cmd=${1:-}
case "$cmd" in
  install)
    need_root; install_debian; install_python ;;
  demo)
    need_root; install_debian; install_python
    echo
    echo "==> the host's view: free -m"
    free -m
    echo
    echo "==> inside a 256 MiB cgroup with the cgprocfs views bound over /proc: free -m"
    .venv/bin/cgprocfs run --memory 256M -- free -m
    ;;
  test)
    need_root; install_debian; install_python
    shift
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: bash scripts/setup.sh {demo|test|install} [pytest args]" >&2
    exit 2 ;;
esac
