"""The pure accounting rules of issue 10: the heap from before an attach is
live, never retained; the gap adds up with every part >= 0; the untouched
part of the live heap is apart; hints never exceed what is resident and
never contradict each other."""

from __future__ import annotations

from dataclasses import replace

from memtrace.model import accounting
from memtrace.model.accounting import ArenaInput, ChunkSpans, HeapSpan
from memtrace.model.snapshot import BUCKET_SHIFT, AllocatorStats, Flow
from memtrace.output.notes import note_text

MiB = 1 << 20


def _main_arena(resident: int, system_mem: int, free: int, trimmable: int = 0) -> ArenaInput:
    return ArenaInput(address=0x7F00_0000_0000, kind="main",
                      heaps=(HeapSpan(0x5555_0000_0000, 0, system_mem, resident),),
                      system_mem_bytes=system_mem, free_bytes=free, trimmable_bytes=trimmable)


def _flow(live: int, chunk_overhead: int = 16, bucket: int = 0x5555_0000_0000 >> BUCKET_SHIFT,
          before_exec: bool = False) -> Flow:
    blocks = live // 4096
    return Flow(1, (1, 2), bucket, live, 0, blocks, 0,
                alloc_chunk_bytes=live + blocks * chunk_overhead, before_exec=before_exec)


def test_blocks_from_before_the_attach_are_live_not_retained():
    # 100 MiB in use by glibc's books, 100 MiB free in its bins, all resident;
    # nothing traced yet.
    arena = _main_arena(resident=200 * MiB, system_mem=200 * MiB, free=100 * MiB)
    account = accounting.account_allocator([arena], [], 0, attached=True)
    a = account.arenas[0]
    assert a.live_before_trace_bytes == 100 * MiB
    assert a.live_bytes == 0  # traced: exact
    assert a.all_live_bytes == 100 * MiB
    assert a.retained_bytes == 100 * MiB
    assert account.allocator.live_before_trace_bytes == 100 * MiB
    # Launched from the first instruction: there is no "before".
    launched = accounting.account_allocator([arena], [], 0, attached=False)
    assert launched.arenas[0].live_before_trace_bytes == 0


def test_traced_chunks_are_not_counted_twice_as_from_before():
    arena = _main_arena(resident=200 * MiB, system_mem=200 * MiB, free=100 * MiB)
    flow = _flow(40 * MiB)  # traced: 40 MiB requested, its chunks a little more
    in_use = 100 * MiB
    account = accounting.account_allocator([arena], [flow], flow.live_bytes, attached=True)
    a = account.arenas[0]
    assert a.live_before_trace_bytes == in_use - flow.live_chunk_bytes
    assert a.all_live_bytes == flow.live_bytes + a.live_before_trace_bytes


def test_an_arena_made_while_traced_has_nothing_from_before():
    arena = _main_arena(resident=200 * MiB, system_mem=200 * MiB, free=100 * MiB)
    arena = ArenaInput(**{**arena.__dict__, "kind": "thread", "existed_before_trace": False})
    account = accounting.account_allocator([arena], [_flow(40 * MiB)], 40 * MiB, attached=True)
    assert account.arenas[0].live_before_trace_bytes == 0


def test_an_exec_drops_the_old_images_blocks():
    old = _flow(4 * MiB, before_exec=True)
    assert old.counters.live_bytes == 0 and old.live_chunk_bytes == 0
    assert old.counters.alloc_bytes == 4 * MiB


def test_the_gap_adds_up_and_untouched_live_is_apart():
    allocator = AllocatorStats(live_bytes=700 * MiB, retained_bytes=10 * MiB,
                               live_not_resident_bytes=690 * MiB)
    g = accounting.gap(526 * MiB, allocator)
    assert g.heap_live_bytes == 10 * MiB
    assert g.heap_live_not_resident_bytes == 690 * MiB
    assert g.heap_live_bytes + g.allocator_retained_bytes + g.other_anon_bytes == g.rss_anon_bytes
    assert min(g.heap_live_bytes, g.allocator_retained_bytes, g.other_anon_bytes) >= 0


def test_the_gap_is_clipped_when_reads_disagree():
    allocator = AllocatorStats(live_bytes=30 * MiB, retained_bytes=300 * MiB)
    g = accounting.gap(100 * MiB, allocator)
    assert (g.heap_live_bytes, g.allocator_retained_bytes, g.other_anon_bytes) == (30 * MiB, 70 * MiB, 0)


def test_untouched_mmapped_chunks_are_live_but_not_resident():
    chunks = ChunkSpans(count=4, committed_bytes=256 * MiB, resident_bytes=4 * 4096)
    account = accounting.account_allocator([], [], 256 * MiB, chunks)
    assert account.allocator.live_not_resident_bytes == 256 * MiB - 4 * 4096


def test_trim_estimate_never_exceeds_what_is_retained():
    # The free lists hold 44 MiB of free pages, but only 2 MiB of them are resident.
    arena = _main_arena(resident=11 * MiB, system_mem=60 * MiB, free=50 * MiB, trimmable=44 * MiB)
    account = accounting.account_allocator([arena], None, 0)
    a = account.arenas[0]
    assert a.trimmable_bytes <= a.retained_bytes <= a.resident_bytes
    hints = [note_text(h) for h in accounting.hints(account.arenas, 44 * MiB, 11 * MiB)]
    assert not any("44" in h for h in hints), hints


def test_fragmented_main_arena_gets_no_call_to_trim():
    arena = _main_arena(resident=200 * MiB, system_mem=200 * MiB, free=100 * MiB, trimmable=0)
    account = accounting.account_allocator([arena], None, 0)
    hints = [note_text(h) for h in accounting.hints(account.arenas, 0, 200 * MiB)]
    assert len(hints) == 1 and "fragmentation" in hints[0], hints
    assert "call malloc_trim" not in hints[0]


def test_one_hint_about_trimming_not_two():
    arena = _main_arena(resident=200 * MiB, system_mem=200 * MiB, free=150 * MiB,
                        trimmable=140 * MiB)
    account = accounting.account_allocator([arena], None, 0)
    hints = [note_text(h) for h in accounting.hints(account.arenas, 140 * MiB, 200 * MiB)]
    assert sum("malloc_trim" in h for h in hints) == 1, hints


def test_exited_threads_past_the_latest_are_one_row():
    from memtrace.model.snapshot import Counters, HeapRow, aggregate_threads

    rows = [HeapRow(tid, (1, 2), Counters(100, 100, 1, 1)) for tid in range(100, 200)]
    rows.append(HeapRow(0, (1, 2), Counters(5000, 5000, 50, 50)))  # folded by the reader
    rows.append(HeapRow(7, (1, 2), Counters(300, 0, 3, 0)))  # alive
    threads = aggregate_threads(rows, {0: "(exited threads)"}, alive=[7], exited_kept=10)
    zero = [t for t in threads if t.tid == 0]
    assert len(zero) == 1 and zero[0].counters.alloc_count == 50 + 90
    assert len(threads) == 1 + 10 + 1
    total = sum((t.counters for t in threads), start=Counters())
    assert total == sum((r.counters for r in rows), start=Counters())


def test_retained_shares_are_whole_pages_and_add_up():
    from memtrace.model.accounting import RETAINED_SHARE_UNIT, _share_retained

    freed = {(i, 0): 1000 + 37 * i for i in range(500)}
    out: dict = {}
    _share_retained(10_000_000, freed, out)
    assert sum(out.values()) == 10_000_000
    top = max(freed, key=lambda k: freed[k])
    assert all(v % RETAINED_SHARE_UNIT == 0 for k, v in out.items() if k != top)
    # A small change elsewhere in the arena moves few shares: the others
    # stay on their page.
    again: dict = {}
    _share_retained(10_000_000 + 3000, {**freed, (7, 0): freed[(7, 0)] + 5}, again)
    moved = [k for k in out if out[k] != again.get(k)]
    assert len(moved) <= 5, moved


def _by_hand(arenas, flows, retained_of):
    """What account_allocator answered from one pass over every flow, before
    it kept sums per bucket: live bytes, threads and retained shares."""
    from memtrace.model.accounting import _share_retained, buckets_of

    owner = {}
    for i, arena in enumerate(arenas):
        for bucket in buckets_of(arena):
            owner.setdefault(bucket, i)
    live = [0] * len(arenas)
    tids = [set() for _ in arenas]
    freed = [{} for _ in arenas]
    for f in flows:
        i = owner.get(f.bucket)
        if i is None or f.before_exec:
            continue
        live[i] += f.alloc_bytes - f.free_bytes
        if f.alloc_bytes and f.tid:
            tids[i].add(f.tid)
        if f.free_bytes:
            freed[i][f.stack_key] = freed[i].get(f.stack_key, 0) + f.free_bytes
    shares = {}
    for i in range(len(arenas)):
        _share_retained(retained_of[i], freed[i], shares)
    return [max(0, x) for x in live], [tuple(sorted(t)) for t in tids], shares


def test_sums_kept_per_bucket_equal_a_pass_over_every_flow():
    import random

    rng = random.Random(3)
    base = 0x5555_0000_0000
    main = ArenaInput(0x7F00_0000_0000, "main", (HeapSpan(base, 0, 130 * MiB, 0),),
                      system_mem_bytes=130 * MiB)  # three buckets
    thread = ArenaInput(0x7F10_0000_0000, "thread", (HeapSpan(base + 8 * (64 * MiB), 64 * MiB, 32 * MiB, 0),))
    buckets = [(base >> BUCKET_SHIFT) + k for k in (0, 1, 2, 8, 40)]  # 40: outside every arena
    book = accounting.BucketBook()
    flows: dict[int, Flow] = {}
    for step in range(200):
        for _ in range(rng.randint(1, 40)):
            slot = rng.randrange(300)
            old = flows.get(slot)
            if old is not None and rng.random() < 0.1:
                new = None
            else:
                key = old.stack_key if old else (rng.randrange(50), rng.randrange(3))
                # Counts that stay or move; a new flow may hold nothing yet.
                a = (old.alloc_bytes if old else 0) + rng.choice((0, rng.randrange(0, 9000)))
                f = (old.free_bytes if old else 0) + rng.choice((0, rng.randrange(1, 9000)))
                new = Flow(old.tid if old else rng.randrange(3), key,
                           old.bucket if old else rng.choice(buckets), a, min(a, f), 1, 1,
                           alloc_chunk_bytes=a + 16, free_chunk_bytes=min(a, f) + 16,
                           before_exec=old.before_exec if old else rng.random() < 0.05)
            book.put(old, new)
            if new is None:
                flows.pop(slot, None)
            else:
                flows[slot] = new
        # Retained bytes from a few pages to more than was freed: few stacks
        # get a share, or most.
        resident = rng.choice((1, 40, 400, 4000)) * 4096 + 10 * MiB
        arenas = [replace(main, heaps=(replace(main.heaps[0], resident_bytes=resident),)),
                  replace(thread, heaps=(replace(thread.heaps[0], resident_bytes=resident // 3),))]
        heap_live = sum(f.live_bytes for f in flows.values())
        kept = accounting.account_allocator(arenas, book, heap_live)
        once = accounting.account_allocator(arenas, list(flows.values()), heap_live)
        assert kept == once, step
        live, tids, shares = _by_hand(arenas, flows.values(), [a.retained_bytes for a in kept.arenas])
        assert [a.live_bytes for a in kept.arenas] == live, step
        assert [a.tids for a in kept.arenas] == tids, step
        assert kept.stack_retained == shares, step


def test_blocks_in_no_arena_read_are_not_said_never_touched():
    """A command gone before its arenas were first read: its live blocks
    are held as far as the RSS goes, not "never touched"; the chunks seen
    mapped alone keep what smaps said of them."""
    chunks = ChunkSpans(count=1, committed_bytes=64 * MiB, resident_bytes=0)
    account = accounting.account_allocator([], [_flow(5 * MiB)], 5 * MiB + 64 * MiB, chunks)
    assert account.allocator.live_not_resident_bytes == 64 * MiB
    g = accounting.gap(11 * MiB, account.allocator)
    assert (g.heap_live_bytes, g.other_anon_bytes, g.heap_live_not_resident_bytes) == (
        5 * MiB, 6 * MiB, 64 * MiB)


def test_an_attached_allocator_with_opaque_books_says_no_block_untouched():
    """jemalloc attached to: its blocks land in mappings made before the
    trace, which are not known; none is said never touched."""
    launched = accounting.account_mappings("jemalloc", 0, 0, 50 * 1024)
    assert launched.allocator.live_not_resident_bytes == 50 * 1024
    attached = accounting.account_mappings("jemalloc", 0, 0, 50 * 1024, attached=True)
    assert attached.allocator.live_not_resident_bytes == 0
    g = accounting.gap(3 * MiB, attached.allocator)
    assert (g.heap_live_bytes, g.heap_live_not_resident_bytes) == (50 * 1024, 0)


def test_the_stack_that_freed_most_in_a_bucket_is_max_over_bytes_and_key_as_frees_come_and_go():
    """The top is kept as frees come (counters only grow), and looked for
    again when the top one freed less or went (an exec, a folded row)."""
    import random

    rng = random.Random(7)
    bucket = accounting._Bucket()
    keys = [(i % 50, 0x1000 + i) for i in range(200)]
    for step in range(20_000):
        key = rng.choice(keys)
        had = bucket.freed.get(key, 0)
        change = rng.choice((16, 32, 4096, 4096)) if rng.random() < 0.9 else -rng.randint(0, had // 16) * 16
        if change:
            bucket._freed(key, change)
        if bucket.freed and step % 7 == 0:
            assert bucket.top() == max((n, k) for k, n in bucket.freed.items())
