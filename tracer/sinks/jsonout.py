"""`--json`: the final snapshot as one JSON document on stdout;
`--json-stream`: every snapshot, one JSON object per line. Both keep the
stacks that --top and --min-size leave (memtrace.reporters.select)."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from memtrace.model import Snapshot
from memtrace.reporters.select import snapshot_json


class JsonSink:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self, final: Snapshot) -> None:
        # One string, one write: json.dump writes token by token, which took
        # most of the final second with 100,000 stacks.
        self.out.write(json.dumps(snapshot_json(final), indent=1) + "\n")
        self.out.flush()


class JsonStreamSink:
    """One line per interval, and the final snapshot as the last line: for
    `jq`, a log shipper or a test that watches a trace as it goes."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def _line(self, snapshot: Snapshot) -> None:
        self.out.write(json.dumps(snapshot_json(snapshot), separators=(",", ":")) + "\n")
        self.out.flush()

    def update(self, snapshot: Snapshot) -> None:
        self._line(snapshot)

    def close(self, final: Snapshot) -> None:
        self._line(final)
