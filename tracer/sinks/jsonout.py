"""`--json`: the final snapshot as one JSON document on stdout;
`--json-stream`: every snapshot, one JSON object per line."""

from __future__ import annotations

import json
import sys
from typing import TextIO

from memtrace.model import Snapshot


class JsonSink:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self, final: Snapshot) -> None:
        json.dump(final.to_json(), self.out, indent=1)
        self.out.write("\n")
        self.out.flush()


class JsonStreamSink:
    """One line per interval, and the final snapshot as the last line: for
    `jq`, a log shipper or a test that watches a trace as it goes."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def _line(self, snapshot: Snapshot) -> None:
        self.out.write(json.dumps(snapshot.to_json(), separators=(",", ":")) + "\n")
        self.out.flush()

    def update(self, snapshot: Snapshot) -> None:
        self._line(snapshot)

    def close(self, final: Snapshot) -> None:
        self._line(final)
