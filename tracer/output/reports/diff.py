"""What changed between two moments: `report --since`.

The difference is itself a Snapshot, so every report renders it as it
renders one moment: its heap counters, threads and stacks hold what changed
from the baseline to the moment reported (a flame graph of live bytes shows
what grew), while the process, address space, allocator and arenas stay as
they are at the moment reported. The baseline is a moment of the same
recording, or of another recording of the same program: there threads are
matched by name, since their ids differ, and stacks by their frames, which
recordings store as text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Counters, Snapshot, StackStats, ThreadStats
from memtrace.record.reader import open_recording, parse_when
from memtrace.output.reports.common import moment_words


@dataclass(frozen=True)
class Baseline:
    """The moment a report is compared with, and the changes to it."""

    snapshot: Snapshot
    label: str  # '12.0s' or 'other.memtrace at 3.0s (end)'
    rss_bytes: Optional[int]  # change of each figure; None where either lacks it
    heap_live_bytes: int
    retained_bytes: Optional[int]
    other_anon_bytes: Optional[int]
    stacks_grown: int
    stacks_shrunk: int


def _delta(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else b - a


def _minus(now: Counters, base: Counters) -> Counters:
    return Counters(now.alloc_bytes - base.alloc_bytes, now.free_bytes - base.free_bytes,
                    now.alloc_count - base.alloc_count, now.free_count - base.free_count)


def _thread_key(t: ThreadStats, by_name: bool):
    return t.name if by_name else t.tid


def diff_snapshot(base: Snapshot, now: Snapshot, same_process: bool) -> Snapshot:
    """`now` with its heap, threads and stacks replaced by their change
    since `base`. Unchanged stacks and threads are left out."""
    old_stacks = {st.frames: st for st in base.stacks}
    stacks = []
    for st in now.stacks:
        old = old_stacks.pop(st.frames, None)
        if old is None:
            changed = replace(st, live_delta_bytes=st.counters.live_bytes)
        else:
            counters = _minus(st.counters, old.counters)
            changed = replace(st, counters=counters, live_delta_bytes=counters.live_bytes,
                              retained_bytes=st.retained_bytes - old.retained_bytes)
        if changed.counters != Counters() or changed.retained_bytes:
            stacks.append(changed)
    # Stacks the baseline had and the moment lacks: all of their blocks went.
    for old in old_stacks.values():
        gone = Counters(0, old.counters.live_bytes, 0, old.counters.live_count)
        if gone != Counters():
            stacks.append(replace(old, counters=gone, live_delta_bytes=-old.counters.live_bytes,
                                  retained_bytes=-old.retained_bytes))
    by_name = not same_process
    old_threads = {_thread_key(t, by_name): t for t in base.threads}
    threads = []
    for t in now.threads:
        old = old_threads.get(_thread_key(t, by_name))
        counters = t.counters if old is None else _minus(t.counters, old.counters)
        if counters != Counters():
            threads.append(replace(t, counters=counters))
    h, o = now.heap, base.heap
    if same_process:
        heap = replace(h, counters=_minus(h.counters, o.counters),
                       untracked_free_count=h.untracked_free_count - o.untracked_free_count,
                       trim_calls=h.trim_calls - o.trim_calls,
                       trim_released_calls=h.trim_released_calls - o.trim_released_calls)
    else:
        # Another run's counters started from its own zero: only live bytes compare.
        live = h.counters.live_bytes - o.counters.live_bytes
        heap = replace(h, counters=Counters(max(live, 0), max(-live, 0), 0, 0))
    return replace(now, heap=heap, threads=tuple(threads), stacks=tuple(stacks))


def baseline_of(base: Snapshot, now: Snapshot, label: str, same_process: bool) -> Baseline:
    gap_a, gap_b = base.gap, now.gap
    diffed = diff_snapshot(base, now, same_process)
    return Baseline(
        snapshot=base,
        label=label,
        rss_bytes=_delta(base.process.rss_bytes or None, now.process.rss_bytes or None),
        heap_live_bytes=now.heap.counters.live_bytes - base.heap.counters.live_bytes,
        retained_bytes=_delta(gap_a and gap_a.allocator_retained_bytes,
                              gap_b and gap_b.allocator_retained_bytes)
        if gap_a is not None and gap_b is not None else None,
        other_anon_bytes=_delta(gap_a.other_anon_bytes, gap_b.other_anon_bytes)
        if gap_a is not None and gap_b is not None else None,
        stacks_grown=sum(1 for st in diffed.stacks if st.counters.live_bytes > 0),
        stacks_shrunk=sum(1 for st in diffed.stacks if st.counters.live_bytes < 0),
    )


def split_since(text: str) -> tuple[Optional[str], str]:
    """`--since` as (other recording or None, moment): a moment of this
    recording ('30', 'start', 'peak'), or FILE or FILE@MOMENT."""
    try:
        parse_when(text)
        return None, text
    except MemtraceError:
        pass
    path, at, when = text.rpartition("@")
    if at and path and os.path.exists(path):
        parse_when(when)  # a bad moment: its own one-line error
        return path, when
    if os.path.exists(text):
        return text, "end"
    raise MemtraceError(
        f"--since {text!r}: give a moment of this recording (seconds, start, peak or end),"
        " or another recording as FILE or FILE@MOMENT"
    )


def load_baseline(since: str, path: str, now: Snapshot) -> tuple[Snapshot, Baseline]:
    """(the diffed snapshot, the baseline) for `--since`."""
    other, when = split_since(since)
    with open_recording(other or path) as rec:
        _, base = rec.snapshot_at(when)
    if other is None:
        if base.elapsed_s > now.elapsed_s:
            raise MemtraceError(f"--since {since}: that moment ({base.elapsed_s:.1f}s) comes after"
                                f" the one reported ({now.elapsed_s:.1f}s): swap --at and --since")
        label = moment_words(base.elapsed_s, str(parse_when(when))).removeprefix("at ")
    else:
        label = f"{os.path.basename(other)} {moment_words(base.elapsed_s, str(parse_when(when)))}"
    same = other is None
    return diff_snapshot(base, now, same), baseline_of(base, now, label, same)
