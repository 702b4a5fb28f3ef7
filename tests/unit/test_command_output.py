"""A launched command on a pseudo-terminal of its own: what it writes is
logged and kept for the view's pane, and nothing reaches our stdout until
the view hands the screen back. Real children (no BPF needed)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from memtrace.process.command_output import CommandOutput, _plain
from memtrace.process.launch import Launched


def run(argv: list[str], out: CommandOutput, timeout: float = 10.0) -> int:
    launched = Launched(argv, argv[0], terminal=out)
    launched.release()
    deadline = time.monotonic() + timeout
    while launched.poll() is None or not out.closed:
        assert time.monotonic() < deadline, "the command did not finish"
        out.drain()
        time.sleep(0.01)
    return launched.wait()


@pytest.mark.parametrize("raw, shown", [
    ("plain", "plain"),
    ("\x1b[1;31mred\x1b[0m text", "red text"),
    ("10%\r50%\r100%", "100%"),
    ("done\r", "done"),
    ("a\tb", "a       b"),
    ("\x1b]0;title\x07after", "after"),
    ("bell\x07", "bell"),
])
def test_plain(raw, shown):
    assert _plain(raw) == shown


def test_output_is_logged_and_kept(tmp_path, capfd):
    out = CommandOutput("sh")
    try:
        script = ("echo one; echo two >&2; test -t 1 && echo 'stdout is a terminal'; "
                  "read x; echo \"stdin gave '$x'\"; printf 'no newline'")
        assert run(["/bin/sh", "-c", script], out) == 0
        assert out.tail(10) == ["one", "two", "stdout is a terminal", "stdin gave ''", "no newline"]
        assert out.line_count == 4
        assert out.tail(2) == ["stdin gave ''", "no newline"]
    finally:
        out.close()
    with open(out.log_path) as f:
        assert f.read() == "one\ntwo\nstdout is a terminal\nstdin gave ''\nno newline"
    os.unlink(out.log_path)
    assert capfd.readouterr().out == ""  # nothing over the view


def test_log_next_to_the_recording(tmp_path):
    record = tmp_path / "app.rec"
    out = CommandOutput("sh", str(record))
    out.close(keep_log=False)
    assert out.log_path == str(record) + ".output.log"
    assert not os.path.exists(out.log_path)


def test_pass_through_after_the_view(capfd):
    out = CommandOutput("sh")
    try:
        out.pass_through()
        run(["/bin/sh", "-c", "echo after the view"], out)
    finally:
        out.close(keep_log=False)
    assert capfd.readouterr().out == "after the view\n"


def test_the_command_stays_ours_and_nothing_hangs_it_up():
    # In our process group, the terminal's Ctrl-C reaches it as before; and
    # what it leaves running survives its exit and the pty's closing.
    out = CommandOutput("sh")
    try:
        run(["/bin/sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"], out)
        left = int(out.tail(1)[0])
    finally:
        out.close(keep_log=False)
    try:
        assert os.getpgid(left) == os.getpgrp()
        time.sleep(0.2)
        with open(f"/proc/{left}/stat") as f:
            assert f.read().split(") ")[1][0] in "SR"  # alive, not hung up
    finally:
        os.kill(left, signal.SIGKILL)


def test_resize_reaches_the_command():
    out = CommandOutput("sh")
    try:
        out.resize(123, 45)
        run(["/bin/sh", "-c", "stty size <&1"], out)
        assert out.tail(1) == ["45 123"]
    finally:
        out.close(keep_log=False)



def test_a_command_that_never_stops_writing_does_not_hold_us():
    out = CommandOutput("yes")
    try:
        launched = Launched(["/usr/bin/yes", "memtrace"], "/usr/bin/yes", terminal=out)
        launched.release()
        time.sleep(0.2)
        for _ in range(5):
            out.drain()  # returns: it reads a bounded amount each time
        assert out.line_count > 1000
        assert list(out.lines)[-3:] == ["memtrace"] * 3
    finally:
        launched.signal(signal.SIGTERM)
        launched.wait()
        out.close(keep_log=False)


def test_an_unwritable_log_folder_is_one_clear_line(tmp_path, monkeypatch):
    from memtrace.errors import MemtraceError

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(MemtraceError, match=r"cannot create a log file for sh's output in .*missing.*TMPDIR"):
        CommandOutput("sh")
    assert set(os.listdir("/proc/self/fd")) == before  # nothing left open
