"""The live screen with what the session adds to a snapshot (a launched
command's output, the interval asked for, replay, a selected stack), at the
two sizes people use: 80x24 and 160x50. Snapshots come from the synthetic
session the recorder's tests use."""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Optional

import pytest
from rich.console import Console

from memtrace.record.synthetic import session
from memtrace.model.notes import TEXT, Note
from memtrace.output.view.context import Context
from memtrace.output.view.live import MODES, render

SIZES = [(80, 24), (160, 50)]


class FakeOutput:
    """What the output pane reads of a CommandOutput."""

    def __init__(self, count: int, command: str = "server") -> None:
        self.command = command
        self.line_count = count
        self.log_path = "/tmp/memtrace-server-x.log"
        self.lines = [f"request {i} served" for i in range(count)]

    def tail(self, count: int) -> list[str]:
        return self.lines[-count:] if count > 0 else []


def snapshots(count: int = 4):
    return list(session(count, stacks=40, threads=6))


def draw(snap, width: int, height: int, mode: str = "stacks", ctx: Optional[Context] = None,
         sort: str = "live") -> list[str]:
    console = Console(record=True, width=width, height=height, color_system=None, force_terminal=False,
                      file=io.StringIO())
    console.print(render(snap, width, height, mode, sort, ctx))
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) == height
    assert all(len(line) <= width for line in lines)
    return lines


# ---------------------------------------------------------------- output pane


@pytest.mark.parametrize("width, height", SIZES)
@pytest.mark.parametrize("mode", list(MODES))
def test_output_pane_sits_above_the_keys(width, height, mode):
    snap = snapshots()[-1]
    lines = draw(snap, width, height, mode, Context(output=FakeOutput(500)))
    assert lines[0].startswith("anon RSS")  # the header keeps the top line
    assert " q " in lines[-1]
    title = next(i for i, line in enumerate(lines) if line.startswith("OUTPUT of server"))
    shown = lines[title + 1 : height - 1]
    assert shown == [f"request {i} served" for i in range(500 - len(shown), 500)]
    assert len(shown) >= 2
    assert f"last {len(shown)} of 500 lines" in lines[title]
    # The tables keep rows of their own.
    first_pane = {"stacks": "STACKS", "threads": "THREADS", "arenas": "ARENAS"}[mode]
    assert any(line.startswith(first_pane) for line in lines[:title])


def test_output_pane_grows_with_the_screen():
    snap = snapshots()[-1]
    small = draw(snap, 80, 24, ctx=Context(output=FakeOutput(500)))
    tall = draw(snap, 160, 50, ctx=Context(output=FakeOutput(500)))
    count = lambda lines: sum(1 for line in lines if line.startswith("request "))  # noqa: E731
    assert count(tall) > count(small) >= 2


def test_output_pane_of_a_quiet_command():
    lines = draw(snapshots()[-1], 80, 24, ctx=Context(output=FakeOutput(0)))
    assert any(line.startswith("OUTPUT of server  nothing yet") for line in lines)


def test_long_output_lines_are_cut_not_wrapped():
    out = FakeOutput(3)
    out.lines = ["x" * 300, "short"]
    lines = draw(snapshots()[-1], 80, 24, ctx=Context(output=out))
    i = lines.index("short")
    assert lines[i - 1].startswith("xxxx") and lines[i - 1].endswith("…")


# ---------------------------------------------------------------- progress

def test_startup_progress_is_silent_without_a_terminal(capfd):
    from memtrace.output.view.progress import StartupProgress

    with StartupProgress(False) as progress:
        progress.step("compiling")
        progress.step("attaching")
    assert capfd.readouterr() == ("", "")


# ---------------------------------------------------------------- quitting


@pytest.mark.parametrize("width, height", SIZES)
def test_detaching_replaces_the_keys(width, height):
    from memtrace.cli.common import DETACHING

    lines = draw(snapshots()[-1], width, height, ctx=Context(banner=DETACHING))
    assert lines[-1].strip() == DETACHING
    assert lines[0].startswith("anon RSS")  # the last figures stay up


def test_session_says_it_is_quitting_before_the_last_snapshot():
    from memtrace.cli.session import Session

    said = []

    class Keys:
        def __init__(self):
            self.r, self.w = os.pipe()
            os.write(self.w, b"q")

        def fileno(self):
            return self.r

        def read_keys(self):
            os.read(self.r, 1)
            return ["q"]

    def snapshot(**kw):
        said.append("snapshot fresh" if kw.get("fresh") else "snapshot")
        return snapshots(1)[0]

    keys = Keys()
    try:
        outcome = Session(os.getpid(), snapshot, lambda: said.append("detach"), [], 10.0, keys=keys,
                          on_quit=lambda: said.append("quitting")).run()
    finally:
        os.close(keys.r)
        os.close(keys.w)
    assert outcome.reason == "quit"
    assert said == ["quitting", "snapshot fresh", "detach"]


# ---------------------------------------------------------------- holding


class PipeKeys:
    """Keys typed in advance, readable through a pipe as from a terminal."""

    eof = False

    def __init__(self, keys: list[str]) -> None:
        self.r, self.w = os.pipe()
        self.pending = list(keys)
        os.write(self.w, b"k")

    def fileno(self) -> int:
        return self.r

    def read_keys(self) -> list[str]:
        # One key per read, so the view acts between them.
        key = self.pending.pop(0)
        if self.pending:
            os.write(self.w, b"k")
        os.read(self.r, 1)
        return [key]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def test_a_finished_demo_holds_its_view_until_q():
    from memtrace.output.view.live import LiveView

    console = Console(file=io.StringIO(), force_terminal=True, width=80, height=24, color_system=None)
    view = LiveView(console)
    keys = PipeKeys(["t", "x", "q"])
    try:
        view.start()
        final = dataclasses.replace(snapshots()[-1], target_alive=False, exit_status=0)
        view.update(final)
        view.hold(keys, "threads has ended; q quits and prints the summary")
        assert view.mode == "threads"  # keys still work while it holds
        assert keys.pending == []
        out = console.file.getvalue()
        assert "threads has ended; q quits" in out and "exited with status 0" in out
    finally:
        view.stop()
        keys.close()


# ---------------------------------------------------------------- rates and timing


@pytest.mark.parametrize("width, height", SIZES)
def test_no_rate_before_the_second_snapshot(width, height):
    first, second = snapshots(2)
    assert first.heap.counters.alloc_bytes > 0  # it did allocate...
    text = "\n".join(draw(first, width, height, ctx=Context(every_s=1.0)))
    assert "rates: malloc —" in text and "free —" in text
    assert "B/s" not in text  # ...so '0 B/s' would be wrong
    text = "\n".join(draw(second, width, height, ctx=Context(every_s=1.0)))
    assert re.search(r"last 1\.0s: malloc [\d.]+ [KM]iB/s", text), text


@pytest.mark.parametrize("measured", [0.987, 1.0, 1.013, 1.1])
def test_the_header_interval_holds_still(measured):
    snap = dataclasses.replace(snapshots(3)[-1], interval_s=measured)
    text = "\n".join(draw(snap, 160, 50, ctx=Context(every_s=1.0)))
    assert "every 1.0s" in text
    assert "last 1.0s:" in text
    assert not re.search(r"\d+ms\b", text)


def test_an_interval_far_from_the_one_asked_for_says_so():
    snap = dataclasses.replace(snapshots(5)[-1], interval_s=2.5)  # a stall
    text = "\n".join(draw(snap, 160, 50, ctx=Context(every_s=1.0)))
    assert "every 1.0s" in text and "last 2.5s:" in text


def test_one_block_one_call():
    from memtrace.model.snapshot import Counters, HeapTotals, StackStats, TrimStats
    from memtrace.output.view.status import trim_calls_text
    from memtrace.output.reports.text import render_summary

    one = Counters(alloc_bytes=64, free_bytes=0, alloc_count=1, free_count=0)
    snap = dataclasses.replace(
        snapshots(3)[-1], heap=HeapTotals(counters=one, trim_calls=1, trim_released_calls=1),
        stacks=(StackStats(frames=("main+0x1 [app]",), tids=(1,), counters=one),),
        trim=TrimStats(calls=1, returned_bytes=0, estimate_bytes=0))
    text = render_summary(snap)
    assert "in 1 block" in text and "1 blocks" not in text
    assert "in 1 call," in text and "1 calls" not in text
    assert "malloc_trim: 1 call, which released memory" in text
    header = "\n".join(draw(snap, 160, 50))
    assert "(1 call)" in header and "1 calls" not in header
    assert trim_calls_text(2, 0) == "2 calls, none of which released memory"
    assert trim_calls_text(2, 2) == "2 calls, each of which released memory"
    assert trim_calls_text(1, 0) == "1 call, which released nothing"


# ---------------------------------------------------------------- selecting a stack


def deep_snapshot():
    """The synthetic session's last snapshot, one stack 40 frames deep."""
    snap = snapshots()[-1]
    deep = dataclasses.replace(snap.stacks[0], frames=tuple(f"layer_{i}+0x{i:x} [libdeep.so]" for i in range(40)))
    return dataclasses.replace(snap, stacks=(deep,) + snap.stacks[1:])


@pytest.mark.parametrize("width, height", SIZES)
def test_the_selected_row_stays_on_screen(width, height):
    snap = snapshots()[-1]
    from memtrace.output.view.panes import ranked_stacks

    ranked = ranked_stacks(snap, "live")
    cursor = len(ranked) - 1
    lines = draw(snap, width, height, ctx=Context(cursor=cursor))
    title = next(line for line in lines if line.startswith("STACKS"))
    # The last row is shown: a window ending there, or every row.
    m = re.search(r"STACKS\s+(?:\d+-)?(\d+) of (\d+)", title)
    assert m and int(m.group(1)) == int(m.group(2)) == len(ranked), title
    assert ("-" in title) == (height < 50), title
    assert "select" in lines[-1] or "stack" in lines[-1]


def styled_rows(snap, ctx, width=80, height=24):
    console = Console(record=True, width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="standard")
    console.print(render(snap, width, height, "stacks", "live", ctx))
    return console.export_text(styles=True).split("\n")


def test_the_selected_row_is_highlighted():
    snap = snapshots()[-1]
    rows = [line for line in styled_rows(snap, Context(cursor=1)) if "\x1b[7m" in line]  # reverse
    assert len(rows) == 1 and "←" in rows[0]


@pytest.mark.parametrize("width, height", SIZES)
def test_an_expanded_stack_shows_every_frame(width, height):
    snap = deep_snapshot()
    frames = snap.stacks[0].frames
    seen: list[str] = []
    offset = 0
    while True:
        lines = draw(snap, width, height, ctx=Context(cursor=0, expanded=frames, frame_offset=offset))
        assert lines[1].startswith("memtrace  pid")  # who is traced stays up
        assert lines[2].startswith("STACK #")
        assert "back" in lines[-1]
        shown = [line.split("  ", 1)[1] for line in lines if re.match(r"\s*\d+  layer_", line)]
        seen += [f for f in shown if f not in seen]
        if len(seen) == len(frames) or offset > 40:
            break
        offset += len(shown)
    assert seen == list(frames)
    if height >= 50:
        assert offset == 0  # 40 frames fit on one tall screen


def test_keys_select_expand_scroll_and_go_back():
    from memtrace.output.view.keys import split_keys
    from memtrace.output.view.live import LiveView
    from memtrace.output.view.panes import ranked_stacks

    console = Console(file=io.StringIO(), force_terminal=True, width=80, height=24, color_system=None)
    view = LiveView(console)
    snap = deep_snapshot()
    view.start()
    try:
        view.update(snap)
        for key in split_keys("jj\x1b[Ak"):  # down, down, up, up
            assert view.handle_key(key)
        assert view.context.cursor == 0
        for key in split_keys("jj"):
            view.handle_key(key)
        assert view.context.cursor == 2
        view.handle_key("\n")  # Enter
        assert view.context.expanded == tuple(ranked_stacks(snap, "live")[2].frames)
        view.handle_key("esc")
        view.handle_key("k")
        view.handle_key("k")
        view.handle_key("\n")
        assert view.context.expanded == snap.stacks[0].frames  # the deep one ranks first
        for _ in range(100):
            view.handle_key("j")  # scrolls the frames, not past the last screenful
        assert 0 < view.context.frame_offset < 40
        view.handle_key("\r")
        assert view.context.expanded is None and view.context.cursor == 0
        view.handle_key("esc")
        assert view.context.cursor is None
        view.set_mode("arenas")
        assert not view.handle_key("j")  # no stacks table there
    finally:
        view.stop()


# ---------------------------------------------------------------- replay

POSITION = "replay 12.0s of 60.0s (13/61) playing x1 | space play/pause  <-/-> step  P peak  g time  +/- speed  q quit"


@pytest.mark.parametrize("width, height", SIZES + [(60, 12)])
def test_replay_keeps_its_position_line_and_says_replay(width, height):
    snap = snapshots()[-1]
    snap = dataclasses.replace(snap, target_alive=True, notes=tuple(Note.of(TEXT, text=f"note {i}") for i in range(6)))
    lines = draw(snap, width, height, ctx=Context(replay=True, every_s=1.0, status_line=POSITION))
    assert lines[-2].startswith("replay 12.0s of 60.0s")  # right above the keys
    assert " q " in lines[-1]
    text = "\n".join(lines)
    assert re.search(r"memtrace  pid \d+ \(\w+\)  replay  up", text)
    assert "running" not in text


def test_replay_of_an_ended_process_says_both():
    snap = dataclasses.replace(snapshots()[-1], target_alive=False, exit_status=0)
    text = "\n".join(draw(snap, 160, 50, ctx=Context(replay=True, status_line=POSITION)))
    assert "replay: exited with status 0" in text


def test_the_last_frames_are_reached_under_a_command_output():
    from memtrace.output.view.live import LiveView

    console = Console(file=io.StringIO(), force_terminal=True, width=80, height=24, color_system=None)
    view = LiveView(console, context=Context(output=FakeOutput(50)))
    snap = deep_snapshot()
    view.start()
    try:
        view.update(snap)
        view.handle_key("\n")
        for _ in range(60):
            view.handle_key("j")
        offset = view.context.frame_offset
    finally:
        view.stop()
    lines = draw(snap, 80, 24, ctx=Context(output=FakeOutput(50), cursor=0, expanded=snap.stacks[0].frames,
                                           frame_offset=offset))
    assert any(re.match(r"40  layer_39\+0x27", line) for line in lines), "\n".join(lines)
    assert any(line.startswith("OUTPUT of server") for line in lines)
