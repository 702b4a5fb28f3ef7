"""The few numbers per snapshot that are plotted over time and searched
(`--at peak`): stored as plain columns so no snapshot needs decoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from memtrace.model.snapshot import Snapshot


@dataclass(frozen=True)
class TimePoint:
    elapsed_s: float
    heap_live_bytes: int
    rss_bytes: Optional[int] = None  # None: not measured
    allocator_retained_bytes: Optional[int] = None  # None: no address-space section
    # The rest of the anonymous RSS (Gap.other_anon_bytes); None also for a
    # recording made before it was stored.
    other_anon_bytes: Optional[int] = None


def rss_bytes(s: Snapshot) -> Optional[int]:
    # A zero RSS means the collector could not read it, not an empty process.
    return s.process.rss_bytes or None


def allocator_retained_bytes(s: Snapshot) -> Optional[int]:
    """What the allocator keeps from the OS beyond the heap's live blocks
    (glibc arena retention), or None when the snapshot has no gap section."""
    if s.gap is None:
        return None
    return s.gap.allocator_retained_bytes


def other_anon_bytes(s: Snapshot) -> Optional[int]:
    return s.gap.other_anon_bytes if s.gap is not None else None


def time_point(s: Snapshot) -> TimePoint:
    return TimePoint(s.elapsed_s, s.heap.live_bytes, rss_bytes(s), allocator_retained_bytes(s), other_anon_bytes(s))


def peak_index(points: list[TimePoint]) -> Optional[int]:
    """The first snapshot at the largest process RSS, or at the largest heap
    live when no snapshot has an RSS. None for no snapshots."""
    if not points:
        return None
    if any(p.rss_bytes for p in points):
        key = [p.rss_bytes or 0 for p in points]
    else:
        key = [p.heap_live_bytes for p in points]
    best = max(key)
    return key.index(best)
