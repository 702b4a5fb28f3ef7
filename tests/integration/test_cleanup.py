"""However a trace ends, nothing of memtrace stays in the kernel, and the
traced process carries on as if it had never been traced."""

from __future__ import annotations

import os
import signal

import pytest

pytestmark = pytest.mark.bpf

TRACE = ["--json", "--interval", "0.2"]


def assert_nothing_left(probes, tracer, target_pid: int, events_before: list[str]) -> None:
    """No uprobe, program or link of this trace remains, and tracefs holds no
    probe event it created."""
    prog_ids = {p["prog_id"] for p in tracer.attached_probes}
    assert prog_ids, "no probe was recorded while tracing"
    still_attached = [e for e in probes.perf() if e.get("prog_id") in prog_ids]
    assert not still_attached, f"uprobes still attached: {still_attached}"
    assert not prog_ids & probes.prog_ids(), f"BPF programs still loaded: {prog_ids & probes.prog_ids()}"
    links = [link for link in probes.links() if link.get("prog_id") in prog_ids]
    assert not links, f"BPF links left: {links}"
    ours = (f"bcc_{tracer.pid}", f"/proc/{target_pid}/", "memtrace")
    new_events = [
        line for line in probes.uprobe_events()
        if line not in events_before and any(mark in line for mark in ours)
    ]
    assert not new_events, f"uprobe_events left behind: {new_events}"


@pytest.fixture
def traced_threads(programs, spawn, wait_file, tmp_path):
    """threads --wait, parked; returns (process, truth path)."""
    truth_path = tmp_path / "truth.json"
    target = spawn([programs["threads"], truth_path, "--wait"])
    wait_file(tmp_path / "truth.json.ready", target)
    return target, truth_path


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_detaches_and_target_carries_on(
    sig, traced_threads, start_memtrace, probes, wait_file
):
    target, truth_path = traced_threads
    events_before = probes.uprobe_events()
    tracer = start_memtrace([*TRACE, "-p", str(target.pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)
    wait_file(truth_path, target)

    rc, doc, stderr = tracer.stop(sig)
    assert rc == 0, f"memtrace rc={rc} after {sig.name}: {stderr}"
    assert doc is not None, f"no final JSON after {sig.name}; stderr: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert_nothing_left(probes, tracer, target.pid, events_before)
    # the target frees and checks every block, runs a malloc workload, exits
    assert target.poll() is None, "the target did not survive the detach"
    target.send_signal(signal.SIGUSR1)
    assert target.wait(30) == 0


def test_target_exit_ends_the_trace(traced_threads, start_memtrace, probes, wait_file):
    target, truth_path = traced_threads
    events_before = probes.uprobe_events()
    tracer = start_memtrace([*TRACE, "-p", str(target.pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)
    wait_file(truth_path, target)
    target.send_signal(signal.SIGUSR1)  # second round while traced, then exit 0
    assert target.wait(30) == 0

    rc, doc, stderr = tracer.wait(30)
    assert rc == 0, stderr
    assert doc is not None, f"no final JSON after the target exited; stderr: {stderr}"
    assert doc["pid"] == target.pid
    assert_nothing_left(probes, tracer, target.pid, events_before)


def test_launched_command_exit_ends_the_trace(
    programs, start_memtrace, probes, wait_file, tmp_path
):
    truth_path = tmp_path / "truth.json"
    events_before = probes.uprobe_events()
    tracer = start_memtrace([*TRACE, "--", str(programs["threads"]), str(truth_path), "--wait"])
    # probes are attached before the command's first instruction, so by the
    # time it reports ready they are all in place
    pid = int(wait_file(tmp_path / "truth.json.ready", tracer.proc))
    tracer.wait_attached(probes)
    os.kill(pid, signal.SIGUSR1)
    wait_file(truth_path, tracer.proc)
    os.kill(pid, signal.SIGUSR1)

    rc, doc, stderr = tracer.wait(30)
    assert rc == 0, f"memtrace must exit with the command's status (0): {stderr}"
    assert doc is not None, f"no final JSON; stderr: {stderr}"
    assert doc["pid"] == pid
    assert_nothing_left(probes, tracer, pid, events_before)
