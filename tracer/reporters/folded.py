"""Folded stacks for flamegraph.pl, inferno and speedscope:
`outermost;...;innermost weight`, one line per distinct stack.

Frames are named by function (offsets dropped, so one function is one box)
and `;` inside a name, which would split it, becomes `:` (Java signatures
carry semicolons). Stacks that fold to the same line are added up.
"""

from __future__ import annotations

from typing import TextIO

from memtrace.reporters.common import ReportData, frame_label, weighted_stacks


def _clean(label: str) -> str:
    return label.replace(";", ":").replace("\n", " ").replace("\r", " ")


def folded_lines(data: ReportData) -> list[str]:
    totals: dict[str, int] = {}
    for stack, weight in weighted_stacks(data.snapshot, data.by):
        # The model keeps frames innermost first; flame graphs want the root first.
        path = ";".join(_clean(frame_label(f)) for f in reversed(stack.frames)) or "[no frames]"
        totals[path] = totals.get(path, 0) + weight
    return [f"{path} {weight}" for path, weight in sorted(totals.items())]


class FoldedReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        for line in folded_lines(self.data):
            out.write(line + "\n")
