"""Things the guest lanes need that the host does not install: a Docker engine and a tiny image.

Nothing here installs anything on the host.  Debian packages are fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache directory (default:
``<repo>/.cache/guest``, gitignored); the guest sees the cache through its hostfs root.

    root = ensure_docker_root()        # .cache/guest/docker-root/usr/sbin/dockerd, ...
    tar = build_tiny_image_tarball()   # .cache/guest/tiny-image-v1.tar, for `docker import`
    script = docker_setup_script(root) + "docker import ..."   # run with run_in_guest()
    script = docker_engine_script()    # the three above in one
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .runner import REPO_ROOT

DEFAULT_CACHE = REPO_ROOT / ".cache" / "guest"

# What dockerd needs beyond the host's own libraries (libc, libseccomp, libsystemd,
# libdevmapper are on every Debian 12 host).  iptables and its libraries are unused with
# --iptables=false but kept so the engine is the ordinary one.
DOCKER_PACKAGES = (
    "docker.io",
    "containerd",
    "runc",
    "tini",
    "iptables",
    "libip4tc2",
    "libip6tc2",
    "libxtables12",
    "libnftnl11",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
)
TINY_IMAGE_NAME = "cgprocfs-tiny:latest"
# procps tools put in the tiny image (with the shared libraries they need).
TINY_IMAGE_TOOLS = ("free", "vmstat", "uptime", "ps")
_TINY_IMAGE_VERSION = "v1"


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    """Serialize cache builders (two test runs at once)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached_tarball(tarball: Path, prefix: str, write: Callable[[Path], None]) -> Path:
    """`tarball` (in a cache directory), made by `write(tmp)` unless it exists: under the
    cache lock, checked again there (another test run may have made it meanwhile); `tmp`
    is a file beside it, named `prefix`..., renamed into place only once complete."""
    cache_dir = tarball.parent
    if tarball.exists():
        return tarball
    with _locked(cache_dir):
        if tarball.exists():
            return tarball
        fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tar", dir=cache_dir)
        os.close(fd)
        try:
            write(Path(tmp_name))
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, tarball)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return tarball


def _apt_download(packages: tuple[str, ...], dest: Path) -> None:
    """apt-get download into dest; apt-get update once if the package lists are missing."""
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *packages]
    done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, check=False)
        done = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed:\n{done.stderr}")


def _unpack(debs: list[Path], root: Path) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)


def _fix_tree(root: Path) -> None:
    """Make the unpacked tree usable as is: absolute symlinks that point inside the packages
    become relative, and the iptables names (made by update-alternatives at install time)
    exist."""
    for link in list(root.rglob("*")):
        if link.is_symlink():
            target = os.readlink(link)
            if target.startswith("/") and (root / target.lstrip("/")).exists():
                link.unlink()
                link.symlink_to(os.path.relpath(root / target.lstrip("/"), link.parent))
    sbin = root / "usr" / "sbin"
    if (sbin / "xtables-legacy-multi").exists():
        for name in ("iptables", "ip6tables"):
            for suffix in ("", "-save", "-restore"):
                link = sbin / f"{name}{suffix}"
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(f"{name}-legacy{suffix}")


def ensure_docker_root(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The Docker engine's Debian packages unpacked into ``cache_dir/docker-root``.

    Downloads and unpacks them on first use (~67 MB of .debs, a few seconds); later calls
    return the cached tree.  Put ``<root>/usr/sbin`` and ``<root>/usr/bin`` on PATH and
    ``<root>/usr/lib/x86_64-linux-gnu`` on LD_LIBRARY_PATH in the guest (docker_env does).
    """
    cache_dir = Path(cache_dir)
    root = cache_dir / "docker-root"
    stamp = root / ".cgprocfs-complete"
    want = "\n".join(DOCKER_PACKAGES) + "\n"
    if stamp.exists() and stamp.read_text() == want:
        return root
    with _locked(cache_dir):
        if stamp.exists() and stamp.read_text() == want:
            return root
        debdir = cache_dir / "debs" / "docker"
        shutil.rmtree(debdir, ignore_errors=True)
        debdir.mkdir(parents=True)
        _apt_download(DOCKER_PACKAGES, debdir)
        build = Path(tempfile.mkdtemp(prefix=".docker-root-", dir=cache_dir))
        try:
            _unpack(sorted(debdir.glob("*.deb")), build)
            _fix_tree(build)
            if not (build / "usr" / "sbin" / "dockerd").exists():
                raise RuntimeError("docker.io unpacked without usr/sbin/dockerd")
            (build / ".cgprocfs-complete").write_text(want)
            shutil.rmtree(root, ignore_errors=True)
            build.rename(root)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return root


def _is_static(path: Path) -> bool:
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    text = done.stdout + done.stderr
    return "not a dynamic executable" in text or "statically linked" in text


def _static_busybox(cache_dir: Path) -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists() and _is_static(candidate):
            return candidate
    unpacked = cache_dir / "busybox-static" / "bin" / "busybox"
    if not unpacked.exists():
        debdir = cache_dir / "debs" / "busybox-static"
        shutil.rmtree(debdir, ignore_errors=True)
        debdir.mkdir(parents=True)
        _apt_download(("busybox-static",), debdir)
        build = Path(tempfile.mkdtemp(prefix=".busybox-", dir=cache_dir))
        try:
            _unpack(sorted(debdir.glob("*.deb")), build)
            shutil.rmtree(cache_dir / "busybox-static", ignore_errors=True)
            build.rename(cache_dir / "busybox-static")
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return unpacked


def _shared_libs(binary: Path) -> set[str]:
    """Absolute paths of the loader and libraries ``binary`` loads, as ldd names them."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    paths = set()
    for line in done.stdout.splitlines():
        for word in line.split():
            if word.startswith("/"):
                paths.add(word)
                break
    return paths


def build_tiny_image_tarball(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A tarball of a tiny root filesystem for ``docker import`` (cached).

    Static busybox in /bin with its applets linked beside it, procps ``free``, ``vmstat``,
    ``uptime`` and ``ps`` in /usr/bin (found first on Docker's default PATH) with the shared
    libraries and loader they need at the paths ldd names, and empty /proc /sys /dev /tmp.
    """
    cache_dir = Path(cache_dir)
    tarball = cache_dir / f"tiny-image-{_TINY_IMAGE_VERSION}.tar"

    def write(tmp: Path) -> None:
        busybox = _static_busybox(cache_dir)
        tools = []
        for name in TINY_IMAGE_TOOLS:
            found = shutil.which(name, path="/usr/bin:/bin")
            if found is None:
                raise RuntimeError(f"procps {name} is missing on the host (apt-get install procps)")
            tools.append(Path(found).resolve())
        libs: set[str] = set()
        for tool in tools:
            libs |= _shared_libs(tool)
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True
        ).stdout.split()

        with tarfile.open(tmp, "w") as tar:

            def add_dir(name: str, mode: int = 0o755) -> None:
                info = tarfile.TarInfo(name)
                info.type, info.mode = tarfile.DIRTYPE, mode
                tar.addfile(info)

            def add_file(name: str, src: Path, mode: int = 0o755) -> None:
                info = tar.gettarinfo(str(src.resolve()), arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mode = mode
                with open(src.resolve(), "rb") as f:
                    tar.addfile(info, f)

            def add_link(name: str, target: str) -> None:
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
                tar.addfile(info)

            def add_text(name: str, text: str) -> None:
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

            made: set[str] = set()

            def add_parents(path: str) -> None:
                parts = path.split("/")[:-1]
                for i in range(1, len(parts) + 1):
                    d = "/".join(parts[:i])
                    if d and d not in made:
                        made.add(d)
                        add_dir(d)

            for d in ("bin", "usr", "usr/bin", "etc", "root", "run", "var", "dev", "proc",
                      "sys"):  # fmt: skip
                made.add(d)
                add_dir(d, 0o700 if d == "root" else 0o755)
            made.add("tmp")
            add_dir("tmp", 0o1777)
            add_file("bin/busybox", busybox)
            procps_names = set(TINY_IMAGE_TOOLS)
            for applet in applets:
                if applet != "busybox" and applet not in procps_names and "/" not in applet:
                    add_link(f"bin/{applet}", "busybox")
            for tool in tools:
                add_file(f"usr/bin/{tool.name}", tool)
            for lib in sorted(libs):
                name = lib.lstrip("/")
                add_parents(name)
                add_file(name, Path(lib), 0o755)
            add_text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                     "nobody:x:65534:65534:nobody:/:/bin/false\n")  # fmt: skip
            add_text("etc/group", "root:x:0:\nnogroup:x:65534:\n")

    return cached_tarball(tarball, ".tiny-image-", write)


def docker_env(docker_root: Path) -> str:
    """Bash lines that put the unpacked engine on PATH and LD_LIBRARY_PATH."""
    root = shlex.quote(str(docker_root))
    return (
        f"export PATH={root}/usr/sbin:{root}/usr/bin:$PATH\n"
        f"export LD_LIBRARY_PATH={root}/usr/lib/x86_64-linux-gnu"
        "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n"
    )


def docker_setup_script(docker_root: Path, *, wait: int = 90) -> str:
    """Bash lines for a guest script: start dockerd (log in $GUEST_OUT/dockerd.log) and wait
    until ``docker info`` answers; exit 90 if it does not within ``wait`` seconds."""
    return (
        docker_env(docker_root)
        + f"""\
mkdir -p /var/lib/docker /var/lib/containerd /etc/docker
mount -t tmpfs -o mode=0711 tmpfs /var/lib/docker
mount -t tmpfs -o mode=0711 tmpfs /var/lib/containerd
: "${{GUEST_OUT:=/tmp}}"
dockerd --iptables=false --ip6tables=false --bridge=none \\
    >"$GUEST_OUT/dockerd.log" 2>&1 &
for _ in $(seq {wait * 5}); do
    docker info >/dev/null 2>&1 && break
    sleep 0.2
done
if ! docker info >/dev/null 2>&1; then
    echo "dockerd did not come up in {wait}s:"; tail -n 50 "$GUEST_OUT/dockerd.log"; exit 90
fi
"""
    )


def docker_import_script(tarball: Path, image: str = TINY_IMAGE_NAME) -> str:
    """Bash line that imports the tiny image tarball as ``image``."""
    return f"docker import {shlex.quote(str(tarball))} {shlex.quote(image)} >/dev/null\n"


def docker_engine_script(cache_dir: Path = DEFAULT_CACHE) -> str:
    """Bash lines for a guest script: the cached engine started (docker_setup_script) and
    the tiny image imported as TINY_IMAGE_NAME (both built here first if need be)."""
    docker_root = ensure_docker_root(cache_dir)
    tarball = build_tiny_image_tarball(cache_dir)
    return docker_setup_script(docker_root) + docker_import_script(tarball)
