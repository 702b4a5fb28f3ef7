"""memtrace.model.multimapped: shared files mapped at several addresses."""

from __future__ import annotations

from memtrace.model.multimapped import MIN_COUNTED_AGAIN_BYTES, mapped_more_than_once
from memtrace.process.procfs import Mapping

MIB = 1 << 20


def _view(start: int, size: int, offset: int = 0, inode: int = 7, perms: str = "rw-s",
          rss: int = 0, pss: int = 0, path: str = "/memfd:java_heap (deleted)") -> Mapping:
    return Mapping(start, start + size, perms, offset, inode, path, rss_bytes=rss, pss_bytes=pss,
                   device=1)


def test_three_views_of_one_memfd():
    maps = [_view(0x40000000000 * k, 64 * MIB, rss=60 * MIB, pss=20 * MIB) for k in (1, 2, 4)]
    maps.append(_view(0x7f0000000000, 4 * MIB, inode=0, perms="rw-p", rss=4 * MIB, pss=4 * MIB, path=""))
    [found] = mapped_more_than_once(maps)
    assert (found.path, found.views) == ("/memfd:java_heap", 3)
    assert (found.rss_bytes, found.pss_bytes) == (180 * MIB, 60 * MIB)
    assert found.counted_again_bytes == 120 * MIB


def test_private_mappings_and_disjoint_parts_of_a_file_are_not_views():
    # A library's segments: one file, private, at different offsets.
    lib = [_view(0x1000 * k, MIB, offset=k * MIB, perms="r-xp", rss=MIB, pss=MIB, path="/lib/x.so")
           for k in range(3)]
    # A shared file mapped in two parts that do not overlap.
    parts = [_view(0x100000000, 8 * MIB, offset=0, inode=9, rss=8 * MIB, pss=8 * MIB),
             _view(0x200000000, 8 * MIB, offset=8 * MIB, inode=9, rss=8 * MIB, pss=8 * MIB)]
    assert mapped_more_than_once(lib + parts) == []


def test_little_counted_again_is_no_news():
    small = MIN_COUNTED_AGAIN_BYTES // 2
    maps = [_view(0x100000000 * k, 4 * MIB, rss=small, pss=small // 2) for k in (1, 2)]
    assert mapped_more_than_once(maps) == []


def test_two_views_overlapping_in_part():
    # A JIT's writable and executable views of the same code memfd, one wider.
    maps = [_view(0x100000000, 16 * MIB, rss=16 * MIB, pss=10 * MIB, path="/memfd:jit-code"),
            _view(0x200000000, 8 * MIB, offset=4 * MIB, perms="r-xs", rss=8 * MIB, pss=4 * MIB,
                  path="/memfd:jit-code")]
    [found] = mapped_more_than_once(maps)
    assert (found.views, found.rss_bytes, found.pss_bytes) == (2, 24 * MIB, 14 * MIB)
