"""The incremental stack aggregation (memtrace.collect.aggregate) and the
row book (memtrace.collect.rows) give what the model's one-shot functions
give on the same rows, interval after interval. No root, no BPF."""

from __future__ import annotations

import random

from memtrace.collect.aggregate import StackAggregator
from memtrace.collect.rows import RowBook
from memtrace.model.accounting import BucketBook
from memtrace.model.snapshot import Counters, Flow, Snapshot, aggregate_stacks, aggregate_threads


def frames_for(stack_key):
    # Two kernel stacks share frames now and then: several keys, one stack.
    sid = stack_key[0] % 40
    return tuple(f"fn{sid}_{d}+0x1 [app]" for d in range(1 + sid % 5)) + ("start_thread+0x7d [libc.so.6]",) * (sid % 3 > 0)


def test_incremental_aggregation_equals_the_one_shot():
    rng = random.Random(5)
    book = RowBook()
    flows: dict[int, Flow] = {}
    agg = StackAggregator(127)
    previous = None
    for step in range(60):
        for _ in range(rng.randint(0, 30)):
            slot = rng.randrange(120)
            old = flows.get(slot)
            if old is not None and rng.random() < 0.1:
                new = None  # a row that goes (folded away)
            else:
                # Now and then the slot holds another row (the map's index
                # reused), or blocks of an image gone by exec.
                moved = old is None or rng.random() < 0.05
                tid = 1000 + rng.randrange(4) if moved else old.tid
                key = (rng.randrange(60), 0) if moved else old.stack_key
                bucket = rng.randrange(2) if moved else old.bucket
                a = (old.alloc_bytes if old else 0) + rng.randrange(1, 5000)
                f = (old.free_bytes if old else 0) + rng.randrange(0, 3000)
                new = Flow(tid, key, bucket, a, min(a, f), 1 + step, step, alloc_chunk_bytes=a + 16,
                           before_exec=rng.random() < 0.03)
            if new is None:
                flows.pop(slot, None)
            else:
                flows[slot] = new
            book.put(slot, old, new)
        changed = book.settle()
        rows = list(book.rows.values())
        retained = {r.stack_key: 4096 * (r.stack_key[0] % 3) for r in rows if step % 7}
        got = agg.update(dict(book.rows), changed if step != 30 else None, frames_for, 1, retained)
        want = aggregate_stacks(rows, frames_for, 127, previous, retained)
        assert got == want, step
        _check_places(agg)
        # What changed since the last answer, as the recorder reads it.
        if step == 30:
            assert got.since is None
        elif previous is not None:
            assert got.since is previous.stacks
            before = {id(s) for s in previous.stacks}
            now = {id(s) for s in got}
            assert sorted(map(id, got.fresh)) == sorted(now - before), step
            assert sorted(map(id, got.gone)) == sorted(before - now), step
            # Each new object with the one it replaced: its stack's previous object, or None.
            was = {s.frames: s for s in previous.stacks}
            assert len(got.replaced) == len(got.fresh)
            assert all(old is was.get(st.frames) for st, old in zip(got.fresh, got.replaced)), step
        # Stacks that did not change keep their objects: the recorder skips them by identity.
        if previous is not None and step != 30 and step % 7 not in (0, 1):
            same = {s.frames: s for s in previous.stacks}
            assert any(s is same.get(s.frames) for s in got) or not got
        by_hand = {}
        for f in flows.values():
            key = (f.tid, f.stack_key)
            by_hand[key] = by_hand.get(key, Counters()) + f.counters
        assert {k: r.counters for k, r in book.rows.items()} == by_hand
        assert book.totals == sum(by_hand.values(), start=Counters())
        assert book.live_chunk_bytes == sum(f.live_chunk_bytes for f in flows.values())
        assert _bucket_sums(book.buckets) == _bucket_sums(BucketBook.of(flows.values())), step
        threads = aggregate_threads(rows, {}, [1000, 1001, 1002, 1003])
        per_tid_rows = [type(rows[0])(tid, (0, 0), c) for tid, c in book.per_tid.items()] if rows else []
        assert aggregate_threads(per_tid_rows, {}, [1000, 1001, 1002, 1003]) == threads
        previous = Snapshot(1, "x", float(step), stacks=got)


def _bucket_sums(book: BucketBook) -> dict:
    """What the arena accounting reads of each bucket that holds anything."""
    return {n: (b.live_bytes, b.live_chunk_bytes, b.freed_bytes, b.freed, set(b.tids))
            for n, b in book.buckets.items() if b.live_bytes or b.freed_bytes or b.live_chunk_bytes}


def _check_places(agg: StackAggregator) -> None:
    """Each stack's place, kept by number, is the one its stats give now."""
    from memtrace.collect.aggregate import _place

    rank = agg._ranks.rank
    for sid, st in enumerate(agg._stats):
        assert agg._places[sid] == (None if st is None else _place(st, rank[sid], sid)), sid


def test_rows_whose_bytes_moved_are_found_run_by_run():
    from memtrace.collect.probes import _moved_rows

    rng = random.Random(9)
    ks, cs = 32, 64
    used = 1000
    keys = bytearray(rng.randbytes(ks * used))
    counts = bytearray(rng.randbytes(cs * used))
    for _ in range(50):
        seen_keys, seen_counts = bytes(keys), bytes(counts)
        grown = rng.choice((0, 0, 3, 70))  # rows added since the last read
        keys += rng.randbytes(ks * grown)
        counts += rng.randbytes(cs * grown)
        n = used + grown
        for _ in range(rng.choice((0, 1, 5, 200))):
            i, which = rng.randrange(n), rng.random()
            buf, size = (keys, ks) if which < 0.2 else (counts, cs)
            buf[i * size + rng.randrange(size)] ^= 1 + rng.randrange(255)
        want = [i for i in range(n)
                if keys[i * ks:(i + 1) * ks] != seen_keys[i * ks:(i + 1) * ks]
                or counts[i * cs:(i + 1) * cs] != seen_counts[i * cs:(i + 1) * cs]]
        assert _moved_rows(bytes(keys), seen_keys, ks, bytes(counts), seen_counts, cs, n) == want
        used = n
    assert _moved_rows(b"", b"", ks, b"", b"", cs, 0) == []


def test_the_order_kept_in_blocks_is_a_sorted_list(monkeypatch):
    from memtrace.collect.aggregate import Ordered

    monkeypatch.setattr(Ordered, "LOAD", 4)  # blocks split and empty often
    rng = random.Random(2)
    order, want = Ordered(), {}
    for step in range(1500):
        r = rng.random()
        if r < 0.1:
            # Batches small beside the order go in one by one, from the block of the one before.
            batch = {rng.randrange(10_000): step for _ in range(rng.randrange(1, 60 if len(want) < 400 else 20))}
            batch = {k: v for k, v in batch.items() if k not in want}
            order.extend(list(batch.items()))
            want.update(batch)
        elif r < 0.55 or not want:
            key = rng.randrange(10_000)
            if key not in want:
                order.add(key, step)
                want[key] = step
        elif r < 0.7:
            key = rng.choice(list(want))
            order.remove(key)
            del want[key]
        elif r < 0.8:
            keys = rng.sample(list(want), rng.randrange(1, min(len(want), 40) + 1))
            order.remove_all(list(keys))
            for key in keys:
                del want[key]
        elif r < 0.9:
            key = rng.choice(list(want))
            order.replace(key, -step)
            want[key] = -step
        else:
            pairs = [(key, -step) for key in rng.sample(list(want), rng.randrange(1, min(len(want), 40) + 1))]
            order.replace_all(list(pairs))
            want.update(pairs)
        assert list(order.values()) == [want[k] for k in sorted(want)], step
        assert len(order) == len(want)


def test_stacks_not_named_within_the_budget_join_later(monkeypatch):
    import dataclasses
    import time

    from memtrace.collect import aggregate

    monkeypatch.setattr(aggregate, "NAMED_AT_LEAST", 2)

    book = RowBook()
    for i in range(40):
        book.put(i, None, Flow(1 + i % 3, (i, 0), 0, 100 + i, 0, 1, 0))
    changed = book.settle()
    named: list = []

    def slow_frames(key):
        time.sleep(0.002)
        named.append(key)
        return frames_for(key)

    def still(stacks):  # growth aside
        return [dataclasses.replace(s, live_delta_bytes=0) for s in stacks]

    agg = StackAggregator(127)
    got = agg.update(book.rows, changed, slow_frames, 1, {}, naming_budget_s=0.01)
    assert 0 < len(named) < 40 and agg.unnamed == 40 - len(named)
    rows = [r for r in book.rows.values() if r.stack_key in named]
    assert still(got) == still(aggregate_stacks(rows, frames_for, 127))
    for _ in range(40):
        if not agg.unnamed:
            break
        got = agg.update(book.rows, set(), slow_frames, 1, {}, naming_budget_s=0.01)
    assert agg.unnamed == 0 and sorted(named) == [(i, 0) for i in range(40)]
    assert still(got) == still(aggregate_stacks(list(book.rows.values()), frames_for, 127))


def test_frame_ranks_keep_the_frames_order(monkeypatch):
    """Ranks given one stack at a time, in batches, and renumbered when two
    neighbours leave no room (a small GAP), order stacks as their frames do."""
    from memtrace.collect.aggregate import FrameRanks

    monkeypatch.setattr(FrameRanks, "GAP", 8)
    monkeypatch.setattr(FrameRanks, "LIMIT", 1 << 14)  # the last ones run out of room too
    rng = random.Random(4)
    ranks, frames = FrameRanks(), []
    renumbered = 0
    for step in range(300):
        for _ in range(rng.choice((1, 1, 2, 40, 200))):
            f = tuple(f"f{rng.randrange(30)}" for _ in range(rng.randrange(1, 4)))
            if f not in frames:
                ranks.add(len(frames))
                frames.append(f)
        renumbered += ranks.rank_new(frames)
        by_rank = sorted(range(len(frames)), key=ranks.rank.__getitem__)
        assert by_rank == sorted(range(len(frames)), key=frames.__getitem__), step
        assert len(set(ranks.rank)) == len(frames)
        assert all(0 <= r < FrameRanks.LIMIT for r in ranks.rank)
    assert 1 < renumbered < 100


def test_incremental_aggregation_with_ranks_renumbered_often(monkeypatch):
    from memtrace.collect.aggregate import FrameRanks

    monkeypatch.setattr(FrameRanks, "GAP", 2)  # no room between neighbours: the order is rekeyed
    test_incremental_aggregation_equals_the_one_shot()


def test_marked_rows_are_the_words_equal_to_an_epoch():
    """probes.marked_rows against a word-by-word look: values that straddle
    two words (bytes of an epoch across a boundary) are not rows."""
    import struct

    from memtrace.collect.probes import marked_rows

    rng = random.Random(8)
    for step in range(50):
        words = [rng.choice((0, 1, 2, 3, 7, 0x0300000000000000, 0x0203, 3 << 56 | 2 << 48))
                 for _ in range(rng.randrange(0, 400))]
        marks = struct.pack(f"<{len(words)}Q", *words)
        epochs = [e for e in (rng.randrange(5), rng.randrange(5)) if e > 0]
        assert marked_rows(marks, epochs) == {i for i, w in enumerate(words) if w in epochs}, step
