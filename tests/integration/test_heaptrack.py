"""memtrace against heaptrack, the reference, on programs nobody here
wrote: Debian's sqlite3 filling a table, git showing its log with
patches, and python3. Each runs once under heaptrack (which injects itself into the
process) and once under memtrace, on the same input; then /usr/bin/python3
building and keeping a few MB of objects. Calls to the
allocation functions, the bytes still allocated at the exit, and the peak
must agree.

heaptrack counts one call and 72,704 bytes more than memtrace: its own
library brings libstdc++ into the process, and libstdc++'s constructor
allocates its emergency exception pool (72,704 bytes) with malloc. The
figures it prints have three significant digits ("1.81M", in powers of
1000)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.bpf

HEAPTRACKS_OWN_CALLS = 1
HEAPTRACKS_OWN_BYTES = 72_704  # libstdc++'s emergency pool, in the peak
UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def _size(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([KMG]?B?)", text).groups()
    return float(number) * UNITS[unit.rstrip("B") if unit != "B" else "B"]


def heaptrack_figures(tmp_path: Path, argv: list[str], cwd: Path) -> dict[str, float]:
    heaptrack, printer = shutil.which("heaptrack"), shutil.which("heaptrack_print")
    assert heaptrack and printer, "heaptrack is missing: run install.sh --test-tools"
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "heaptrack"
    done = subprocess.run([heaptrack, "-o", str(out), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    data = next(tmp_path.glob("heaptrack.*"))
    summary = subprocess.run([printer, "--print-peaks", "0", "--print-allocators", "0",
                              "--print-temporary", "0", "--print-leaks", "0", str(data)],
                             capture_output=True, text=True, timeout=300).stdout
    found = dict(re.findall(r"^(calls to allocation functions|peak heap memory consumption|"
                            r"total memory leaked|suppressed leaks): (\S+)", summary, re.M))
    assert len(found) == 4, summary[-2000:]
    return {
        "calls": int(found["calls to allocation functions"]),
        "peak": _size(found["peak heap memory consumption"]),
        "leaked": _size(found["total memory leaked"]) + _size(found["suppressed leaks"]),
    }


def memtrace_figures(run_memtrace, argv: list[str]) -> dict[str, float]:
    rc, doc, stderr = run_memtrace(["--json", "--", *argv])
    assert rc == 0, stderr[-2000:]
    assert doc is not None, f"no JSON on stdout; stderr: {stderr[-2000:]}"
    heap = doc["heap"]
    return {"calls": heap["alloc_count"], "peak": heap["peak_live_bytes"], "leaked": heap["live_bytes"]}


def assert_agree(ours: dict, reference: dict) -> None:
    def close(a: float, b: float, share: float, slack: float) -> bool:
        return abs(a - b) <= share * b + slack

    assert close(ours["calls"] + HEAPTRACKS_OWN_CALLS, reference["calls"], 0.0005, 2), (ours, reference)
    # heaptrack's three digits: half a unit of the last, 0.5 % at worst
    assert close(ours["leaked"], reference["leaked"], 0.006, 16), (ours, reference)
    assert close(ours["peak"] + HEAPTRACKS_OWN_BYTES, reference["peak"], 0.006, 16), (ours, reference)


def test_sqlite3_allocates_and_leaks_what_heaptrack_says(run_memtrace, tmp_path):
    sqlite3 = shutil.which("sqlite3")
    assert sqlite3, "sqlite3 is missing: run install.sh --test-tools"
    script = tmp_path / "fill.sql"
    lines = ["create table t(a integer primary key, b text);", "begin;"]
    lines += [f"insert into t(b) values('row {i}');" for i in range(20000)]
    lines += ["commit;"]
    script.write_text("\n".join(lines) + "\n")
    figures = []
    for tracer in ("heaptrack", "memtrace"):
        db = tmp_path / f"{tracer}.db"
        argv = [sqlite3, str(db), f".read {script}"]
        figures.append(heaptrack_figures(tmp_path / "ht", argv, tmp_path) if tracer == "heaptrack"
                       else memtrace_figures(run_memtrace, argv))
    reference, ours = figures
    assert reference["calls"] > 100_000, reference
    assert_agree(ours, reference)


def test_git_log_allocates_and_leaks_what_heaptrack_says(run_memtrace, tmp_path):
    git = shutil.which("git")
    assert git, "git is missing"
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.fail(f"{repo} is not a git checkout: the test reads its history", pytrace=False)
    argv = [git, "-C", str(repo), "--no-pager", "log", "-p", "-n", "100", "--no-color"]
    reference = heaptrack_figures(tmp_path / "ht", argv, repo)
    ours = memtrace_figures(run_memtrace, argv)
    assert reference["calls"] > 10_000, reference
    assert_agree(ours, reference)


def test_python3_allocates_and_leaks_what_heaptrack_says(run_memtrace, tmp_path):
    python3 = Path("/usr/bin/python3")
    assert python3.exists(), "/usr/bin/python3 is missing"
    script = tmp_path / "objects.py"
    script.write_text(
        "import json\n"
        "rows = [{'id': i, 'name': 'row %d' % i, 'tags': [str(i), 'x' * (i % 300)]}\n"
        "        for i in range(20000)]\n"
        "back = json.loads(json.dumps(rows))\n"
        "kept = [bytearray(1000 + i % 5000) for i in range(2000)]\n"
    )
    argv = [str(python3), str(script)]
    reference = heaptrack_figures(tmp_path / "ht", argv, tmp_path)
    ours = memtrace_figures(run_memtrace, argv)
    assert reference["peak"] > 5e6, reference
    assert_agree(ours, reference)
