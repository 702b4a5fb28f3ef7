"""Address-space events from the kernel into the address-space model, and
the malloc_trim calls they report."""

from __future__ import annotations

import time
from typing import Callable, Optional

from memtrace.addrspace import (
    MAP_ANONYMOUS,
    PROT_EXEC,
    AddressSpace,
    VmEvent,
    parse_start_brk,
)
from memtrace.model import TrimCall

VM_KINDS = {1: "mmap", 2: "munmap", 3: "brk", 4: "mprotect", 5: "mremap", 6: "madvise"}
VM_TRIM = 7
RECENT_TRIMS = 16


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class VmTracker:
    def __init__(self, pid: int, on_code_mapped: Optional[Callable[[], None]] = None) -> None:
        self.pid = pid
        self.space = AddressSpace()
        self.on_code_mapped = on_code_mapped
        self.started_ns = time.monotonic_ns()
        self.trims: list[TrimCall] = []
        self.trim_returned_bytes = 0
        self.events = 0
        self.keep_events = False  # a recorder wants each event
        self.recent: list[VmEvent] = []

    def seed(self) -> None:
        """From /proc/PID/maps, before the first event is applied."""
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
        self.events += 1
        malloc_key = (raw.malloc_key.stack, raw.malloc_key.caller) if raw.in_malloc else None
        if raw.kind == VM_TRIM:
            before, after = _signed(raw.new_len), _signed(raw.new_addr)
            returned = max(0, before - after) if before > 0 and after > 0 else 0
            self.trim_returned_bytes += returned
            self.trims.append(TrimCall(raw.tid, (raw.ts_ns - self.started_ns) / 1e9, returned,
                                       _signed(raw.result)))
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
        self.space.apply(event)
        if self.keep_events:
            self.recent.append(event)
        if (kind == "mmap" and raw.prot & PROT_EXEC and not raw.flags & MAP_ANONYMOUS
                and not event.failed and self.on_code_mapped):
            # A library arrived: learn where it is while the process lives.
            self.on_code_mapped()


    def take_recent(self) -> list[VmEvent]:
        events, self.recent = self.recent, []
        return events
