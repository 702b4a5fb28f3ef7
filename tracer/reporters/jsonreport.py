"""The JSON report: exactly `Snapshot.to_json()` at the chosen moment, the
same document `memtrace --json` prints, so one parser reads both."""

from __future__ import annotations

import json
from typing import TextIO

from memtrace.reporters.common import ReportData


class JsonReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        json.dump(self.data.snapshot.to_json(), out, indent=2)
        out.write("\n")
