"""Runs memtrace with process CPU timed around named stages of a snapshot
and around the cyclic collector's passes, and prints each one's CPU ms per
snapshot to stderr when memtrace ends: from the snapshot after --after on,
the final snapshot left out. For bench/scale.py --stages; usable alone:

    sudo .venv/bin/python bench/stages.py [--after N] -- MEMTRACE ARGS

A stage's time includes the stages it calls: the table says which are
inside which by indentation. Only stages called a few times a snapshot
are timed, so that the timer's own cost stays out of the figures: nothing
called once per row."""

from __future__ import annotations

import functools
import gc
import importlib
import sys
import time

# (dotted owner, attribute, depth in the table)
STAGES = (
    ("memtrace.collect.collector.Collector", "snapshot", 0),
    ("memtrace.collect.probes.Probes", "read", 1),
    ("memtrace.collect.probes.Probes", "_flows", 2),
    ("memtrace.collect.rows.RowBook", "settle", 2),
    ("memtrace.collect.collector.Collector", "_refresh_process", 1),
    ("memtrace.collect.collector.Collector", "_read_arenas", 1),
    ("memtrace.model.accounting", "account_allocator", 1),
    ("memtrace.collect.collector.Collector", "_aggregate_stacks", 1),
    ("memtrace.collect.aggregate.StackAggregator", "update", 2),
    ("memtrace.collect.collector.Collector", "_threads", 1),
    ("memtrace.output.sinks.record.RecordSink", "update", 0),
    ("memtrace.record.recorder.Recorder", "_write_stacks", 1),
)

# Per snapshot (from the start of one Collector.snapshot to the next), the
# CPU seconds of each stage: the last one (the final snapshot, which reads
# and names everything once more) is left out of the figures.
_spent: list[dict[str, float]] = [{}]
_after = [3]


def _owner(dotted: str):
    module, _, rest = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), rest)
    except (ImportError, AttributeError):
        return importlib.import_module(dotted)


def _add(name: str, seconds: float) -> None:
    spent = _spent[-1]
    spent[name] = spent.get(name, 0.0) + seconds


def _timed(name: str, fn, counts: bool):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if counts:
            _spent.append({})
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, time.process_time() - start)
    return wrapper


def _time_collections() -> None:
    """The cyclic collector's passes, timed as one more stage: those it
    started itself, and those called (gc.collect())."""
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            how = "automatic" if gc.isenabled() else "called"
            _add(f"gc generation {info['generation']}, {how}", time.process_time() - started[0])

    gc.callbacks.append(callback)


def _report() -> None:
    counted = _spent[1 + _after[0]:-1]  # [0]: before the first snapshot
    if not counted:
        return
    n = len(counted)
    total = {}
    for spent in counted:
        for name, seconds in spent.items():
            total[name] = total.get(name, 0.0) + seconds
    print(f"\n-- CPU ms per snapshot, {n} snapshots after the first {_after[0]}, the last left out --",
          file=sys.stderr)
    for owner, attr, depth in STAGES:
        name = f"{owner.rsplit('.', 1)[-1]}.{attr}"
        if name in total:
            print(f"{'  ' * depth}{name:<{44 - 2 * depth}} {1000 * total[name] / n:7.1f}", file=sys.stderr)
    for name in sorted(k for k in total if k.startswith("gc ")):
        print(f"{name:<44} {1000 * total[name] / n:7.1f}", file=sys.stderr)


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--after"]:
        _after[0], argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    for owner, attr, _ in STAGES:
        holder = _owner(owner)
        name = f"{owner.rsplit('.', 1)[-1]}.{attr}"
        setattr(holder, attr, _timed(name, getattr(holder, attr), attr == "snapshot"))
    import atexit

    from memtrace.cli import run  # ends the process itself, after the atexit functions

    _time_collections()
    atexit.register(_report)
    sys.argv = ["memtrace"] + argv
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
