"""A launched command's own pseudo-terminal, while the live view holds ours.

The command writes to the pty's slave side, so it still sees a terminal
(line-buffered output, colours); memtrace reads the master side, keeps every
byte in a log file and the latest lines for the view's output pane. The pty
is not its controlling terminal: it stays in our session and process group,
so Ctrl-C from our terminal reaches it as it always did, and closing the pty
hangs nothing up. Once
the view has given the screen back, `pass_through()` sends what follows to
our stdout as well, as if the command had written there all along.

The command's stdin is /dev/null: the keyboard belongs to the view, and a
command waiting for input that nobody can type would hang unseen. A command
said to need the keyboard (`keep_stdin`) reads our stdin instead, and the
view reads no keys.
"""

from __future__ import annotations

import codecs
import collections
import errno
import fcntl
import os
import re
import select
import struct
import sys
import tempfile
import termios
from typing import Optional

from memtrace.errors import MemtraceError

# Lines the view may show: a tall terminal's pane, no more.
TAIL_LINES = 200
_MAX_LINE = 1000  # a line without a newline stops growing here
_DRAIN_BYTES = 1 << 20

# Escape sequences (colours, cursor moves, titles) mean nothing in a pane.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _plain(line: str) -> str:
    """What a terminal would leave on the line: escapes gone, a carriage
    return starting it over (progress bars), tabs expanded."""
    line = _ESCAPES.sub("", line)
    if "\r" in line:
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
    return _CONTROLS.sub("", line.expandtabs())


def _log_path(record: Optional[str], comm: str) -> tuple[int, str]:
    """A new file: next to the recording when there is one, else in $TMPDIR."""
    if record:
        path = record + ".output.log"
        try:
            return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600), path
        except OSError:
            pass  # taken or unwritable: the temporary folder will do
    fd, path = tempfile.mkstemp(prefix=f"memtrace-{comm}-", suffix=".log")
    return fd, path


class CommandOutput:
    """The pty a launched command writes to, and where its output goes.

    Args:
        command: the command's name, for the pane's title and the log's name.
        record: the recording's path; the log is put next to it.
        keep_stdin: the command reads our stdin rather than /dev/null.
    """

    def __init__(self, command: str, record: Optional[str] = None, keep_stdin: bool = False) -> None:
        self.command = command
        try:
            self.master, self.slave = os.openpty()
        except OSError as e:
            raise MemtraceError(f"cannot open a pseudo-terminal for {command}'s output ({e.strerror}): "
                                "run with --batch to let it write to this terminal") from None
        os.set_blocking(self.master, False)
        os.set_inheritable(self.master, False)
        # The command's bytes as it wrote them: no '\n' -> '\r\n' on the way.
        mode = termios.tcgetattr(self.slave)
        mode[1] &= ~termios.OPOST
        termios.tcsetattr(self.slave, termios.TCSANOW, mode)
        self.stdin = os.dup(0) if keep_stdin else os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._log, self.log_path = _log_path(record, command)
        except OSError as e:
            for fd in (self.master, self.slave, self.stdin):
                os.close(fd)
            raise MemtraceError(f"cannot create a log file for {command}'s output in "
                                f"{tempfile.gettempdir()} ({e.strerror}): set TMPDIR to a writable "
                                "folder, or run with --batch") from None
        self.lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.line_count = 0  # complete lines seen
        self._partial = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._passing = False
        self.closed = False
        self.byte_count = 0

    # -- the child's side

    def child_fds(self) -> tuple[int, int, int]:
        """(stdin, stdout, stderr) for the command."""
        return self.stdin, self.slave, self.slave

    def started(self) -> None:
        """The command has its copies: ours would keep the pty open after it exits."""
        for fd in (self.slave, self.stdin):
            os.close(fd)
        self.slave = self.stdin = -1

    def resize(self, columns: int, rows: int) -> None:
        """Give the pty our terminal's size: what the command reads there
        (SIGWINCH reaches it from our terminal, its controlling one)."""
        if self.closed:
            return
        try:
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        except OSError:
            pass

    # -- our side

    def fileno(self) -> int:
        """The fd to select() on; -1 once the command's side is closed."""
        return -1 if self.closed else self.master

    def drain(self) -> bool:
        """Read what is waiting, up to _DRAIN_BYTES (a command that never
        stops writing must not keep the caller from its other work); True
        if anything came."""
        got = False
        budget = _DRAIN_BYTES
        while not self.closed and budget > 0:
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: every copy of the slave is closed
                    raise
                data = b""
            if not data:
                self._close_master()
                break
            got = True
            budget -= len(data)
            self._take(data)
        return got

    def _take(self, data: bytes) -> None:
        self.byte_count += len(data)
        _write_all(self._log, data)
        if self._passing:
            _write_all(sys.stdout.fileno(), data)
        text = self._partial + self._decoder.decode(data)
        *complete, self._partial = text.split("\n")
        self._partial = self._partial[-_MAX_LINE:]
        # Only what the pane can show is cleaned up and kept.
        self.lines.extend(_plain(line[:_MAX_LINE]) for line in complete[-TAIL_LINES:])
        self.line_count += len(complete)

    def tail(self, count: int) -> list[str]:
        """The last `count` lines, the unfinished one included."""
        if count <= 0:
            return []
        lines = list(self.lines)
        if self._partial:
            lines.append(_plain(self._partial))
        return lines[-count:]

    def pass_through(self) -> None:
        """From now on, also write the command's output to our stdout."""
        sys.stdout.flush()
        self._passing = True

    def _close_master(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.master)

    def close(self, keep_log: bool = True) -> None:
        """Read what is left, then close everything; safe to call twice."""
        if self._log < 0:
            return
        if not keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        try:
            self.drain()
        except OSError:
            pass
        self._close_master()
        for fd in (self.slave, self.stdin):
            if fd >= 0:
                os.close(fd)
        self.slave = self.stdin = -1
        os.close(self._log)
        self._log = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]
