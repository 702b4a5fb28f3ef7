"""When the arenas' free lists are walked, and their free bytes between walks
(memtrace.collect.walks)."""

from __future__ import annotations

from types import SimpleNamespace

from memtrace.collect.walks import (
    ARENA_WALK_SHARE,
    MOVED_AT_LEAST,
    WALK_AT_LEAST_EVERY_S,
    ArenaWalks,
)
from memtrace.model.accounting import ArenaInput, BucketBook, HeapSpan
from memtrace.model.snapshot import BUCKET_SHIFT, Flow

HEAP = 0x7F00_0400_0000
MiB = 1 << 20


def arena(system_mem: int, free: int) -> ArenaInput:
    return ArenaInput(HEAP + 0x30, "thread", (HeapSpan(HEAP, 64 * MiB, system_mem, system_mem),),
                      system_mem_bytes=system_mem, free_bytes=free)


def book(live_chunk_bytes: int) -> BucketBook:
    return BucketBook.of([Flow(7, (1, 0), HEAP >> BUCKET_SHIFT, live_chunk_bytes, 0,
                               alloc_chunk_bytes=live_chunk_bytes)])


def walked(walks: ArenaWalks, at: float, took: float, untracked: int = 0) -> None:
    walks.done(at, at + took, [SimpleNamespace(address=HEAP + 0x30, reliable=True)], False, untracked)


def test_the_first_reading_walks_then_the_budget_and_what_moved_decide() -> None:
    walks = ArenaWalks()
    assert walks.due(0.0, False, book(10 * MiB), 0)
    walked(walks, 0.0, 0.005)
    walks.carried([arena(32 * MiB, 20 * MiB)], book(10 * MiB))
    assert not walks.due(0.4, False, book(10 * MiB), 0)  # within the budget's wait
    assert not walks.due(1.0, False, book(10 * MiB + MiB // 2), 0)  # nothing a walk would tell
    assert walks.due(1.0, False, book(10 * MiB + MiB + 1), 0)  # blocks moved past the threshold
    assert walks.due(1.0, False, book(10 * MiB), 1)  # a block from before the trace was freed
    assert walks.due(WALK_AT_LEAST_EVERY_S, False, book(10 * MiB), 0)  # how its chunks lie, now and then
    assert not walks.due(0.005 / ARENA_WALK_SHARE - 0.01, False, book(20 * MiB), 1)  # the budget first
    walks.ask()
    assert walks.due(0.1, False, book(10 * MiB), 0)


def test_without_the_probes_books_every_budgeted_reading_walks() -> None:
    walks = ArenaWalks()
    walked(walks, 0.0, 0.005)
    walks.carried([arena(32 * MiB, 20 * MiB)], None)
    assert not walks.due(0.4, False, None, 0)
    assert walks.due(0.6, False, None, 0)


def test_free_bytes_between_walks_move_with_the_heap_and_the_blocks() -> None:
    walks = ArenaWalks()
    walked(walks, 0.0, 0.005)
    assert walks.carried([arena(32 * MiB, 20 * MiB)], book(10 * MiB))[0].free_bytes == 20 * MiB
    # The heap grew 4 MiB and the blocks 3 MiB: 1 MiB more free (top).
    [now] = walks.carried([arena(36 * MiB, 20 * MiB)], book(13 * MiB))
    assert now.free_bytes == 21 * MiB
    # Freed blocks go back to the free bytes; never more than system_mem.
    assert walks.carried([arena(32 * MiB, 20 * MiB)], book(0))[0].free_bytes == 30 * MiB
    assert walks.carried([arena(32 * MiB, 20 * MiB)], book(-40 * MiB))[0].free_bytes == 32 * MiB
    # The next walk is the new base.
    walked(walks, 2.0, 0.005)
    assert walks.carried([arena(32 * MiB, 25 * MiB)], book(MiB))[0].free_bytes == 25 * MiB


def test_an_unreliable_walk_is_done_again_once_idle() -> None:
    walks = ArenaWalks()
    walks.done(0.0, 0.005, [SimpleNamespace(address=HEAP + 0x30, reliable=False)], False, 0)
    walks.carried([arena(32 * MiB, 20 * MiB)], book(10 * MiB))
    assert not walks.due(0.1, False, book(10 * MiB), 0)
    assert walks.due(0.1, True, book(10 * MiB), 0)
    assert MOVED_AT_LEAST == MiB
