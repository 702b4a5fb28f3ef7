"""`memtrace replay`: a recording played back through the live view.

`Player` holds where the replay is and how it moves; it is pure (keys and
the recording's times in, an index out), so the whole key map is tested
without a terminal. `ReplayCommand` wires it to the live view and the
keyboard, or prints plain snapshots when there is no terminal. No root and
no BPF: nothing here imports bcc.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from memtrace.model.snapshot import Snapshot
from memtrace.record.reader import Recording, open_recording, when_arg

QUIT = "quit"
SPEEDS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# Longest wait between two frames, whatever the recording's interval: a
# recording with an hour-long gap still moves.
MAX_FRAME_WAIT_S = 5.0
_IDLE_POLL_S = 0.5  # wake-ups while paused, to notice a resized terminal

HELP = "space play/pause  <-/-> step  P peak  g time  +/- speed  q quit"
# Keys the player owns; any other key may switch the live view's mode.
PLAYER_KEYS = frozenset({"q", " ", "right", "n", "left", "p", "P", "home", "end", "g", "+", "=", "-", "_"})


def _speed_text(speed: float) -> str:
    return f"x{speed:g}" if speed >= 1 else f"x1/{round(1 / speed)}"


@dataclass
class Player:
    """The replay position and what each key does to it."""

    times: list[float]  # elapsed_s of each snapshot
    peak: int
    index: int = 0
    playing: bool = True
    speed: float = 1.0
    entry: Optional[str] = None  # seconds being typed after 'g'
    message: str = ""

    def handle(self, key: str) -> Optional[str]:
        """Apply one key; QUIT when the replay should end."""
        if self.entry is not None:
            if self._edit_entry(key):
                return None
        self.message = ""
        if key == "q":
            return QUIT
        if key == " ":
            if not self.playing and self.index >= len(self.times) - 1:
                self.index = 0  # play again from the start
            self.playing = not self.playing
        elif key in ("right", "n"):
            self.playing = False
            self.index = min(self.index + 1, len(self.times) - 1)
        elif key in ("left", "p"):
            self.playing = False
            self.index = max(self.index - 1, 0)
        elif key == "P":
            self.playing = False
            self.index = self.peak
            self.message = "at the peak"
        elif key in ("home",):
            self.index = 0
        elif key in ("end",):
            self.playing = False
            self.index = len(self.times) - 1
        elif key == "g":
            self.entry = ""
        elif key in ("+", "="):
            self.speed = min(SPEEDS[-1], self.speed * 2)
        elif key in ("-", "_"):
            self.speed = max(SPEEDS[0], self.speed / 2)
        return None

    def _edit_entry(self, key: str) -> bool:
        """Keys while a time is typed; False hands the key back to handle()."""
        entry = self.entry or ""
        if key.isdigit() or (key == "." and "." not in entry):
            self.entry = entry + key
        elif key in ("\x7f", "\b"):
            self.entry = entry[:-1]
        elif key in ("\r", "\n"):
            self.entry = None
            if entry:
                self.jump_to(float(entry) if entry != "." else 0.0)
        elif key == "esc":
            self.entry = None
        else:
            self.entry = None
            return False
        return True

    def jump_to(self, seconds: float) -> None:
        self.playing = False
        self.index = max(0, bisect.bisect_right(self.times, seconds) - 1)
        self.message = f"at {self.times[self.index]:.1f}s"

    def wait_s(self) -> Optional[float]:
        """Seconds until the next snapshot is due; None when not moving."""
        if not self.playing or self.index >= len(self.times) - 1:
            return None
        gap = max(0.0, self.times[self.index + 1] - self.times[self.index])
        return min(gap / self.speed, MAX_FRAME_WAIT_S)

    def advance(self) -> None:
        if self.index < len(self.times) - 1:
            self.index += 1
        if self.index >= len(self.times) - 1:
            self.playing = False
            self.message = "end of the recording: space plays it again"

    def status(self) -> str:
        state = "playing" if self.playing else "paused"
        end = self.times[-1] if self.times else 0.0
        line = (
            f"replay {self.times[self.index]:.1f}s of {end:.1f}s"
            f" ({self.index + 1}/{len(self.times)}) {state} {_speed_text(self.speed)}"
        )
        if self.entry is not None:
            return f"{line} | go to: {self.entry}_ s (Enter jumps, Esc cancels)"
        if self.message:
            line += f" | {self.message}"
        return f"{line} | {HELP}"


# ---------------------------------------------------------------- the view


class _Screen:
    """The live view and keyboard, the only part touching the terminal."""

    def __init__(self, every_s: Optional[float] = None) -> None:
        from memtrace.output.view.context import Context
        from memtrace.output.view.keys import KeyReader
        from memtrace.output.view.live import LiveView

        self.keys = KeyReader()
        # The header says "replay"; the position line stays at every size.
        self.view = LiveView(context=Context(replay=True, every_s=every_s))
        self.resized = False
        self._old_winch: Any = None

    def __enter__(self) -> "_Screen":
        self.keys.__enter__()
        try:
            self._old_winch = signal.signal(signal.SIGWINCH, self._on_winch)
            self.view.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.view.stop()
        finally:
            if self._old_winch is not None:
                signal.signal(signal.SIGWINCH, self._old_winch)
            self.keys.restore()

    def _on_winch(self, signum: int, frame: object) -> None:
        self.resized = True

    def show(self, snapshot: Snapshot, position: str) -> None:
        self.view.context = dataclasses.replace(self.view.context, status_line=position)
        self.view.update(snapshot)

    def wait_keys(self, timeout: float) -> list[str]:
        try:
            ready, _, _ = select.select([self.keys], [], [], max(0.0, timeout))
        except InterruptedError:  # pragma: no cover - PEP 475 retries select
            ready = []
        keys = self.keys.read_keys() if ready else []
        if self.resized:
            self.resized = False
            self.view.refresh()
        return keys


def play(recording: Recording, player: Player, screen: _Screen) -> None:
    """The interactive loop: show, wait for a key or the next frame, repeat."""
    shown: Optional[tuple[int, str]] = None
    due: Optional[float] = None
    while True:
        snapshot = recording.snapshot(player.index)
        if len(recording) != len(player.times):
            # Damage found on the way: the recording was cut short.
            player.times = [p.elapsed_s for p in recording.points]
            player.index = min(player.index, len(player.times) - 1)
            player.peak = min(player.peak, len(player.times) - 1)
        status = player.status()
        if shown != (player.index, status):
            screen.show(snapshot, status)
            shown = (player.index, status)
        wait = player.wait_s()
        now = time.monotonic()
        if wait is None:
            due = None
        elif due is None:
            due = now + wait
        timeout = _IDLE_POLL_S if due is None else min(_IDLE_POLL_S, due - now)
        keys = screen.wait_keys(timeout)
        if screen.keys.eof:
            return
        for key in keys:
            if player.entry is None and key not in PLAYER_KEYS:
                screen.view.handle_key(key)  # view keys: s t a r
                continue
            before = (player.index, player.playing, player.speed)
            if player.handle(key) == QUIT:
                return
            if (player.index, player.playing, player.speed) != before:
                due = None
        if due is not None and time.monotonic() >= due:
            player.advance()
            due = None


def print_batch(recording: Recording, start: int, out: Any = None) -> None:
    """Without a terminal: every snapshot from `start` on, as plain text."""
    from memtrace.output.view.text import BatchView

    out = out or sys.stdout
    view = BatchView(out)
    total = len(recording)
    i = start
    while i < len(recording):
        snapshot = recording.snapshot(i)
        if i >= len(recording):
            break  # cut short by damage
        out.write(f"=== replay {snapshot.elapsed_s:.1f}s ({i + 1}/{total})\n")
        view.update(snapshot)
        i += 1
    view.close()




def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not SPEEDS[0] <= value <= SPEEDS[-1]:
        raise argparse.ArgumentTypeError(f"speed must be between 1/16 and {SPEEDS[-1]:g}")
    return value


def _interval_asked(metadata: dict) -> Optional[float]:
    """The --interval the recording was made with, if it says."""
    options = metadata.get("options")
    interval = options.get("interval") if isinstance(options, dict) else None
    return float(interval) if isinstance(interval, (int, float)) and interval > 0 else None


class ReplayCommand:
    """Play a recording (made with --record FILE) in the live view.

    keys: space play/pause, right/left or n/p step, P jump to the peak,
    g then seconds and Enter jump to a time, + and - change the speed,
    s/t switch the view, q quit. Without a terminal the snapshots are
    printed as plain text (from --at on). Needs no root.

    examples:
      memtrace replay app.rec
      memtrace replay app.rec --at peak         start paused at the highest RSS
      memtrace replay app.rec --speed 8
      memtrace replay app.rec --at 60 | less    plain text from 60 s on
    """

    name = "replay"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", metavar="FILE", help="a recording made with --record")
        parser.add_argument("--at", type=when_arg, metavar="T|end|peak",
                            help="start here, paused: seconds since the start, 'end' or 'peak'")
        parser.add_argument("--speed", type=_speed, default=1.0, metavar="X",
                            help="playback speed, 1/16 to 64 (default 1: as recorded)")
        parser.add_argument("--batch", action="store_true",
                            help="print plain-text snapshots even on a terminal")

    def run(self, args: argparse.Namespace) -> int:
        with open_recording(os.fspath(args.file)) as recording:
            start = recording.index_at(args.at) if args.at else 0
            interactive = not args.batch and sys.stdout.isatty() and sys.stdin.isatty()
            if not interactive:
                try:
                    print_batch(recording, start)
                except BrokenPipeError:
                    from memtrace.cli.report import quiet_stdout

                    quiet_stdout()
                return 0
            player = Player(
                times=[p.elapsed_s for p in recording.points],
                peak=recording.peak_index() or 0,
                index=start,
                playing=args.at is None,
                speed=args.speed,
            )
            with _Screen(_interval_asked(recording.metadata)) as screen:
                play(recording, player, screen)
        return 0
