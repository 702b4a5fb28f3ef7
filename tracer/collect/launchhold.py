"""A launched command held once at the end of ld.so's startup work, while
memtrace is still its ptrace tracer (process/launch.py): bpf/launch.bpf.c
raises HOLD_SIGNAL in it when ld.so has mapped every library the program
needs, the kernel stops it for us, the libraries' unwind tables go in, and
it is released with the signal cancelled. Its first calls are then walked
whole, however soon it starts threads."""

from __future__ import annotations

import signal
import time
from typing import Callable, Optional

from memtrace.process import procfs
from memtrace.symbols.elf import exported_objects, symbols_of
from memtrace.symbols.symbolizer import code_modules, read_mapped

# Ignored unless a handler is set, and none is at startup: should memtrace
# die while the command is held, the kernel delivers it, to no effect.
HOLD_SIGNAL = signal.SIGURG
# struct r_debug (glibc's <link.h>): int r_version, then the pointers
# r_map and r_brk, then enum r_state.
R_STATE_OFFSET = 24


class LibrariesHold:
    """What the launcher needs to hold the command (Launched.release)."""

    signal = HOLD_SIGNAL

    def __init__(self, probes, then: Callable[[], None]) -> None:
        self._probes = probes
        self._then = then
        self.held_s: Optional[float] = None  # how long the command stood still

    def disarm(self) -> None:
        self._probes.set_launch_hold(0, 0)

    def reached(self) -> None:
        """The command is stopped with its libraries mapped: then()."""
        started = time.monotonic()
        try:
            self._then()
        except Exception:  # noqa: BLE001 — the command runs on; its first stacks may be cut
            return
        self.held_s = time.monotonic() - started


def hold_at_libraries(probes, pid: int, then: Callable[[], None]) -> Optional[LibrariesHold]:
    """Arm the hold for launched process pid, stopped after its exec, to
    call then() once ld.so has mapped its libraries; None where there is
    nothing to hold for: a static program (no ld.so), an ld.so that is not
    glibc's, or no unwind tables."""
    if probes.unwind is None:
        return None
    for module in code_modules(procfs.maps(pid)):
        exported = read_mapped(pid, module, exported_objects) or {}
        if "_r_debug" not in exported:
            continue
        elf = read_mapped(pid, module, symbols_of)
        vaddr = elf.vaddr_of_offset(module.file_offset) if elf is not None else None
        if vaddr is None or not read_mapped(pid, module, probes.watch_loader):
            return None
        probes.set_launch_hold(module.start - vaddr + exported["_r_debug"] + R_STATE_OFFSET,
                               HOLD_SIGNAL)
        return LibrariesHold(probes, then)
    return None
