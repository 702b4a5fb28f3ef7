"""A launched command is held once ld.so has mapped its libraries, while
memtrace is still its ptrace tracer, so that their unwind tables and names
are in place for its very first calls (bpf/launch.bpf.c,
collect/launchhold.py, process/launch.py).

- tests/programs/first_calls.c starts four threads as soon as main runs,
  and each allocates at once. Without the hold, their stacks stopped at
  start_thread (libc's table not placed yet), or at thread_main when the
  program was gone before its maps were read again.
- A shell that execs first_calls (`sh -c 'exec ...'`, a wrapper script's
  last line) is followed through the exec, and the program it runs is held
  the same way: before, its stacks were bare addresses (it was gone before
  its maps could be read). The shell's signals pass through memtrace
  meanwhile, and a shell still running when the trace ends is let go.
- Debian's xz compressing with two threads: without the hold, one run in
  three had each thread stack twice, once cut at start_thread.
- The hold itself, with no BPF: a command that never reaches it is stopped
  by hand and goes on; one that exits first has its status kept; and one
  whose tracer dies while it is held carries on, the signal that held it
  ignored.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtrace.process.launch import Launched

FIRST_CALLS = 3 * 4  # FIRST_BLOCKS x THREADS in first_calls.c
FIRST_SIZE = 7001


def function_of(frame: str) -> str:
    return frame.split(" ", 1)[0].split("+", 1)[0].split("@", 1)[0]


@pytest.mark.bpf
def test_a_launched_programs_first_calls_are_walked_whole(programs, run_memtrace):
    rc, doc, stderr = run_memtrace(["--json", "-v", "--", programs["first_calls"]])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert "held" in stderr and "once ld.so had mapped its libraries" in stderr, stderr
    stacks = [[function_of(f) for f in s["frames"]] + [s["alloc_count"], s["alloc_bytes"]]
              for s in doc["stacks"]]
    first = [s for s in doc["stacks"] if function_of(s["frames"][0]) == "first_call"]
    assert sum(s["alloc_count"] for s in first) == FIRST_CALLS, stacks
    assert sum(s["alloc_bytes"] for s in first) == FIRST_CALLS * FIRST_SIZE, stacks
    for s in first:
        assert [function_of(f) for f in s["frames"]] == [
            "first_call", "thread_main", "start_thread", "clone3"], stacks
        assert not s["truncated"], s
    # main's own first call into libc: pthread_create's thread storage
    tls = [s for s in doc["stacks"] if "pthread_create" in map(function_of, s["frames"])]
    assert tls, stacks
    for s in tls:
        assert function_of(s["frames"][-1]) == "_start", stacks


@pytest.mark.bpf
def test_a_program_a_shell_execs_is_held_as_well(programs, run_memtrace):
    rc, doc, stderr = run_memtrace(["--json", "--", "/bin/sh", "-c", f"exec {programs['first_calls']}"])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert [n["kind"] for n in doc["notes"]].count("exec") == 1, doc["notes"]
    stacks = [[function_of(f) for f in s["frames"]] for s in doc["stacks"]]
    first = [s for s in doc["stacks"] if function_of(s["frames"][0]) == "first_call"]
    assert sum(s["alloc_count"] for s in first) == FIRST_CALLS, stacks
    for s in first:
        assert [function_of(f) for f in s["frames"]] == [
            "first_call", "thread_main", "start_thread", "clone3"], stacks
    tls = [s for s in doc["stacks"] if "pthread_create" in map(function_of, s["frames"])]
    assert tls and all(function_of(s["frames"][-1]) == "_start" for s in tls), stacks


@pytest.mark.bpf
def test_a_shell_followed_through_its_exec_gets_its_signals(start_memtrace):
    tracer = start_memtrace(["--json", "--", "/bin/sh", "-c", "trap 'exit 7' INT; sleep 20 & wait"])
    shell = _child_shell(tracer.pid, "^/bin/sh -c trap")
    time.sleep(1.0)  # the trace is under way: memtrace is still its tracer
    assert _tracer_of(shell) == tracer.pid
    os.kill(shell, signal.SIGINT)  # stops it for memtrace, which passes it on
    rc, doc, stderr = tracer.wait(30)
    assert rc == 7, stderr


@pytest.mark.bpf
def test_a_followed_shell_stopped_by_a_job_control_signal_stays_stopped(start_memtrace):
    tracer = start_memtrace(["--json", "--", "/bin/sh", "-c", "sleep 3; exit 5"])
    shell = _child_shell(tracer.pid, "^/bin/sh -c sleep 3")
    time.sleep(1.0)
    assert _tracer_of(shell) == tracer.pid
    # passed on as memtrace lets it go: a plain stop (SIGSTOP: a SIGTSTP
    # is discarded in an orphaned process group, as under some CI shells)
    os.kill(shell, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while _state_of(shell) != "T" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state_of(shell) == "T" and _tracer_of(shell) == 0
    time.sleep(0.5)
    assert _state_of(shell) == "T"  # not continued behind its back
    os.kill(shell, signal.SIGCONT)
    rc, doc, stderr = tracer.wait(30)
    assert rc == 5, stderr


def _child_shell(tracer_pid: int, pattern: str) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = subprocess.run(["pgrep", "-f", "-P", str(tracer_pid), pattern],
                               capture_output=True, text=True).stdout.split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    pytest.fail("the shell never started", pytrace=False)


def _state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).split()[1]
    except FileNotFoundError:
        pytest.fail(f"pid {pid} is gone: it was not stopped", pytrace=False)


@pytest.mark.bpf
def test_a_shell_still_running_when_the_trace_ends_is_let_go(run_memtrace, tmp_path):
    said = tmp_path / "tracer"
    script = f"sleep 4; grep TracerPid /proc/$$/status > {said}; exit 3"
    rc, doc, stderr = run_memtrace(["--json", "--duration", "1", "--", "/bin/sh", "-c", script])
    assert rc == 3, stderr
    assert said.read_text().split() == ["TracerPid:", "0"]


def _tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("TracerPid:")).split()[1])


@pytest.mark.bpf
def test_xz_thread_stacks_are_whole_from_their_first_call(run_memtrace, tmp_path):
    xz = shutil.which("xz")
    assert xz, "xz is missing: run install.sh --test-tools"
    data = tmp_path / "in.bin"
    data.write_bytes(os.urandom(24 << 20))  # a few blocks for each of the two threads
    rc, doc, stderr = run_memtrace(["--json", "--", xz, "-T2", "-1", "-k", "-f", data])
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    threaded = [[function_of(f) for f in s["frames"]] for s in doc["stacks"]
                if any(function_of(f) == "start_thread" for f in s["frames"])]
    assert threaded, "no stack through xz's threads"
    cut = [frames for frames in threaded if frames[-1] != "clone3"]
    assert not cut, cut


class NeverReached:
    """A hold whose signal never comes on its own (no probe behind it)."""

    signal = signal.SIGURG

    def __init__(self) -> None:
        self.disarmed = self.reached_calls = 0

    def disarm(self) -> None:
        self.disarmed += 1

    def reached(self) -> None:
        self.reached_calls += 1

    def follows_exec(self) -> bool:
        return False


def test_a_hold_never_reached_is_stopped_by_hand_and_the_command_goes_on(tmp_path):
    marker = tmp_path / "went-on"
    launched = Launched(["/bin/sh", "-c", f"sleep 0.6; echo yes > {marker}"], "/bin/sh")
    hold = NeverReached()
    started = time.monotonic()
    launched.release(hold, wait_s=0.3)
    assert time.monotonic() - started < 1.3
    assert hold.disarmed == 1 and hold.reached_calls == 0  # the stop was ours, not ld.so's
    assert launched.wait() == 0
    assert marker.read_text() == "yes\n"


def test_a_command_that_exits_before_its_hold_keeps_its_status():
    launched = Launched(["/bin/sh", "-c", "exit 7"], "/bin/sh")
    launched.release(NeverReached(), wait_s=5.0)
    assert launched.poll() == 7
    assert launched.wait() == 7


HELD_THEN_TRACER_DIES = """
import os, signal, sys
from memtrace.process.launch import Launched

class DiesWhileHolding:
    signal = signal.SIGURG
    def disarm(self): pass
    def reached(self):
        os.kill(os.getpid(), signal.SIGKILL)  # the tracer dies, the command held

marker = sys.argv[1]
# The command raises the hold's signal itself, as the probe would in ld.so.
Launched(["/bin/sh", "-c", "kill -URG $$; echo went on > " + marker],
         "/bin/sh").release(DiesWhileHolding())
"""


def test_a_command_held_when_its_tracer_dies_carries_on(tmp_path):
    marker = tmp_path / "went-on"
    tracer = subprocess.run([sys.executable, "-c", HELD_THEN_TRACER_DIES, str(marker)],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert tracer.returncode == -signal.SIGKILL, tracer.stderr
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(marker).read_text() == "went on\n"
