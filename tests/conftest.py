"""Fixtures shared by the unit and integration tests.

Integration tests (marker `bpf`) run the real `memtrace` CLI as a
subprocess against the ground-truth programs in tests/programs/. Their
prerequisites (root, bcc, bpftool) are checked up front, and a missing one
FAILS the test with the reason: in CI nothing eBPF-related may be skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

import pytest

TESTS_DIR = Path(__file__).resolve().parent
TRACEFS = Path("/sys/kernel/tracing")

# A trace that takes longer than this is hung, not slow: the CLI is expected
# to compile, attach and answer within a few seconds.
DEFAULT_TIMEOUT_S = 60.0
# bcc attaches a process's uprobes in one burst; once the count has not moved
# for this long, the burst is over.
ATTACH_SETTLE_S = 0.5


def _load_build_helper(name: str = "build.py"):
    spec = importlib.util.spec_from_file_location(
        "memtrace_test_" + name.removesuffix(".py"), TESTS_DIR / "programs" / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- prerequisites


def _missing_prerequisites() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("not root: the bpf integration tests load BPF programs (run under sudo)")
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        missing.append(f"bcc is not importable ({e}): apt-get install python3-bpfcc")
    if shutil.which("bpftool") is None:
        missing.append("bpftool not found: apt-get install bpftool")
    if shutil.which("gcc") is None:
        missing.append("gcc not found: apt-get install gcc")
    return missing


@pytest.fixture(scope="session")
def _prerequisites() -> list[str]:
    return _missing_prerequisites()


@pytest.fixture
def require_root(_prerequisites: list[str]) -> None:
    """Fail (never skip) when the machine cannot run BPF tests."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)


@pytest.fixture(autouse=True)
def _bpf_tests_require_root(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("bpf") is not None:
        request.getfixturevalue("require_root")


# ---------------------------------------------------------------- programs


@pytest.fixture(scope="session")
def programs(tmp_path_factory: pytest.TempPathFactory):
    """`programs["threads"]` is the path of the built binary (built once)."""
    build = _load_build_helper()
    built = build.Programs(tmp_path_factory.mktemp("programs"))

    class _BuiltOrFail:
        def __getitem__(self, name: str) -> Path:
            try:
                return built[name]
            except build.BuildError as e:
                pytest.fail(str(e), pytrace=False)

    return _BuiltOrFail()


@pytest.fixture(scope="session")
def names_library(tmp_path_factory: pytest.TempPathFactory):
    """libnames.so built in every way a library loses its function names
    (tests/programs/names_build.py): a NamesBuild."""
    try:
        return _load_build_helper("names_build.py").build(tmp_path_factory.mktemp("names"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


# ---------------------------------------------------------------- memtrace


@pytest.fixture(scope="session")
def memtrace_cmd() -> list[str]:
    """The command line that runs memtrace (the interpreter running pytest,
    which must have memtrace installed)."""
    return [sys.executable, "-m", "memtrace"]


class Result(NamedTuple):
    rc: int
    doc: Optional[dict]  # the JSON document on stdout, None if stdout was empty
    stderr: str


def _parse_stdout(stdout: str, stderr: str) -> Optional[dict]:
    if not stdout.strip():
        return None
    try:
        return json.loads(stdout)
    except json.JSONDecodeError as e:
        pytest.fail(
            f"memtrace stdout is not ONE JSON document ({e}):\n"
            f"stdout[:2000]={stdout[:2000]!r}\nstderr={stderr[-2000:]!r}",
            pytrace=False,
        )


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (memtrace may hold probes in a child)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _multi_uprobes(pid: int) -> list[dict]:
    """The probes of the uprobe_multi links pid holds, from their fdinfo."""
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return found
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        if "link_type:\tuprobe_multi" not in text and "link_type:\turetprobe_multi" not in text:
            continue
        fields, offsets = {}, []
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
            elif line.split() and line.split()[0].isdigit() and len(line.split()) == 3:
                offsets.append(int(line.split()[1], 16))  # cookie, offset, ref_ctr_offset
        kind = "uretprobe" if fields["link_type"].startswith("uret") else "uprobe"
        found += [{"fd_type": kind, "pid": pid, "prog_id": int(fields["prog_id"]),
                   "filename": _held_path(pid, fields.get("path", "")), "offset": offset,
                   "link_id": int(fields["link_id"])} for offset in offsets]
    return found


def _held_path(pid: int, path: str) -> str:
    """A link's fdinfo names its file by path ("... (deleted)" once
    unlinked): the descriptor pid holds on that file, which reaches the very
    inode, else the path."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                return f"/proc/{pid}/fd/{fd}"
    except OSError:
        pass
    return path


class Probes:
    """What the kernel shows as attached: bpftool and tracefs."""

    @staticmethod
    def _bpftool(*args: str) -> list[dict]:
        done = subprocess.run(
            ["bpftool", "-j", *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            pytest.fail(f"bpftool {' '.join(args)} failed: {done.stderr.strip()}", pytrace=False)
        return json.loads(done.stdout or "[]")

    def perf(self, pids: Optional[Sequence[int]] = None) -> list[dict]:
        """uprobes with a BPF program (held by `pids`): perf events, and one
        entry per probe of a uprobe_multi link, in bpftool's perf fields.
        bpftool 7.1 names no holder of a link: those held by `pids` come
        from their fdinfo, and every link's program id without it."""
        found = [
            e
            for e in self._bpftool("perf", "list")
            if e.get("fd_type") in ("uprobe", "uretprobe")
            and (pids is None or e.get("pid") in pids)
        ]
        if pids is None:
            return found + [{"fd_type": "uprobe_multi", "prog_id": link.get("prog_id")}
                            for link in self.links() if link.get("type") in (12, "uprobe_multi")]
        return found + [probe for pid in pids for probe in _multi_uprobes(pid)]

    @staticmethod
    def below(pid: int) -> list[int]:
        """pid and every process below it: whose probes are a tracer's."""
        return _descendants(pid)

    def tracepoints(self, pids: Sequence[int]) -> set[str]:
        """Names of the tracepoints with a BPF program held by `pids`."""
        return {e.get("tracepoint", "") for e in self._bpftool("perf", "list")
                if e.get("fd_type") == "tracepoint" and e.get("pid") in pids}

    def prog_ids(self) -> set[int]:
        return {p["id"] for p in self._bpftool("prog", "list")}

    def links(self) -> list[dict]:
        return self._bpftool("link", "list")

    @staticmethod
    def uprobe_events() -> list[str]:
        try:
            return (TRACEFS / "uprobe_events").read_text().splitlines()
        except OSError as e:
            pytest.fail(f"cannot read {TRACEFS}/uprobe_events: {e}", pytrace=False)


@pytest.fixture(scope="session")
def probes() -> Probes:
    return Probes()


class Tracer:
    """A memtrace process running in the background (attach mode)."""

    def __init__(self, cmd: list[str], env: Optional[dict] = None) -> None:
        self.cmd = cmd
        self._out = tempfile.TemporaryFile(mode="w+")
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env
        )
        self.pid = self.proc.pid
        self.attached_probes: list[dict] = []

    def stderr_so_far(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def wait_attached(self, probes: Probes, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
        """Return once memtrace's uprobes are attached (seen by bpftool, count
        stable for ATTACH_SETTLE_S). Records them for the cleanup checks."""
        deadline = time.monotonic() + timeout
        last, stable_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"memtrace exited (rc={self.proc.returncode}) before attaching: "
                    f"{self.stderr_so_far().strip()}",
                    pytrace=False,
                )
            found = probes.perf(_descendants(self.pid))
            now = time.monotonic()
            if len(found) != last:
                last, stable_since = len(found), now
            elif found and now - stable_since >= ATTACH_SETTLE_S:
                self.attached_probes = found
                return found
            time.sleep(0.1)
        self.kill()
        pytest.fail(
            f"memtrace attached no uprobe within {timeout}s: {self.stderr_so_far().strip()}",
            pytrace=False,
        )

    def wait(self, timeout: float = DEFAULT_TIMEOUT_S) -> Result:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(
                f"memtrace still running after {timeout}s: {self.stderr_so_far().strip()}",
                pytrace=False,
            )
        self._out.seek(0)
        stderr = self.stderr_so_far()
        return Result(rc, _parse_stdout(self._out.read(), stderr), stderr)

    def stop(self, sig: int = signal.SIGINT, timeout: float = DEFAULT_TIMEOUT_S) -> Result:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def start_memtrace(memtrace_cmd: list[str]):
    """start_memtrace(args) -> Tracer running `memtrace ARGS` in the background."""
    started: list[Tracer] = []

    def start(args: Sequence[str], env: Optional[dict] = None) -> Tracer:
        tracer = Tracer([*memtrace_cmd, *args], env=env)
        started.append(tracer)
        return tracer

    yield start
    for tracer in started:
        tracer.kill()


@pytest.fixture
def run_memtrace(memtrace_cmd: list[str]):
    """run_memtrace(args, timeout) -> (rc, parsed_json, stderr)."""

    def run(
        args: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT_S,
        env: Optional[dict] = None,
        prefix: Sequence[str] = (),
    ) -> Result:
        # prefix: e.g. setpriv ... to run memtrace as another user
        tracer = Tracer([*prefix, *memtrace_cmd, *args], env=env)
        try:
            return tracer.wait(timeout)
        finally:
            tracer.kill()

    return run


# ---------------------------------------------------------------- targets


@pytest.fixture
def spawn():
    """spawn(argv) -> Popen of a target; anything left running is killed."""
    started: list[subprocess.Popen] = []

    def start(argv: Sequence[Any], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([str(a) for a in argv], **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_file(path: Path, proc: Optional[subprocess.Popen] = None,
                  timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """Wait for a ground-truth program to publish `path` (it renames the file
    into place, so it is complete once it exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if proc is not None and proc.poll() is not None and not path.exists():
            pytest.fail(f"{proc.args[0]} exited (rc={proc.returncode}) without writing {path}",
                        pytrace=False)
        time.sleep(0.02)
    pytest.fail(f"{path} not written within {timeout}s", pytrace=False)


@pytest.fixture(scope="session")
def wait_file():
    return wait_for_file
