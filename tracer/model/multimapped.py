"""Memory the process maps at more than one address, which its RSS counts
once per address.

The JVM's ZGC (JDK 17) maps its heap, a memfd, at three addresses, one per
pointer colour: the kernel counts each resident page once per mapping, and
a heap of 470 MiB reads as 1.3 GiB of RSS, all of it outside the gap's
anonymous memory. Other programs map code or data twice (a JIT's writable
and executable views of one memfd). Per shared file mapped at two or more
addresses whose file ranges overlap: how many views, the RSS of those
mappings and their PSS. A page the process maps n times counts 1/n in each
mapping's PSS, so the PSS is the memory they hold (less, where other
processes map it too).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

# Below this much RSS counted again, nothing worth a note.
MIN_COUNTED_AGAIN_BYTES = 1 << 20


@dataclass(frozen=True)
class MappedMoreThanOnce:
    path: str
    views: int  # the most mappings that hold one byte of the file
    rss_bytes: int  # of the mappings that overlap another
    pss_bytes: int

    @property
    def counted_again_bytes(self) -> int:
        return max(0, self.rss_bytes - self.pss_bytes)


def mapped_more_than_once(smaps: Iterable) -> list[MappedMoreThanOnce]:
    """From /proc/PID/smaps entries (memtrace.process.procfs.Mapping, with
    rss_bytes and pss_bytes): the shared files mapped at several addresses,
    most RSS counted again first."""
    by_file: dict[tuple, list] = defaultdict(list)
    for m in smaps:
        if m.inode and m.perms[3:4] == "s" and m.rss_bytes:
            by_file[(m.device, m.inode)].append(m)
    out = []
    for maps in by_file.values():
        if len(maps) < 2:
            continue
        # In file order: a mapping that starts before the furthest end so
        # far overlaps the one that reaches there (a file mapped in
        # thousands of pieces is looked at in n log n, not n squared).
        maps.sort(key=lambda m: m.offset)
        overlapping, reach, reacher = set(), -1, -1
        for i, m in enumerate(maps):
            if m.offset < reach:
                overlapping.update((i, reacher))
            if m.offset + m.size > reach:
                reach, reacher = m.offset + m.size, i
        if not overlapping:
            continue
        again = [maps[i] for i in sorted(overlapping)]
        # The most views of one byte: ends before starts at the same offset.
        depth = views = 0
        for _, step in sorted([(m.offset, 1) for m in maps] + [(m.offset + m.size, -1) for m in maps]):
            depth += step
            views = max(views, depth)
        found = MappedMoreThanOnce(again[0].path.removesuffix(" (deleted)"), views,
                                   sum(m.rss_bytes or 0 for m in again),
                                   sum(m.pss_bytes or 0 for m in again))
        if found.counted_again_bytes >= MIN_COUNTED_AGAIN_BYTES:
            out.append(found)
    return sorted(out, key=lambda f: -f.counted_again_bytes)
