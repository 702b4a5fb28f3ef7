"""The JSON report: exactly `Snapshot.to_json()` at the chosen moment, the
same document `memtrace --json` prints, so one parser reads both. With
--top or --min-size, the stacks are those the policy keeps, and
`stacks_left_out` counts the others."""

from __future__ import annotations

import json
from typing import TextIO

from memtrace.reporters.common import ReportData
from memtrace.reporters.select import snapshot_json


class JsonReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        # One string, one write: json.dump writes token by token, which took
        # most of the time on 100,000 stacks.
        doc = snapshot_json(self.data.snapshot, self.data.by, self.data.policy)
        out.write(json.dumps(doc, indent=2) + "\n")
