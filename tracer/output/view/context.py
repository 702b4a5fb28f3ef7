"""What the live screen shows besides the snapshot: the session's settings,
the launched command's output, what is selected, and a passing message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from memtrace.output.reports.select import StackPolicy


class CommandLines(Protocol):
    """A launched command's output as the view reads it (CommandOutput)."""

    command: str
    line_count: int
    log_path: str

    def tail(self, count: int) -> list[str]: ...


@dataclass(frozen=True)
class Context:
    every_s: Optional[float] = None  # the interval asked for (the header's "every")
    replay: bool = False  # a recording played back, not a process now
    output: Optional[CommandLines] = None
    banner: Optional[str] = None  # in place of the footer: "detaching…"
    cursor: Optional[int] = None  # the selected row of the stacks table (by rank)
    expanded: Optional[Sequence[str]] = None  # the frames of the stack shown whole
    frame_offset: int = 0  # the first of its frames on screen
    step: Optional[str] = None  # before the first snapshot: what is happening
    status_line: Optional[str] = None  # above the keys, whatever the size (replay's position)
    policy: StackPolicy = StackPolicy()  # --top, --min-size and the filters
