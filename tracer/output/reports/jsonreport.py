"""The one JSON writer: `memtrace --json` (the final snapshot), each line
of `--json-stream` and `report --format json` are all `Snapshot.to_json()`
written here, its notes and hints with their words, so one parser reads
them all. With --top or --min-size, the
stacks are those the policy keeps, and `stacks_left_out` counts the others;
with --since, a "since" object says what the heap, threads and stacks are
changes from."""

from __future__ import annotations

import json
from typing import Any, Optional, TextIO

from memtrace.model.snapshot import Snapshot

from memtrace.output.reports.common import ReportData
from memtrace.output.notes import note_json
from memtrace.output.reports.select import StackPolicy, snapshot_json


def snapshot_document(s: Snapshot, by: str = "live", policy: Optional[StackPolicy] = None) -> dict[str, Any]:
    """A snapshot as memtrace writes it: its plain form, the stacks the
    policy keeps, and the words of its notes and hints."""
    doc = snapshot_json(s, by, policy)
    doc["notes"] = [note_json(n) for n in s.notes]
    if "hints" in doc:
        doc["hints"] = [note_json(h) for h in s.hints]
    return doc


def json_document(data: ReportData) -> dict[str, Any]:
    doc = snapshot_document(data.snapshot, data.by, data.policy)
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
    """Indented for a person, or one line per document for a stream. One
    string, one write: json.dump writes token by token, which took most of
    the time on 100,000 stacks."""
    doc = json_document(data)
    text = json.dumps(doc, separators=(",", ":")) if one_line else json.dumps(doc, indent=1)
    out.write(text + "\n")


class JsonReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        write_json(self.data, out)
