"""`--record FILE`: the session kept in a recording, interval by interval.

A recording that fails (a full disk, an I/O error) stops, and the trace goes
on: the sinks after it (the view, JSON) get every snapshot with a note saying
where the recording stopped and what it holds. That is why this sink passes
snapshots on rather than sitting beside the others."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from memtrace.errors import MemtraceError
from memtrace.model import notes
from memtrace.model.notes import Note
from memtrace.model.snapshot import Snapshot
from memtrace.record.recorder import Recorder


class RecordSink:
    def __init__(self, path: str, metadata: Mapping[str, Any], then: Optional[list] = None) -> None:
        self.recorder = Recorder(path, metadata)
        self.then = then or []
        self.note: Optional[Note] = None  # set once the recording stopped
        self._written = 0

    def update(self, snapshot: Snapshot) -> None:
        self._record(snapshot)
        snapshot = self._noted(snapshot)
        for sink in self.then:
            sink.update(snapshot)

    def close(self, final: Snapshot) -> None:
        try:
            self._record(final)
            if self.note is None:
                try:
                    self.recorder.close()
                except MemtraceError as e:
                    self.note = Note.of(notes.RECORDING_UNFINISHED, reason=str(e))
        finally:
            # The summary and the JSON come out whatever happened here.
            final = self._noted(final)
            for sink in self.then:
                sink.close(final)

    def abort(self) -> None:
        try:
            self.recorder.close()
        except MemtraceError:
            pass  # the trace is failing already; its error is the one to show
        finally:
            for sink in self.then:
                abort = getattr(sink, "abort", None)
                if abort:
                    abort()

    def _record(self, snapshot: Snapshot) -> None:
        if self.note is not None:
            return
        try:
            if snapshot.vm_events:
                self.recorder.write_events(snapshot.vm_events)
            self.recorder.write(snapshot)
            self._written += 1
        except MemtraceError as e:
            # The recorder rolled back and closed: the file holds the
            # snapshots written before this one.
            self.note = Note.of(notes.RECORDING_STOPPED, at_s=round(snapshot.elapsed_s, 1),
                                reason=str(e), snapshots=self._written)

    def _noted(self, snapshot: Snapshot) -> Snapshot:
        if self.note is None:
            return snapshot
        return dataclasses.replace(snapshot, notes=(*snapshot.notes, self.note))
