"""When to walk the arenas' free lists, and what their figures are between
two walks.

A walk reads every free chunk of every arena: a good part of a second in a
fragmented heap of gigabytes, a few milliseconds in a small one. It is
done with at most ARENA_WALK_SHARE of the wall time, and, when malloc's
probes see every block the arenas hold, only when a walk could tell
something the probes did not: between two walks an arena's free bytes
move by what its heaps grew less what its blocks grew, both known (glibc's
`system_mem` is read every interval, the blocks' chunk bytes per 64 MiB
bucket come from the probes). What only a walk sees:
- a block from before the trace freed (the probes know it went, not its
  size): the untracked frees' count moved;
- how the free chunks lie, which says what malloc_trim could give back:
  walked again after WALK_AT_LEAST_EVERY_S, or at once when the blocks
  moved by more than MOVED_SHARE of the arena.
Light mode (no malloc probes) walks whenever the budget allows, as before.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from memtrace.model.accounting import ArenaInput, BucketBook, buckets_of

ARENA_WALK_SHARE = 0.01  # of wall time spent walking free lists, at most
WALK_AT_LEAST_EVERY_S = 10.0
MOVED_SHARE = 1 / 32  # of the arena's system_mem
MOVED_AT_LEAST = 1 << 20


def live_chunk_bytes(arena: ArenaInput, book: BucketBook) -> int:
    """The chunk bytes the probes saw go into the arena's heaps and stay."""
    total = 0
    for bucket in buckets_of(arena):
        b = book.buckets.get(bucket)
        if b is not None:
            total += b.live_chunk_bytes
    return total


class ArenaWalks:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new image: its arenas are not the old ones."""
        self.walked: dict = {}  # arena address -> its last walk (process.glibc.report.Arena)
        self.rewalk_when_idle = False
        self._asked = True
        self._next_at = 0.0
        self._walked_at = 0.0
        self._untracked: Optional[int] = None
        # address -> (system_mem, live chunk bytes) at the last walk; None:
        # taken at the next carried(), right after a walk
        self._bases: Optional[dict[int, tuple[int, int]]] = None
        self._inputs: Sequence[ArenaInput] = ()

    def ask(self) -> None:
        """Walk at the next reading, whatever the budget: a new arena, or
        the last word on a process."""
        self._asked = True

    def due(self, now: float, idle: bool, book: Optional[BucketBook], untracked_frees: int) -> bool:
        if self._asked:
            return True
        # A walk that raced with a busy target is unreliable; once the target
        # is idle one more walk gives a steady answer, whatever the budget.
        if idle and self.rewalk_when_idle:
            return True
        if now < self._next_at:
            return False
        if book is None or untracked_frees != self._untracked:
            return True
        if now - self._walked_at >= WALK_AT_LEAST_EVERY_S:
            return True
        for arena in self._inputs:
            base = (self._bases or {}).get(arena.address)
            if base is None:
                return True
            moved = abs(live_chunk_bytes(arena, book) - base[1])
            if moved > max(MOVED_AT_LEAST, base[0] * MOVED_SHARE):
                return True
        return False

    def done(self, started: float, ended: float, arenas: Sequence, idle: bool, untracked_frees: int) -> None:
        """A walk of these arenas (process.glibc.report.Arena) ran from
        `started` to `ended`."""
        self.walked = {a.address: a for a in arenas}
        self.rewalk_when_idle = not idle and not all(a.reliable for a in arenas)
        self._asked = False
        self._next_at = started + (ended - started) / ARENA_WALK_SHARE
        self._walked_at = started
        self._untracked = untracked_frees
        self._bases = None

    def carried(self, inputs: list[ArenaInput], book: Optional[BucketBook]) -> list[ArenaInput]:
        """The arenas' inputs with each walk's free bytes carried to now.
        Right after a walk they are its own, and the base of the next ones."""
        self._inputs = inputs
        if book is None:
            return inputs
        if self._bases is None:
            self._bases = {a.address: (a.system_mem_bytes, live_chunk_bytes(a, book))
                           for a in inputs if a.address in self.walked}
            return inputs
        out = []
        for a in inputs:
            base = self._bases.get(a.address)
            if base is not None:
                free = a.free_bytes + (a.system_mem_bytes - base[0]) - (live_chunk_bytes(a, book) - base[1])
                a = replace(a, free_bytes=min(max(0, free), a.system_mem_bytes))
            out.append(a)
        return out
