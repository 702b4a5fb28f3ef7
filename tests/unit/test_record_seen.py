"""The recorder's quick path (memtrace.record.seen): the stacks that are
new objects since the previous snapshot, found by identity, give the very
file that comparing every stack gives, whatever the snapshots do: stacks
kept as they were, changed, growing, gone, back, two with the same frames,
one object twice, an order that is not the model's. No root, no BPF."""

from __future__ import annotations

import dataclasses
import random
import sqlite3

from memtrace.model.snapshot import Counters, Snapshot, StackStats
from memtrace.record import recorder, seen
from memtrace.record.reader import open_recording
from memtrace.record.recorder import Recorder, stack_sort_key

TABLES = ("frames", "stacks", "changes", "snapshots")


def _snapshots(seed: int, steps: int = 80):
    rng = random.Random(seed)
    live: dict[tuple, StackStats] = {}
    for step in range(steps):
        for frames, st in list(live.items()):
            r = rng.random()
            if r < 0.05:
                del live[frames]
            elif r < 0.2:
                a = st.counters.alloc_bytes + rng.randrange(1, 900)
                c = Counters(a, min(a, st.counters.free_bytes + rng.randrange(0, 900)), 2, 1)
                live[frames] = dataclasses.replace(st, counters=c, live_delta_bytes=c.live_bytes - st.counters.live_bytes)
            elif r < 0.3 and st.live_delta_bytes:
                live[frames] = dataclasses.replace(st, live_delta_bytes=0)  # grows no more
            elif r < 0.33:
                live[frames] = dataclasses.replace(st, retained_bytes=4096 * rng.randrange(3), tids=(1, 2))
            # else: the same object, growing or not
        for _ in range(rng.randrange(6)):
            frames = tuple(f"f{rng.randrange(40)}+0x{d:x} [app]" for d in range(rng.randrange(1, 4)))
            if frames not in live:
                n = rng.randrange(1, 5000)
                live[frames] = StackStats(frames, (1,), Counters(n, 0, 1, 0), rng.random() < 0.1, n)
        stacks = sorted(live.values(), key=stack_sort_key)
        r = rng.random()
        if r < 0.04 and len(stacks) > 2:
            stacks[0], stacks[-1] = stacks[-1], stacks[0]  # not the model's order
        elif r < 0.07 and stacks:
            stacks.append(stacks[0])  # one object twice
        elif r < 0.10 and stacks:
            twin = dataclasses.replace(stacks[-1], counters=Counters(1, 0, 1, 0))
            stacks.append(twin)  # two stacks with the same frames
        yield Snapshot(1, "x", float(step), stacks=tuple(stacks))


def _record(path, snapshots) -> dict:
    with Recorder(str(path)) as rec:
        for snap in snapshots:
            rec.write(snap)
    db = sqlite3.connect(path)
    try:
        return {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in TABLES}  # in the order written
    finally:
        db.close()


def test_the_quick_path_writes_what_the_whole_comparison_writes(tmp_path, monkeypatch):
    for seed in range(6):
        snaps = list(_snapshots(seed))
        quick = _record(tmp_path / f"quick{seed}.memtrace", snaps)
        with monkeypatch.context() as m:
            m.setattr(seen.SeenStacks, "since", lambda self, stacks, key: None)
            whole = _record(tmp_path / f"whole{seed}.memtrace", snaps)
        assert quick == whole, seed
        with open_recording(str(tmp_path / f"quick{seed}.memtrace")) as r:
            got = [r.snapshot(i).stacks for i in range(len(snaps))]
        assert [list(g) for g in got] == [list(s.stacks) for s in snaps], seed


def test_the_collectors_own_account_of_changes_writes_what_comparing_writes(tmp_path, monkeypatch):
    """Stacks from memtrace.collect.aggregate say themselves what changed
    (memtrace.model.snapshot.StackChanges): the recording reads back the same as
    when every stack is compared."""
    from memtrace.collect.aggregate import StackAggregator
    from memtrace.collect.rows import RowBook
    from memtrace.model.snapshot import Flow

    def made():
        """Each snapshot recorded before the next is made, as in a trace:
        a StackChanges tells only against the latest."""
        rng = random.Random(11)
        book, agg, flows = RowBook(), StackAggregator(127), {}
        for step in range(70):
            for _ in range(rng.randint(0, 25)):
                slot = rng.randrange(150)
                old = flows.get(slot)
                if old is not None and rng.random() < 0.1:
                    new = None
                else:
                    a = (old.alloc_bytes if old else 0) + rng.randrange(1, 5000)
                    f = (old.free_bytes if old else 0) + rng.randrange(0, 3000)
                    new = Flow(old.tid if old else 1 + rng.randrange(3),
                               old.stack_key if old else (rng.randrange(80), 0), 0, a, min(a, f), 1, 0)
                flows.pop(slot, None) if new is None else flows.__setitem__(slot, new)
                book.put(slot, old, new)
            changed = book.settle()
            retained = {k: 4096 for k in sorted({r.stack_key for r in book.rows.values()})[:3]} if step % 5 else {}
            stacks = agg.update(book.rows, changed if step != 40 else None,
                                lambda k: (f"fn{k[0] % 50}+0x1 [app]", "start_thread+0x7d [libc.so.6]"),
                                1, retained)
            snaps.append(Snapshot(1, "x", float(step), stacks=stacks))
            yield snaps[-1]

    def unpaired(self, stacks, key):
        found = since(self, stacks, key)
        return None if found is None else (*found[:3], None)

    def spy_paired(calls):
        def spy(self, *args):
            calls.append(1)
            return write_replaced(self, *args)
        return spy

    write_replaced = recorder.Recorder._write_replaced
    snaps: list[Snapshot] = []
    told_by_collector = []
    since = seen.SeenStacks.since

    def spy(self, stacks, key):
        told_by_collector.append(getattr(stacks, "since", None) is self.stacks)
        return since(self, stacks, key)

    with monkeypatch.context() as m:
        m.setattr(seen.SeenStacks, "since", spy)
        told = _record(tmp_path / "told.memtrace", made())
    assert sum(told_by_collector) > 50
    with monkeypatch.context() as m:
        m.setattr(seen.SeenStacks, "since", lambda self, stacks, key: None)
        whole = _record(tmp_path / "whole.memtrace", snaps)
    # Entity ids may be handed out in another order: the snapshots read
    # back are the same, each in the model's order.
    assert [row[-1] for row in told["snapshots"]] == [row[-1] for row in whole["snapshots"]]
    with open_recording(str(tmp_path / "told.memtrace")) as r:
        assert [tuple(r.snapshot(i).stacks) for i in range(len(snaps))] == [tuple(s.stacks) for s in snaps]
    # Told which object each new one replaced, or left to pair them by their
    # frames (StackChanges.replaced), the recorder writes the same file.
    snaps.clear()
    with monkeypatch.context() as m:
        m.setattr(seen.SeenStacks, "since", unpaired)
        by_frames = _record(tmp_path / "by_frames.memtrace", made())
    assert by_frames == told
    snaps.clear()
    paired = []
    with monkeypatch.context() as m:
        m.setattr(recorder.Recorder, "_write_replaced", spy_paired(paired))
        again = _record(tmp_path / "again.memtrace", made())
    assert again == told and sum(paired) > 50
