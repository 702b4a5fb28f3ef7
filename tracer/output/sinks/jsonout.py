"""`--json`: the final snapshot as one JSON document on stdout;
`--json-stream`: every snapshot, one JSON object per line. Both written by
the one JSON writer (memtrace.output.reports.jsonreport), keeping the stacks
that --top and --min-size leave."""

from __future__ import annotations

import sys
from typing import TextIO

from memtrace.model.snapshot import Snapshot
from memtrace.output.reports.select import StackPolicy
from memtrace.output.reports.common import ReportData
from memtrace.output.reports.jsonreport import write_json


class JsonSink:
    def __init__(self, policy: StackPolicy, out: TextIO = sys.stdout) -> None:
        self.policy = policy
        self.out = out

    def _data(self, snapshot: Snapshot) -> ReportData:
        return ReportData(snapshot=snapshot, trace_end=True, policy=self.policy)

    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self, final: Snapshot) -> None:
        write_json(self._data(final), self.out)
        self.out.flush()


class JsonStreamSink(JsonSink):
    """One line per interval, and the final snapshot as the last line: for
    `jq`, a log shipper or a test that watches a trace as it goes."""

    def _line(self, snapshot: Snapshot) -> None:
        write_json(self._data(snapshot), self.out, one_line=True)
        self.out.flush()

    def update(self, snapshot: Snapshot) -> None:
        self._line(snapshot)

    def close(self, final: Snapshot) -> None:
        self._line(final)
