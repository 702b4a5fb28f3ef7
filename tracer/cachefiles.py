"""Files memtrace keeps between runs (the compiled BPF object, probe sites,
unwind rows), in one directory: /var/cache/memtrace, or MEMTRACE_CACHE_DIR.

What is read back becomes kernel code or decides where probes go, run as
root: a file is read only when we own it and its directory, and nobody
else can write to either; anything else is refused and made afresh."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Optional

DEFAULT_DIR = "/var/cache/memtrace"
KEEP = 32  # files kept by count (all but those kept by a byte budget)


def cache_dir() -> Path:
    return Path(os.environ.get("MEMTRACE_CACHE_DIR") or DEFAULT_DIR)


def _trusted(st: os.stat_result) -> Optional[str]:
    """Why a file or directory with this stat must not be trusted (None: it
    may): owned by someone else, or writable by group or others."""
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not {os.geteuid()}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def read_trusted(name: str, what: str) -> tuple[Optional[bytes], str]:
    """The bytes of the cache file `name`, or None and why not (`what` the
    file holds, for that sentence)."""
    directory = cache_dir()
    path = directory / name
    try:
        why = _trusted(os.stat(directory))
    except OSError as e:
        return None, f"no cache at {directory} ({e.strerror})"
    if why:
        return None, f"cache directory {directory} refused: {why}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        return None, f"no cached {what} yet ({path}: {e.strerror})"
    try:
        st = os.fstat(fd)
        why = _trusted(st) or (None if stat.S_ISREG(st.st_mode) else "not a regular file")
        if why:
            return None, f"cache file {path} refused: {why}"
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
        with contextlib.suppress(OSError):
            os.utime(fd)  # used last: _prune keeps it
    finally:
        os.close(fd)
    return data, str(path)


def write_trusted(name: str, data: str | bytes, budget: Optional[tuple[str, int]] = None) -> str:
    """Store data as the cache file `name` (never over a file we would
    refuse to read); says where or why not. A cache that cannot be written
    only costs the next run the work again. budget: (glob, bytes): the
    files of name's kind, kept within that many bytes (the ones used last
    stay), instead of by count."""
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _trusted(os.stat(directory))
        if why:
            return f"not cached: cache directory {directory} refused: {why}"
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".new-", suffix=Path(name).suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, directory / name)  # mkstemp made it 0600
        except BaseException:
            os.unlink(tmp)
            raise
        if budget is None:
            _prune(directory)
        else:
            _prune_to_bytes(directory, *budget)
    except OSError as e:
        return f"not cached: {directory}: {e.strerror}"
    return f"cached in {directory}"


def _used_last_first(directory: Path, pattern: str) -> list[tuple[float, int, Path]]:
    entries = []
    for path in directory.glob(pattern):
        try:
            st = path.stat()
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    return sorted(entries, reverse=True)


def _prune(directory: Path) -> None:
    """Keep the KEEP files used last: each new source, option or kernel
    adds an object (~0.1 MB), each allocator file its probe sites."""
    for _, _, path in _used_last_first(directory, "*.json")[KEEP:]:
        with contextlib.suppress(OSError):
            path.unlink()


def _prune_to_bytes(directory: Path, pattern: str, max_bytes: int) -> None:
    """Drop the files matching pattern used longest ago, past max_bytes in all."""
    total = 0
    for _, size, path in _used_last_first(directory, pattern):
        total += size
        if total > max_bytes:
            with contextlib.suppress(OSError):
                path.unlink()
