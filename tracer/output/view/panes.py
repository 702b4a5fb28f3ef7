"""The tables of the live screen, each sized to the rows and width it gets.

A `Pane` knows how many rows its section could show and renders exactly
`lines(rows)` lines: a title, then (if it has rows) a column header and the
rows. The screen decides the rows; panes never overflow what they were
given. A pane's `count` returns None when the snapshot lacks its section
(an older recording, or the address-space layer off); it then says so in
its title.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from rich.console import RenderableType
from rich.table import Column, Table
from rich.text import Text

from memtrace.model.snapshot import ArenaStats, RegionStats, Snapshot, StackStats, ThreadStats
from memtrace.output.view import status
from memtrace.output.view.context import Context
from memtrace.output.view.fmt import (
    ellipsize,
    fit_list,
    fmt_bytes,
    fmt_counted,
    fmt_si,
    fmt_signed_bytes,
    frame_chain,
)
from memtrace.output.reports.select import StackPolicy, select_stacks
from memtrace.output.view.status import SORT_LIVE, SORT_RETAINED, top_threads

HEADER_STYLE = "bold reverse"
TITLE_STYLE = "bold cyan"
DETAIL_STYLE = "dim"
_MIN_FLEX = 12  # below this a stack chain says nothing: drop other columns first


@dataclass
class Col:
    """A column: fixed cells, or (flex) cells made for whatever width is left."""

    header: str
    cells: Sequence[Text] = ()
    justify: str = "right"
    drop_rank: int = 0  # 0: always kept; the highest rank goes first when narrow
    make: Optional[Callable[[int], Sequence[Text]]] = None  # flex column

    @property
    def flex(self) -> bool:
        return self.make is not None

    def natural_width(self) -> int:
        return max([len(self.header)] + [c.cell_len for c in self.cells])


def fit_table(
    cols: list[Col], width: int, row_styles: Sequence[str] = (), min_flex: int = _MIN_FLEX
) -> Table:
    """A borderless table exactly `width` wide, dropping optional columns
    until the flex column (if any) has `min_flex` cells."""
    cols = list(cols)
    has_flex = any(c.flex for c in cols)
    while True:
        # Every column carries one space of padding each side: rich measures
        # columns that way even at the table's edges.
        fixed = sum(c.natural_width() for c in cols if not c.flex) + 2 * len(cols)
        flex_width = width - fixed
        fits = flex_width >= min_flex if has_flex else fixed <= width
        droppable = [c for c in cols if c.drop_rank]
        if fits or not droppable:
            break
        cols.remove(max(droppable, key=lambda c: c.drop_rank))
    flex_width = max(1, flex_width)
    columns, cells = [], []
    for c in cols:
        w = flex_width if c.flex else c.natural_width()
        columns.append(Column(c.header, justify=c.justify, width=w, no_wrap=True, overflow="ellipsis"))  # type: ignore[arg-type]
        cells.append(c.make(w) if c.make else c.cells)
    table = Table(
        *columns,
        box=None,
        padding=(0, 1),
        header_style=HEADER_STYLE,
        expand=False,
    )
    for i, row in enumerate(zip(*cells)):
        table.add_row(*row, style=row_styles[i] if i < len(row_styles) else None)
    return table


def title_line(name: str, detail: str, width: int) -> Text:
    text = Text()
    text.append(name, style=TITLE_STYLE)
    if detail:
        text.append("  " + detail, style=DETAIL_STYLE)
    text.truncate(width, overflow="ellipsis")
    return text


def growth_text(delta: int) -> Text:
    # Growth is what we hunt: red. Shrinking is good news: green.
    style = "red" if delta > 0 else "green" if delta < 0 else "dim"
    return Text(fmt_signed_bytes(delta) if delta else "0", style=style)


@dataclass(frozen=True)
class Pane:
    name: str
    count: Callable[[Snapshot], Optional[int]]  # None: section absent
    build: Callable[[Snapshot, int, int, Context], list[RenderableType]]  # (snapshot, width, rows, ctx)

    @staticmethod
    def lines(rows: int) -> int:
        return 1 + (1 + rows if rows else 0)


# ---------------------------------------------------------------- stacks


def _stack_rows(stacks: Sequence[StackStats], width: int, interval: str, by: str, retained: bool,
                selected: Optional[int] = None) -> Table:
    def chains(w: int) -> list[Text]:
        out = []
        for s in stacks:
            if s.truncated:
                # '~' marks a walk that probably lost its outer frames.
                cell = Text()
                cell.append("~ ", style="yellow")
                cell.append(frame_chain(s.frames, w - 2))
            else:
                cell = Text(frame_chain(s.frames, w))
            out.append(cell)
        return out

    by_retained = by == SORT_RETAINED
    cols = [
        Col("LIVE", [Text(fmt_bytes(s.counters.live_bytes), style="" if by_retained else "bold") for s in stacks]),
        Col("Δ " + interval if interval else "Δ", [growth_text(s.live_delta_bytes) for s in stacks], drop_rank=3),
        Col("BLOCKS", [Text(fmt_si(s.counters.live_count)) for s in stacks], drop_rank=4),
        Col("THR", [Text(str(len(s.tids))) for s in stacks], drop_rank=5),
        Col("ALLOCATED", [Text(fmt_bytes(s.counters.alloc_bytes), style="dim") for s in stacks], drop_rank=6),
        Col("STACK (caller first)", justify="left", make=chains),
    ]
    if retained:
        # Ranked by it, the column stays whatever the width.
        cells = [
            Text(fmt_bytes(s.retained_bytes) if s.retained_bytes else "0", style="bold" if by_retained else "")
            for s in stacks
        ]
        cols.insert(1, Col("RETAINED", cells, drop_rank=0 if by_retained else 2))
    if width < 110:
        # Below this the frames say more than the total ever allocated.
        cols = [c for c in cols if c.header != "ALLOCATED"]
    styles = ["reverse" if i == selected else "" for i in range(len(stacks))]
    return fit_table(cols, width, styles)


def stack_order(s: Snapshot, by: str) -> str:
    """What the stacks table ranks by: retained bytes only when there are some."""
    return by if s.has_retained else SORT_LIVE


def ranked_stacks(s: Snapshot, by: str, policy: Optional[StackPolicy] = None) -> list[StackStats]:
    """The stacks in the table's order: what its rows and the selection
    index. The run's --top and --min-size apply (memtrace.output.reports.select)."""
    return list(select_stacks(s.stacks, stack_order(s, by), policy=policy, threads=s.threads).shown)


def window(cursor: Optional[int], rows: int, total: int) -> int:
    """The first row shown: the selected row stays on screen."""
    if cursor is None or rows <= 0:
        return 0
    return max(0, min(cursor, total - 1) - rows + 1)


def stacks_pane(by: str = SORT_LIVE) -> Pane:
    """The stacks table ranked by live bytes or by retained bytes; the
    selected row (ctx.cursor) is highlighted and kept on screen."""

    def build(s: Snapshot, width: int, rows: int, ctx: Context) -> list[RenderableType]:
        total = len(s.stacks)
        if not total:
            what = "none: no malloc probes in light mode (press a for the arenas)" if s.light else "no tracked allocations yet"
            return [title_line("STACKS", what, width)]
        retained = s.has_retained
        order = stack_order(s, by)
        ranked = ranked_stacks(s, by, ctx.policy)
        count = len(ranked)  # what --top and --min-size leave of the total
        first = window(ctx.cursor, rows, count)
        shown = ranked[first : first + rows]
        where = f"{first + 1}-{first + len(shown)}" if first else f"{len(shown)}"
        detail = f"{where} of {total} by {order} bytes"
        if order == SORT_RETAINED:
            detail += " (estimates)"
        elif by == SORT_RETAINED:
            detail += " (no retained bytes yet)"
        if any(st.truncated for st in shown):
            detail += "  ~ truncated"
        out: list[RenderableType] = [title_line("STACKS", detail, width)]
        if shown:
            interval = status.interval_label(s, ctx.every_s) if s.interval_s > 0 else ""
            selected = None if ctx.cursor is None else min(ctx.cursor, count - 1) - first
            out.append(_stack_rows(shown, width, interval, order, retained, selected))
        return out

    return Pane("stacks", lambda s: len(s.stacks), build)


STACKS = stacks_pane(SORT_LIVE)
STACKS_BY_RETAINED = stacks_pane(SORT_RETAINED)


# ---------------------------------------------------------------- threads


def _thread_rows(threads: Sequence[ThreadStats], width: int) -> Table:
    name_width = max([4] + [len(t.name) for t in threads])
    cols = [
        Col("TID", [Text(str(t.tid)) for t in threads]),
        Col("NAME", [Text(t.name[:name_width]) for t in threads], justify="left"),
        Col("LIVE", [Text(fmt_bytes(t.counters.live_bytes), style="bold") for t in threads]),
        Col("BLOCKS", [Text(fmt_si(t.counters.live_count)) for t in threads], drop_rank=5),
        Col("ALLOCATED", [Text(fmt_bytes(t.counters.alloc_bytes)) for t in threads], drop_rank=3),
        Col("FREED", [Text(fmt_bytes(t.counters.free_bytes)) for t in threads], drop_rank=4),
        Col("STATE", [Text("alive" if t.alive else "exited") for t in threads], justify="left", drop_rank=2),
    ]
    styles = ["" if t.alive else "dim" for t in threads]
    return fit_table(cols, width, styles)


def _build_threads(s: Snapshot, width: int, rows: int, ctx: Context) -> list[RenderableType]:
    total = len(s.threads)
    if not total:
        return [title_line("THREADS", "none seen allocating yet", width)]
    shown = top_threads(s)[:rows]
    exited = sum(1 for t in s.threads if not t.alive)
    detail = f"{len(shown)} of {total} by live bytes"
    if exited:
        detail += f"  {exited} exited"
    out: list[RenderableType] = [title_line("THREADS", detail, width)]
    if shown:
        out.append(_thread_rows(shown, width))
    return out


THREADS = Pane("threads", lambda s: len(s.threads), _build_threads)


# ---------------------------------------------------------------- arenas

_NO_ARENAS = "no arena data (address-space layer off, or an older recording)"


def _arena_count(s: Snapshot) -> Optional[int]:
    return len(s.arenas) if s.allocator is not None or s.arenas else None


def _percent_text(a: ArenaStats) -> Text:
    share = a.retained_bytes / a.resident_bytes if a.resident_bytes else 0.0
    style = "bold red" if share >= 0.5 else "yellow" if share >= 0.25 else ""
    return Text(status.retained_percent(a), style=style)


def _arena_rows(s: Snapshot, arenas: Sequence[ArenaStats], width: int) -> Table:
    names = status.thread_names(s)

    def threads(w: int) -> list[Text]:
        return [
            Text(fit_list(status.name_list(a.tids, names), w), style="" if a.tids else "dim")
            for a in arenas
        ]

    def live(a: ArenaStats) -> str:
        return status.arena_live(a)

    cols = [
        Col("ARENA", [Text(a.id, style="dim") for a in arenas], justify="left", drop_rank=6),
        # '?' marks an arena glibc's structures could not be read reliably.
        Col("KIND", [Text(a.kind + ("?" if not a.reliable else ""), style="" if a.reliable else "yellow") for a in arenas], justify="left"),
        Col("HEAPS", [Text(str(a.heap_count)) for a in arenas], drop_rank=8),
        Col("RESERVED", [Text(fmt_bytes(a.reserved_bytes), style="dim") for a in arenas], drop_rank=9),
        Col("COMMITTED", [Text(fmt_bytes(a.committed_bytes)) for a in arenas], drop_rank=7),
        Col("RESIDENT", [Text(fmt_bytes(a.resident_bytes)) for a in arenas], drop_rank=4),
        Col("LIVE", [Text(live(a)) for a in arenas], drop_rank=3),
        Col("RETAINED", [Text(fmt_bytes(a.retained_bytes), style="bold") for a in arenas]),
        Col("RET%", [_percent_text(a) for a in arenas], drop_rank=2),
        Col("TRIMMABLE", [Text(fmt_bytes(a.trimmable_bytes)) for a in arenas], drop_rank=5),
        Col("THREADS", justify="left", make=threads),
    ]
    return fit_table(cols, width, ["" if a.reliable else "dim" for a in arenas])


def _build_arenas(s: Snapshot, width: int, rows: int, ctx: Context) -> list[RenderableType]:
    if _arena_count(s) is None:
        return [title_line("ARENAS", _NO_ARENAS, width)]
    total = len(s.arenas)
    if not total:
        return [title_line("ARENAS", "none read yet (see the notes)", width)]
    shown = status.top_arenas(s)[:rows]
    detail = f"{len(shown)} of {total} by retained bytes ({status.arena_kinds(s.arenas)})"
    if any(a.live_is_estimate for a in shown):
        detail += "  ~ estimate"
    if any(not a.reliable for a in shown):
        detail += "  ? unreliable read"
    out: list[RenderableType] = [title_line("ARENAS", detail, width)]
    if shown:
        out.append(_arena_rows(s, shown, width))
    return out


ARENAS = Pane("arenas", _arena_count, _build_arenas)


# ---------------------------------------------------------------- regions

_MIN_ORIGIN = 24  # narrower, an origin chain names one frame at best


def _origin_text(r: RegionStats, width: int) -> Text:
    if r.origin_frames:
        return Text(frame_chain(r.origin_frames, width))
    return Text("(made before the trace began)" if r.origin_tid is None else "(no stack)", style="dim")


def _region_rows(s: Snapshot, regions: Sequence[RegionStats], width: int) -> Table:
    names = status.thread_names(s)
    cols = [
        Col("START", [Text(f"0x{r.start:x}", style="dim") for r in regions], justify="left", drop_rank=5),
        Col("KIND", [Text(status.region_kind(r)) for r in regions], justify="left"),
        Col("SIZE", [Text(fmt_bytes(r.end - r.start), style="dim") for r in regions], drop_rank=4),
        Col("COMMITTED", [Text(fmt_bytes(r.committed_bytes)) for r in regions], drop_rank=3),
        Col("RESIDENT", [Text(fmt_bytes(r.resident_bytes), style="bold") for r in regions], drop_rank=1),
        Col("THREAD", [Text(ellipsize(status.thread_label(r.origin_tid, names), 18)) for r in regions], justify="left", drop_rank=3),
        # Made inside a malloc call: the origin is then malloc's caller.
        Col("VIA", [Text("malloc", style="yellow") if r.in_malloc else Text("direct", style="dim") for r in regions], justify="left", drop_rank=2),
        Col("ORIGIN (caller first)", justify="left", make=lambda w: [_origin_text(r, w) for r in regions]),
    ]
    return fit_table(cols, width, min_flex=_MIN_ORIGIN)


def _region_count(s: Snapshot) -> Optional[int]:
    return len(s.regions) if s.os is not None or s.regions else None


def _build_regions(s: Snapshot, width: int, rows: int, ctx: Context) -> list[RenderableType]:
    if _region_count(s) is None:
        return [title_line("REGIONS", "no address-space data", width)]
    total = len(s.regions)
    if not total:
        return [title_line("REGIONS", "none held since the trace began", width)]
    shown = status.top_regions(s)[:rows]
    detail = f"{len(shown)} of the {total} largest never returned to the OS, by resident bytes"
    out: list[RenderableType] = [title_line("REGIONS", detail, width)]
    if shown:
        out.append(_region_rows(s, shown, width))
    return out


REGIONS = Pane("regions", _region_count, _build_regions)


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Slot:
    pane: Pane
    weight: int = 1


def share_rows(wants: Sequence[int], weights: Sequence[int], total: int) -> list[int]:
    """Split `total` rows by weight, never giving a pane more than it wants,
    so rows a small pane leaves over go to the others."""
    got = [0] * len(wants)
    for _ in range(max(0, total)):
        hungry = [i for i in range(len(wants)) if got[i] < wants[i]]
        if not hungry:
            break
        i = min(hungry, key=lambda i: (got[i] / weights[i], i))
        got[i] += 1
    return got


@dataclass(frozen=True)
class Layout:
    """Which panes a mode shows, first the one the mode is about."""

    slots: tuple[Slot, ...]

    def with_pane(self, pane: Pane) -> "Layout":
        """The same layout with `pane` in place of the pane of its name."""
        return Layout(tuple(Slot(pane, s.weight) if s.pane.name == pane.name else s for s in self.slots))

    def plan(self, s: Snapshot, lines: int) -> list[tuple[Pane, int]]:
        """(pane, rows) for the panes that fit in `lines` lines; the first
        pane is always there, if only as its title."""
        counts = [slot.pane.count(s) or 0 for slot in self.slots]
        first = self.slots[0]
        if counts[0] == 0 or lines < 3:
            return [(first.pane, 0)]
        chosen = [(first, counts[0])]
        # Another pane costs a title and a header: show it only if it gets a
        # row too and the first pane keeps a few of its own.
        spare = lines - 2 - min(counts[0], 3)
        for slot, n in zip(self.slots[1:], counts[1:]):
            if n and spare >= 3:
                chosen.append((slot, n))
                spare -= 3
        rows = share_rows(
            [n for _, n in chosen], [slot.weight for slot, _ in chosen], lines - 2 * len(chosen)
        )
        return [(slot.pane, r) for (slot, _), r in zip(chosen, rows)]


# ---------------------------------------------------------------- command output


def output_lines(output, width: int, lines: int) -> list[RenderableType]:
    """A launched command's latest lines under a title saying where all of
    them are kept; exactly `lines` lines (blank ones while it is quiet)."""
    if lines <= 0:
        return []
    shown = output.tail(lines - 1)
    detail = f"last {len(shown)} of {output.line_count} lines, all in {output.log_path}" if shown else "nothing yet"
    out: list[RenderableType] = [title_line(f"OUTPUT of {output.command}", detail, width)]
    for line in shown:
        text = Text(line, no_wrap=True, overflow="ellipsis")
        text.truncate(width, overflow="ellipsis")
        out.append(text)
    out.extend(Text() for _ in range(lines - 1 - len(shown)))
    return out


# ---------------------------------------------------------------- one stack


def stack_lines(s: Snapshot, frames: Sequence[str], rank: Optional[int], width: int, lines: int,
                offset: int = 0) -> list[RenderableType]:
    """One stack whole: what it holds, then every frame (innermost first)
    from `offset` on, in `lines` lines at most."""
    stack = next((st for st in s.stacks if tuple(st.frames) == tuple(frames)), None)
    if stack is None:
        return [title_line("STACK", "no longer in the snapshot (its blocks were freed)", width)]
    c = stack.counters
    numbers = [f"live {fmt_bytes(c.live_bytes)} in {fmt_counted(c.live_count, 'block')}"]
    if stack.retained_bytes:
        numbers.append(f"retained ~{fmt_bytes(stack.retained_bytes)}")
    numbers.append(f"allocated {fmt_bytes(c.alloc_bytes)} in {fmt_counted(c.alloc_count, 'call')}")
    names = status.thread_names(s)
    numbers.append("threads " + fit_list(status.name_list(stack.tids, names), 40))
    name = f"STACK #{rank + 1}" if rank is not None else "STACK"
    out: list[RenderableType] = [title_line(name, "  ".join(numbers), width)]
    total = len(stack.frames)
    room = max(0, lines - 2)
    offset = max(0, min(offset, total - room)) if total > room else 0
    shown = stack.frames[offset : offset + room]
    more = "  ~ outer frames probably missing" if stack.truncated else ""
    where = f"{offset + 1}-{offset + len(shown)} of {total}" if len(shown) < total else f"all {total}"
    out.append(title_line("", f"frames, innermost first: {where}{more}", width))
    digits = len(str(total))
    for i, frame in enumerate(shown, start=offset):
        # The frame as the collector wrote it, offset and module included.
        code, bracket, module = frame.rpartition(" [")
        text = Text(f"{i + 1:>{digits}}  ", style="dim")
        text.append(code if bracket else frame, style="bold")
        if bracket:
            text.append(f" [{module}", style="dim")
        text.truncate(width, overflow="ellipsis")
        out.append(text)
    return out
