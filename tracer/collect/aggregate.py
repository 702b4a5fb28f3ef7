"""`memtrace.model.aggregate_stacks`, kept up to date instead of redone.

Each interval only the stacks whose rows changed, whose retained share
changed, or which grew or shrank in the last interval (their growth goes
back to zero) are built again; the others keep their `StackStats` object,
which the recorder then skips by identity. The order is the model's
(live bytes, allocated bytes, frames), kept sorted: a list that is nearly
in order sorts in one pass. The result equals aggregate_stacks' on the
same rows (tests/unit/test_aggregate.py).
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, Mapping, Optional

from memtrace.model import Counters, HeapRow, StackKey, StackStats, looks_truncated

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
        self._members: dict[Frames, set[RowKey]] = {}
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
        for key in changed:
            stack_key = key[1]
            frames = frames_by_key.get(stack_key)
            if frames is None:
                frames = frames_by_key[stack_key] = frames_of(stack_key)
            members = self._members.get(frames)
            if key in rows:
                if members is None:
                    members = self._members[frames] = set()
                members.add(key)
            elif members is not None:
                members.discard(key)
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

        dead: set[int] = set()  # ids of StackStats whose place changes or which went
        same_place: dict[int, StackStats] = {}  # id of the old -> the new, same place
        fresh: list[tuple[tuple, StackStats]] = []
        moved: set[Frames] = set()
        for frames in dirty:
            old = self._stats.get(frames)
            members = self._members.get(frames)
            if not members:
                self._members.pop(frames, None)
                if old is not None:
                    del self._stats[frames]
                    dead.add(id(old))
                continue
            a = b = n = m = 0
            for key in members:
                c = rows[key].counters
                a += c.alloc_bytes
                b += c.free_bytes
                n += c.alloc_count
                m += c.free_count
            counters = Counters(a, b, n, m)
            delta = counters.live_bytes - (old.counters.live_bytes if old is not None
                                           else live_before.get(frames, 0))
            st = StackStats(
                frames=frames,
                tids=tuple(sorted({key[0] for key in members})),
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
                    same_place[id(old)] = st
                    continue
                dead.add(id(old))
            self._stats[frames] = st
            fresh.append((_order(st), st))
        self._moved = moved
        entries = self._entries
        if dead or same_place:
            entries = [(k, same_place.get(id(s), s)) for k, s in entries if id(s) not in dead]
        entries.extend(fresh)
        # Keys are unique (they end with the frames): StackStats are never compared.
        entries.sort(key=itemgetter(0))
        self._entries = entries
        return tuple(map(_second, entries))
