"""Unwind rows ready when the code runs (symbols/unwindfile.py,
collect/unwind.py):

- the rows a trace read from .eh_frame are kept in the cache directory,
  and the next trace reads them from there (the file is read, not written
  again); a damaged one is ignored and made again, the stacks as whole;
- a program reached through an exec (`sh -c 'exec PROG'`) that allocates
  from deep frames from its start gets whole stacks for nearly all its
  bytes: its image and libraries are read at the exec and placed as ld.so
  maps them, not when the events next read name the mappings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memtrace.symbols import elf, unwindfile

pytestmark = pytest.mark.bpf

LONG_AGO = 1_000_000_000  # 2001: a cache file read since has a later mtime


def function_of(frame: str) -> str:
    return frame.split(" ", 1)[0].split("+", 1)[0]


def cache_file_of(cache: Path, program: Path) -> Path:
    """Where the rows of program's .eh_frame are kept."""
    with open(program, "rb") as f:
        headers = elf._headers(elf._file_reader(f), program.stat().st_size)
        _end, machine, segments, _sections, by_name, body, _entry = headers
        eh = by_name[b".eh_frame"]
        section = body(eh)
    shape = [(s.offset, s.vaddr, s.filesz) for s in segments]
    return cache / unwindfile.name_of(unwindfile.key_of(machine, shape, eh[3], section))


def assert_chains_exact(doc: dict, truth_path: Path) -> None:
    for chain in json.loads(truth_path.read_text())["chains"]:
        want = chain["frames"]
        found = [s for s in doc["stacks"]
                 if [function_of(f) for f in s["frames"][: len(want)]] == want]
        assert len(found) == 1, f"chain {want}: {len(found)} stacks"
        assert (found[0]["alloc_bytes"], found[0]["alloc_count"]) == (
            chain["alloc_bytes"], chain["alloc_count"]), found[0]
        assert not found[0]["truncated"], found[0]["frames"]


def test_the_rows_kept_by_a_trace_are_read_by_the_next(programs, run_memtrace, tmp_path):
    cache = tmp_path / "cache"
    env = dict(os.environ, MEMTRACE_CACHE_DIR=str(cache))
    program = programs["unwind_chains"]
    truth = tmp_path / "truth.json"

    rc, doc, stderr = run_memtrace(["--json", "--", program, truth], env=env)
    assert rc == 0, stderr
    kept = cache_file_of(cache, Path(program))
    assert kept.exists(), sorted(p.name for p in cache.iterdir())
    assert_chains_exact(doc, truth)
    for path in cache.glob("unwind-*.rows"):
        os.utime(path, (LONG_AGO, LONG_AGO))
    inode = kept.stat().st_ino

    rc, doc, stderr = run_memtrace(["--json", "--", program, truth], env=env)
    assert rc == 0, stderr
    assert kept.stat().st_ino == inode, "the rows were written again: parsed, not read"
    assert kept.stat().st_mtime > LONG_AGO, "the kept rows were not read"
    assert_chains_exact(doc, truth)

    # Damaged: ignored (no traceback, the stacks as whole) and made again.
    for path in cache.glob("unwind-*.rows"):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] + b"\xff" * (len(data) - len(data) // 2))
    rc, doc, stderr = run_memtrace(["--json", "--", program, truth], env=env)
    assert rc == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert_chains_exact(doc, truth)
    assert kept.stat().st_ino != inode, "the damaged rows were not made again"
    key = bytes.fromhex(kept.name.removeprefix("unwind-").removesuffix(".rows"))
    assert unwindfile.decode(key, kept.read_bytes()) is not None, "the new file is not whole"


def test_a_program_reached_through_an_exec_gets_whole_stacks_from_its_start(
        programs, run_memtrace, tmp_path):
    program = programs["exec_deep"]
    env = dict(os.environ, MEMTRACE_CACHE_DIR=str(tmp_path / "cache"))  # nothing read before
    # The exec comes once the trace is under way: the collector, busy with
    # the shell's start, reads an exec made at once tens of ms late.
    rc, doc, stderr = run_memtrace(["--json", "--", "sh", "-c", f"sleep 0.3; exec {program}"],
                                   env=env)
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert doc["comm"] == "exec_deep", "the exec was not seen"
    ours = [s for s in doc["stacks"] if s["frames"] and function_of(s["frames"][0]) == "descend"]
    total = sum(s["alloc_bytes"] for s in ours)
    assert total >= 1_000_000, json.dumps(ours, indent=1)[:3000]
    whole = [s for s in ours if not s["truncated"]]
    assert sum(s["alloc_bytes"] for s in whole) >= 0.85 * total, \
        json.dumps([(s["alloc_bytes"], s["frames"][:4]) for s in ours], indent=1)
    for s in whole:
        functions = [function_of(f) for f in s["frames"]]
        assert functions[:14] == ["descend"] * 13 + ["main"], functions
