"""`memtrace agent --light` following a cgroup whose processes come and go.

The test makes its own cgroup in the cgroup v2 hierarchy and starts idle.c
in it (a shell writes itself into cgroup.procs, then execs the program).
The agent must attach to each process that appears, serve all of them on
one /metrics, detach from one that exits (its probes gone from the kernel),
leave alone a process outside the cgroup, and harm none of them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memtrace.process.follow import cgroup2_root

pytestmark = pytest.mark.bpf

WAIT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cgroup():
    path = Path(cgroup2_root()) / f"memtrace-test-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as e:
        pytest.fail(f"cannot make a test cgroup {path}: {e}", pytrace=False)
    yield path
    remove_cgroup(path)


def remove_cgroup(path: Path) -> None:
    """Its processes killed, then the cgroup removed once they are gone."""
    for pid in (path / "cgroup.procs").read_text().split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while True:
        try:
            path.rmdir()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def start_agent(start_memtrace, args) -> object:
    """The agent, once it says it follows (its BPF object loaded)."""
    port = free_port()
    agent = start_memtrace(["agent", *args, "--serve", str(port)])
    agent.port = port
    deadline = time.monotonic() + WAIT_S
    while "following" not in agent.stderr_so_far():
        if agent.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the agent did not start: {agent.stderr_so_far()}", pytrace=False)
        time.sleep(0.1)
    return agent


def start_in(cgroup: Path, argv, spawn) -> subprocess.Popen:
    """argv started inside the cgroup: the shell joins it, then execs."""
    script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
    return spawn(["sh", "-c", script, "sh", *argv])


def scrape(port: int) -> dict[str, dict[str, float]]:
    """metric name -> {pid label or '': value}; "comm" -> {pid: comm}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, dict] = {"comm": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[s.labels.get("pid", "")] = s.value
            if "pid" in s.labels:
                out["comm"][s.labels["pid"]] = s.labels["comm"]
    return out


def wait_until(check, what: str, agent) -> dict:
    deadline = time.monotonic() + WAIT_S
    last = None
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            pytest.fail(f"the agent exited (rc={agent.proc.returncode}): "
                        f"{agent.stderr_so_far()}", pytrace=False)
        try:
            last = scrape(agent.port)
            if check(last):
                return last
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    pytest.fail(f"{what} not seen within {WAIT_S}s; last scrape: {last}; "
                f"agent: {agent.stderr_so_far()}", pytrace=False)


def traced_pids(metrics: dict) -> set[str]:
    """The pids served, once each runs idle (the shell that started it
    may be caught before its exec, and is attached again after it)."""
    pids = set(metrics.get("memtrace_rss_bytes", {}))
    return pids if all(metrics["comm"][p] == "idle" for p in pids) else {"(not idle yet)"}


def test_agent_follows_a_cgroup(cgroup, programs, spawn, start_memtrace, probes):
    port = free_port()
    agent = start_memtrace(["agent", "--light", "--cgroup", str(cgroup), "--serve", str(port),
                            "--interval", "0.5"])
    agent.port = port
    idle = programs["idle"]
    outsider = spawn([idle])
    static = start_in(cgroup, [programs["idle_static"]], spawn)  # refused, once
    first = start_in(cgroup, [idle], spawn)
    metrics = wait_until(lambda m: traced_pids(m) == {str(first.pid)}, "the first process", agent)
    assert metrics["memtrace_light_mode"][str(first.pid)] == 1
    assert metrics["memtrace_rss_bytes"][str(first.pid)] > 0
    held_by_one = len(probes.perf(probes.below(agent.pid)))
    assert held_by_one > 0, "light mode still probes malloc_trim"

    second = start_in(cgroup, [idle], spawn)
    both = {str(first.pid), str(second.pid)}
    metrics = wait_until(lambda m: traced_pids(m) == both, "both processes", agent)
    assert metrics["memtrace_targets"][""] == 2
    assert metrics["memtrace_self_rss_bytes"][""] > 0
    assert len(probes.perf(probes.below(agent.pid))) == 2 * held_by_one
    assert str(outsider.pid) not in traced_pids(metrics)

    first.send_signal(signal.SIGTERM)
    assert first.wait(30) == 0, "a followed process was harmed"
    wait_until(lambda m: traced_pids(m) == {str(second.pid)}, "the first one's exit", agent)
    assert len(probes.perf(probes.below(agent.pid))) == held_by_one, "its probes stay attached"

    third = start_in(cgroup, [idle], spawn)
    wait_until(lambda m: traced_pids(m) == {str(second.pid), str(third.pid)},
               "a process started later", agent)

    result = agent.stop(signal.SIGTERM)
    assert result.rc == 0, result.stderr
    for line in (f"attached to pid {first.pid} (idle)", f"detached from pid {first.pid} (idle): "
                 "it exited", f"attached to pid {third.pid} (idle)"):
        assert line in result.stderr, result.stderr
    assert result.stderr.count(f"pid {static.pid} (idle_static) is statically linked") == 1, \
        result.stderr
    for proc in (second, third, outsider, static):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "a process was harmed"


def test_agent_follows_an_exec(cgroup, programs, spawn, start_memtrace):
    """A wrapper script that execs its service: traced as the shell first,
    then again as the program it became. The service's cgroup is named as a
    user names a systemd unit, without its path or suffix."""
    unit = f"wrapper-{os.getpid()}"
    service = cgroup / f"{unit}.service"
    service.mkdir()
    try:
        agent = start_agent(start_memtrace, ["--light", "--cgroup", unit, "--interval", "0.5"])
        assert f"cgroup {service}" in agent.stderr_so_far(), agent.stderr_so_far()
        script = f'echo $$ > {service}/cgroup.procs && sleep 4 && exec "$1"'
        wrapper = spawn(["sh", "-c", script, "sh", programs["idle"]])
        wait_until(lambda m: m["comm"].get(str(wrapper.pid)) == "sh", "the shell", agent)
        wait_until(lambda m: traced_pids(m) == {str(wrapper.pid)}, "the exec'd program", agent)
        result = agent.stop(signal.SIGTERM)
        assert result.rc == 0, result.stderr
        assert f"detached from pid {wrapper.pid} (sh): it exec'd idle" in result.stderr, result.stderr
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(30) == 0
    finally:
        remove_cgroup(service)


def test_agent_caps_the_number_of_targets(cgroup, programs, spawn, start_memtrace):
    port = free_port()
    agent = start_memtrace(["agent", "--light", "--cgroup", str(cgroup), "--serve", str(port),
                            "--interval", "0.5", "--max-targets", "1"])
    agent.port = port
    procs = [start_in(cgroup, [programs["idle"]], spawn) for _ in range(2)]
    first = wait_until(lambda m: len(traced_pids(m)) == 1, "one process", agent)
    time.sleep(2)  # a second look at the cgroup
    assert traced_pids(scrape(port)) == traced_pids(first)
    # the one traced exits: the other takes its place
    traced = next(p for p in procs if str(p.pid) in traced_pids(first))
    other = next(p for p in procs if p is not traced)
    traced.send_signal(signal.SIGTERM)
    assert traced.wait(30) == 0
    wait_until(lambda m: traced_pids(m) == {str(other.pid)}, "the other process", agent)
    result = agent.stop(signal.SIGTERM)
    assert result.rc == 0, result.stderr
    assert f"pid {other.pid}: waits for a free slot (--max-targets 1)" in result.stderr, result.stderr
    other.send_signal(signal.SIGTERM)
    assert other.wait(30) == 0


def test_agent_with_pids_ends_when_they_exit(programs, spawn, start_memtrace):
    port = free_port()
    target = spawn([programs["idle"]])
    agent = start_memtrace(["agent", "--light", "-p", str(target.pid), "--serve", str(port)])
    agent.port = port
    wait_until(lambda m: traced_pids(m) == {str(target.pid)}, "the process", agent)
    target.send_signal(signal.SIGTERM)
    assert target.wait(30) == 0
    result = agent.wait()
    assert result.rc == 0 and "nothing left to follow" in result.stderr, result.stderr


def test_agent_refuses_bad_input(run_memtrace):
    serve = ["agent", "--serve", str(free_port())]
    for args, message in (
        (serve, "say what to follow"),
        ([*serve, "--cgroup", "no-such-cgroup-here"], "no cgroup named 'no-such-cgroup-here'"),
        ([*serve, "--cgroup", "system.slice/no-such.service"], "is not a cgroup directory"),
        ([*serve, "--comm", "a/b"], "takes a command name"),
        ([*serve, "-p", "1,x"], "comma-separated list of pids"),
        ([*serve, "-p", "999999999"], "no process with pid 999999999"),
    ):
        rc, _, stderr = run_memtrace(args)
        assert rc == 2 and message in stderr and "Traceback" not in stderr, (args, stderr)


def vm_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for pid {pid}")


BATCH = 10
WARM_UP_BATCHES = 2
MEASURED_BATCHES = 20
GROWTH_BOUND = 5 << 20  # after 200 starts: ~10 MB with an object compiled per process


def test_agent_memory_stays_bounded(cgroup, programs, spawn, start_memtrace):
    """Processes start and exit in batches; each is attached, served and
    detached. Past the warm-up, the agent's own memory must not grow with
    the number of processes it has followed: one BPF object serves all, and
    a process's share of it goes when it exits. A bound on memory, not
    time: the batches wait as long as the attaches take."""
    agent = start_agent(start_memtrace, ["--light", "--cgroup", str(cgroup), "--interval", "0.5"])

    def batch() -> None:
        procs = [start_in(cgroup, [programs["idle"]], spawn) for _ in range(BATCH)]
        pids = {str(p.pid) for p in procs}
        wait_until(lambda m: pids <= set(m.get("memtrace_rss_bytes", {}))
                   and all(m["comm"][p] == "idle" for p in pids), "a batch", agent)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(30) == 0, "a followed process was harmed"
        wait_until(lambda m: not pids & set(m.get("memtrace_rss_bytes", {})),
                   "the batch's exit", agent)

    for _ in range(WARM_UP_BATCHES):
        batch()
    warm = vm_rss_bytes(agent.proc.pid)
    for _ in range(MEASURED_BATCHES):
        batch()
    grown = vm_rss_bytes(agent.proc.pid) - warm
    starts = BATCH * MEASURED_BATCHES
    print(f"agent RSS {warm} B after warm-up, {grown:+} B after {starts} more process starts")
    assert grown < GROWTH_BOUND, f"the agent grew by {grown} B over {starts} process starts"
    metrics = scrape(agent.port)
    assert metrics["memtrace_targets"][""] == 0
    result = agent.stop(signal.SIGTERM)
    assert result.rc == 0, result.stderr
    assert result.stderr.count("detached from pid") >= starts, result.stderr[-2000:]


def test_agent_keeps_each_process_figures_apart(cgroup, programs, retention_binary, spawn,
                                               start_memtrace, tmp_path):
    """Two processes on the one shared object: the malloc_trim of one, its
    calls and what it gave back, are its own; the other shows none."""
    agent = start_agent(start_memtrace, ["--light", "--cgroup", str(cgroup), "--interval", "0.5"])
    out = tmp_path / "truth.json"
    trimmer = start_in(cgroup, [retention_binary, out, "--threads", "2", "--mib", "16",
                                "--trim", "--wait"], spawn)
    idle = start_in(cgroup, [programs["idle"]], spawn)
    both = {str(trimmer.pid), str(idle.pid)}
    wait_until(lambda m: both <= set(m.get("memtrace_rss_bytes", {}))
               and m["comm"][str(idle.pid)] == "idle"
               and m["comm"][str(trimmer.pid)] == "retention", "both processes", agent)
    trimmer.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + WAIT_S
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    metrics = wait_until(lambda m: m["memtrace_trim_calls_total"].get(str(trimmer.pid)) == 1
                         and m["memtrace_trim_returned_bytes_total"][str(trimmer.pid)] > 0,
                         "the trim", agent)
    assert metrics["memtrace_trim_calls_total"][str(idle.pid)] == 0
    assert metrics["memtrace_trim_returned_bytes_total"][str(idle.pid)] == 0
    # the workers' arenas are the trimmer's: 2 x 16 MiB mapped, none of it the idle one's
    assert metrics["memtrace_address_space_committed_bytes"][str(trimmer.pid)] > 16 << 20
    assert metrics["memtrace_address_space_committed_bytes"][str(idle.pid)] < 4 << 20
    trimmer.send_signal(signal.SIGUSR1)
    idle.send_signal(signal.SIGTERM)
    assert trimmer.wait(30) == 0 and idle.wait(30) == 0, "a followed process was harmed"
    result = agent.stop(signal.SIGTERM)
    assert result.rc == 0, result.stderr
