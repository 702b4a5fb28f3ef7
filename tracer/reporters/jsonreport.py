"""The one JSON writer: `memtrace --json` (the final snapshot), each line
of `--json-stream` and `report --format json` are all `Snapshot.to_json()`
written here, so one parser reads them all. With --since, a "since" object
says what the heap, threads and stacks are changes from."""

from __future__ import annotations

import json
from typing import Any, TextIO

from memtrace.reporters.common import ReportData


def json_document(data: ReportData) -> dict[str, Any]:
    doc = data.snapshot.to_json()
    since = data.since
    if since is not None:
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
    return doc


def write_json(data: ReportData, out: TextIO, one_line: bool = False) -> None:
    """Indented for a person, or one line per document for a stream."""
    doc = json_document(data)
    if one_line:
        out.write(json.dumps(doc, separators=(",", ":")))
    else:
        json.dump(doc, out, indent=1)
    out.write("\n")


class JsonReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        write_json(self.data, out)
