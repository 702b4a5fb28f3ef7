"""Where the JSON goes, and the launched command's own output: stdout that
carries JSON carries nothing else (a chatty command would break `jq`), and
`-o FILE` keeps the JSON in a file while the command keeps stdout."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.bpf

SAY = "hello from the command"


def _command(programs, tmp_path) -> list[str]:
    """It prints, then allocates (churn's own tests check its figures)."""
    return ["/bin/sh", "-c", f'echo "{SAY}"; exec "$0" "$1" 20', programs["churn"],
            str(tmp_path / "truth.json")]


def _run(memtrace_cmd, args) -> subprocess.CompletedProcess:
    return subprocess.run([*memtrace_cmd, *args], capture_output=True, text=True, timeout=120)


def test_json_on_stdout_keeps_the_commands_output_apart(memtrace_cmd, programs, tmp_path):
    done = _run(memtrace_cmd, ["--json", "--", *_command(programs, tmp_path)])
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # one JSON document, nothing else
    assert doc["heap"]["alloc_count"] > 0, doc["heap"]
    assert SAY in done.stderr, done.stderr


def test_json_stream_to_a_file_leaves_stdout_to_the_command(memtrace_cmd, programs, tmp_path):
    out = tmp_path / "trace.jsonl"
    done = _run(memtrace_cmd, ["--json-stream", "--interval", "0.1", "-o", str(out), "--",
                               *_command(programs, tmp_path)])
    assert done.returncode == 0, done.stderr
    assert done.stdout == SAY + "\n", done.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 2 and not lines[-1]["target_alive"], len(lines)


def test_output_file_beside_the_text_snapshots(memtrace_cmd, programs, tmp_path):
    out = tmp_path / "final.json"
    out.write_text("an older file is replaced, as a redirection would")
    done = _run(memtrace_cmd, ["--batch", "-o", str(out), "--", *_command(programs, tmp_path)])
    assert done.returncode == 0, done.stderr
    assert SAY in done.stdout and "memtrace summary" in done.stdout, done.stdout[-2000:]
    doc = json.loads(out.read_text())
    assert doc["heap"]["alloc_count"] > 0 and not doc["target_alive"], doc["heap"]
