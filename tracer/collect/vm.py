"""Address-space events from the kernel into the address-space model, and
the malloc_trim calls they report."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Callable, Optional

from memtrace.model.addrspace import (
    MAP_ANONYMOUS,
    PROT_EXEC,
    AddressSpace,
    VmEvent,
    parse_start_brk,
)
from memtrace.model.snapshot import TrimCall

VM_KINDS = {1: "mmap", 2: "munmap", 3: "brk", 4: "mprotect", 5: "mremap", 6: "madvise"}
VM_TRIM = 7
VM_CALLER = 8
IN_MALLOC_CALLER_FOLLOWS = 2  # bpf/memtrace.h
RECENT_TRIMS = 16
# A malloc call still open after this long lost its return: its held
# events are applied without their caller.
HOLD_LIMIT_NS = 200_000_000


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


APPLIED_KEPT = 4096


class VmTracker:
    def __init__(self, pid: int, on_code_mapped: Optional[Callable[[], None]] = None,
                 on_unwatched_trim: Optional[Callable[[], None]] = None) -> None:
        self.pid = pid
        self.on_unwatched_trim = on_unwatched_trim
        self.space = AddressSpace()
        self.on_code_mapped = on_code_mapped
        self.started_ns = time.monotonic_ns()
        self.trims: list[TrimCall] = []
        self.trim_returned_bytes = 0
        self.events = 0
        self.keep_events = False  # a recorder wants each event
        self.recent: list[VmEvent] = []
        # Events made inside a malloc call whose caller comes at its return
        # (VM_CALLER), per thread, held until then.
        self.held: dict[int, list[VmEvent]] = {}
        # An exec's time (CLOCK_MONOTONIC, as the events'): what came before
        # was the old image's, which the new seed replaced.
        self.not_before_ns = 0
        # The events applied last: an exec read late (netlink) reseeds from
        # the maps, and the new image's events already applied are applied
        # again on the new seed.
        self.applied: deque[VmEvent] = deque(maxlen=APPLIED_KEPT)

    def seed(self) -> None:
        """From /proc/PID/maps, before the first event is applied."""
        self.held.clear()
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                maps_text = f.read()
            with open(f"/proc/{self.pid}/stat") as f:
                start_brk = parse_start_brk(f.read())
        except OSError:
            return
        self.space.seed_from_maps(maps_text, start_brk=start_brk)

    def handle(self, raw, scanned: tuple[int, ...] = ()) -> None:
        """One `struct vm_event` from the ring buffer (light mode's mmaps
        come with the raw words at the top of the user stack)."""
        if raw.ts_ns < self.not_before_ns:
            return
        self.events += 1
        malloc_key = (raw.malloc_key.stack, raw.malloc_key.caller) if raw.in_malloc else None
        if raw.kind == VM_CALLER:
            for event in self.held.pop(raw.tid, []):
                self._apply(replace(event, malloc_stack_key=malloc_key))
            return
        if raw.tid in self.held and raw.in_malloc != IN_MALLOC_CALLER_FOLLOWS:
            self.release(raw.tid)  # the call's return was not seen
        if raw.kind == VM_TRIM:
            before, after = _signed(raw.new_len), _signed(raw.new_addr)
            measured = before > 0 and after > 0
            returned = max(0, before - after) if measured else 0
            self.trim_returned_bytes += returned
            self.trims.append(TrimCall(raw.tid, (raw.ts_ns - self.started_ns) / 1e9, returned,
                                       _signed(raw.result), measured))
            if not measured and self.on_unwatched_trim:
                self.on_unwatched_trim()
            del self.trims[:-RECENT_TRIMS]
            return
        kind = VM_KINDS.get(raw.kind)
        if kind is None:
            return
        event = VmEvent(
            ts_ns=raw.ts_ns,
            tid=raw.tid,
            kind=kind,
            addr=raw.addr,
            length=raw.len,
            prot=raw.prot if kind in ("mmap", "mprotect") else 0,
            flags=raw.prot if kind == "madvise" else raw.flags,
            new_addr=raw.new_addr,
            new_length=raw.new_len,
            result=_signed(raw.result),
            stack_key=(raw.stack, 0),
            in_malloc=bool(raw.in_malloc),
            malloc_stack_key=malloc_key,
            scanned=scanned,
        )
        if raw.in_malloc == IN_MALLOC_CALLER_FOLLOWS:
            self.held.setdefault(raw.tid, []).append(event)
        else:
            self._apply(event)

    def release(self, tid: Optional[int] = None, before_ns: Optional[int] = None) -> None:
        """Apply held events without waiting longer for their caller: one
        thread's, or every thread's whose first held event is older than
        before_ns (a call that long is one whose return was lost), or all."""
        for t in [tid] if tid is not None else list(self.held):
            held = self.held.get(t)
            if held and (before_ns is None or held[0].ts_ns < before_ns):
                for event in self.held.pop(t):
                    self._apply(event)

    def reseed_after_exec(self, exec_ns: int) -> None:
        """A new image since exec_ns: the model from its maps, and its
        events seen so far; older events are the old image's, and dropped."""
        self.not_before_ns = exec_ns
        since = [e for e in self.applied if e.ts_ns >= exec_ns]
        self.seed()
        for event in since:
            self.space.apply(event)

    def _apply(self, event: VmEvent) -> None:
        self.applied.append(event)
        self.space.apply(event)
        if self.keep_events:
            self.recent.append(event)
        if (event.kind == "mmap" and event.prot & PROT_EXEC and not event.flags & MAP_ANONYMOUS
                and not event.failed and self.on_code_mapped):
            # A library arrived: learn where it is while the process lives.
            self.on_code_mapped()


    def take_recent(self) -> list[VmEvent]:
        events, self.recent = self.recent, []
        return events
