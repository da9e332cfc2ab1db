"""A root filesystem equivalent to what docker/Dockerfile builds, assembled from this
machine's files, as a tarball for ``docker import`` (the test machine has no registry, so
``FROM python:3.11-slim-bookworm`` cannot be pulled).

Same layout and contents as the Dockerfile's final stage, from different sources:

=================================  ==================================  ====================
in the image                       Dockerfile                          here
=================================  ==================================  ====================
/usr/local/bin/python3.X + stdlib  python:3.11-slim-bookworm           the interpreter that
                                                                       runs the tests (its
                                                                       stdlib minus test/,
                                                                       idlelib, tkinter...)
/opt/cgprocfs (venv, cgprocfs;     ``pip install`` of the build        ``pip install
no other Python package)           context                             --target`` of the
                                                                       repository
umount, mountpoint, nsenter        util-linux in the base image        the host's, via ldd
/bin/sh and small tools            dash, coreutils, grep               static busybox
shared libraries                   Debian packages                     the host's, via ldd
ENTRYPOINT, CMD, HEALTHCHECK, ...  docker/Dockerfile                   the same lines, read
                                                                       from it by the lane
=================================  ==================================  ====================

``python -m tests.deploy.image_rootfs`` builds it and prints the tarball's path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

from tests.deploy import dockerfile
from tests.guest.packages import DEFAULT_CACHE, _static_busybox, cached_tarball

REPO_ROOT = dockerfile.REPO_ROOT
VENV = "/opt/cgprocfs"
# util-linux programs the image carries (the Kubernetes init container uses umount and
# mountpoint, the DaemonSet nsenter). No fusermount: the daemon mounts with mount(2).
HOST_TOOLS = ("umount", "mount", "mountpoint", "nsenter")
# Parts of the standard library a daemon never imports (python:3.11-slim drops most of
# them too); __pycache__ keeps only the plain .pyc files.
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "idlelib", "tkinter",
                          "turtledemo", "ensurepip", "lib2to3", "__phello__"})  # fmt: skip
# Extension modules of those parts (and the interpreter's own test modules).
_DYNLOAD_SKIP = ("_tkinter", "_test", "_xxtest", "xxlimited", "_ctypes_test", "xxsubtype")


def _context_files() -> list[Path]:
    """The files of the build context docker/Dockerfile COPYs (per its .dockerignore)."""
    rules = dockerfile.ignore_rules(dockerfile.DOCKERIGNORE.read_text())
    out = []
    candidates = [*sorted(REPO_ROOT.joinpath("src").rglob("*")),
                  REPO_ROOT / "pyproject.toml", REPO_ROOT / "README.md"]  # fmt: skip
    for path in candidates:
        rel = path.relative_to(REPO_ROOT).as_posix()
        if path.is_file() and not dockerfile.is_ignored(rel, rules):
            out.append(path)
    return out


def _cache_key(python: Path) -> str:
    h = hashlib.sha256(f"{python}\n{sys.version}\n".encode())
    h.update(Path(__file__).read_bytes())  # this recipe itself
    for path in _context_files():
        h.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _ldd(binary: Path) -> list[str]:
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if done.returncode != 0 or "not a dynamic executable" in done.stdout + done.stderr:
        return []
    paths = []
    for line in done.stdout.splitlines():
        if "=> not found" in line:
            continue  # a stdlib module for a library the host lacks: never imported
        for word in line.split():
            if word.startswith("/"):
                paths.append(word)
                break
    return paths


def _copy(src: Path, dest: Path, mode: int | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src.resolve(), dest)
    if mode is not None:
        dest.chmod(mode)


def _stage_python(stage: Path, python: Path) -> tuple[str, Path]:
    """The interpreter at /usr/local like the python images; returns ("3.11", its
    install prefix on the host)."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    base_prefix = Path(sys.base_prefix)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    _copy(python, stage / f"usr/local/bin/python{ver}")
    for alias in ("python3", "python"):
        (stage / f"usr/local/bin/{alias}").symlink_to(f"python{ver}")

    def skip(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == stdlib
        return {
            n for n in names
            if (top and (n in _STDLIB_SKIP or n.startswith("config-")))
            or ".opt-" in n
            or n.startswith(_DYNLOAD_SKIP)
        }  # fmt: skip

    shutil.copytree(stdlib, stage / f"usr/local/lib/python{ver}", symlinks=True, ignore=skip)
    return ver, base_prefix


def _stage_venv(stage: Path, ver: str, python: Path) -> None:
    """/opt/cgprocfs as `python -m venv` + `pip install .` would leave it."""
    venv = stage / VENV.lstrip("/")
    (venv / "bin").mkdir(parents=True)
    for name in ("python", "python3", f"python{ver}"):
        (venv / "bin" / name).symlink_to(f"/usr/local/bin/python{ver}")
    (venv / "lib64").symlink_to("lib")
    (venv / "pyvenv.cfg").write_text(
        "home = /usr/local/bin\ninclude-system-site-packages = false\n"
        f"version = {sys.version.split()[0]}\n"
    )
    site = venv / f"lib/python{ver}/site-packages"
    build = Path(tempfile.mkdtemp(prefix=".cgprocfs-src-", dir=stage.parent))
    try:
        # A copy of the build context (what docker build would send), so the pip build
        # never writes into the working tree (build/, *.egg-info).
        for path in _context_files():
            _copy(path, build / path.relative_to(REPO_ROOT))
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-warn-script-location", "--target", str(site), str(build)],
            capture_output=True, text=True,
        )  # fmt: skip
    finally:
        shutil.rmtree(build, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"pip install --target failed:\n{done.stdout}\n{done.stderr}")
    shutil.rmtree(site / "bin", ignore_errors=True)  # scripts with this machine's shebang
    # The console script pip writes for `cgprocfs = cgprocfs.cli:main` in a venv.
    script = venv / "bin" / "cgprocfs"
    script.write_text(
        f"#!{VENV}/bin/python\nimport sys\nfrom cgprocfs.cli import main\n"
        "if __name__ == '__main__':\n    sys.exit(main())\n"
    )
    script.chmod(0o755)


def _stage_tools(stage: Path, cache_dir: Path) -> None:
    for name in HOST_TOOLS:
        found = shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if found is None:
            raise RuntimeError(f"{name} is missing on this machine (util-linux, mount)")
        _copy(Path(found), stage / "usr/bin" / name)
    busybox = _static_busybox(cache_dir)
    _copy(busybox, stage / "bin/busybox", 0o755)
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        # The real tools win (same name in /usr/bin, which comes first on PATH anyway).
        if applet != "busybox" and "/" not in applet and applet not in HOST_TOOLS:
            (stage / "bin" / applet).symlink_to("busybox")


def _stage_libs(stage: Path, base_prefix: Path) -> None:
    """Every shared library the staged programs and extension modules load, at the path
    ldd names; the interpreter's own (libpython) goes to /usr/local/lib."""
    libs: set[str] = set()
    for path in stage.rglob("*"):
        if path.is_file() and not path.is_symlink() and _elf(path) and path.name != "busybox":
            libs.update(_ldd(path))
    multiarch = None
    for lib in sorted(libs):
        src = Path(lib)
        if src.name.startswith("libc.so"):
            multiarch = src.parent
        if src.is_relative_to(base_prefix):
            _copy(src, stage / "usr/local/lib" / src.name, 0o755)
        else:
            _copy(src, stage / lib.lstrip("/"), 0o755)
    # libpython: the python images run ldconfig for /usr/local/lib; a link in the
    # loader's default directory does the same here without an ld.so.cache.
    if multiarch is None:
        raise RuntimeError("ldd named no libc")
    for own in (stage / "usr/local/lib").glob("lib*.so*"):
        link = stage / str(multiarch).lstrip("/") / own.name
        if not link.exists():
            link.symlink_to(f"/usr/local/lib/{own.name}")


def _strip(stage: Path) -> None:
    """Strip debugging symbols from the interpreter and the extension modules, as the
    python images do (pyenv's libpython alone carries ~18 MB of them): a smaller tarball
    imports faster in the guest. System libraries from Debian are stripped already."""
    strip = shutil.which("strip")
    if strip is None:
        return
    roots = [stage / "usr/local", stage / VENV.lstrip("/")]
    files = [p for r in roots for p in r.rglob("*")
             if p.is_file() and not p.is_symlink() and _elf(p)]  # fmt: skip
    if files:
        subprocess.run(
            [strip, "--strip-unneeded", *map(str, files)], check=True, capture_output=True
        )


def _stage_etc(stage: Path) -> None:
    for d in ("dev", "proc", "sys", "run", "var/lib/cgprocfs", "root"):
        (stage / d).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").mkdir(mode=0o1777, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "etc").mkdir(exist_ok=True)
    (stage / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"
    )
    (stage / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")


def _smoke_test(stage: Path) -> None:
    """Run the staged daemon's --help and the util-linux tools in a chroot (root only)."""
    chroot = shutil.which("chroot")
    if os.geteuid() != 0 or chroot is None:
        return
    checks = [
        [f"{VENV}/bin/cgprocfs", "--help"],
        ["/usr/bin/umount", "--version"],
        ["/usr/bin/nsenter", "--version"],
        ["/bin/sh", "-c", "grep -q x /etc/passwd"],
    ]
    for cmd in checks:
        done = subprocess.run(
            [chroot, str(stage), *cmd],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        if done.returncode != 0:
            raise RuntimeError(f"in the staged rootfs, {cmd} failed:\n{done.stderr}")
    # What the supervisor runs must import too, not only the CLI: the supervisor itself,
    # its workers and the load sampler (python -m cgprocfs.fuse.worker / .loads), with the
    # standard library modules they load (ctypes for mount(2), mmap for the arena).
    modules = "cgprocfs.fuse.supervisor, cgprocfs.fuse.worker, cgprocfs.fuse.loads"
    done = subprocess.run(
        [chroot, str(stage), f"{VENV}/bin/python", "-c", f"import {modules}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"in the staged rootfs, importing {modules} failed:\n{done.stderr}")


def build_daemon_rootfs_tarball(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The tarball (cached by the content of the build context and the interpreter)."""
    cache_dir = Path(cache_dir)
    python = Path(os.path.realpath(sys.executable))
    tarball = cache_dir / f"daemon-rootfs-{_cache_key(python)}.tar"

    def write(tmp: Path) -> None:
        for old in cache_dir.glob("daemon-rootfs-*.tar"):
            old.unlink()
        stage = Path(tempfile.mkdtemp(prefix=".daemon-rootfs-", dir=cache_dir))
        try:
            stage.chmod(0o755)
            ver, base_prefix = _stage_python(stage, python)
            _stage_venv(stage, ver, python)
            _stage_tools(stage, cache_dir)
            _stage_libs(stage, base_prefix)
            _strip(stage)
            _stage_etc(stage)
            _smoke_test(stage)

            def owner_root(info: tarfile.TarInfo) -> tarfile.TarInfo:
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                return info

            with tarfile.open(tmp, "w") as tar:
                for top in sorted(stage.iterdir()):
                    tar.add(top, arcname=top.name, filter=owner_root)
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    return cached_tarball(tarball, ".daemon-rootfs-", write)


if __name__ == "__main__":
    print(build_daemon_rootfs_tarball())
