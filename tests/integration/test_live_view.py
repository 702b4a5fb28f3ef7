"""The live view in a real terminal (tmux, 80x24) on a real trace.

A launched command that prints a line every 50 ms must not write over the
view: for 10 s the header keeps the top of the screen and the command's
lines show in the output pane. `q` answers at once ("detaching…") and the
probes are gone when memtrace says so; Ctrl-C then reaches the command
(still in the terminal's foreground process group), and all of its output
is in the log it names. A demo holds its last view (probes removed) until
`q`. Without a terminal the command keeps memtrace's stdin, stdout and
stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

WIDTH, HEIGHT = 80, 24
WATCH_S = 10.0
START_TIMEOUT_S = 120.0  # compiling the probes on a loaded machine
# `q` must answer in under a second; the bound is generous for a loaded CI.
ANSWER_BOUND_S = 1.5
DETACH_TIMEOUT_S = 60.0

CHATTY = """#!/bin/sh
i=0
while :; do i=$((i+1)); echo "tick $i"; sleep 0.05; done
"""


class Tmux:
    """A private tmux server (its own socket) with one window."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux not found: install.sh --test-tools installs it", pytrace=False)
        self.socket = str(tmp_path / "tmux.sock")

    def run(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"tmux {' '.join(args)}: {done.stderr.strip()}", pytrace=False)
        return done.stdout

    def start(self, command: str) -> int:
        self.run("new-session", "-d", "-s", "t", "-x", str(WIDTH), "-y", str(HEIGHT), command)
        return int(self.run("list-panes", "-t", "t", "-F", "#{pane_pid}").split()[0])

    def screen(self, history: bool = False) -> list[str]:
        """The visible lines; with `history`, those scrolled off too."""
        args = ("-S", "-", "-J") if history else ()  # -J: wrapped lines joined
        return self.run("capture-pane", "-p", "-t", "t", *args).rstrip("\n").split("\n")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "t", *keys)

    def wait_for(self, pattern: str, timeout: float, history: bool = False) -> tuple[list[str], float]:
        """The screen once `pattern` shows on it, and when that was."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen(history)
            if any(re.search(pattern, line) for line in lines):
                return lines, time.monotonic()
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} not on the screen after {timeout:.0f} s:\n" + "\n".join(lines),
                            pytrace=False)
            time.sleep(0.02)

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux(tmp_path):
    t = Tmux(tmp_path)
    yield t
    t.kill()


def _trace_chatty(tmux: Tmux, tmp_path: Path, memtrace_cmd: list[str]) -> tuple[int, Path]:
    """memtrace -- chatty.sh in the tmux window, under a shell that writes
    memtrace's exit status to a file: (the shell's pid, that file)."""
    chatty = tmp_path / "chatty.sh"
    chatty.write_text(CHATTY)
    chatty.chmod(0o755)
    done_file = tmp_path / "exit-status"
    memtrace = " ".join(memtrace_cmd)
    # The shell outlives Ctrl-C (a handler, which memtrace does not inherit).
    shell = tmux.start(f"sh -c 'trap : INT; {memtrace} --interval 0.5 -- {chatty}; echo $? > {done_file}; "
                       "sleep 600'")
    return shell, done_file


def _wait_for_exit(tmux: Tmux, done_file: Path) -> str:
    """memtrace's exit status, once the shell has written it."""
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    while not done_file.exists() or not done_file.read_text().strip():
        assert time.monotonic() < deadline, "\n".join(tmux.screen())
        time.sleep(0.05)
    return done_file.read_text().strip()


def _is_header(line: str) -> bool:
    return line.startswith("anon RSS") or line.startswith("memtrace  pid")


def test_launched_command_logs_into_its_pane_and_q_answers_at_once(tmux, tmp_path, memtrace_cmd, probes):
    shell, done_file = _trace_chatty(tmux, tmp_path, memtrace_cmd)

    tmux.wait_for(r"^memtrace  pid", START_TIMEOUT_S)
    tmux.wait_for(r"^tick \d+", 10)
    seen = []
    end = time.monotonic() + WATCH_S
    while time.monotonic() < end:
        lines = tmux.screen()
        assert _is_header(lines[0]), "\n".join(lines)
        assert any(line.startswith("memtrace  pid") for line in lines[:3]), "\n".join(lines)
        title = next((i for i, line in enumerate(lines) if line.startswith("OUTPUT of chatty.sh")), None)
        assert title is not None, "\n".join(lines)
        ticks = [int(m.group(1)) for line in lines if (m := re.match(r"^tick (\d+)$", line))]
        # Its lines are in the pane, and nowhere else.
        assert all(re.match(r"^tick \d+$", line) for line in lines[title + 1 : HEIGHT - 1]), "\n".join(lines)
        assert not any(line.startswith("tick") for line in lines[:title]), "\n".join(lines)
        if ticks:
            seen.append(ticks[-1])
        assert " q " in lines[-1]
        time.sleep(0.25)
    assert len(seen) > 10 and seen[-1] - seen[0] > 50, seen  # the pane kept up with it

    tracer = [p for p in probes.below(shell) if p != shell]
    assert probes.perf(tracer), "no uprobes while tracing"
    pressed = time.monotonic()
    tmux.keys("q")
    _, answered = tmux.wait_for(r"detaching", DETACH_TIMEOUT_S)
    assert answered - pressed < ANSWER_BOUND_S
    # The command's output held back while detaching follows at once: it
    # may have scrolled the line off already.
    tmux.wait_for(r"probes removed; waiting for \S*chatty\.sh", DETACH_TIMEOUT_S, history=True)
    assert not probes.perf(tracer), "a uprobe is left after memtrace said the probes were removed"
    # The command runs on, its output now on our terminal.
    tmux.wait_for(r"^tick \d+$", 5)

    tmux.keys("C-c")  # the terminal's Ctrl-C: the command is still in its process group
    assert _wait_for_exit(tmux, done_file) == "130"  # the command's status: killed by SIGINT
    screen = "\n".join(tmux.screen(history=True))
    m = re.search(r"the output of chatty\.sh is in (\S+)", screen)
    assert m, screen
    log = Path(m.group(1)).read_text()
    numbers = [int(n) for n in re.findall(r"^tick (\d+)$", log, re.M)]
    assert numbers[:3] == [1, 2, 3] and numbers == list(range(1, len(numbers) + 1))
    os.unlink(m.group(1))


def test_without_a_terminal_the_command_keeps_our_stdio(memtrace_cmd):
    """Batch (no terminal): no pty, no log, no progress: the command reads
    our stdin and writes to our stdout and stderr, as it always did."""
    script = 'read line; echo "got $line"; echo "to stderr" >&2'
    done = subprocess.run([*memtrace_cmd, "--batch", "--", "/bin/sh", "-c", script], input="hello\n",
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert "got hello\n" in done.stdout
    assert "to stderr\n" in done.stderr
    assert "output of" not in done.stderr and "memtrace: " not in done.stderr, done.stderr


def test_an_interactive_demo_holds_its_last_view_until_q(tmux, tmp_path, memtrace_cmd, probes):
    done_file = tmp_path / "exit-status"
    memtrace = " ".join(memtrace_cmd)
    shell = tmux.start(f"sh -c '{memtrace} demo leak --interval 0.5 -- --seconds 1; echo $? > {done_file}; "
                       "sleep 600'")
    tmux.wait_for(r"^memtrace  pid", START_TIMEOUT_S)
    lines, _ = tmux.wait_for(r"leak has ended; q quits", 60)
    assert any("exited with status 0" in line for line in lines), "\n".join(lines)
    tracer = [p for p in probes.below(shell) if p != shell]
    assert not probes.perf(tracer), "probes left while the view holds"
    time.sleep(3)
    lines = tmux.screen()
    assert any("leak has ended; q quits" in line for line in lines), "\n".join(lines)
    assert not done_file.exists()
    tmux.keys("q")
    assert _wait_for_exit(tmux, done_file) == "0"
    assert any(line.startswith("memtrace summary") for line in tmux.screen(history=True))


def test_ctrl_c_reaches_a_command_that_writes_to_a_pty(tmux, tmp_path, memtrace_cmd, probes):
    shell, done_file = _trace_chatty(tmux, tmp_path, memtrace_cmd)
    tmux.wait_for(r"^memtrace  pid", START_TIMEOUT_S)
    tmux.wait_for(r"^tick \d+", 10)
    tracer = [p for p in probes.below(shell) if p != shell]
    tmux.keys("C-c")  # reaches the command too (our process group); memtrace traces its end
    assert _wait_for_exit(tmux, done_file) == "130"
    screen = tmux.screen(history=True)
    assert any("exited with status 130" in line for line in screen), "\n".join(screen)
    assert not probes.perf(tracer)
