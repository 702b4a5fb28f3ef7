"""Open the files a traced process maps, and no other file.

A path from /proc/PID/maps is a name, and the process may have changed
what the name leads to since it mapped the file: a symlink to the host's
libc (uprobes are per inode: every process mapping that file would take
the trap), a FIFO (open would block), /dev/watchdog (open alone has
effects), or a file we may read and the process may not. So a file is
opened first with O_PATH, which never runs a driver's open or blocks, and
kept only when it is a regular file and the very inode the mapping names
(st_dev, st_ino from the maps line); /proc/PID/map_files/START-END, where
we may open it (CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), is the mapped
file itself.

The kernel and bcc are then given /proc/self/fd/N of that verified
descriptor: every later open or uprobe registration through that name
reaches the same inode, whatever the process does to its paths."""

from __future__ import annotations

import ctypes
import os
import stat
from typing import Optional

from memtrace.process.procfs import Mapping

# ELF files read whole on the target's behalf; bigger ones are left unread
# (their frames are named by offset) rather than filling our memory.
MAX_FILE_BYTES = 512 << 20


class NotTheFile(OSError):
    """The name no longer leads to the file the process maps."""


def open_path(path: str, identity: Optional[tuple[int, int]] = None) -> int:
    """An O_PATH descriptor of the regular file at `path`, which must be
    (st_dev, st_ino) == identity when given. OSError otherwise."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotTheFile(f"{path} is not a regular file")
        if identity is not None and (st.st_dev, st.st_ino) != identity:
            raise NotTheFile(f"{path} is another file than the one mapped")
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int) -> str:
    """The name through which the kernel reaches fd's own file."""
    return f"/proc/self/fd/{fd}"


def open_regular(path: str, limit: int = MAX_FILE_BYTES):
    """A binary file open for reading: the regular file at `path`, of at
    most `limit` bytes, opened without following it anywhere unsafe;
    OSError otherwise. Nothing is read: callers read the parts they need."""
    pfd = open_path(path)
    try:
        fd = os.open(fd_path(pfd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    finally:
        os.close(pfd)
    f = os.fdopen(fd, "rb")
    size = os.fstat(fd).st_size
    if size > limit:
        f.close()
        raise OSError(f"{path} is {size} bytes, over the {limit}-byte limit")
    return f


def read_regular(path: str, limit: int = MAX_FILE_BYTES):
    """(open binary file, its bytes) of a regular file (open_regular).
    The file stays open for later reads of the same inode."""
    f = open_regular(path, limit)
    try:
        data = f.read(limit + 1)[:limit]
    except BaseException:
        f.close()
        raise
    return f, data


class HeldFile:
    """A descriptor kept open while its holder lives: the name
    /proc/self/fd/N stays that file's (and no other's) until then."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @property
    def path(self) -> str:
        return fd_path(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


def identity_of(mapping: Mapping) -> Optional[tuple[int, int]]:
    if mapping.device is None or not mapping.inode:
        return None
    return mapping.device, mapping.inode


def open_mapped(pid: int, mapping: Mapping) -> int:
    """An O_PATH descriptor of the file `mapping` of process `pid` maps.

    Tried in turn: the mapped file itself (/proc/PID/map_files); the path
    as seen from here (a chroot's files are reachable from here, and the
    maps path is relative to our root); the path inside the process's root
    (another mount namespace). The last two only when the inode matches.
    Raises NotTheFile, or OSError when none can be opened."""
    try:
        return open_path(f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}")
    except NotTheFile:
        raise
    except OSError:
        pass  # no CAP_SYS_ADMIN nor CAP_CHECKPOINT_RESTORE, or the mapping is gone
    identity = identity_of(mapping)
    path = mapping.path.removesuffix(" (deleted)")
    if identity is None or not path.startswith("/"):
        raise NotTheFile(f"{mapping.path} has no inode to check")
    mismatch: Optional[OSError] = None
    for candidate in (path, f"/proc/{pid}/root{path}"):
        try:
            return open_path(candidate, identity)
        except NotTheFile as e:
            mismatch = mismatch or e
        except OSError as e:
            mismatch = mismatch or (None if isinstance(e, FileNotFoundError) else e)
    if mismatch is not None:
        raise mismatch
    raise FileNotFoundError(f"{path} is gone")


# ------------------------------------------------- files the process names

# openat2(2): names resolved as if the process's root were "/", so no
# symlink or ".." it planted leads outside it (Linux 5.6 and later).
_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_IN_ROOT = 0x02, 0x04, 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = None


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(_SYS_OPENAT2, dirfd, os.fsencode(path), ctypes.byref(how),
                       ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def open_in_root(root: str, path: str, no_symlinks: bool = False,
                 limit: int = MAX_FILE_BYTES, owner: Optional[int] = None):
    """A binary file open for reading: `path` inside the directory `root`
    (/proc/PID/root: the process's view), never leaving it, only a regular
    file of at most `limit` bytes, owned by `owner` when given. OSError
    otherwise. Nothing is read."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        pfd = _openat2(rootfd, path.lstrip("/") or ".", os.O_PATH | os.O_CLOEXEC,
                       RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
                       | (RESOLVE_NO_SYMLINKS if no_symlinks else 0))
    finally:
        os.close(rootfd)
    try:
        st = os.fstat(pfd)
        if not stat.S_ISREG(st.st_mode):
            raise NotTheFile(f"{path} is not a regular file")
        if owner is not None and st.st_uid != owner:
            raise NotTheFile(f"{path} is not owned by uid {owner}")
        if st.st_size > limit:
            raise OSError(f"{path} is {st.st_size} bytes, over the {limit}-byte limit")
        fd = os.open(fd_path(pfd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    finally:
        os.close(pfd)
    return os.fdopen(fd, "rb")
