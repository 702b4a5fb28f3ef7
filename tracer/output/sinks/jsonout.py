"""`--json`: the final snapshot as one JSON document on stdout (or in the
file of `-o`); `--json-stream`: every snapshot, one JSON object per line. Both written by
the one JSON writer (memtrace.output.reports.jsonreport), keeping the stacks
that --top and --min-size leave."""

from __future__ import annotations

import io
import sys
from typing import Optional, TextIO

from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Snapshot
from memtrace.output.reports.select import StackPolicy
from memtrace.output.reports.common import ReportData
from memtrace.output.reports.jsonreport import write_json


class JsonSink:
    """The final snapshot, on stdout or (`-o FILE`) in a file written whole
    at the end: a trace that fails before leaves the file as it was."""

    def __init__(self, policy: StackPolicy, out: TextIO = sys.stdout,
                 path: Optional[str] = None) -> None:
        self.policy = policy
        self.out = out
        self.path = path

    def _data(self, snapshot: Snapshot) -> ReportData:
        return ReportData(snapshot=snapshot, trace_end=True, policy=self.policy)

    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self, final: Snapshot) -> None:
        if self.path is None:
            write_json(self._data(final), self.out)
            self.out.flush()
            return
        text = io.StringIO()
        write_json(self._data(final), text)
        try:
            with open(self.path, "w") as f:
                f.write(text.getvalue())
        except OSError as e:
            raise MemtraceError(f"cannot write {self.path}: {e.strerror}") from None


class JsonStreamSink(JsonSink):
    """One line per interval, and the final snapshot as the last line: for
    `jq`, a log shipper or a test that watches a trace as it goes. With
    `-o FILE` the lines go to the file as they come (tail -f works); it
    is opened at the first line, so a trace that fails before leaves none."""

    def __init__(self, policy: StackPolicy, out: TextIO = sys.stdout,
                 path: Optional[str] = None) -> None:
        super().__init__(policy, out, path)
        self._file: Optional[TextIO] = None

    def _line(self, snapshot: Snapshot) -> None:
        out = self.out
        if self.path is not None:
            if self._file is None:
                try:
                    self._file = open(self.path, "w", buffering=1)
                except OSError as e:
                    raise MemtraceError(f"cannot write {self.path}: {e.strerror}") from None
            out = self._file
        write_json(self._data(snapshot), out, one_line=True)
        out.flush()

    def update(self, snapshot: Snapshot) -> None:
        self._line(snapshot)

    def close(self, final: Snapshot) -> None:
        self._line(final)
        self.abort()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
