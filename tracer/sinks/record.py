"""`--record FILE`: the session kept in a recording, interval by interval."""

from __future__ import annotations

from typing import Any, Mapping

from memtrace.model import Snapshot
from memtrace.record.recorder import Recorder


class RecordSink:
    def __init__(self, path: str, metadata: Mapping[str, Any]) -> None:
        self.recorder = Recorder(path, metadata)

    def update(self, snapshot: Snapshot) -> None:
        if snapshot.vm_events:
            self.recorder.write_events(snapshot.vm_events)
        self.recorder.write(snapshot)

    def close(self, final: Snapshot) -> None:
        self.update(final)
        self.recorder.close()

    def abort(self) -> None:
        self.recorder.close()
