"""The collector's side of a HotSpot target: once the JVM's interpreter
is generated, tell the frame walk where it is, and where its compiled code
is (bpf/jvm.bpf.c); keep its
flags and NMT summary fresh (memtrace.jvm.diagnostics); and hand the
snapshot a `JvmStats`. Nothing here waits on the JVM but `settle`, at the
end of a trace."""

from __future__ import annotations

import time
from typing import Optional

from memtrace.jvm.diagnostics import JvmDiagnostics
from memtrace.model.snapshot import JvmStats
from memtrace.model.notes import Note

CODE_REFRESH_S = 1.0


class JvmWatch:
    def __init__(self, symbols, probes, started: float) -> None:
        """symbols: the target's Symbolizer (it notices the JVM); probes:
        the loaded BPF program; started: time.monotonic() of the trace."""
        self.symbols = symbols
        self.probes = probes
        self.started = started
        self.diagnostics: Optional[JvmDiagnostics] = None
        self.interpreter: Optional[tuple[int, int]] = None
        # Where the compiled code is, for the walk: None until read.
        self.code_heaps = None
        self._code_generation = 0
        self._next_code_read = 0.0

    def reset(self) -> None:
        """The process exec'd: its old JVM's interpreter and code heaps are
        gone (the walk would take the new image's code for them until it
        failed the walk's checks), and a JVM the new image may start is
        met afresh."""
        if self.interpreter is not None:
            self.probes.set_jvm_interpreter(0, 0)  # off: no frame is the interpreter's
        if self.code_heaps is not None:
            self._code_generation += 1
            self.probes.set_jvm_code((), {}, self._code_generation)
        self.interpreter = None
        self.code_heaps = None
        self.diagnostics = None
        self._next_code_read = 0.0

    def tick(self) -> None:
        """Each snapshot while the target runs."""
        java = self.symbols.java
        if self.symbols.perf_map is None or java is None:
            return  # not a JVM (yet: libjvm.so is loaded by the launcher)
        if self.interpreter is None:
            self.interpreter = java.interpreter()
            if self.interpreter is not None:
                self.probes.set_jvm_interpreter(*self.interpreter)
        if self.interpreter is not None:
            self._refresh_compiled_code(java)
        if self.diagnostics is None and java.hotspot:  # its flags and jcmd's commands
            self.diagnostics = JvmDiagnostics(self.symbols.perf_map)
        if self.diagnostics is not None:
            self.diagnostics.tick()

    def _refresh_compiled_code(self, java) -> None:
        """The code heaps once the JVM made them, and a new generation every
        CODE_REFRESH_S: code is freed and reused, and what the walk found
        for a pc holds until then."""
        now = time.monotonic()
        if now < self._next_code_read:
            return
        self._next_code_read = now + CODE_REFRESH_S
        if self.code_heaps is None:
            self.code_heaps = java.code_heaps()
            if self.code_heaps is None:
                return
        self._code_generation += 1
        self.probes.set_jvm_code(self.code_heaps, java.code_layout.walk_fields(),
                                 self._code_generation)

    def settle(self, timeout_s: float) -> None:
        if self.diagnostics is not None:
            self.diagnostics.settle(timeout_s)

    def problems(self) -> list[Note]:
        """Why JVM frames stay unnamed, for the notes."""
        found = [self.symbols.perf_map.problem if self.symbols.perf_map is not None else None,
                 self.symbols.java.problem if self.symbols.java is not None else None]
        return [p for p in found if p]

    def stats(self) -> Optional[JvmStats]:
        d = self.diagnostics
        if d is None:
            return None
        nmt = d.nmt
        return JvmStats(
            preserve_frame_pointer=d.preserve_frame_pointer,
            interpreter_found=self.interpreter is not None,
            compiled_frames_walked=self.code_heaps is not None,
            nmt_malloc_bytes=nmt.malloc_bytes if nmt else None,
            nmt_malloc_count=nmt.malloc_count if nmt else None,
            nmt_elapsed_s=round(max(0.0, d.nmt_elapsed - self.started), 3)
            if nmt and d.nmt_elapsed is not None else None,
        )
