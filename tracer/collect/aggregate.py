"""`memtrace.model.snapshot.aggregate_stacks`, kept up to date instead of redone.

Each interval only the stacks whose rows changed, whose retained share
changed, or which grew or shrank in the last interval (their growth goes
back to zero) are built again; the others keep their `StackStats` object,
which the recorder then skips by identity. The order is the model's
(live bytes, allocated bytes, frames), kept sorted: a list that is nearly
in order sorts in one pass. The result equals aggregate_stacks' on the
same rows (tests/unit/test_aggregate.py).
"""

from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter
from typing import Callable, Mapping, Optional

from memtrace.model.snapshot import Counters, HeapRow, StackKey, StackStats, looks_truncated

RowKey = tuple[int, StackKey]
Frames = tuple[str, ...]

_second = itemgetter(1)


def _order(st: StackStats) -> tuple:
    c = st.counters
    return (c.free_bytes - c.alloc_bytes, -c.alloc_bytes, st.frames)


class StackAggregator:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._generation: object = None
        self._reset()

    def _reset(self) -> None:
        self._frames_of_key: dict[StackKey, Frames] = {}
        # Per stack, running sums of its rows' counters and the rows each
        # thread has in it: one stack can gather thousands of rows (kernel
        # stacks lost to the stack map keep only their immediate caller),
        # and a change to one of them must not add them all up again.
        self._sums: dict[Frames, list[int]] = {}
        self._tid_rows: dict[Frames, dict[int, int]] = {}
        self._row_counters: dict[RowKey, Counters] = {}
        self._stats: dict[Frames, StackStats] = {}
        self._retained: dict[Frames, int] = {}
        self._moved: set[Frames] = set()  # live_delta_bytes != 0
        self._entries: list[tuple[tuple, StackStats]] = []

    def update(
        self,
        rows: Mapping[RowKey, HeapRow],
        changed: Optional[set[RowKey]],
        frames_of: Callable[[StackKey], Frames],
        generation: object,
        retained: Optional[Mapping[StackKey, int]] = None,
    ) -> tuple[StackStats, ...]:
        """rows: every (thread, stack) row by key; changed: the keys whose
        row changed, appeared or went since the last call (None: all may
        have). generation: what frames_of answers depends on; when it
        moves, everything is grouped again."""
        live_before: dict[Frames, int] = {}
        if changed is None or generation != self._generation:
            # Grown since the last call, all the same.
            live_before = {f: st.counters.live_bytes for f, st in self._stats.items()}
            self._reset()
            self._generation = generation
            changed = set(rows)
        frames_by_key = self._frames_of_key
        dirty: set[Frames] = set(self._moved)
        sums, tid_rows, row_counters = self._sums, self._tid_rows, self._row_counters
        for key in changed:
            tid, stack_key = key
            frames = frames_by_key.get(stack_key)
            if frames is None:
                frames = frames_by_key[stack_key] = frames_of(stack_key)
            old_c = row_counters.pop(key, None)
            if old_c is not None:
                s = sums[frames]
                s[0] -= old_c.alloc_bytes
                s[1] -= old_c.free_bytes
                s[2] -= old_c.alloc_count
                s[3] -= old_c.free_count
                per_tid = tid_rows[frames]
                per_tid[tid] -= 1
                if not per_tid[tid]:
                    del per_tid[tid]
            row = rows.get(key)
            if row is not None:
                c = row_counters[key] = row.counters
                s = sums.get(frames)
                if s is None:
                    s = sums[frames] = [0, 0, 0, 0]
                    tid_rows[frames] = {}
                s[0] += c.alloc_bytes
                s[1] += c.free_bytes
                s[2] += c.alloc_count
                s[3] += c.free_count
                per_tid = tid_rows[frames]
                per_tid[tid] = per_tid.get(tid, 0) + 1
            dirty.add(frames)
        kept: dict[Frames, int] = {}
        for stack_key, n in (retained or {}).items():
            frames = frames_by_key.get(stack_key)
            if frames is None:
                frames = frames_by_key[stack_key] = frames_of(stack_key)
            kept[frames] = kept.get(frames, 0) + n
        before = self._retained
        for frames, n in kept.items():
            if before.get(frames, 0) != n:
                dirty.add(frames)
        dirty.update(f for f in before if f not in kept)
        self._retained = kept

        dead = False
        places: list[tuple[StackStats, Optional[StackStats]]] = []  # (old, new in its place or None)
        fresh: list[tuple[tuple, StackStats]] = []
        moved: set[Frames] = set()
        for frames in dirty:
            old = self._stats.get(frames)
            per_tid = tid_rows.get(frames)
            if not per_tid:
                sums.pop(frames, None)
                tid_rows.pop(frames, None)
                if old is not None:
                    del self._stats[frames]
                    places.append((old, None))
                    dead = True
                continue
            counters = Counters(*sums[frames])
            delta = counters.live_bytes - (old.counters.live_bytes if old is not None
                                           else live_before.get(frames, 0))
            st = StackStats(
                frames=frames,
                tids=tuple(sorted(per_tid)),
                counters=counters,
                truncated=old.truncated if old is not None else looks_truncated(frames, self.max_depth),
                live_delta_bytes=delta,
                retained_bytes=kept.get(frames, 0),
            )
            if delta:
                moved.add(frames)
            if old is not None:
                if st == old:
                    continue
                self._stats[frames] = st
                if old.counters == counters:
                    # Only its growth, threads or retained share moved: its
                    # place is the same, and the sort has less to do.
                    places.append((old, st))
                    continue
                places.append((old, None))
                dead = True
            self._stats[frames] = st
            fresh.append((_order(st), st))
        self._moved = moved
        entries = self._entries
        # Each old one found by its key (keys are unique: they end with
        # the frames), replaced where it is, or marked to go.
        for old, new in places:
            key = _order(old)
            i = bisect_left(entries, (key,))
            entries[i] = (key, new)
        if dead:
            entries = [e for e in entries if e[1] is not None]
        entries.extend(fresh)
        # Keys are unique (they end with the frames): StackStats are never compared.
        entries.sort(key=itemgetter(0))
        self._entries = entries
        return tuple(map(_second, entries))
