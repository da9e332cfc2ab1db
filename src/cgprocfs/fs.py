"""The FUSE layer: a static read-only tree of views, rendered once per open.

It knows nothing about memory or CPUs: it maps an inode to a View, asks the Renderer
what the opening pid sees, keeps those bytes for the file handle and serves slices.
Every handler is wrapped so that nothing but FUSEError ever escapes: any other exception
would end pyfuse3.main() and take /proc away from every container.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from cgprocfs import __version__
from cgprocfs.cpudir import CpuDir
from cgprocfs.views import Renderer, View

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

ROOT_INODE: int = pyfuse3.ROOT_INODE
# A file at the mount's root that says who serves it and how it is going (`cgprocfs status`).
STATUS_NAME = b".cgprocfs-status"
# The tree never changes while mounted: let the kernel cache names and attributes.
CACHE_TIMEOUT = 3600.0
# The host's sysfs behind the cpu directory can change (hotplug): cache it briefly.
MIRROR_TIMEOUT = 1.0
CPU_DIR = "sys/devices/system/cpu"
MIRROR_FIRST_INODE = 1 << 32
DIR_FH_BASE = 1 << 40  # directory handles of listings fixed at opendir


def guarded(
    handler: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("%s failed; answering EIO", handler.__name__)
            ops = args[0]
            if isinstance(ops, ViewsFS):
                ops.stats.errors += 1
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class Node:
    inode: int
    name: bytes
    parent: int
    view: View | None = None  # None for directories (and the status file)
    children: dict[bytes, int] = field(default_factory=dict)
    status: bool = False


@dataclass
class Handle:
    """An open file: the bytes rendered at open, and who they were rendered for."""

    view: View | None  # None: the status file
    pid: int
    caller: str
    data: bytes
    read: bool = False


@dataclass
class Stats:
    opens: int = 0
    errors: int = 0


def build_tree(views: Sequence[View]) -> dict[int, Node]:
    """Inode numbers follow the order of `views`, so they are stable across restarts."""
    nodes = {ROOT_INODE: Node(ROOT_INODE, b"", ROOT_INODE)}
    next_inode = ROOT_INODE + 1
    for view in views:
        parent = nodes[ROOT_INODE]
        parts = view.path.split("/")
        for i, part in enumerate(parts):
            name = part.encode()
            last = i == len(parts) - 1
            inode = parent.children.get(name)
            if inode is None:
                inode = next_inode
                next_inode += 1
                nodes[inode] = Node(inode, name, parent.inode, view if last else None)
                parent.children[name] = inode
            parent = nodes[inode]
    nodes[next_inode] = Node(next_inode, STATUS_NAME, ROOT_INODE, status=True)
    nodes[ROOT_INODE].children[STATUS_NAME] = next_inode
    return nodes


class ViewsFS(pyfuse3.Operations):
    # pyfuse3 calls `flush` only if defined; leaving it out saves one round trip per close.

    def __init__(self, renderer: Renderer, views: Sequence[View]) -> None:
        super().__init__()
        self.renderer = renderer
        self.nodes = build_tree(views)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._next_dir_fh = DIR_FH_BASE
        self.stats = Stats()
        self.started = time.time()
        self.cpu_dir_inode, self.cpu_dir = self._mirror(views)
        self._dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self._uid = os.getuid()
        self._gid = os.getgid()

    def _mirror(self, views: Sequence[View]) -> tuple[int | None, CpuDir | None]:
        """The node of sys/devices/system/cpu, if any view lives there, and its mirror."""
        for node in self.nodes.values():
            if node.view is not None and node.view.path.startswith(CPU_DIR + "/"):
                parent = self.nodes[node.parent]
                return parent.inode, CpuDir(
                    "/" + CPU_DIR, self.renderer.visible_cpus,
                    [n.decode() for n in parent.children], MIRROR_FIRST_INODE)
        return None, None

    def _host_attr(self, path: str, entry_timeout: float) -> pyfuse3.EntryAttributes:
        assert self.cpu_dir is not None
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.cpu_dir.inode_of(path)
        a.generation = 0
        a.entry_timeout = entry_timeout
        a.attr_timeout = MIRROR_TIMEOUT
        a.st_mode = st.st_mode & ~0o222  # read-only
        a.st_nlink = st.st_nlink
        a.st_size = st.st_size
        a.st_uid, a.st_gid = st.st_uid, st.st_gid
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        a.st_blksize = 4096
        a.st_blocks = 0
        return a

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        if node.view is None and not node.status:
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2 + sum(
                1 for c in node.children.values()
                if self.nodes[c].view is None and not self.nodes[c].status
            )
        else:
            # Size 0 like the kernel's /proc files; content is served with direct_io.
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
        a.st_size = 0
        a.st_uid = self._uid
        a.st_gid = self._gid
        ns = int(self.started * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = ns
        a.st_blksize = 4096
        a.st_blocks = 0
        return a

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @guarded
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if self.cpu_dir is not None:
            host = self.cpu_dir.path_of(parent_inode)
            if host is not None:  # inside a read-through directory
                if name in (b".", b"..") or b"/" in name:
                    raise pyfuse3.FUSEError(errno.ENOENT)
                return self._host_attr(f"{host}/{name.decode()}", MIRROR_TIMEOUT)
        parent = self._node(parent_inode)
        if name == b".":
            return self._attr(parent)
        if name == b"..":
            return self._attr(self._node(parent.parent))
        inode = parent.children.get(name)
        if inode is None:
            if parent_inode == self.cpu_dir_inode and self.cpu_dir is not None:
                # What cpuN means depends on the caller: no entry cache.
                path = self.cpu_dir.top_entry(name.decode(errors="replace"), ctx.pid)
                if path is not None:
                    return self._host_attr(path, 0)
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(self.nodes[inode])

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        host = self.cpu_dir.path_of(inode) if self.cpu_dir is not None else None
        if host is not None:
            return self._host_attr(host, MIRROR_TIMEOUT)
        return self._attr(self._node(inode))

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        host = self.cpu_dir.path_of(inode) if self.cpu_dir is not None else None
        if host is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        try:
            return os.readlink(host).encode()
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    @guarded
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    @guarded
    async def opendir(self, inode: int, ctx: Any) -> int:
        host = self.cpu_dir.path_of(inode) if self.cpu_dir is not None else None
        if host is not None or (inode == self.cpu_dir_inode and self.cpu_dir is not None):
            return self._open_mirror_dir(inode, host, ctx.pid)
        node = self._node(inode)
        if node.view is not None or node.status:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    def _open_mirror_dir(self, inode: int, host: str | None, pid: int) -> int:
        """A listing fixed at opendir: of a read-through directory, or of the cpu
        directory as `pid` sees it (its views, then the host's entries)."""
        assert self.cpu_dir is not None
        entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        try:
            if host is None:
                node = self.nodes[inode]
                for child_name, child in sorted(node.children.items()):
                    entries.append((child_name, self._attr(self.nodes[child])))
                for shown, path in self.cpu_dir.top_listing(pid):
                    entries.append((shown.encode(), self._host_attr(path, 0)))
            else:
                for entry in sorted(os.listdir(host)):
                    entries.append((entry.encode(),
                                    self._host_attr(f"{host}/{entry}", MIRROR_TIMEOUT)))
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = entries
        return fh

    @guarded
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        listed = self._dirs.get(fh)
        if listed is not None:
            for i, (name, attr) in enumerate(listed[start_id:], start=start_id + 1):
                if not pyfuse3.readdir_reply(token, name, attr, i):
                    break
            return
        node = self._node(fh)
        entries = sorted(node.children.items())
        for i, (name, inode) in enumerate(entries[start_id:], start=start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[inode]), i):
                break

    @guarded
    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @guarded
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise pyfuse3.FUSEError(errno.EACCES)
        host = self.cpu_dir.path_of(inode) if self.cpu_dir is not None else None
        if host is not None:
            try:
                data = CpuDir.read(host)
            except OSError as exc:
                raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(None, 0, "", data)
            return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)
        node = self._node(inode)
        if node.status:
            return self._open_status()
        if node.view is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        rendered = self.renderer.render_for(node.view, ctx.pid)
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(node.view, ctx.pid, rendered.caller, rendered.data)
        self.stats.opens += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _open_status(self) -> pyfuse3.FileInfo:
        doc = {
            "pid": os.getpid(),
            "version": __version__,
            "started": self.started,
            "uptime": round(time.time() - self.started, 3),
            "views": [n.view.path for n in self.nodes.values() if n.view is not None],
            "opens": self.stats.opens,
            "errors": self.stats.errors,
            "fallbacks": self.renderer.fallbacks,
            "open_handles": len(self.handles),
        }
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(None, 0, "", (json.dumps(doc, indent=1) + "\n").encode())
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        if off == 0 and h.read:
            self._rerender(h)
        h.read = True
        return h.data[off : off + size]

    def _rerender(self, h: Handle) -> None:
        """A read from offset 0 on a handle already read is a new look, as with the
        kernel's seq_file: top, `free -s` and `vmstat N` keep the file open and re-read
        it. READ carries no caller, so render again for the pid that opened the file,
        and keep the new bytes only if that pid is still in the same cgroups (a reused
        pid of another container must never see its numbers through this handle)."""
        if not h.caller or h.view is None:
            return
        fresh = self.renderer.render_for(h.view, h.pid)
        if fresh.caller == h.caller:
            h.data = fresh.data

    @guarded
    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @guarded
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        self._node(inode)
        return not mode & os.W_OK

    @guarded
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s
