"""SharedProbes' bookkeeping, with the kernel's maps as dicts: each
process's events reach its own handler, and a process that goes takes its
entry and the stacks only it named."""

from __future__ import annotations

import ctypes

from memtrace.collect.probes import Limits, set_traced
from memtrace.collect.shared import SharedProbes


class Key(ctypes.Structure):
    _fields_ = [("stack", ctypes.c_uint64)]


class Event(ctypes.Structure):
    _fields_ = [("tgid", ctypes.c_uint32), ("stack", ctypes.c_uint64),
                ("in_malloc", ctypes.c_uint32), ("malloc_key", Key)]


class Table(dict):
    """A BPF table as bcc shows it, keyed by plain ints inside."""

    def __init__(self, empty=None) -> None:
        super().__init__()
        self.empty = empty  # an array's value where nothing was written
        self.Leaf = lambda: "state"

    def __getitem__(self, key):
        key = getattr(key, "value", key)
        if key not in self and self.empty is not None:
            return self.empty
        return super().__getitem__(key)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(getattr(key, "value", key), value)

    def __delitem__(self, key) -> None:
        super().__delitem__(getattr(key, "value", key))


class FakeBpf(dict):
    def __init__(self) -> None:
        super().__init__(targets=Table(), stacks=Table(),
                         traced_tgids=Table(empty=ctypes.c_ulonglong(0)))

    def ring_buffer_consume(self) -> None:
        pass

    def traced(self) -> set[int]:
        bits = self["traced_tgids"]
        return {word * 64 + i for word, v in bits.items() for i in range(64) if v.value >> i & 1}


def shared_with(*pids: int) -> SharedProbes:
    shared = SharedProbes(Limits())
    shared.host._bpf = FakeBpf()
    for pid in pids:
        shared.add(pid)
        set_traced(shared.bpf, pid, True)
    return shared


def event(tgid: int, stack: int, malloc_stack: int = 0) -> Event:
    return Event(tgid, stack, 1 if malloc_stack else 0, Key(malloc_stack))


def test_events_go_to_their_process_and_wait_for_its_handler():
    shared = shared_with(10, 20)
    seen: dict[int, list] = {10: [], 20: []}
    shared.listen(10, lambda e: seen[10].append(e.stack))
    shared._dispatch(event(10, 1))
    shared._dispatch(event(20, 2))  # before its handler: kept, then replayed
    shared._dispatch(event(30, 3))  # not traced (any more): dropped
    shared.listen(20, lambda e: seen[20].append(e.stack))
    assert seen == {10: [1], 20: [2]}


def test_a_process_that_goes_takes_its_entry_and_its_own_stacks():
    shared = shared_with(10, 20, 30, 74)
    assert shared.bpf.traced() == {10, 20, 30, 74}
    shared.remove(30)  # the same word as 10 and 20
    shared.remove(74)
    for key in (1, 2, 3, 4):
        shared.bpf["stacks"][key] = "frames"
    shared.listen(10, lambda e: None)
    shared.listen(20, lambda e: None)
    shared._dispatch(event(10, 1, malloc_stack=2))
    shared._dispatch(event(10, 3))
    shared._dispatch(event(20, 3))  # shared by both
    shared.remove(10)
    assert set(shared.bpf["targets"]) == {20} and shared.bpf.traced() == {20}
    assert set(shared.bpf["stacks"]) == {3, 4}
    shared.remove(20)  # the last one: whatever is left goes too
    assert not shared.bpf["targets"] and not shared.bpf["stacks"] and not shared.bpf.traced()
