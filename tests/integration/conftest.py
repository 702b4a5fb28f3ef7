"""Fixtures of the end-to-end arena tests: the programs that are not in
tests/programs/build.py (retention.c, Inflate.java), built once per session,
and a traced retention run shared by the tests that read it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

PROGRAMS_DIR = Path(__file__).resolve().parents[1] / "programs"
TRACE_TIMEOUT_S = 120.0


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


class Traced(NamedTuple):
    doc: dict  # memtrace's final JSON
    truth: dict  # what the program wrote


@pytest.fixture(scope="module")
def traced_retention(
    retention_binary: Path,
    memtrace_cmd: list[str],
    _prerequisites: list[str],
    tmp_path_factory: pytest.TempPathFactory,
):
    """traced_retention(*program_args) -> Traced: `retention` launched under
    memtrace --json (full mode), each distinct argument list run once per
    module. The program holds its final state for 4 intervals, so the last
    sample before it exits shows it."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    runs: dict[tuple[str, ...], Traced] = {}

    def run(*args: str) -> Traced:
        if args not in runs:
            truth_path = tmp_path_factory.mktemp("retention-run") / "truth.json"
            cmd = [*memtrace_cmd, "--json", "--interval", "0.25", "--",
                   str(retention_binary), str(truth_path), "--hold-ms", "1000", *args]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=TRACE_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
            if done.returncode != 0 or not done.stdout.strip():
                pytest.fail(f"{' '.join(cmd)}: rc={done.returncode}, stderr: {done.stderr[-2000:]}",
                            pytrace=False)
            if not truth_path.exists():
                pytest.fail(f"retention wrote no {truth_path}; stderr: {done.stderr[-2000:]}",
                            pytrace=False)
            runs[args] = Traced(json.loads(done.stdout), json.loads(truth_path.read_text()))
        return runs[args]

    return run
