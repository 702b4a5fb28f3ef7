"""The JSON report: exactly `Snapshot.to_json()` at the chosen moment, the
same document `memtrace --json` prints, so one parser reads both. With
--since, a "since" object says what the heap, threads and stacks are
changes from."""

from __future__ import annotations

import json
from typing import TextIO

from memtrace.reporters.common import ReportData


class JsonReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        doc = self.data.snapshot.to_json()
        since = self.data.since
        if since is not None:
            # heap, threads and stacks are changes since this moment.
            doc["since"] = {
                "label": since.label,
                "elapsed_s": since.snapshot.elapsed_s,
                "rss_bytes_change": since.rss_bytes,
                "heap_live_bytes_change": since.heap_live_bytes,
                "allocator_retained_bytes_change": since.retained_bytes,
                "other_anon_bytes_change": since.other_anon_bytes,
                "stacks_grown": since.stacks_grown,
                "stacks_shrunk": since.stacks_shrunk,
            }
        json.dump(doc, out, indent=2)
        out.write("\n")
