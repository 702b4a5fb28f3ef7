"""Fixtures of the end-to-end arena tests (test_arenas_e2e, test_light,
test_inflater): the programs that are not in tests/programs/build.py
(retention.c, Inflate.java), built once per session; waiting for memtrace's
uprobes; and traced runs of retention shared by the tests that read them.

The shared runs attach to a parked program and stop memtrace with SIGINT
while the program still lives, so the final snapshot is a fresh read of an
idle process. (A launched program's final snapshot is the last sample taken
while it lived, and that sample can race with the exit: see
test_arenas_e2e.py::test_final_snapshot_*.)
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional, Sequence

import pytest

PROGRAMS_DIR = Path(__file__).resolve().parents[1] / "programs"
TRACE_TIMEOUT_S = 120.0
ATTACH_TIMEOUT_S = 60.0
ATTACH_SETTLE_S = 0.5  # uprobe count unchanged this long: bcc is done attaching
RETENTION_INTERVAL_S = 0.25


def _build_flags() -> list[str]:
    """The flags build.py gives every program (frame pointers on)."""
    spec = importlib.util.spec_from_file_location("memtrace_test_build", PROGRAMS_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.WITH_FP)


@pytest.fixture(scope="session")
def retention_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc not found: apt-get install gcc", pytrace=False)
    binary = tmp_path_factory.mktemp("retention") / "retention"
    cmd = ["gcc", *_build_flags(), "-Wall", "-o", str(binary), str(PROGRAMS_DIR / "retention.c")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr}", pytrace=False)
    return binary


@pytest.fixture(scope="session")
def java_tools() -> tuple[str, str]:
    """(java, javac) of the JDK on PATH; CI must have one (never skipped)."""
    java, javac = shutil.which("java"), shutil.which("javac")
    if not java or not javac:
        pytest.fail("java/javac not found: apt-get install openjdk-17-jdk-headless", pytrace=False)
    return java, javac


@pytest.fixture(scope="session")
def inflate_classpath(java_tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inflate-classes")
    cmd = [java_tools[1], "-d", str(out), str(PROGRAMS_DIR / "Inflate.java")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{done.stderr}", pytrace=False)
    return out


# ---------------------------------------------------------------- memtrace


@pytest.fixture(scope="session")
def wait_attached(probes) -> Callable[[Sequence[subprocess.Popen]], None]:
    """wait_attached(tracers): until each memtrace's uprobes are attached
    (bpftool shows them, their count stable for ATTACH_SETTLE_S)."""

    def wait(tracers: Sequence[subprocess.Popen]) -> None:
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        counts: dict[int, int] = {}
        since: dict[int, float] = {}
        while time.monotonic() < deadline:
            now, settled = time.monotonic(), True
            for t in tracers:
                if t.poll() is not None:
                    err = t.stderr.read() if t.stderr else ""
                    pytest.fail(f"memtrace exited (rc={t.returncode}) before attaching: "
                                f"{err[-2000:]}", pytrace=False)
                n = len(probes.perf(probes.below(t.pid)))
                if n != counts.get(t.pid):
                    counts[t.pid], since[t.pid] = n, now
                if not n or now - since[t.pid] < ATTACH_SETTLE_S:
                    settled = False
            if settled:
                return
            time.sleep(0.1)
        pytest.fail(f"memtrace attached no uprobe within {ATTACH_TIMEOUT_S}s", pytrace=False)

    return wait


def start_tracer(memtrace_cmd: Sequence[str], args: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen([*memtrace_cmd, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_tracer(tracer: subprocess.Popen, what: str, sig: Optional[int] = signal.SIGINT) -> dict:
    """Stop memtrace (sig; None: let it end by itself) and return its JSON."""
    if sig is not None:
        tracer.send_signal(sig)
    try:
        out, err = tracer.communicate(timeout=TRACE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        tracer.kill()
        out, err = tracer.communicate()
        pytest.fail(f"{what} still running after {TRACE_TIMEOUT_S}s: {err[-2000:]}", pytrace=False)
    if tracer.returncode != 0 or not out.strip():
        pytest.fail(f"{what}: rc={tracer.returncode}, stderr: {err[-2000:]}", pytrace=False)
    return json.loads(out)


def kill_all(procs: Sequence[Optional[subprocess.Popen]]) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tracers(memtrace_cmd):
    """.start(args) -> Popen of memtrace in the background; .finish(p, what)
    -> its JSON after SIGINT; .kill_all(procs)."""
    return SimpleNamespace(
        start=lambda args: start_tracer(memtrace_cmd, args),
        finish=finish_tracer,
        kill_all=kill_all,
    )


@pytest.fixture(scope="session")
def memtrace_json(memtrace_cmd):
    """memtrace_json(args) -> the JSON of `memtrace ARGS` run to its end
    (a launched command's exit or --duration)."""

    def run(args: Sequence[str]) -> dict:
        tracer = start_tracer(memtrace_cmd, args)
        try:
            return finish_tracer(tracer, f"memtrace {' '.join(map(str, args))}", sig=None)
        finally:
            kill_all([tracer])

    return run


# ---------------------------------------------------------------- retention


class Traced(NamedTuple):
    doc: dict  # memtrace's final JSON
    truth: dict  # what the program wrote


class RetentionRun:
    """`retention OUT --wait ARGS` with a full-mode memtrace attached before
    its workers start. Inside `with`: .truth is written, the program is
    parked, the trace still running; stop() ends the trace (final snapshot
    of the live, idle program) and returns its JSON."""

    def __init__(self, binary: Path, memtrace_cmd: Sequence[str], wait_attached, wait_file,
                 work: Path, args: Sequence[str]) -> None:
        self.binary, self.memtrace_cmd = binary, memtrace_cmd
        self.wait_attached, self.wait_file = wait_attached, wait_file
        self.truth_path = work / "truth.json"
        self.args = list(args)
        self.program: Optional[subprocess.Popen] = None
        self.tracer: Optional[subprocess.Popen] = None
        self.truth: dict = {}

    @property
    def pid(self) -> int:
        return self.program.pid

    def __enter__(self) -> "RetentionRun":
        try:
            self.program = subprocess.Popen(
                [str(self.binary), str(self.truth_path), "--wait", *self.args],
                stdin=subprocess.DEVNULL)
            self.wait_file(self.truth_path.with_name("truth.json.ready"), self.program)
            self.tracer = start_tracer(self.memtrace_cmd, [
                "--json", "--interval", str(RETENTION_INTERVAL_S), "-p", str(self.pid),
                "--duration", "300"])
            self.wait_attached([self.tracer])
            self.program.send_signal(signal.SIGUSR1)  # the workers start
            self.truth = json.loads(self.wait_file(self.truth_path, self.program))
            time.sleep(2 * RETENTION_INTERVAL_S)
        except BaseException:
            kill_all([self.tracer, self.program])
            raise
        return self

    def stop(self) -> dict:
        return finish_tracer(self.tracer, f"memtrace -p {self.pid} (retention {self.args})")

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None and self.program.poll() is None:
                self.program.send_signal(signal.SIGUSR1)  # the program exits
                assert self.program.wait(30) == 0
        finally:
            kill_all([self.tracer, self.program])


@pytest.fixture(scope="session")
def retention_run(retention_binary, memtrace_cmd, wait_attached, wait_file, _prerequisites,
                  tmp_path_factory):
    """retention_run(*args) -> a RetentionRun context manager."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)

    def make(*args: str) -> RetentionRun:
        return RetentionRun(retention_binary, memtrace_cmd, wait_attached, wait_file,
                            tmp_path_factory.mktemp("retention-run"), args)

    return make


@pytest.fixture(scope="module")
def traced_retention(retention_run):
    """traced_retention(*args) -> Traced, each distinct argument list run
    once per module."""
    runs: dict[tuple[str, ...], Traced] = {}

    def run(*args: str) -> Traced:
        if args not in runs:
            with retention_run(*args) as r:
                runs[args] = Traced(r.stop(), r.truth)
        return runs[args]

    return run
