"""`--serve [HOST:]PORT`: each snapshot of the trace, served over HTTP
until the trace ends (see memtrace.output.serve)."""

from __future__ import annotations

from memtrace.model.snapshot import Snapshot
from memtrace.output.serve import Board, ServeAddress, Server


class ServeSink:
    def __init__(self, address: ServeAddress) -> None:
        self.board = Board()
        self.server = Server(address, self.board)

    def update(self, snapshot: Snapshot) -> None:
        self.board.update(snapshot)

    def close(self, final: Snapshot) -> None:
        self.server.close()

    def abort(self) -> None:
        self.server.close()
