"""The tree cgprocfs serves, answered at the FUSE protocol level.

It knows nothing about memory or CPUs: it maps an inode to a View, asks the Renderer what
the calling pid sees and keeps those bytes in the shared arena, where any worker (of any
generation) can serve the READs of that open. Inode numbers are derived from paths, so
they are the same in every worker and after every restart.

Every handler returns the reply's payload or raises FsError; the worker turns anything
else into EIO, so no request can take the daemon down.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cgprocfs import __version__
from cgprocfs.cpudir import CpuDir
from cgprocfs.fuse import abi
from cgprocfs.fuse.arena import Arena
from cgprocfs.views import Renderer, View

log = logging.getLogger(__name__)

ROOT_INODE = 1
# A file at the mount's root that says who serves it and how it is going (`cgprocfs status`).
STATUS_NAME = b".cgprocfs-status"
# The tree never changes while mounted: let the kernel cache names and attributes.
CACHE_TIMEOUT = 3600.0
# The host's sysfs behind the cpu directory can change (hotplug): cache it briefly.
MIRROR_TIMEOUT = 1.0
CPU_DIR = "sys/devices/system/cpu"
DT_DIR, DT_REG, DT_LNK = 4, 8, 10


class FsError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(os.strerror(code))
        self.errno = code


def path_inode(path: str, bits: int, base: int) -> int:
    digest = hashlib.blake2b(path.encode(), digest_size=8).digest()
    return base + (int.from_bytes(digest, "little") & ((1 << bits) - 1))


@dataclass
class Node:
    inode: int
    name: bytes
    parent: int
    path: str
    view: View | None = None  # None for directories (and the status file)
    children: dict[bytes, int] = field(default_factory=dict)
    status: bool = False

    @property
    def is_dir(self) -> bool:
        return self.view is None and not self.status


def build_tree(views: Sequence[View]) -> dict[int, Node]:
    """Inodes are hashes of paths (2 .. 2^31): the same whatever views a generation
    serves, so the kernel's cached inodes stay meaningful across restarts."""
    nodes = {ROOT_INODE: Node(ROOT_INODE, b"", ROOT_INODE, "")}

    def add(parent: Node, name: bytes, path: str, **kw: object) -> Node:
        inode = path_inode(path, 31, 2)
        while inode in nodes:  # a collision among a few dozen paths: probe
            inode += 1
        node = Node(inode, name, parent.inode, path, **kw)  # type: ignore[arg-type]
        nodes[inode] = node
        parent.children[name] = inode
        return node

    for view in views:
        parent = nodes[ROOT_INODE]
        parts = view.path.split("/")
        for i, part in enumerate(parts):
            name = part.encode()
            inode = parent.children.get(name)
            if inode is None:
                last = i == len(parts) - 1
                parent = add(parent, name, "/".join(parts[: i + 1]),
                             view=view if last else None)
            else:
                parent = nodes[inode]
    add(nodes[ROOT_INODE], STATUS_NAME, STATUS_NAME.decode(), status=True)
    return nodes


@dataclass
class Counters:
    opens: int = 0
    errors: int = 0


class ViewsFS:
    def __init__(self, renderer: Renderer, views: Sequence[View], arena: Arena, seat: int,
                 started: float | None = None) -> None:
        self.renderer = renderer
        self.arena = arena
        self.seat = seat
        self.nodes = build_tree(views)
        self.counters = Counters(*arena.counters(seat)[:2])
        self.started = started if started is not None else arena.created
        self._uid, self._gid = os.getuid(), os.getgid()
        self._attrs = {i: self._node_attr(n) for i, n in self.nodes.items()}
        self.cpu_dir_inode, self.cpu_dir = self._mirror()
        self._refresh_logged = -math.inf
        # The request being answered (its FUSE unique), set by the worker: a READ that a
        # killed worker may already have answered is replayed by its successor, and must
        # then not render the handle again (read()).
        self.unique = 0
        self.ops: dict[int, Callable[[int, int, memoryview], bytes]] = {
            abi.LOOKUP: self.lookup, abi.GETATTR: self.getattr, abi.READLINK: self.readlink,
            abi.OPEN: self.open, abi.READ: self.read, abi.RELEASE: self.release,
            abi.OPENDIR: self.opendir, abi.READDIR: self.readdir,
            abi.RELEASEDIR: self.releasedir, abi.STATFS: self.statfs,
            abi.ACCESS: self.access, abi.SETATTR: self.setattr, abi.DESTROY: self.destroy,
        }

    # ---- attributes ----------------------------------------------------------------
    def _mirror(self) -> tuple[int | None, CpuDir | None]:
        for node in self.nodes.values():
            if node.view is not None and node.path.startswith(CPU_DIR + "/"):
                parent = self.nodes[node.parent]
                return parent.inode, CpuDir(
                    "/" + CPU_DIR, self.renderer.visible_cpus,
                    [n.decode() for n in parent.children])
        return None, None

    def _node_attr(self, node: Node) -> bytes:
        ns = int(self.started * 1e9)
        if node.is_dir:
            mode = stat.S_IFDIR | 0o555
            nlink = 2 + sum(1 for c in node.children.values() if self.nodes[c].is_dir)
        else:
            # Size 0 like the kernel's /proc files; content is served with direct I/O.
            mode, nlink = stat.S_IFREG | 0o444, 1
        s, n = divmod(ns, 10**9)
        return abi.ATTR.pack(node.inode, 0, 0, s, s, s, n, n, n, mode, nlink,
                             self._uid, self._gid, 0, 4096, 0)

    @staticmethod
    def _host_attr(inode: int, path: str) -> bytes:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None
        return abi.ATTR.pack(
            inode, st.st_size, 0, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
            st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9, st.st_ctime_ns % 10**9,
            st.st_mode & ~0o222, st.st_nlink, st.st_uid, st.st_gid, 0, 4096, 0)

    @staticmethod
    def _entry(attr: bytes, inode: int, entry_timeout: float, attr_timeout: float) -> bytes:
        ev, evn = abi.entry_valid_split(entry_timeout)
        av, avn = abi.entry_valid_split(attr_timeout)
        return abi.ENTRY_OUT_HEAD.pack(inode, 0, ev, av, evn, avn) + attr

    @staticmethod
    def _attr_out(attr: bytes, timeout: float) -> bytes:
        av, avn = abi.entry_valid_split(timeout)
        return abi.ATTR_OUT_HEAD.pack(av, avn, 0) + attr

    def _node(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _host_path(self, inode: int) -> str | None:
        return self.cpu_dir.path_of(inode) if self.cpu_dir is not None else None

    # ---- requests ------------------------------------------------------------------
    def lookup(self, parent_inode: int, pid: int, body: memoryview) -> bytes:
        name = bytes(body).split(b"\0", 1)[0]
        host = self._host_path(parent_inode)
        if host is not None:  # inside a read-through directory
            assert self.cpu_dir is not None
            if name in (b".", b"..") or b"/" in name:
                raise FsError(errno.ENOENT)
            path = f"{host}/{name.decode()}"
            ino = self.cpu_dir.inode_of(path)
            return self._entry(self._host_attr(ino, path), ino, MIRROR_TIMEOUT,
                               MIRROR_TIMEOUT)
        parent = self._node(parent_inode)
        inode = parent.children.get(name)
        if inode is None:
            if parent_inode == self.cpu_dir_inode and self.cpu_dir is not None:
                # What cpuN means depends on the caller: no entry cache.
                found = self.cpu_dir.top_entry(name.decode(errors="replace"), pid)
                if found is not None:
                    ino = self.cpu_dir.inode_of(found)
                    return self._entry(self._host_attr(ino, found), ino, 0, MIRROR_TIMEOUT)
            raise FsError(errno.ENOENT)
        return self._entry(self._attrs[inode], inode, CACHE_TIMEOUT, CACHE_TIMEOUT)

    def getattr(self, inode: int, pid: int, body: memoryview) -> bytes:
        attr = self._attrs.get(inode)
        if attr is not None:
            return self._attr_out(attr, CACHE_TIMEOUT)
        host = self._host_path(inode)
        if host is None:
            raise FsError(errno.ENOENT)
        return self._attr_out(self._host_attr(inode, host), MIRROR_TIMEOUT)

    def readlink(self, inode: int, pid: int, body: memoryview) -> bytes:
        host = self._host_path(inode)
        if host is None:
            raise FsError(errno.EINVAL)
        try:
            return os.readlink(host).encode()
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None

    def setattr(self, inode: int, pid: int, body: memoryview) -> bytes:
        raise FsError(errno.EROFS)

    def destroy(self, inode: int, pid: int, body: memoryview) -> bytes:
        return b""

    def access(self, inode: int, pid: int, body: memoryview) -> bytes:
        (mask,) = abi.ACCESS_IN.unpack_from(body)
        if mask & os.W_OK:
            raise FsError(errno.EACCES)
        return b""

    def statfs(self, inode: int, pid: int, body: memoryview) -> bytes:
        return abi.STATFS_OUT.pack(0, 0, 0, 0, 0, 4096, 255, 4096)

    def _content(self, inode: int, pid: int) -> bytes:
        node = self.nodes.get(inode)
        if node is not None:
            if node.status:
                return self.status_document()
            if node.view is None:
                raise FsError(errno.EISDIR)
            self.counters.opens += 1
            return self.renderer.render_for(node.view, pid).data
        host = self._host_path(inode)
        if host is None:
            raise FsError(errno.ENOENT)
        try:
            return CpuDir.read(host)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None

    def open(self, inode: int, pid: int, body: memoryview) -> bytes:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_CREAT):
            raise FsError(errno.EACCES)
        data = self._content(inode, pid)
        slot = self.arena.allocate(self.seat, len(data))
        if slot is None:
            raise FsError(errno.ENFILE)
        fh = self.arena.store(slot, inode, pid, data)
        return abi.OPEN_OUT.pack(fh, abi.FOPEN_DIRECT_IO, 0)

    def read(self, inode: int, pid: int, body: memoryview) -> bytes:
        fh, off, size = abi.READ_IN.unpack_from(body)
        found = self.arena.lookup(fh)
        if found is None:
            raise FsError(errno.EBADF)
        start, length, inode, flags, opener = found
        if not flags:
            self.arena.mark_read(fh, self.unique)
        elif off == 0 and not self._replayed(fh) and inode in self.nodes \
                and not self.nodes[inode].status and same_process(pid, opener):
            # A read from offset 0 on a handle already read is a new look, as with the
            # kernel's seq_file (top, `free -s` and `vmstat N` keep the file open): the
            # opening process gets a fresh rendering. A descriptor handed to another
            # process keeps the bytes rendered at open: it never shows the reader's
            # numbers as the opener's, nor the opener's container to a reused pid.
            fresh = self._content(inode, pid)
            if self.arena.replace(fh, fresh, self.unique):
                return fresh[:size]
        if off >= length:
            return b""
        end = min(length, off + size)
        return self.arena.mem[start + off : start + end]

    def _replayed(self, fh: int) -> bool:
        """The request in hand already read `fh` at offset 0: a successor replaying it."""
        return self.unique != 0 and self.arena.last_reader(fh) == self.unique & 0xFFFFFFFFFFFF

    def release(self, inode: int, pid: int, body: memoryview) -> bytes:
        (fh,) = abi.RELEASE_IN.unpack_from(body)
        self.arena.free(fh)  # unknown or stale handles: nothing to free
        return b""

    def opendir(self, inode: int, pid: int, body: memoryview) -> bytes:
        node = self.nodes.get(inode)
        if node is None and self._host_path(inode) is None:
            raise FsError(errno.ENOENT)
        if node is not None and not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return abi.OPEN_OUT.pack(0, 0, 0)

    def releasedir(self, inode: int, pid: int, body: memoryview) -> bytes:
        return b""

    def _listing(self, inode: int, pid: int) -> list[tuple[bytes, int, int]]:
        """(name, inode, d_type) of a directory as `pid` sees it. Listings are computed
        per READDIR (any worker may get the next chunk), in a fixed order."""
        host = self._host_path(inode)
        out: list[tuple[bytes, int, int]] = []
        try:
            if host is not None:
                assert self.cpu_dir is not None
                for entry in sorted(os.listdir(host)):
                    path = f"{host}/{entry}"
                    out.append((entry.encode(), self.cpu_dir.inode_of(path), _dtype(path)))
                return out
            node = self._node(inode)
            for name, child in sorted(node.children.items()):
                out.append((name, child, DT_DIR if self.nodes[child].is_dir else DT_REG))
            if inode == self.cpu_dir_inode and self.cpu_dir is not None:
                for shown, path in self.cpu_dir.top_listing(pid):
                    out.append((shown.encode(), self.cpu_dir.inode_of(path), _dtype(path)))
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO) from None
        return out

    def readdir(self, inode: int, pid: int, body: memoryview) -> bytes:
        _fh, off, size = abi.READ_IN.unpack_from(body)
        node = self.nodes.get(inode)
        parent = node.parent if node is not None else inode
        entries = [(b".", inode, DT_DIR), (b"..", parent, DT_DIR), *self._listing(inode, pid)]
        out = bytearray()
        for i in range(off, len(entries)):
            name, ino, dtype = entries[i]
            ent = abi.dirent(ino, i + 1, name, dtype)
            if len(out) + len(ent) > size:
                break
            out += ent
        return bytes(out)

    # ---- between requests --------------------------------------------------------------
    def refresh_ahead(self) -> None:
        """Refresh the shared configuration in use before it expires (called by a parked
        worker), and close the kept files nobody read for a while. Never raises: a failure
        only means requests reload it themselves."""
        resolver = self.renderer.resolver
        try:
            resolver.files.close_idle()
            n = resolver.refresh_placements()
        except Exception:
            now = time.monotonic()
            if now - self._refresh_logged >= 60:  # it is retried every 0.1 s: log rarely
                self._refresh_logged = now
                log.exception("refreshing shared placements failed")
            return
        if n:
            self.arena.add_refreshes(self.seat, n)

    # ---- status ----------------------------------------------------------------------
    def status_document(self) -> bytes:
        opens, errors, fallbacks = self.arena.totals()
        doc = {
            "pid": os.getppid(),  # the supervisor: the process that holds the mount
            "worker": os.getpid(),
            "version": __version__,
            "started": self.started,
            "uptime": round(time.time() - self.started, 3),
            "views": [n.view.path for n in self.nodes.values() if n.view is not None],
            "opens": opens,
            "errors": errors,
            "fallbacks": fallbacks,
            "open_handles": self.arena.in_use(),
            "worker_restarts": self.arena.restarts,
            "poisoned_requests": self.arena.poisoned,
            # Placements refreshed by idle workers before they expired (off the requests).
            "placement_refreshes": sum(self.arena.refreshes(s)
                                       for s in range(self.arena.layout.seats)),
            # Who reads /dev/fuse while the load is low, and how the opens spread.
            "leader": dict(zip(("seat", "pid"), self.arena.leader(), strict=True)),
            "opens_by_seat": [self.arena.counters(s)[0]
                              for s in range(self.arena.layout.seats)],
            # FUSE over io_uring: how many ring workers, and the group each seat serves.
            "io_uring": {
                "groups": self.arena.ring_groups,
                "seats": {str(s): g for s in range(self.arena.layout.seats)
                          if (g := self.arena.ring_group(s)) >= 0},
            },
        }
        return (json.dumps(doc, indent=1) + "\n").encode()


def same_process(tid: int, other: int) -> bool:
    """READ and OPEN name the calling thread; threads of one process count as one."""
    if tid == other:
        return True
    try:
        return _tgid(tid) == _tgid(other)
    except (OSError, ValueError):
        return False


def _tgid(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ValueError(tid)


def _dtype(path: str) -> int:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return 0
    if stat.S_ISDIR(mode):
        return DT_DIR
    if stat.S_ISLNK(mode):
        return DT_LNK
    return DT_REG
