"""ProcessWatch and task_memory against real processes on this kernel.

tests/programs/netlink_peak.c touches 64 MiB, gives it back and exits with
code 3, single- or multi-threaded; it waits on stdin so the watch is
subscribed before it runs. No BPF is loaded, but the proc connector and
taskstats need root (CAP_NET_ADMIN in the initial namespaces).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import pytest

from memtrace.errors import MemtraceError
from memtrace.process.netlink import ProcEvent, ProcessWatch, task_memory

PROGRAMS = Path(__file__).resolve().parents[1] / "programs"
MIB = 1 << 20
PEAK_BYTES = 64 * MIB
THREADS = 5  # netlink_peak's main + 4 workers
WATCH_TIMEOUT_S = 10.0  # the programs run well under a second


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("not root: the proc connector and taskstats need CAP_NET_ADMIN (run under sudo)",
                    pytrace=False)


@pytest.fixture(scope="module")
def peak_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc not found: apt-get install gcc", pytrace=False)
    binary = tmp_path_factory.mktemp("programs") / "netlink_peak"
    cmd = ["gcc", "-O1", "-g", "-pthread", "-Wall", f"-I{PROGRAMS}", "-o", str(binary),
           str(PROGRAMS / "netlink_peak.c")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr}", pytrace=False)
    return binary


class Watched(NamedTuple):
    pid: int
    returncode: int
    stdout: str
    events: list[ProcEvent]
    peak_rss_bytes: Optional[int]
    peak_vm_bytes: Optional[int]


def watch_run(argv: list[str]) -> Watched:
    """Start argv, which prints "ready" and waits for a line on stdin; watch
    it from then on; release it and read until its exit."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with ProcessWatch(proc.pid) as watch:
            assert watch.available, watch.reason
            # Popen may return before the kernel reports argv's own exec,
            # but not after "ready": drop what came before it.
            assert proc.stdout.readline() == "ready\n"
            watch.read()
            proc.stdin.write("go\n")
            proc.stdin.close()
            events: list[ProcEvent] = []
            deadline = time.monotonic() + WATCH_TIMEOUT_S
            while not watch.exited and time.monotonic() < deadline:
                select.select(watch.filenos(), [], [], 0.5)
                events.extend(watch.read())
            assert watch.exited, f"no exit seen within {WATCH_TIMEOUT_S}s; events: {events}"
            assert watch.overflows == 0
            stdout = proc.stdout.read()
            return Watched(proc.pid, proc.wait(WATCH_TIMEOUT_S), stdout, events,
                           watch.peak_rss_bytes, watch.peak_vm_bytes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rss_at_exit(stdout: str) -> int:
    found = re.search(r"rss_bytes (\d+)", stdout)
    assert found, f"netlink_peak printed no rss_bytes: {stdout!r}"
    return int(found.group(1))


def assert_exited_3_with_peak(run: Watched) -> None:
    assert run.returncode == 3
    exits = [e for e in run.events if e.kind == "exit"]
    assert len(exits) == 1 and exits[0] is run.events[-1], run.events
    assert (exits[0].pid, exits[0].exit_code, exits[0].exit_signal) == (run.pid, 3, None)
    # The peak is the 64 MiB the process touched, which it no longer holds.
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes >= PEAK_BYTES
    assert run.peak_vm_bytes is not None and run.peak_vm_bytes >= run.peak_rss_bytes
    assert rss_at_exit(run.stdout) < PEAK_BYTES // 2 < run.peak_rss_bytes


def test_single_thread_exit_code_and_peak_rss(peak_binary: Path) -> None:
    run = watch_run([str(peak_binary), "single"])
    assert_exited_3_with_peak(run)
    # One thread: its exit is the process's, reported once.
    assert [(e.kind, e.tid) for e in run.events] == [("exit", run.pid)]


def test_exec_is_seen_with_the_new_command_line(peak_binary: Path) -> None:
    run = watch_run(["/bin/sh", "-c", f'echo ready; read _; exec "{peak_binary}" single'])
    assert [e.kind for e in run.events] == ["exec", "exit"]
    assert run.events[0].argv == (str(peak_binary), "single")
    # The peak is the exec'd image's, not the shell's.
    assert_exited_3_with_peak(run)


def test_shell_exec_sleep() -> None:
    run = watch_run(["/bin/sh", "-c", "echo ready; read _; exec sleep 0.3"])
    assert [e.kind for e in run.events] == ["exec", "exit"]
    assert run.events[0].argv == ("sleep", "0.3")
    assert (run.events[1].exit_code, run.returncode) == (0, 0)
    assert run.events[0].ts_ns < run.events[1].ts_ns <= time.monotonic_ns()


def test_a_child_process_is_told_with_its_command_line() -> None:
    # dash runs a command that is not its last as a child: fork, then exec.
    run = watch_run(["/bin/sh", "-c", "echo ready; read _; sleep 0.2; true"])
    children = [e for e in run.events if e.kind == "child"]
    assert children and {e.tid for e in children} == {children[0].tid} != {run.pid}, run.events
    assert children[-1].argv == ("sleep", "0.2"), children
    assert [e.kind for e in run.events if e.kind != "child"] == ["exit"], run.events


def test_multi_threaded_exit_counts_threads_once(peak_binary: Path) -> None:
    run = watch_run([str(peak_binary), "threads"])
    assert_exited_3_with_peak(run)
    # exit_group: every thread's exit is seen, the last one is the process's.
    assert [e.kind for e in run.events] == ["thread-exit"] * (THREADS - 1) + ["exit"]
    assert len({e.tid for e in run.events}) == THREADS
    assert all(e.exit_code == 3 for e in run.events)


def test_leader_exiting_first_is_not_the_process_exit(peak_binary: Path) -> None:
    # main pthread_exit()s with 0; a worker later touches 64 MiB and exits
    # with 3. Only the group's last taskstats record has that peak.
    run = watch_run([str(peak_binary), "leader"])
    first = run.events[0]
    assert (first.kind, first.tid, first.exit_code) == ("thread-exit", run.pid, 0)
    assert_exited_3_with_peak(run)
    assert run.events[-1].tid != run.pid


def test_killed_by_a_signal() -> None:
    run = watch_run(["/bin/sh", "-c", "echo ready; read _; kill -KILL $$"])
    assert run.returncode == -9
    assert [(e.kind, e.exit_code, e.exit_signal) for e in run.events] == [("exit", None, 9)]


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def test_task_memory_of_a_live_process() -> None:
    before = _vm_hwm_bytes()
    memory = task_memory(os.getpid())
    after = _vm_hwm_bytes()
    assert memory.pid == os.getpid()
    # The high-water mark /proc shows, read between two readings of it. The
    # kernel keeps RSS in per-CPU counters: taskstats reads their fast sum,
    # /proc the exact one, which differ by up to a batch (32+ pages) per CPU.
    slack = 4 * 32 * os.sysconf("SC_PAGE_SIZE") * (os.cpu_count() or 1)
    assert before - slack <= memory.hiwater_rss_bytes <= after + slack
    assert memory.hiwater_vm_bytes >= memory.hiwater_rss_bytes


def test_task_memory_of_a_missing_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(MemtraceError, match=rf"no process {proc.pid}"):
        task_memory(proc.pid)


def test_without_cap_net_admin_it_degrades_with_the_reason() -> None:
    script = (
        "from memtrace.process.netlink import ProcessWatch\n"
        "w = ProcessWatch(1)\n"
        "print(w.available, w.peak_rss_available)\n"
        "print(w.reason)\n"
    )
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-c", script],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    flags, reason = done.stdout.splitlines()
    assert flags == "False False"
    assert "taskstats needs CAP_NET_ADMIN" in reason and "run memtrace as root" in reason


def waiting_datagrams(sock) -> int:
    """How many datagrams wait on the socket (read and counted)."""
    sock.setblocking(False)
    count = 0
    while True:
        try:
            sock.recv(1 << 16)
        except BlockingIOError:
            return count
        count += 1


def test_other_processes_exit_records_never_reach_the_taskstats_socket(peak_binary: Path) -> None:
    # The kernel sends a taskstats listener a record for every thread that
    # exits on the machine; the socket's filter keeps the watched process's
    # leader's and its group's last one. The watched process here exits
    # leader first, so the peak comes from the last thread's record.
    proc = subprocess.Popen([str(peak_binary), "leader"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with ProcessWatch(proc.pid) as watch:
            subprocess.run(["sh", "-c", "for i in $(seq 200); do (:); done"], check=True)
            time.sleep(0.2)
            datagrams = waiting_datagrams(watch._taskstats.sock)
            assert datagrams < 40, datagrams  # 200 subshells' exits, a few of others'
            proc.stdin.write("go\n")
            proc.stdin.flush()
            deadline = time.monotonic() + WATCH_TIMEOUT_S
            while not watch.exited and time.monotonic() < deadline:
                watch.read()
                time.sleep(0.02)
            assert watch.exited
            for _ in range(10):  # the group's record comes with the last exit
                watch.read()
                if watch.peak_rss_bytes:
                    break
                time.sleep(0.05)
            assert watch.peak_rss_bytes is not None and watch.peak_rss_bytes >= PEAK_BYTES
    finally:
        proc.kill()
        proc.wait()


def test_other_processes_forks_and_exits_never_reach_the_socket() -> None:
    # The kernel tells every listener of every fork and exit on the machine;
    # the socket's filter keeps those of the watched process and its own.
    idle = subprocess.Popen(["sleep", "30"])
    try:
        with ProcessWatch(idle.pid) as watch:
            subprocess.run(["sh", "-c", "for i in $(seq 200); do (:); done"], check=True)
            time.sleep(0.2)
            datagrams = waiting_datagrams(watch._events.sock)
            # 400 forks and exits of subshells, a few of others' (other work
            # on the machine, the test's own sh and its exec).
            assert datagrams < 40, datagrams
            child = subprocess.Popen(["sleep", "0.1"])  # not the watched one's
            idle.kill()
            idle.wait()
            child.wait()
            deadline = time.monotonic() + WATCH_TIMEOUT_S
            while not watch.exited and time.monotonic() < deadline:
                watch.read()
                time.sleep(0.02)
            assert watch.exited
    finally:
        idle.kill()
        idle.wait()
