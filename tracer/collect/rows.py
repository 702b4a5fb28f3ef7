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
        if old is not None and new is not None and old.stack_key == new.stack_key \
                and old.tid == new.tid and old.bucket == new.bucket \
                and not old.before_exec and not new.before_exec:
            # Its counts moved, in the same row and bucket: most changes,
            # each a few lookups less than the general case below (2,000 a
            # snapshot at 2,000 changes a second).
            key = (old.tid, old.stack_key)
            members = self._members.get(key)
            if members is not None:
                members[slot] = new
                self._touched.add(key)
                self.live_chunk_bytes += (new.alloc_chunk_bytes - new.free_chunk_bytes) \
                    - (old.alloc_chunk_bytes - old.free_chunk_bytes)
                self.buckets.buckets[old.bucket].move(old, new)
                return
        self.buckets.put(old, new)
        if old is not None:
            key = (old.tid, old.stack_key)
            self._touched.add(key)
            self.live_chunk_bytes -= old.live_chunk_bytes
            members = self._members.get(key)
            if members is not None:
                if new is not None and new.tid == old.tid and new.stack_key == old.stack_key:
                    # Its counts moved, in the same row: most changes.
                    members[slot] = new
                    self.live_chunk_bytes += new.live_chunk_bytes
                    return
                members.pop(slot, None)
        if new is not None:
            key = (new.tid, new.stack_key)
            self._members.setdefault(key, {})[slot] = new
            self._touched.add(key)
            self.live_chunk_bytes += new.live_chunk_bytes

    def settle(self) -> set[RowKey]:
        """Add up again the rows whose flows changed; returns their keys."""
        touched, self._touched = self._touched, set()
        totals, tid_sums, rows, all_members = self._totals, self._tid_sums, self.rows, self._members
        tids = set()
        for key in touched:
            old = rows.get(key)
            members = all_members.get(key)
            if members:
                if len(members) == 1:
                    # One flow (one bucket): most rows.
                    for f in members.values():
                        a, n = f.alloc_bytes, f.alloc_count
                        b, m = (a, n) if f.before_exec else (f.free_bytes, f.free_count)
                else:
                    a = b = n = m = 0
                    for f in members.values():
                        c = f.counters
                        a += c.alloc_bytes
                        b += c.free_bytes
                        n += c.alloc_count
                        m += c.free_count
                rows[key] = HeapRow(key[0], key[1], Counters(a, b, n, m))
                count = 1 if old is None else 0
            else:
                a = b = n = m = 0
                rows.pop(key, None)
                all_members.pop(key, None)
                if old is None:
                    continue
                count = -1
            if old is not None:
                c = old.counters
                a -= c.alloc_bytes
                b -= c.free_bytes
                n -= c.alloc_count
                m -= c.free_count
            tid = key[0]
            t = tid_sums.get(tid)
            if t is None:
                t = tid_sums[tid] = [0, 0, 0, 0, 0]  # the four counters, and its rows
            t[0] += a
            t[1] += b
            t[2] += n
            t[3] += m
            t[4] += count
            totals[0] += a
            totals[1] += b
            totals[2] += n
            totals[3] += m
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
