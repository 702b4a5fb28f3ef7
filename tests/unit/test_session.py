"""The session loop's handling of Python's cyclic collector: off while a
snapshot is made and handed to the sinks, what lives then frozen, what
the loop made in between collected first."""

from __future__ import annotations

import gc
import os
import weakref

from memtrace.cli.session import Session
from memtrace.record.synthetic import session as synthetic_session


SNAPS = list(synthetic_session(3, stacks=5, threads=2, regions=2))


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_no_collector_pass_runs_while_a_snapshot_is_made_and_its_objects_end_frozen():
    snaps = SNAPS
    seen = {"enabled during snapshot": [], "enabled in sinks": [], "passes": 0}
    made: list[object] = []

    def counting(phase, info):
        if phase == "start":
            seen["passes"] += 1

    def snapshot(**kw):
        seen["enabled during snapshot"].append(gc.isenabled())
        if not kw:
            before = seen["passes"]
            # More than gen 0's threshold: a pass would run, were it allowed to.
            made.extend([i] for i in range(5 * gc.get_threshold()[0]))
            seen["passes during"] = seen.get("passes during", 0) + seen["passes"] - before
        return snaps[min(len(seen["enabled during snapshot"]), len(snaps)) - 1]

    class Sink:
        def update(self, snap):
            seen["enabled in sinks"].append(gc.isenabled())

    frozen = gc.get_freeze_count()
    gc.callbacks.append(counting)
    try:
        Session(os.getpid(), snapshot, lambda: None, [Sink()], 0.05, duration_s=0.3).run()
        frozen = gc.get_freeze_count() - frozen
    finally:
        gc.callbacks.remove(counting)
        gc.unfreeze()
    assert seen["enabled during snapshot"][:-1] and not any(seen["enabled during snapshot"][:-1])
    assert seen["enabled in sinks"] and not any(seen["enabled in sinks"])
    assert seen["passes during"] == 0
    assert gc.isenabled()
    assert frozen >= len(made)  # what the snapshots made was frozen


def test_cycles_the_loop_made_between_snapshots_are_collected_before_the_freeze():
    gone = []

    def snapshot(**kw):
        if not kw and not gone:
            c = Cycle()
            gone.append(weakref.ref(c))  # made in a snapshot: frozen with it
            del c
        return SNAPS[0]

    class Sink:
        made = []

        def update(self, snap):
            pass

    def on_watch():
        c = Cycle()  # made by the loop between snapshots, as netlink news is
        Sink.made.append(weakref.ref(c))

    r, w = os.pipe()
    try:
        os.write(w, b"x" * 64)
        Session(os.getpid(), snapshot, lambda: None, [Sink()], 0.05, duration_s=0.3,
                watch_fds=[r], on_watch=lambda: (os.read(r, 1), on_watch())).run()
    finally:
        os.close(r)
        os.close(w)
        gc.unfreeze()
    # The loop's cycles went at the next snapshot's start (all but the last few).
    assert len(Sink.made) > 2
    collected = [ref for ref in Sink.made[:-2] if ref() is None]
    assert Sink.made and len(collected) == len(Sink.made[:-2])
    gc.collect()
    assert gone and gone[0]() is None  # and a frozen one goes at a full collection
