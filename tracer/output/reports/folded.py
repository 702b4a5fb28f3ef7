"""Folded stacks for flamegraph.pl, inferno and speedscope:
`outermost;...;innermost weight`, one line per distinct stack.

Frames are named by function (offsets dropped, so one function is one box)
and `;` inside a name, which would split it, becomes `:` (Java signatures
carry semicolons). Stacks that fold to the same line are added up.
"""

from __future__ import annotations

from typing import TextIO

from memtrace.output.reports.common import ReportData, frame_label, selected_stacks


def _clean(label: str) -> str:
    return label.replace(";", ":").replace("\n", " ").replace("\r", " ")


def folded_lines(data: ReportData) -> list[str]:
    """With --top or --min-size, the stacks left out are one line,
    `other (N stacks)`, so the graph's total stays the whole weight."""
    totals: dict[str, int] = {}
    chosen = selected_stacks(data, data.by)
    for stack, weight in zip(chosen.shown, chosen.weights):
        # The model keeps frames innermost first; flame graphs want the root first.
        path = ";".join(_clean(frame_label(f)) for f in reversed(stack.frames)) or "[no frames]"
        totals[path] = totals.get(path, 0) + weight
    lines = [f"{path} {weight}" for path, weight in sorted(totals.items())]
    if chosen.other_count:
        lines.append(f"{chosen.other_label} {chosen.other_weight}")
    return lines


class FoldedReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        for line in folded_lines(self.data):
            out.write(line + "\n")
