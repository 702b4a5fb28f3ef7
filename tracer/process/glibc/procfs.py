"""The target's address space as /proc shows it: maps, smaps, mem, pagemap.

The maps and smaps parsers live in `memtrace.process.procfs`. `ProcessMemory` reads the target with
pread() only; every failed or short read comes back as None, because the
target keeps running and unmapping while we look.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Protocol

from ..procfs import Mapping
from .layout import PAGE_SIZE


class _Pagemap(Protocol):
    def resident_bytes(self, start: int, end: int) -> Optional[int]: ...


def resident_in(
    mappings: Iterable[Mapping], start: int, end: int, memory: Optional[_Pagemap] = None
) -> Optional[int]:
    """Resident bytes of [start, end): the Rss of the mappings inside it,
    and, given the memory, the pagemap's count for the part of a mapping
    that reaches over its ends (the kernel merges a heap with an anonymous
    neighbour). None if a mapping has no Rss (it came from maps, not
    smaps) or the pagemap cannot be read."""
    total = 0
    for m in mappings:
        if m.end <= start or m.start >= end:
            continue
        if m.start >= start and m.end <= end:
            part = m.rss_bytes
        else:
            part = memory.resident_bytes(max(start, m.start), min(end, m.end)) if memory else 0
        if part is None:
            return None
        total += part
    return total


# ---------------------------------------------------------------- memory

# Addresses beyond this are not user space (5-level paging included); pread
# would reject them as offsets anyway.
_USER_LIMIT = 1 << 56
_CACHE_PAGES = 4096  # 16 MiB of cached target pages, then start over
_DIRECT_READ = 16 * PAGE_SIZE  # bigger reads bypass the page cache

_PRESENT_BYTE = bytes(1 if b & 0x80 else 0 for b in range(256))


class ProcessMemory:
    """Read-only view of another process's memory through /proc/PID/mem.

    Pages are cached until `forget()`, so keep one per snapshot: a
    long-lived instance would serve stale data.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        self._pagemap_fd: Optional[int] = None
        self._pagemap_failed = False
        self._pages: dict[int, Optional[bytes]] = {}
        self.failed_reads = 0

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._pagemap_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._fd = -1
        self._pagemap_fd = None

    def _pread(self, fd: int, size: int, offset: int) -> Optional[bytes]:
        if offset < 0 or offset + size > _USER_LIMIT or size <= 0:
            return None
        try:
            data = os.pread(fd, size, offset)
        except (OSError, OverflowError, ValueError):
            self.failed_reads += 1
            return None
        if len(data) != size:
            self.failed_reads += 1
            return None
        return data

    def forget(self) -> None:
        """Drop cached pages, so the next reads see the target as it is now."""
        self._pages.clear()

    def _page(self, page: int) -> Optional[bytes]:
        if page in self._pages:
            return self._pages[page]
        if len(self._pages) >= _CACHE_PAGES:
            self._pages.clear()
        data = self._pread(self._fd, PAGE_SIZE, page)
        self._pages[page] = data
        return data

    def read(self, address: int, size: int) -> Optional[bytes]:
        """`size` bytes at `address` in the target, or None if any is unreadable."""
        if size >= _DIRECT_READ:
            return self._pread(self._fd, size, address)
        if address < 0 or size <= 0:
            return None
        first = address - address % PAGE_SIZE
        skip = address - first
        if skip + size <= PAGE_SIZE:  # the common case: a chunk header
            data = self._page(first)
            return None if data is None else data[skip : skip + size]
        parts = []
        for page in range(first, address + size, PAGE_SIZE):
            data = self._page(page)
            if data is None:
                return None
            parts.append(data)
        return b"".join(parts)[skip : skip + size]

    def present_pages(self, start: int, end: int) -> Optional[bytes]:
        """One byte per page of [start, end): 1 where the page is in RAM
        (pagemap bit 63), or None when pagemap cannot be read."""
        if end <= start:
            return b""
        if self._pagemap_fd is None and not self._pagemap_failed:
            try:
                self._pagemap_fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._pagemap_failed = True
        if self._pagemap_fd is None:
            return None
        first, last = start // PAGE_SIZE, (end + PAGE_SIZE - 1) // PAGE_SIZE
        entries = self._pread(self._pagemap_fd, (last - first) * 8, first * 8)
        if entries is None:
            return None
        # Little-endian entries: bit 63 is the top bit of each entry's last byte.
        return entries[7::8].translate(_PRESENT_BYTE)

    def resident_bytes(self, start: int, end: int) -> Optional[int]:
        """Bytes of [start, end) whose pages are in RAM now (pagemap bit 63),
        or None when pagemap cannot be read."""
        present = self.present_pages(start, end)
        return None if present is None else present.count(1) * PAGE_SIZE
