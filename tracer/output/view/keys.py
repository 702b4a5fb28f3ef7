"""Single keystrokes from the terminal, without threads.

The main loop select()s on `KeyReader.fileno()` alongside its interval
timer and calls `read_keys()` when the fd is readable (or just polls it:
it never blocks). The terminal is in cbreak mode only inside the `with`.
"""

from __future__ import annotations

import os
import select
import sys
import termios
from typing import Any, Optional

from memtrace.errors import MemtraceError

QUIT = "quit"
TOGGLE_SORT = "sort"  # rank the stacks by live or by retained bytes
SELECT_UP, SELECT_DOWN = "select-up", "select-down"  # move through the stacks table
EXPAND = "expand"  # show the selected stack's every frame, or go back
BACK = "back"

# What each key does; a mode name means "switch the live view to it".
# The main loop handles QUIT and hands every other key to the live view's
# `handle_key`, which acts on the rest; its footer lists them.
KEY_BINDINGS: dict[str, str] = {
    "q": QUIT,
    "s": "stacks",
    "t": "threads",
    "a": "arenas",
    "r": TOGGLE_SORT,
    "up": SELECT_UP,
    "k": SELECT_UP,
    "down": SELECT_DOWN,
    "j": SELECT_DOWN,
    "\n": EXPAND,  # Enter, as the terminal turns it into a newline
    "\r": EXPAND,
    "esc": BACK,
}

# Escape sequences xterm-like terminals send, named so callers can bind them.
_SEQUENCES = {
    "\x1b[A": "up",
    "\x1b[B": "down",
    "\x1b[C": "right",
    "\x1b[D": "left",
    "\x1b[H": "home",
    "\x1b[F": "end",
    "\x1b[5~": "pgup",
    "\x1b[6~": "pgdn",
    "\x1bOA": "up",
    "\x1bOB": "down",
    "\x1bOC": "right",
    "\x1bOD": "left",
}


def split_keys(text: str) -> list[str]:
    """'q\\x1b[Ab' -> ['q', 'up', 'b']; a lone or unknown escape is 'esc'."""
    keys: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b":
            for seq, name in _SEQUENCES.items():
                if text.startswith(seq, i):
                    keys.append(name)
                    i += len(seq)
                    break
            else:
                keys.append("esc")
                i += 1
                # Skip the rest of an unknown CSI sequence, up to its final byte.
                if text.startswith("[", i):
                    i += 1
                    while i < len(text) and not ("@" <= text[i] <= "~"):
                        i += 1
                    i += 1
            continue
        keys.append(text[i])
        i += 1
    return keys


class KeyReader:
    """Cbreak mode on a terminal fd for the life of a `with` block.

    Echo and line buffering are off, signals (Ctrl-C) still work, and reads
    never block: VMIN=0/VTIME=0 in termios, so the fd itself stays blocking
    (setting O_NONBLOCK would leak to stdout, which shares the terminal).
    """

    def __init__(self, fd: Optional[int] = None) -> None:
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._saved: Optional[list[Any]] = None
        self.eof = False  # the terminal hung up: the caller should stop

    def fileno(self) -> int:
        return self._fd

    def __enter__(self) -> "KeyReader":
        if not os.isatty(self._fd):
            raise MemtraceError(
                "keyboard input needs a terminal on stdin: run in a terminal, or use batch output"
            )
        self._saved = termios.tcgetattr(self._fd)
        mode = termios.tcgetattr(self._fd)
        mode[3] &= ~(termios.ECHO | termios.ICANON)  # lflag
        mode[6][termios.VMIN] = 0
        mode[6][termios.VTIME] = 0
        termios.tcsetattr(self._fd, termios.TCSANOW, mode)
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put the terminal back as it was; safe to call more than once."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        try:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
        except (termios.error, OSError):
            pass  # the terminal is gone: there is nothing left to restore

    def read_keys(self) -> list[str]:
        """Keys typed since the last call; [] at once if there are none."""
        if self._saved is None or self.eof:
            return []
        data = b""
        while True:
            try:
                ready, _, _ = select.select([self._fd], [], [], 0)
            except (OSError, ValueError):
                self.eof = True
                break
            if not ready:
                break
            try:
                chunk = os.read(self._fd, 1024)
            except OSError:
                self.eof = True
                break
            if not chunk:
                # Readable yet empty: the other end of the terminal is gone.
                self.eof = True
                break
            data += chunk
        return split_keys(data.decode("utf-8", errors="replace"))
