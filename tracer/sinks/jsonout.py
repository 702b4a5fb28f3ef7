"""`--json`: the final snapshot as one JSON document on stdout."""

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
