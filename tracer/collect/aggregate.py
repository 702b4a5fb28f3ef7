"""`memtrace.model.snapshot.aggregate_stacks`, kept up to date instead of redone.

Each interval only the stacks whose rows changed, whose retained share
changed, or which grew or shrank in the last interval (their growth goes
back to zero) are built again; the others keep their `StackStats` object,
and the tuple says which are new (model.StackChanges), for the recorder
to write only those. The order is the model's (live bytes, allocated
bytes, frames), kept in sorted blocks (Ordered):
a stack that moves is taken out and put back in O(log n), where
re-sorting 100,000 stacks took tens of milliseconds each interval, and a
stack whose place does not change (only its growth, threads or retained
share moved) is swapped where it is. The result equals aggregate_stacks'
on the same rows (tests/unit/test_aggregate.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from itertools import chain
from typing import Callable, Iterable, Mapping, Optional

from memtrace.model.snapshot import Counters, HeapRow, StackChanges, StackKey, StackStats, looks_truncated

RowKey = tuple[int, StackKey]
Frames = tuple[str, ...]

# A budget for naming applies only past this many new stacks in one call: a
# program's first stacks (and a slow first read of a library's symbols)
# never wait.
NAMED_AT_LEAST = 1000


def _place(st: StackStats, rank: int, sid: int) -> int:
    """Its place in the order, as one int: (live bytes falling, allocated
    bytes falling, the frames' rank, the stack number) from the high bits
    to the low. A tuple's comparison reads its items, each an object of its
    own: bisecting 100,000 of them was cache misses more than compares. The
    frames' rank stands for the frames (FrameRanks), and the stack number
    keeps the key the stack's own however ranks are renumbered."""
    c = st.counters
    return ((c.free_bytes - c.alloc_bytes) << 194) - (c.alloc_bytes << 128) + (rank << 64) + sid


_LOW = (1 << 128) - 1  # a key's rank and stack number
_SID = (1 << 64) - 1


def _reranked(key: int, rank: list) -> int:
    low = key & _LOW
    sid = low & _SID
    return key - low + (rank[sid] << 64) + sid


class FrameRanks:
    """Per stack number, an int whose order is its frames' order. The
    model orders stacks of equal bytes by their frames: comparing tuples
    of ~30 strings was most of the cost of placing a stack (100,000 stacks
    of a few hundred sizes tie often); ints compare at once. New stacks
    take ranks between their neighbours'; when there is no room, every
    stack is ranked again (rank_new says so)."""

    GAP = 1 << 32
    LIMIT = 1 << 60  # ranks are in [0, LIMIT): 64 bits of a key (_place)
    INSERT_AT_MOST = 32  # more new stacks at once: the ranked list is merged, not inserted into

    def __init__(self) -> None:
        self.rank: list[Optional[int]] = []  # by stack number
        self._sids: list[int] = []  # the ranked stack numbers, in their frames' order
        self._pending: list[int] = []  # stack numbers not ranked yet

    def add(self, sid: int) -> None:
        """sid is the next stack number: ranked by rank_new()."""
        self.rank.append(None)
        self._pending.append(sid)

    def rank_new(self, frames_of_sid: list[Frames]) -> bool:
        """Ranks the stacks added since; True when every rank was renumbered."""
        pending, self._pending = self._pending, []
        if not pending:
            return False
        sids, rank, frames = self._sids, self.rank, frames_of_sid.__getitem__
        if sids:
            pending.sort(key=frames)
            # Where each goes among the ranked (in order, as pending is):
            # those that share a place share the room between its neighbours.
            places = [bisect_left(sids, frames(sid), key=frames) for sid in pending]
            start = 0
            while start < len(pending):
                p, end = places[start], start + 1
                while end < len(pending) and places[end] == p:
                    end += 1
                lo = rank[sids[p - 1]] if p else -1
                hi = rank[sids[p]] if p < len(sids) else min(rank[sids[-1]] + (end - start + 1) * self.GAP,
                                                            self.LIMIT)
                step = (hi - lo) // (end - start + 1)
                if step < 1:
                    break  # no room between them: all again
                for j in range(start, end):
                    rank[pending[j]] = lo + step * (j - start + 1)
                start = end
            else:
                if len(pending) <= self.INSERT_AT_MOST:
                    for sid, p in zip(reversed(pending), reversed(places)):
                        sids.insert(p, sid)
                else:
                    self._sids = sorted(sids + pending, key=rank.__getitem__)
                return False
        self._sids = sorted(range(len(frames_of_sid)), key=frames)
        gap = min(self.GAP, self.LIMIT // (len(self._sids) + 1))
        for i, sid in enumerate(self._sids):
            rank[sid] = (i + 1) * gap
        return True


class Ordered:
    """Values by unique keys in order, in blocks of at most 2 * LOAD: one
    goes in or out in O(log n) and a block's length, one whose key stays
    is swapped where it is, and all of them are read off the blocks in one
    pass (a tuple of 100,000 in a few milliseconds). Changes come in
    batches (extend, remove_all, replace_all), each in key order; add,
    remove and replace are batches of one."""

    LOAD = 512

    def __init__(self) -> None:
        self._keys: list[list] = []
        self._values: list[list] = []
        self._maxes: list = []  # the last key of each block

    def __len__(self) -> int:
        return sum(map(len, self._keys))

    def values(self) -> Iterable:
        return chain.from_iterable(self._values)

    def add(self, key, value) -> None:
        self.extend([(key, value)])

    def extend(self, items: list[tuple]) -> None:
        """(key, value) pairs, keys not there: in key order, each looked
        for from the block of the one before, or one sort when many come
        at once."""
        if len(items) * 8 < len(self):
            items.sort(key=_first)
            maxes, all_keys, all_values, n = self._maxes, self._keys, self._values, self.LOAD
            i = 0
            for key, value in items:
                i = min(bisect_left(maxes, key, i), len(maxes) - 1)
                keys, values = all_keys[i], all_values[i]
                j = bisect_left(keys, key)
                keys.insert(j, key)
                values.insert(j, value)
                if j == len(keys) - 1:
                    maxes[i] = key  # past the last block's end
                if len(keys) > 2 * n:
                    all_keys[i + 1:i + 1] = [keys[n:]]
                    all_values[i + 1:i + 1] = [values[n:]]
                    del keys[n:], values[n:]
                    maxes[i:i + 1] = [keys[-1], all_keys[i + 1][-1]]
            return
        merged = sorted(chain(zip(chain.from_iterable(self._keys), self.values()), items),
                        key=_first)
        n = self.LOAD
        self._keys = [[k for k, _ in merged[i:i + n]] for i in range(0, len(merged), n)]
        self._values = [[v for _, v in merged[i:i + n]] for i in range(0, len(merged), n)]
        self._maxes = [keys[-1] for keys in self._keys]

    def remove(self, key) -> None:
        self.remove_all([key])

    def remove_all(self, keys: list) -> None:
        """remove() of each key, all there: in order, one pass over the blocks."""
        keys.sort()
        maxes, all_keys, all_values = self._maxes, self._keys, self._values
        i = 0
        for key in keys:
            # A block's last key taken out leaves its max above its keys
            # for the rest of the pass: still a bound for the keys after.
            i = bisect_left(maxes, key, i)
            block = all_keys[i]
            j = bisect_left(block, key)
            del block[j], all_values[i][j]
        if not all(all_keys):
            self._keys = all_keys = [k for k in all_keys if k]
            self._values = [v for v in all_values if v]
        self._maxes = [block[-1] for block in all_keys]

    def replace_all(self, items: list[tuple]) -> None:
        """replace() for each (key, value), keys all there: in key order,
        one pass over the blocks (2,000 a snapshot here)."""
        items.sort(key=_first)
        maxes, all_keys, all_values = self._maxes, self._keys, self._values
        i = 0
        for key, value in items:
            i = bisect_left(maxes, key, i)
            all_values[i][bisect_left(all_keys[i], key)] = value

    def replace(self, key, value) -> None:
        """The value under key, which is there, is now `value`."""
        self.replace_all([(key, value)])

    def rekey(self, new_key: Callable) -> None:
        """Every key becomes new_key(key), which keeps their order."""
        self._keys = [[new_key(k) for k in keys] for keys in self._keys]
        self._maxes = [keys[-1] for keys in self._keys]


def _first(pair: tuple):
    return pair[0]


class StackAggregator:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._generation: object = None
        self._last: Optional[StackChanges] = None  # what update() answered last
        self._reset()

    def _reset(self) -> None:
        # Each distinct stack (its frames) gets a number, by which it is
        # kept: hashing a tuple of ~30 frames touches ~30 objects, and at
        # 100,000 stacks the dictionaries keyed by frames cost more than the
        # work itself.
        self._sid_of_key: dict[StackKey, int] = {}
        self._sid_of_frames: dict[Frames, int] = {}
        self._frames: list[Frames] = []  # by stack number
        # Per stack, running sums of its rows' counters and the rows each
        # thread has in it: one stack can gather thousands of rows (kernel
        # stacks lost to the stack map keep only their immediate caller),
        # and a change to one of them must not add them all up again.
        # Lists by stack number rather than dictionaries: an index reads one
        # slot, where a lookup hashes and compares (each a cache miss or
        # more, over 100,000 stacks). None: the stack has no rows now.
        self._sums: list[Optional[list[int]]] = []
        self._tid_rows: list[Optional[dict[int, int]]] = []
        self._row_counters: dict[RowKey, Counters] = {}
        self._stats: list[Optional[StackStats]] = []
        self._places: list[Optional[int]] = []  # of the stack in the order, while it has one
        self._retained: dict[int, int] = {}
        self._moved: set[int] = set()  # live_delta_bytes != 0
        self._order = Ordered()  # the stacks by _place
        self._ranks = FrameRanks()
        self._waiting: set[RowKey] = set()  # rows whose stack is not named yet

    @property
    def unnamed(self) -> int:
        """Stacks whose rows wait to be named (naming_budget_s)."""
        return len({stack_key for _, stack_key in self._waiting})

    def _sid(self, stack_key: StackKey, frames_of: Callable[[StackKey], Frames]) -> int:
        frames = frames_of(stack_key)
        sid = self._sid_of_frames.get(frames)
        if sid is None:
            sid = self._sid_of_frames[frames] = len(self._frames)
            self._frames.append(frames)
            self._ranks.add(sid)
            for per_sid in (self._sums, self._tid_rows, self._stats, self._places):
                per_sid.append(None)
        self._sid_of_key[stack_key] = sid
        return sid

    def update(
        self,
        rows: Mapping[RowKey, HeapRow],
        changed: Optional[set[RowKey]],
        frames_of: Callable[[StackKey], Frames],
        generation: object,
        retained: Optional[Mapping[StackKey, int]] = None,
        naming_budget_s: Optional[float] = None,
    ) -> tuple[StackStats, ...]:
        """rows: every (thread, stack) row by key; changed: the keys whose
        row changed, appeared or went since the last call (None: all may
        have). generation: what frames_of answers depends on; when it
        moves, everything is grouped again. naming_budget_s: past that
        many seconds in this call (and NAMED_AT_LEAST stacks named), the
        rows of stacks not named yet wait for the next call (`unnamed`):
        100,000 new stacks took 5-20 s to name and place, and the
        snapshots that long to come."""
        live_before: dict[Frames, int] = {}
        since = self._last
        if changed is None or generation != self._generation:
            since = None
            # Grown since the last call, all the same.
            live_before = {st.frames: st.counters.live_bytes for st in self._stats if st is not None}
            self._reset()
            self._generation = generation
            changed = set(rows)
        sid_of_key = self._sid_of_key
        counted: set[int] = set()  # stacks whose rows changed
        sums, tid_rows, row_counters = self._sums, self._tid_rows, self._row_counters
        waiting, self._waiting = self._waiting, set()
        deadline = None if naming_budget_s is None else time.monotonic() + naming_budget_s
        named = 0
        for key in (changed | waiting) if waiting else changed:
            tid, stack_key = key
            sid = sid_of_key.get(stack_key)
            if sid is None:
                if deadline is not None and named >= NAMED_AT_LEAST and time.monotonic() > deadline:
                    self._waiting.add(key)  # never counted yet: nothing to take back
                    continue
                sid = self._sid(stack_key, frames_of)
                named += 1
            old_c = row_counters.pop(key, None)
            row = rows.get(key)
            if old_c is not None and row is not None:
                # The row was counted and is still there: its thread's
                # count of rows in the stack stays. Most changes.
                c = row_counters[key] = row.counters
                s = sums[sid]
                s[0] += c.alloc_bytes - old_c.alloc_bytes
                s[1] += c.free_bytes - old_c.free_bytes
                s[2] += c.alloc_count - old_c.alloc_count
                s[3] += c.free_count - old_c.free_count
                counted.add(sid)
                continue
            if old_c is not None:
                s = sums[sid]
                s[0] -= old_c.alloc_bytes
                s[1] -= old_c.free_bytes
                s[2] -= old_c.alloc_count
                s[3] -= old_c.free_count
                per_tid = tid_rows[sid]
                per_tid[tid] -= 1
                if not per_tid[tid]:
                    del per_tid[tid]
            if row is not None:
                c = row_counters[key] = row.counters
                s = sums[sid]
                if s is None:
                    s = sums[sid] = [0, 0, 0, 0]
                    tid_rows[sid] = {}
                s[0] += c.alloc_bytes
                s[1] += c.free_bytes
                s[2] += c.alloc_count
                s[3] += c.free_count
                per_tid = tid_rows[sid]
                per_tid[tid] = per_tid.get(tid, 0) + 1
            counted.add(sid)
        dirty = counted | self._moved
        kept: dict[int, int] = {}
        for stack_key, n in (retained or {}).items():
            sid = sid_of_key.get(stack_key)
            if sid is None:
                sid = self._sid(stack_key, frames_of)
            kept[sid] = kept.get(sid, 0) + n
        before = self._retained
        for sid, n in kept.items():
            if before.get(sid, 0) != n:
                dirty.add(sid)
        dirty.update(sid for sid in before if sid not in kept)
        self._retained = kept

        stats, places, order, all_frames = self._stats, self._places, self._order, self._frames
        rank = self._ranks.rank
        if self._ranks.rank_new(all_frames):
            order.rekey(lambda key: _reranked(key, rank))
            self._places = places = [None if key is None else _reranked(key, rank) for key in places]
        fresh: list[tuple] = []  # (place, stack) to put in the order
        swaps: list[tuple] = []  # (place, stack) of stacks that keep their place
        removed: list[int] = []  # places taken out
        new_stacks: list[StackStats] = []  # objects new since the last call
        replaced: list[Optional[StackStats]] = []  # what each one replaces
        gone_stacks: list[StackStats] = []  # and those that went
        moved: set[int] = set()
        for sid in dirty:
            old = stats[sid]
            if old is not None and sid not in counted:
                # Its rows did not change, nor its counters and threads:
                # it only stopped growing, or its retained share moved (half
                # of the stacks here, at every snapshot of a churning heap).
                # Its place in the order stays.
                retained_bytes = kept.get(sid, 0)
                if not old.live_delta_bytes and retained_bytes == old.retained_bytes:
                    continue
                st = stats[sid] = StackStats(old.frames, old.tids, old.counters, old.truncated, 0, retained_bytes)
                new_stacks.append(st)
                replaced.append(old)
                gone_stacks.append(old)
                swaps.append((places[sid], st))
                continue
            per_tid = tid_rows[sid]
            if not per_tid:
                sums[sid] = tid_rows[sid] = None
                if old is not None:
                    stats[sid] = None
                    removed.append(places[sid])
                    places[sid] = None
                    gone_stacks.append(old)
                continue
            s = sums[sid]
            c = old.counters if old is not None else None
            if c is not None and c.alloc_bytes == s[0] and c.free_bytes == s[1] \
                    and c.alloc_count == s[2] and c.free_count == s[3]:
                counters = c  # only its growth went back to 0, or its threads or share moved
            else:
                counters = Counters(*s)
            frames = all_frames[sid]
            retained_bytes = kept.get(sid, 0)
            if old is not None:
                delta = counters.live_bytes - c.live_bytes
                tids = old.tids
                if len(tids) != len(per_tid) or (tids[0] not in per_tid if len(tids) == 1
                                                 else per_tid.keys() != set(tids)):
                    tids = tuple(sorted(per_tid))
                if delta:
                    moved.add(sid)
                # The fields compared one by one, before an object is made:
                # most stacks here only stopped growing, or did not move.
                if counters is c and tids is old.tids and delta == old.live_delta_bytes \
                        and retained_bytes == old.retained_bytes:
                    continue
                st = StackStats(frames, tids, counters, old.truncated, delta, retained_bytes)
            else:
                delta = counters.live_bytes - live_before.get(frames, 0)
                if delta:
                    moved.add(sid)
                st = StackStats(frames, tuple(sorted(per_tid)), counters,
                                looks_truncated(frames, self.max_depth), delta, retained_bytes)
            new_stacks.append(st)
            replaced.append(old)
            stats[sid] = st
            if old is not None:
                gone_stacks.append(old)
                if old.counters is counters:
                    # Only its growth, threads or retained share moved: its
                    # place is the same.
                    swaps.append((places[sid], st))
                    continue
                removed.append(places[sid])
            place = places[sid] = _place(st, rank[sid], sid)
            fresh.append((place, st))
        # In key order, each batch one pass over the blocks.
        order.replace_all(swaps)
        order.remove_all(removed)
        order.extend(fresh)
        self._moved = moved
        out = StackChanges(order.values())
        if since is not None:
            # Only the latest says what changed: the one before is let go.
            since.since, since.fresh, since.gone, since.replaced = None, (), (), ()
            out.since, out.fresh, out.gone = since, tuple(new_stacks), tuple(gone_stacks)
            out.replaced = tuple(replaced)
        self._last = out
        return out
