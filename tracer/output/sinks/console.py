"""The terminal sinks: the live view (or batch text without a terminal) and
the final summary printed when a trace ends."""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, TextIO

from memtrace.model.snapshot import Snapshot
from memtrace.output.reports.select import StackPolicy


class LiveSink:
    def __init__(self, mode: str = "stacks", context=None) -> None:
        from memtrace.output.view.live import LiveView

        self.view = LiveView(mode=mode, context=context)
        self.view.start()

    def set_context(self, **changes) -> None:
        self.view.set_context(**changes)

    def output_changed(self) -> None:
        self.view.output_changed()

    def hold(self, final: Snapshot, keys, message: str) -> None:
        self.view.update(final)
        self.view.hold(keys, message)

    def update(self, snapshot: Snapshot) -> None:
        self.view.update(snapshot)

    def handle_key(self, key: str) -> bool:
        return self.view.handle_key(key)

    def refresh(self) -> None:
        self.view.refresh()

    def abort(self) -> None:
        self.view.stop()

    def close(self, final: Snapshot) -> None:
        self.view.stop()


class BatchSink:
    def __init__(self, policy: StackPolicy, out: TextIO = sys.stdout) -> None:
        from memtrace.output.view.text import BatchView

        self.view = BatchView(out, policy=policy)

    def update(self, snapshot: Snapshot) -> None:
        self.view.update(snapshot)

    def close(self, final: Snapshot) -> None:
        pass


class SummarySink:
    def __init__(self, policy: StackPolicy, out: TextIO = sys.stdout) -> None:
        self.policy = policy
        self.out = out

    def update(self, snapshot: Snapshot) -> None:
        pass

    def close(self, final: Snapshot) -> None:
        from memtrace.output.reports.text import render_summary

        self.out.write(render_summary(final, self.policy))
        self.out.flush()


def console_sinks(interactive: bool, policy: StackPolicy, mode: str = "stacks",
                  context=None) -> tuple[list, Optional[LiveSink]]:
    """Sinks in the order they close: the live view gives the screen back
    before the summary is printed."""
    if interactive:
        from memtrace.output.view.context import Context

        live = LiveSink(mode, dataclasses.replace(context or Context(), policy=policy))
        return [live, SummarySink(policy)], live
    return [BatchSink(policy), SummarySink(policy)], None
