"""VmTracker: events made inside a malloc call whose caller is known only at
its return wait for it (IN_MALLOC_CALLER_FOLLOWS, then VM_CALLER)."""

from types import SimpleNamespace

from memtrace.collect.vm import IN_MALLOC_CALLER_FOLLOWS, VM_CALLER, VmTracker

MMAP, MPROTECT = 1, 4
PROT_NONE, PROT_RW = 0, 3
MAP_PRIVATE_ANON_NORESERVE = 0x22 | 0x4000


def raw(kind, tid=7, ts_ns=1_000, in_malloc=0, stack=0, caller=0, addr=0, length=0, prot=0,
        flags=0, result=0):
    return SimpleNamespace(
        ts_ns=ts_ns, tid=tid, kind=kind, addr=addr, len=length, prot=prot, flags=flags,
        new_len=0, new_addr=0, result=result, stack=0, in_malloc=in_malloc,
        malloc_key=SimpleNamespace(stack=stack, caller=caller))


def tracker() -> VmTracker:
    t = VmTracker(pid=0)
    t.keep_events = True
    return t


def heap_mmap(tid=7, ts_ns=1_000):
    return raw(MMAP, tid=tid, ts_ns=ts_ns, in_malloc=IN_MALLOC_CALLER_FOLLOWS, stack=0x51,
               length=64 << 20, prot=PROT_NONE, flags=MAP_PRIVATE_ANON_NORESERVE,
               result=0x7F0000000000)


def test_events_wait_for_the_caller_of_their_malloc_call():
    t = tracker()
    t.handle(heap_mmap())
    t.handle(raw(MPROTECT, in_malloc=IN_MALLOC_CALLER_FOLLOWS, stack=0x51,
                 addr=0x7F0000000000, length=132 << 10, prot=PROT_RW))
    assert t.take_recent() == []  # held: nothing applied yet
    t.handle(raw(VM_CALLER, in_malloc=1, stack=0x51, caller=0x401234))
    events = t.take_recent()
    assert [e.kind for e in events] == ["mmap", "mprotect"]
    assert all(e.in_malloc and e.malloc_stack_key == (0x51, 0x401234) for e in events)
    assert t.held == {}


def test_a_later_event_of_the_thread_releases_a_call_whose_return_was_lost():
    t = tracker()
    t.handle(heap_mmap())
    t.handle(raw(MPROTECT, addr=0x7F0000000000, length=4096, prot=PROT_RW))  # not in malloc
    events = t.take_recent()
    assert [e.kind for e in events] == ["mmap", "mprotect"]
    assert events[0].malloc_stack_key == (0x51, 0)


def test_other_threads_do_not_release_it():
    t = tracker()
    t.handle(heap_mmap(tid=7))
    t.handle(raw(MPROTECT, tid=8, addr=0x1000, length=4096, prot=PROT_RW))
    assert [e.tid for e in t.take_recent()] == [8]
    assert list(t.held) == [7]


def test_release_by_age_keeps_calls_still_in_flight():
    t = tracker()
    t.handle(heap_mmap(tid=7, ts_ns=1_000))
    t.handle(heap_mmap(tid=8, ts_ns=9_000))
    t.release(before_ns=5_000)
    assert [e.tid for e in t.take_recent()] == [7]
    t.release()
    assert [e.tid for e in t.take_recent()] == [8]
