"""read_arenas against a real program whose arenas we know.

tests/programs/arenas.c fills one arena per thread with fragmented free
memory and prints the ground truth: each thread's arena (found the way glibc
finds it), the bytes it still holds, glibc's own malloc_info(), and the RSS
drop of a real malloc_trim(0). No BPF is loaded, but in the one test that
attaches memtrace; reading another process's memory needs root or ptrace
rights over it (it is our child here).
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from memtrace.process.glibc.inspect import ArenaReport, read_arenas

SOURCE = Path(__file__).resolve().parents[1] / "programs" / "arenas.c"
PAGE = 4096
TINY_FASTBIN_CHUNKS = 20 - 7  # tiny blocks freed minus the 7 tcache keeps


@pytest.fixture(scope="module")
def arenas_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("programs") / "arenas"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(SOURCE)],
        check=True,
        capture_output=True,
    )
    return binary


@dataclass
class Truth:
    pid: int
    threads: list[dict[str, int]] = field(default_factory=list)
    main: dict[str, int] = field(default_factory=dict)
    malloc_info: list[dict[str, int]] = field(default_factory=list)  # glibc's arena order
    rss: int = 0


def _fields(line: str) -> dict[str, int]:
    out = {}
    for word in line.split()[1:]:
        key, _, value = word.partition("=")
        out[key] = 0 if value == "main" else int(value, 0)
    return out


def _parse_malloc_info(xml: str) -> list[dict[str, int]]:
    heaps = []
    for heap in ET.fromstring(xml).findall("heap"):
        entry = {}
        for node in heap:
            key = f"{node.tag}_{node.get('type')}"
            if node.get("count") is not None:
                entry[key + "_count"] = int(node.get("count"))
            if node.get("size") is not None:
                entry[key] = int(node.get("size"))
        heaps.append(entry)
    return heaps


@contextmanager
def running(binary: Path, *args: str, arena_max: int = 0) -> Iterator[tuple[subprocess.Popen, Truth]]:
    env = dict(os.environ)
    if arena_max:
        env["MALLOC_ARENA_MAX"] = str(arena_max)
    proc = subprocess.Popen(
        [str(binary), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        truth = Truth(proc.pid)
        xml: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("thread "):
                truth.threads.append(_fields(line))
            elif line.startswith("main "):
                truth.main = _fields(line)
            elif line.startswith("<") or xml and not line.startswith("ready"):
                xml.append(line)
            elif line.startswith("ready"):
                truth.rss = _fields(line)["rss"]
                break
        else:
            pytest.fail(f"arenas exited early with status {proc.wait()}")
        truth.malloc_info = _parse_malloc_info("".join(xml))
        yield proc, truth
    finally:
        if proc.poll() is None:
            proc.stdin.write("exit\n")
            proc.stdin.flush()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _trim(proc: subprocess.Popen) -> int:
    """Run malloc_trim(0) in the target; the RSS it released."""
    proc.stdin.write("trim\n")
    proc.stdin.flush()
    fields = _fields(proc.stdout.readline())
    assert fields["result"] == 1
    return fields["rss_before"] - fields["rss_after"]


def _assert_matches_malloc_info(report: ArenaReport, info: list[dict[str, int]]) -> None:
    assert len(report.arenas) == len(info)
    for arena, glibc in zip(report.arenas, info):
        assert arena.system_mem == glibc["system_current"]
        assert arena.max_system_mem == glibc["system_max"]
        assert arena.fastbin_bytes == glibc["total_fast"]
        # malloc_info's "rest" is bins + top, counting each binned chunk's
        # PREV_INUSE bit in its size (chunksize_nomask): one byte per chunk.
        binned = glibc["total_rest_count"] - 1
        assert arena.free_bytes - arena.fastbin_bytes + arena.top_bytes == glibc["total_rest"] - binned
        assert arena.free_chunk_count == binned + glibc["total_fast_count"]


def test_one_arena_per_thread_matches_glibc(arenas_binary: Path) -> None:
    with running(arenas_binary, "4", "40", "90") as (proc, truth):
        report = read_arenas(truth.pid)

    assert report.reliable, report.to_json()
    assert report.main_arena_found_by == "next list"
    assert [a.kind for a in report.arenas] == ["main"] + ["thread"] * 4
    assert report.arenas[0].address == report.main_arena_address
    _assert_matches_malloc_info(report, truth.malloc_info)

    by_address = {a.address: a for a in report.arenas}
    for thread in truth.threads:
        arena = by_address[thread["arena"]]
        assert thread["heap"] == arena.heaps[0].address  # its first heap, oldest first
        assert arena.system_mem == sum(h.size for h in arena.heaps)
        assert all(h.resident_bytes is not None and h.resident_bytes <= h.mprotect_size for h in arena.heaps)
        assert arena.fastbin_bytes == TINY_FASTBIN_CHUNKS * thread["tiny_chunk"]
        assert arena.attached_threads == 1
        assert arena.live_estimate_bytes == pytest.approx(thread["chunk_bytes"], rel=0.05)
    assert len(by_address[truth.threads[0]["arena"]].heaps) == 2  # 90 MiB needs two heaps

    main = report.arenas[0]
    assert main.system_mem <= sum(h.size for h in main.heaps)
    assert main.live_estimate_bytes == pytest.approx(truth.main["chunk_bytes"], rel=0.05)


def test_heaps_merged_with_a_neighbour_are_found(arenas_binary: Path) -> None:
    """A full heap and the heap glibc places right above it are one mapping
    to the kernel, so the upper heap's boundary is not a mapping's start.
    "crowd" makes that layout below every heap it can."""
    with running(arenas_binary, "4", "40", "90") as (proc, truth):
        proc.stdin.write("crowd\n")
        proc.stdin.flush()
        crowded = _fields(proc.stdout.readline())["heaps"]
        starts = {int(line.split("-")[0], 16) for line in Path(f"/proc/{truth.pid}/maps").read_text().splitlines()}
        report = read_arenas(truth.pid)

    hidden = [t["heap"] for t in truth.threads if t["heap"] not in starts]
    assert crowded >= 1 and hidden, f"no heap was merged with a neighbour (crowded {crowded})"
    assert report.reliable, report.to_json()
    assert report.main_arena_found_by == "next list"
    assert [a.kind for a in report.arenas] == ["main"] + ["thread"] * 4
    _assert_matches_malloc_info(report, truth.malloc_info)
    by_address = {a.address: a for a in report.arenas}
    for thread in truth.threads:
        arena = by_address[thread["arena"]]
        assert thread["heap"] == arena.heaps[0].address
        assert arena.system_mem == sum(h.size for h in arena.heaps)
        # The neighbour's 1 MiB, all in RAM, is not the heap's.
        assert all(h.resident_bytes is not None and h.resident_bytes <= h.mprotect_size for h in arena.heaps)
    assert len(by_address[truth.threads[0]["arena"]].heaps) == 2


@pytest.mark.bpf
def test_memtrace_attached_counts_a_merged_heap_as_an_arena_heap(arenas_binary: Path, run_memtrace) -> None:
    """The address-space table, seeded from the maps on attach, takes a heap
    merged with its neighbour for plain anonymous memory until the arenas
    are read; then that heap, and no more, is an arena heap."""
    with running(arenas_binary, "4", "40", "90") as (proc, truth):
        proc.stdin.write("crowd\n")
        proc.stdin.flush()
        assert _fields(proc.stdout.readline())["heaps"] >= 1
        rc, doc, stderr = run_memtrace(["-p", str(truth.pid), "--json", "--duration", "1"])

    assert rc == 0, stderr
    regions = {r["start"]: r for r in doc["regions"]}
    for thread in truth.threads:
        heap = regions.get(thread["heap"])
        assert heap is not None and heap["kind"] == "glibc-arena-heap", (thread, heap)
    # The crowding MiB below a heap stays anonymous (a heap can also end
    # right where the next begins).
    crowds = [r for r in doc["regions"]
              if r["end"] in {t["heap"] for t in truth.threads} and r["end"] - r["start"] == 1 << 20]
    assert crowds and all(r["kind"] == "anonymous" for r in crowds), crowds


def test_trim_estimate_matches_real_rss_drop(arenas_binary: Path) -> None:
    with running(arenas_binary, "4", "24", "24") as (proc, truth):
        report = read_arenas(truth.pid)
        released = _trim(proc)
        after = read_arenas(truth.pid)

    assert report.reliable, report.to_json()
    assert released > 50 * 2**20  # most of the 90 % freed
    assert abs(report.trimmable_bytes - released) <= 8 * PAGE
    assert after.trimmable_bytes <= 8 * PAGE


def test_arena_max_shares_arenas_between_threads(arenas_binary: Path) -> None:
    with running(arenas_binary, "4", "6", "6", arena_max=2) as (proc, truth):
        report = read_arenas(truth.pid)

    assert report.reliable, report.to_json()
    assert [a.kind for a in report.arenas] == ["main", "thread"]
    _assert_matches_malloc_info(report, truth.malloc_info)
    main, shared = report.arenas
    held: dict[int, int] = {main.address: truth.main["chunk_bytes"], shared.address: 0}
    for thread in truth.threads:
        address = thread["arena"] or main.address
        assert address in held
        held[address] += thread["chunk_bytes"]
    assert main.live_estimate_bytes == pytest.approx(held[main.address], rel=0.05)
    assert shared.live_estimate_bytes == pytest.approx(held[shared.address], rel=0.05)


def test_single_arena_main_found_in_libc_data(arenas_binary: Path) -> None:
    with running(arenas_binary, "2", "4", "4", arena_max=1) as (proc, truth):
        report = read_arenas(truth.pid)
        released = _trim(proc)

    assert report.reliable, report.to_json()
    assert report.main_arena_found_by == "libc scan"
    assert [a.kind for a in report.arenas] == ["main"]
    _assert_matches_malloc_info(report, truth.malloc_info)
    assert abs(report.trimmable_bytes - released) <= 8 * PAGE


def test_gone_process_is_an_error_not_an_exception(arenas_binary: Path) -> None:
    with running(arenas_binary, "1", "1", "1") as (proc, truth):
        pid = truth.pid
    report = read_arenas(pid)
    assert report.error is not None and str(pid) in report.error
    assert not report.reliable and report.arenas == ()


def test_busy_target_gives_flagged_figures_never_exceptions(arenas_binary: Path) -> None:
    with running(arenas_binary, "4", "4", "4") as (proc, truth):
        proc.stdin.write("churn\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "churning"
        reports = [read_arenas(truth.pid) for _ in range(5)]

    for report in reports:
        assert report.error is None
        assert [a.kind for a in report.arenas] == ["main"] + ["thread"] * 4
        json.dumps(report.to_json())
        for arena in report.arenas:
            assert arena.reliable or arena.notes  # an unreliable figure always says why
            assert min(arena.free_bytes, arena.top_bytes, arena.trimmable_bytes) >= 0
