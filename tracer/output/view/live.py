"""The interactive top-style screen.

`render` is pure: a snapshot and a size in, a renderable no larger than that
size out. `LiveView` is the sink that puts it on the terminal with rich's
Live in the alternate screen, redrawing only when told (once per snapshot,
and on resize or key presses via `refresh`).
"""

from __future__ import annotations

import dataclasses
import io
import select
import signal
import sys
import textwrap
import time
from typing import Iterable, Optional, Sequence, TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.text import Text

from memtrace.model.snapshot import Gap, Snapshot
from memtrace.output.view import status
from memtrace.output.view.context import Context
from memtrace.output.view.keys import BACK, EXPAND, KEY_BINDINGS, QUIT, SELECT_DOWN, SELECT_UP, TOGGLE_SORT
from memtrace.output.view.panes import (
    ARENAS,
    REGIONS,
    STACKS,
    STACKS_BY_RETAINED,
    THREADS,
    Layout,
    Slot,
    output_lines,
    ranked_stacks,
    stack_lines,
)

# The views the `mode` argument selects: the first pane gets most rows.
# A new mode is one more entry here and its key in KEY_BINDINGS.
MODES: dict[str, Layout] = {
    "stacks": Layout((Slot(STACKS, 3), Slot(THREADS, 1))),
    "threads": Layout((Slot(THREADS, 3), Slot(STACKS, 1))),
    "arenas": Layout((Slot(ARENAS, 1), Slot(REGIONS, 1))),
}
SORTS = status.SORTS

# Labels are dim and values bold, so numbers stand out when scanning.
_TONE_STYLES = {
    status.PLAIN: "bold",
    status.GOOD: "bold green",
    status.BAD: "bold red",
    status.WARN: "yellow",
    status.DIM: "dim",
    status.TITLE: "bold cyan",
}
_MAX_NOTES = 3
_ROOMY_HEIGHT = 20
_BADGE = 7  # ' DROPS ', ' HINT  ': the width of a line's badge
_OUTPUT_REDRAW_S = 0.25
_HOLD_POLL_S = 0.25
_EXPANDED_HEADER = 2  # lines of header above an expanded stack: the gap and who is traced

# The gap bar: one cell style per part, and a glyph that tells them apart
# without colour too.
_BAR_PARTS = (("█", "cyan"), ("▒", "red"), ("░", "blue"))
_MIN_BAR, _MAX_BAR = 10, 40


class _Clip:
    """Crops a renderable to width x height: the screen never scrolls."""

    def __init__(self, renderable: RenderableType, width: int, height: int) -> None:
        self.renderable = renderable
        self.width = max(1, width)
        self.height = max(0, height)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = min(self.width, options.max_width)
        lines = console.render_lines(
            self.renderable, options.update(width=width, height=None), pad=False
        )
        for line in lines[: self.height]:
            yield from line
            yield Segment.line()


def _field_text(f: status.Field, style: Optional[str] = None) -> Text:
    text = Text()
    if f.label:
        text.append(f.label + " ", style="dim")
    text.append(f.value, style=style or _TONE_STYLES.get(f.tone, ""))
    return text


def _pack(chunks: Iterable[Text], width: int, sep: str = "  ") -> list[Text]:
    """Lay chunks out left to right, wrapping between chunks, never inside."""
    lines: list[Text] = []
    line = Text()
    for chunk in chunks:
        gap = len(sep) if line.cell_len else 0
        if line.cell_len and line.cell_len + gap + chunk.cell_len > width:
            lines.append(line)
            line = Text()
            gap = 0
        if gap:
            line.append(sep)
        line.append_text(chunk)
    if line.cell_len:
        lines.append(line)
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


def bar_cells(parts: list[int], width: int) -> list[int]:
    """Cells per part, adding up to `width`, each non-zero part seen."""
    total = sum(parts)
    if total <= 0 or width <= 0:
        return [0] * len(parts)
    exact = [p * width / total for p in parts]
    cells = [int(x) for x in exact]
    # Hand out what rounding down left, largest remainder first.
    for i in sorted(range(len(parts)), key=lambda i: exact[i] - cells[i], reverse=True)[: width - sum(cells)]:
        cells[i] += 1
    # A part too small for a cell still gets one, taken from the largest.
    for i, p in enumerate(parts):
        if p > 0 and cells[i] == 0:
            biggest = max(range(len(cells)), key=lambda j: cells[j])
            if cells[biggest] > 1:
                cells[biggest] -= 1
                cells[i] = 1
    return cells


def gap_bar(gap: Gap, width: int) -> Text:
    parts = [gap.heap_live_bytes, gap.allocator_retained_bytes, gap.other_anon_bytes]
    text = Text()
    for (glyph, style), n in zip(_BAR_PARTS, bar_cells(parts, width)):
        text.append(glyph * n, style=style)
    return text


def _fitted(line: status.HeaderLine, width: int, styles: Sequence[str] = ()) -> list[Text]:
    """A line of fields on one line if it fits, in its compact wording if
    that fits better, else wrapped between fields."""
    def texts(fields: Sequence[status.Field]) -> list[Text]:
        return [_field_text(f, styles[i] if i < len(styles) else None) for i, f in enumerate(fields)]

    packed = _pack(texts(line.fields), width, line.sep)
    if len(packed) > 1 and line.compact:
        packed = _pack(texts(line.compact), width, line.sep)
    return packed


def _gap_lines(line: status.HeaderLine, s: Snapshot, width: int) -> list[Text]:
    """The equation, its parts coloured as in the bar that follows it when
    there is room, each marked with its glyph in the bar: the legend."""
    styles = [""] + [f"bold {style}" for _, style in _BAR_PARTS]
    if s.gap is not None and s.gap.rss_anon_bytes > 0:
        marked = _legend(line)
        texts = _fitted(marked, width, styles)
        room = width - texts[-1].cell_len - 2
        if len(texts) == 1 and room >= _MIN_BAR:
            texts[0].append("  ")
            texts[0].append_text(gap_bar(s.gap, min(room, _MAX_BAR)))
            return texts
    return _fitted(line, width, styles)


def _legend(line: status.HeaderLine) -> status.HeaderLine:
    """The gap line with each part's value after its bar glyph (the first
    field is the whole, anon RSS: no glyph)."""
    def mark(fields: Sequence[status.Field]) -> tuple[status.Field, ...]:
        return tuple(f if i == 0 or i > len(_BAR_PARTS) else
                     dataclasses.replace(f, value=f"{_BAR_PARTS[i - 1][0]} {f.value}")
                     for i, f in enumerate(fields))

    return dataclasses.replace(line, fields=mark(line.fields), compact=mark(line.compact))


def _badged(badge: str, style: str, body: str, body_style: str, width: int, wrap: bool) -> list[Text]:
    """A sentence after a badge; wrapped lines are indented under it."""
    chunks = textwrap.wrap(body, max(8, width - _BADGE - 1)) if wrap else [body]
    lines = []
    for i, chunk in enumerate(chunks or [""]):
        line = Text()
        line.append(badge.ljust(_BADGE) if i == 0 else " " * _BADGE, style=style if i == 0 and badge else "")
        line.append(" " + chunk, style=body_style)
        line.truncate(width, overflow="ellipsis")
        lines.append(line)
    return lines


def _header(s: Snapshot, width: int, budget: int, detail_budget: Optional[int] = None,
            ctx: Optional[Context] = None) -> list[Text]:
    """Header lines in display order; when `budget` is short the lowest
    ranks stay (the gap and who is traced, then drops and hints, ...).
    Detail lines (rank DETAIL_RANK and up) are added only while the header
    stays within `detail_budget` lines: they must not crowd out the tables."""
    ranked: list[tuple[float, Text]] = []  # in display order
    drops = notes = 0
    ctx = ctx or Context()
    lines = status.header(s, ctx.every_s, ctx.replay)
    note_count = sum(1 for line in lines if line.kind == status.NOTE)
    for line in lines:
        if line.kind == status.GAP:
            texts = _gap_lines(line, s, width)
        elif line.kind == status.DROP:
            texts = _badged(" DROPS" if drops == 0 else "", "bold white on red", line.text, "bold red", width, False)
            drops += 1
        elif line.kind == status.HINT:
            # Hints wrap: their advice comes after their numbers.
            texts = _badged(" HINT", "bold black on yellow", line.text, "yellow", width, True)
        elif line.kind == status.NOTE:
            notes += 1
            if notes > _MAX_NOTES:
                continue
            last = notes == _MAX_NOTES and note_count > _MAX_NOTES
            text = f"(+{note_count - _MAX_NOTES + 1} more notes)" if last else line.text
            note = Text()
            note.append("note ", style="yellow")
            note.append(text)
            note.truncate(width, overflow="ellipsis")
            texts = [note]
        else:
            texts = _fitted(line, width)
        for i, text in enumerate(texts):
            # A line's wrapped tail goes before any other line's start.
            ranked.append((line.rank + (0.5 if i else 0), text))
    order = sorted(range(len(ranked)), key=lambda i: (ranked[i][0], i))
    detail_budget = budget if detail_budget is None else detail_budget
    kept: list[int] = []
    for i in order:
        limit = budget if ranked[i][0] < status.DETAIL_RANK else min(budget, detail_budget)
        if len(kept) < limit:
            kept.append(i)
    kept.sort()
    return [ranked[i][1] for i in kept]


def _keys_text(pairs: Sequence[tuple[str, str]], text: Text) -> None:
    for key, label in pairs:
        if text.cell_len:
            text.append(" ")
        text.append(f" {key} ", style="bold reverse")
        text.append(" " + label, style="dim")


def _footer(mode: str, sort: str, width: int, ctx: Optional[Context] = None) -> Text:
    ctx = ctx or Context()
    if ctx.expanded is not None:
        text = Text()
        _keys_text((("⏎", "back"), ("↑↓", "scroll"), ("q", "quit")), text)
        text.truncate(width, overflow="ellipsis")
        return text
    text = Text()
    for key, action in KEY_BINDINGS.items():
        if action == TOGGLE_SORT:
            # Says what the key will do: rank by the other measure.
            label, style = ("by live" if sort == status.SORT_RETAINED else "by retained"), "dim"
        elif action == QUIT or action in MODES:
            label, style = action, "bold" if action == mode else "dim"
        else:
            continue
        if text.cell_len:
            text.append(" ")
        text.append(f" {key} ", style="bold reverse")
        text.append(" " + label, style=style)
    if any(slot.pane.name == "stacks" for slot in MODES[mode].slots):
        full = text.copy()
        _keys_text((("↑↓", "select"), ("⏎", "frames")), full)
        if full.cell_len <= width:
            return full
        _keys_text((("↑↓⏎", "stack"),), text)
    text.truncate(width, overflow="ellipsis")
    return text


def _banner(message: str, width: int) -> Text:
    text = Text(f" {message} ", style="bold black on yellow")
    text.truncate(width, overflow="ellipsis")
    return text


def output_height(height: int) -> int:
    """Lines for a launched command's output (its title included): a fifth
    of the screen, the tables keep the rest."""
    return max(3, min(12, height // 5))


def render(
    snapshot: Snapshot,
    width: int,
    height: int,
    mode: str = "stacks",
    sort: str = status.SORT_LIVE,
    ctx: Optional[Context] = None,
) -> RenderableType:
    """The whole screen for one snapshot, at most `width` x `height` cells;
    `sort` ranks the stacks table by live or by retained bytes; `ctx` adds
    what the session knows besides the snapshot."""
    ctx = ctx or Context()
    if mode not in MODES:
        raise ValueError(f"unknown view mode {mode!r}: expected one of {', '.join(MODES)}")
    if sort not in SORTS:
        raise ValueError(f"unknown sort {sort!r}: expected one of {', '.join(SORTS)}")
    width, height = max(1, width), max(1, height)
    footer = _banner(ctx.banner, width) if ctx.banner else _footer(mode, sort, width, ctx)
    if ctx.expanded is not None:
        return _Clip(_expanded_screen(snapshot, width, height, sort, ctx, footer), width, height)
    # The header may take half the screen (the gap, identity, drops and
    # hints first, see _header), details a third, but it leaves the first
    # table a title, a column header and a row.
    header = _header(snapshot, width, max(1, min(height - 4, max(4, height // 2))), max(4, height // 3), ctx)
    pane_lines = height - len(header) - 1
    layout = MODES[mode]
    if sort == status.SORT_RETAINED:
        layout = layout.with_pane(STACKS_BY_RETAINED)
    # On a roomy screen a blank line sets each table apart.
    gap = 1 if height >= _ROOMY_HEIGHT else 0
    # Below the tables; it leaves them a title, a header and a row.
    output = _bottom(ctx, width, height, pane_lines - 3)
    pane_lines -= len(output)
    parts: list[RenderableType] = list(header)
    if pane_lines > 0:
        for pane, rows in layout.plan(snapshot, pane_lines - gap * len(layout.slots)):
            parts.extend([Text()] * gap)
            parts.extend(pane.build(snapshot, width, rows, ctx))
    return _Clip(_Screen(parts, footer, height, output), width, height)


def _bottom(ctx: Context, width: int, height: int, room: int) -> list[RenderableType]:
    """Lines pinned above the keys: a launched command's output, and a
    status line (a replay's position) that every size keeps."""
    out: list[RenderableType] = []
    if ctx.status_line:
        line = Text(ctx.status_line, style="bold")
        line.truncate(width, overflow="ellipsis")
        out.append(line)
    if ctx.output is not None:
        gap = 1 if height >= _ROOMY_HEIGHT else 0
        lines = min(output_height(height), room - len(out) - gap)
        if lines >= 2:
            out = [Text()] * gap + output_lines(ctx.output, width, lines) + out
    return out


def _expanded_bottom(ctx: Context, width: int, height: int) -> list[RenderableType]:
    return _bottom(ctx, width, height, height - _EXPANDED_HEADER - 1 - 3)


def _frame_rows(width: int, height: int, ctx: Context) -> int:
    """Frames an expanded stack shows at once, at the least: what the
    header, the output pane, the stack's two title lines and the keys leave."""
    return max(1, height - _EXPANDED_HEADER - len(_expanded_bottom(ctx, width, height)) - 1 - 2)


def _expanded_screen(s: Snapshot, width: int, height: int, sort: str, ctx: Context, footer: Text) -> "_Screen":
    """One stack's every frame under the two header lines that say what is
    traced: the frames get the screen."""
    header = _header(s, width, max(1, min(_EXPANDED_HEADER, height - 4)), 0, ctx)
    bottom = _expanded_bottom(ctx, width, height)
    ranked = ranked_stacks(s, sort, ctx.policy)
    rank = next((i for i, st in enumerate(ranked) if tuple(st.frames) == tuple(ctx.expanded or ())), None)
    lines = height - len(header) - 1 - len(bottom)
    body = list(header) + stack_lines(s, ctx.expanded or (), rank, width, lines, ctx.frame_offset)
    return _Screen(body, footer, height, bottom)


class _Screen:
    """Body lines from the top, the footer pinned to the bottom line (as in
    top), so the keys stay put while the tables grow and shrink."""

    def __init__(self, parts: list[RenderableType], footer: Text, height: int,
                 bottom: Sequence[RenderableType] = ()) -> None:
        self.parts = parts
        self.footer = footer
        self.height = height
        self.bottom = bottom  # pinned above the footer too (a command's output)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        options = options.update(height=None)
        bottom = console.render_lines(Group(*self.bottom), options, pad=False) if self.bottom else []
        bottom = bottom[: max(0, self.height - 1)]
        body = console.render_lines(Group(*self.parts), options, pad=False)
        body = body[: max(0, self.height - 1 - len(bottom))]
        for line in body:
            yield from line
            yield Segment.line()
        for _ in range(self.height - 1 - len(body) - len(bottom)):
            yield Segment.line()
        for line in bottom:
            yield from line
            yield Segment.line()
        yield self.footer


def _waiting(width: int, height: int, ctx: Context) -> RenderableType:
    text = Text(f"memtrace: {ctx.step or 'waiting for the first snapshot'}…", style="dim")
    bottom = _bottom(ctx, width, height, height - 2)
    footer = _banner(ctx.banner, width) if ctx.banner else Text()
    return _Clip(_Screen([text], footer, height, bottom), width, height)


class _StopHolding(Exception):
    pass


class LiveView:
    """The interactive sink: a full-screen view redrawn once per snapshot.

    The main loop handles quitting and hands every other key to
    `handle_key`.

    Args:
        console: where to draw; a fresh stdout Console by default.
        mode: the view to start in, a key of MODES.
        sort: how the stacks table starts ranked, one of SORTS.
    """

    def __init__(self, console: Optional[Console] = None, mode: str = "stacks", sort: str = status.SORT_LIVE,
                 context: Optional[Context] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown view mode {mode!r}")
        if sort not in SORTS:
            raise ValueError(f"unknown sort {sort!r}")
        self.console = console or Console()
        self.mode = mode
        self.sort = sort
        self.snapshot: Optional[Snapshot] = None
        self.context = context or Context()
        self._drawn_at = 0.0
        self._live: Optional[Live] = None
        self._real_stderr: Optional[TextIO] = None
        self._stderr_buffer: Optional[io.StringIO] = None

    # -- lifecycle

    def start(self) -> None:
        if self._live is not None:
            return
        # Anything written to stderr while the alternate screen is up would
        # be wiped by the next redraw: hold it and print it after stop().
        self._real_stderr, self._stderr_buffer = sys.stderr, io.StringIO()
        sys.stderr = self._stderr_buffer
        live = Live(
            console=self.console,
            screen=True,
            auto_refresh=False,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        try:
            live.start()
        except BaseException:
            self._restore_stderr()
            raise
        self._live = live
        self.refresh()

    def stop(self) -> None:
        """Leave the alternate screen and show the cursor again. Safe to call
        twice, before start(), or while an exception is unwinding."""
        live, self._live = self._live, None
        try:
            if live is not None:
                try:
                    live.stop()
                finally:
                    # If rich failed half-way, still put the terminal back.
                    try:
                        self.console.set_alt_screen(False)
                        self.console.show_cursor(True)
                    except Exception:
                        pass
        finally:
            self._restore_stderr()

    def __enter__(self) -> "LiveView":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- drawing

    def update(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.refresh()

    def set_mode(self, mode: str) -> bool:
        """Switch views; False (and no change) for a mode this build lacks."""
        if mode not in MODES:
            return False
        if mode != self.mode:
            self.mode = mode
            self.refresh()
        return True

    def set_sort(self, sort: str) -> bool:
        """Rank the stacks table by live or retained bytes; False (and no
        change) for an unknown sort."""
        if sort not in SORTS:
            return False
        if sort != self.sort:
            self.sort = sort
            self.refresh()
        return True

    def handle_key(self, key: str) -> bool:
        """Act on a key bound to this view (see KEY_BINDINGS): switch modes,
        or with 'r' rank the stacks by the other measure (from the arenas
        view, show the stacks by retained bytes). False for keys it does not
        handle, quitting included: that is the main loop's."""
        action = KEY_BINDINGS.get(key)
        if action in (SELECT_UP, SELECT_DOWN, EXPAND, BACK):
            return self._select(action)
        if action in MODES:
            return self.set_mode(action)
        if action == TOGGLE_SORT:
            if any(slot.pane.name == "stacks" for slot in MODES[self.mode].slots):
                self.set_sort(status.SORT_RETAINED if self.sort == status.SORT_LIVE else status.SORT_LIVE)
            else:
                # A view without stacks: show them, by what they left retained.
                self.mode, self.sort = "stacks", status.SORT_RETAINED
                self.refresh()
            return True
        return False

    def _select(self, action: str) -> bool:
        """Move through the stacks table, open the selected stack (all of
        its frames, scrolled by the same keys), and go back."""
        ctx, s = self.context, self.snapshot
        step = -1 if action == SELECT_UP else 1
        if ctx.expanded is not None:
            if action in (EXPAND, BACK):
                self.set_context(expanded=None, frame_offset=0)
            else:
                # Past the end only while the last frames fill the screen.
                width, height = self.console.size
                end = max(0, len(ctx.expanded) - _frame_rows(width, height, ctx))
                self.set_context(frame_offset=max(0, min(end, ctx.frame_offset + step)))
            return True
        shows_stacks = any(slot.pane.name == "stacks" for slot in MODES[self.mode].slots)
        if s is None or not s.stacks or not shows_stacks:
            return False
        last = len(s.stacks) - 1
        if action == BACK:
            self.set_context(cursor=None)
        elif action == EXPAND:
            cursor = min(ctx.cursor or 0, last)
            stack = ranked_stacks(s, self.sort, ctx.policy)[cursor]
            self.set_context(cursor=cursor, expanded=tuple(stack.frames), frame_offset=0)
        elif ctx.cursor is None:
            self.set_context(cursor=0)
        else:
            self.set_context(cursor=max(0, min(last, ctx.cursor + step)))
        return True

    def refresh(self) -> None:
        """Redraw at the terminal's current size (call on SIGWINCH/keys)."""
        if self._live is None:
            return
        width, height = self.console.size
        if self.snapshot is None:
            screen = _waiting(width, height, self.context)
        else:
            screen = render(self.snapshot, width, height, self.mode, self.sort, self.context)
        self._live.update(screen, refresh=True)
        self._drawn_at = time.monotonic()

    def set_context(self, **changes: object) -> None:
        """Change what the screen shows besides the snapshot, and redraw."""
        self.context = dataclasses.replace(self.context, **changes)  # type: ignore[arg-type]
        self.refresh()

    def output_changed(self) -> None:
        """The command wrote: redraw, at most a few times a second (a chatty
        command must not cost a full redraw per line)."""
        if time.monotonic() - self._drawn_at >= _OUTPUT_REDRAW_S:
            self.refresh()

    def hold(self, keys, message: str) -> None:
        """Keep the screen up, `message` in place of the keys, until `q`
        (or Ctrl-C, SIGTERM, a hang-up); other keys still switch views."""
        self.set_context(banner=message)

        def stop(signum, frame):
            raise _StopHolding()

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        size = self.console.size
        try:
            while not keys.eof:
                try:
                    ready, _, _ = select.select([keys.fileno()], [], [], _HOLD_POLL_S)
                except InterruptedError:
                    continue
                if self.console.size != size:  # SIGWINCH is not ours here
                    size = self.console.size
                    self.refresh()
                if ready:
                    for key in keys.read_keys():
                        if KEY_BINDINGS.get(key) == QUIT or key == "Q":
                            return
                        self.handle_key(key)
        except _StopHolding:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # The Sink protocol's names for the same thing.
    write = update
    close = stop

    def _restore_stderr(self) -> None:
        real, held = self._real_stderr, self._stderr_buffer
        self._real_stderr = self._stderr_buffer = None
        if real is None:
            return
        if sys.stderr is held:
            sys.stderr = real
        if held is not None and held.getvalue():
            real.write(held.getvalue())
            real.flush()
