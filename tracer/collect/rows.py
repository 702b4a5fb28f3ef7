"""The (thread, stack) rows and their totals, kept up to date from the
flows that changed since the last read.

A flow is one row of the kernel's aggregate map: (thread, stack, 64 MiB
bucket). A (thread, stack) row adds up its flows. With 100,000 stacks,
adding up every flow at every interval, and the totals per thread and for
the heap, took most of a second; here only the rows whose flows changed are
added up again, and the totals move by the difference.
"""

from __future__ import annotations

from typing import Hashable, Optional

from memtrace.model.accounting import BucketBook
from memtrace.model.snapshot import Counters, Flow, HeapRow, StackKey

RowKey = tuple[int, StackKey]  # (tid, stack key)


class RowBook:
    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        # row key -> {slot: flow}; a slot names where a flow comes from (a
        # map index, or a folded sum)
        self._members: dict[RowKey, dict[Hashable, Flow]] = {}
        self.rows: dict[RowKey, HeapRow] = {}
        self.per_tid: dict[int, Counters] = {}
        self._tid_sums: dict[int, list[int]] = {}  # tid -> its counters and its rows
        self._totals = [0, 0, 0, 0]
        self.live_chunk_bytes = 0
        self._touched: set[RowKey] = set()
        self.buckets = BucketBook()  # the same flows per 64 MiB bucket, for the arena accounting

    @property
    def totals(self) -> Counters:
        return Counters(*self._totals)

    def put(self, slot: Hashable, old: Optional[Flow], new: Optional[Flow]) -> None:
        """The flow in `slot` was `old` and is now `new` (None: none)."""
        self.buckets.put(old, new)
        if old is not None:
            key = (old.tid, old.stack_key)
            members = self._members.get(key)
            if members is not None:
                members.pop(slot, None)
            self._touched.add(key)
            self.live_chunk_bytes -= old.live_chunk_bytes
        if new is not None:
            key = (new.tid, new.stack_key)
            self._members.setdefault(key, {})[slot] = new
            self._touched.add(key)
            self.live_chunk_bytes += new.live_chunk_bytes

    def settle(self) -> set[RowKey]:
        """Add up again the rows whose flows changed; returns their keys."""
        touched, self._touched = self._touched, set()
        totals, tid_sums = self._totals, self._tid_sums
        tids = set()
        for key in touched:
            old = self.rows.get(key)
            members = self._members.get(key)
            if members:
                a = b = n = m = 0
                for f in members.values():
                    c = f.counters
                    a += c.alloc_bytes
                    b += c.free_bytes
                    n += c.alloc_count
                    m += c.free_count
                new: Optional[HeapRow] = HeapRow(key[0], key[1], Counters(a, b, n, m))
                self.rows[key] = new
            else:
                new = None
                self.rows.pop(key, None)
                self._members.pop(key, None)
            tid = key[0]
            for row, sign in ((old, -1), (new, 1)):
                if row is None:
                    continue
                c = row.counters
                t = tid_sums.get(tid)
                if t is None:
                    t = tid_sums[tid] = [0, 0, 0, 0, 0]  # the four counters, and its rows
                for i, value in enumerate((c.alloc_bytes, c.free_bytes, c.alloc_count, c.free_count)):
                    t[i] += sign * value
                    totals[i] += sign * value
                t[4] += sign
                tids.add(tid)
        for tid in tids:
            t = tid_sums[tid]
            if t[4]:
                self.per_tid[tid] = Counters(*t[:4])
            else:
                # The thread's last row went (its rows were folded): no row of its own.
                del tid_sums[tid]
                self.per_tid.pop(tid, None)
        return touched
