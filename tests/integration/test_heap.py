"""memtrace's heap accounting against programs that know what they did.

Each program in tests/programs/ counts its own allocations and writes them
as JSON to a file; memtrace's JSON must match it exactly, per thread and per
allocating function (the sum of the stacks whose frames[0] is that
function).
"""

from __future__ import annotations

import json
import signal

import pytest

pytestmark = pytest.mark.bpf

COUNTERS = ("live_bytes", "alloc_bytes", "free_bytes", "alloc_count", "free_count")
NOTHING = dict.fromkeys(COUNTERS, 0)


def function_of(frame: str) -> str:
    """'alloc_small+0x1f [threads]' -> 'alloc_small'."""
    return frame.split(" ", 1)[0].split("+", 1)[0]


def counters(d: dict) -> dict:
    return {k: d[k] for k in COUNTERS}


def summed(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) for k in COUNTERS}


def called_from(doc: dict, function: str) -> list[dict]:
    return [s for s in doc["stacks"] if s["frames"] and function_of(s["frames"][0]) == function]


def callers_seen(doc: dict) -> list[str]:
    return sorted({s["frames"][0] if s["frames"] else "<no frames>" for s in doc["stacks"]})


def assert_threads_match(doc: dict, truth: dict, names: bool = True) -> None:
    by_tid = {t["tid"]: t for t in doc["threads"]}
    for want in truth["threads"]:
        got = by_tid.get(want["tid"])
        label = f"thread {want['name']} (tid {want['tid']})"
        if counters(want) == NOTHING:
            # allocated nothing: absent, or present with nothing charged
            assert got is None or counters(got) == NOTHING, f"{label}: memtrace {got}"
            continue
        assert got is not None, f"{label} missing; memtrace's tids: {sorted(by_tid)}"
        assert counters(got) == counters(want), f"{label}: memtrace {got} != truth {want}"
        if names:
            assert got["name"] == want["name"], f"{label}: memtrace named it {got['name']!r}"


def assert_functions_match(doc: dict, truth: dict) -> None:
    for function, want in truth["functions"].items():
        stacks = called_from(doc, function)
        assert stacks, f"no stack has {function} as frames[0]; frames[0] seen: {callers_seen(doc)}"
        assert summed(stacks) == counters(want), (
            f"stacks called from {function}: memtrace {summed(stacks)} != truth {counters(want)}; "
            f"stacks: {json.dumps(stacks)[:3000]}"
        )


def assert_views_agree(doc: dict) -> None:
    """Threads and stacks are two groupings of the same (thread, stack) rows."""
    heap = counters(doc["heap"])
    assert summed(doc["threads"]) == heap, f"threads {summed(doc['threads'])} != heap {heap}"
    assert summed(doc["stacks"]) == heap, f"stacks {summed(doc['stacks'])} != heap {heap}"


@pytest.mark.parametrize("program", ["threads", "threads_nofp"])
def test_launch_counts_every_thread_and_stack(program, programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    # --hold-ms keeps the workers alive for a few intervals after they are
    # done, so their names are read while they exist.
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.2", "--", programs[program], truth_path, "--hold-ms", "600"]
    )
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    truth = json.loads(truth_path.read_text())

    assert doc["pid"] == truth["pid"]
    assert doc["heap"]["dropped_count"] == 0, doc["heap"]
    assert_threads_match(doc, truth)
    assert_functions_match(doc, truth)
    assert_views_agree(doc)
    worker_tids = {t["tid"] for t in truth["threads"]}
    for function in truth["functions"]:
        for stack in called_from(doc, function):
            assert set(stack["tids"]) <= worker_tids, stack
    # release() only frees: it must never be taken for an allocating caller
    assert not called_from(doc, "release"), callers_seen(doc)
    assert_arena_heaps_name_their_malloc(doc, worker_tids)


def assert_arena_heaps_name_their_malloc(doc: dict, worker_tids: set[int]) -> None:
    """Each worker's first malloc makes glibc map the heap of its arena: the
    region names that malloc's caller. Without frame pointers the caller is
    known only when malloc returns, after the mmap event was sent (the
    event waits for it: IN_MALLOC_CALLER_FOLLOWS)."""
    heaps = [r for r in doc["regions"]
             if r["kind"] == "glibc-arena-heap" and r["origin_tid"] in worker_tids]
    assert heaps, doc["regions"]
    for region in heaps:
        assert region["in_malloc"], region
        assert region["origin_frames"] and region["origin_frames"][0].startswith(
            ("alloc_small+", "alloc_large+")), region


def test_attach_counts_threads_started_before_attach(
    programs, spawn, start_memtrace, probes, wait_file, tmp_path
):
    truth_path = tmp_path / "truth.json"
    ready_path = tmp_path / "truth.json.ready"
    target = spawn([programs["threads"], truth_path, "--wait"])
    pid = int(wait_file(ready_path, target))

    tracer = start_memtrace(["--json", "--interval", "0.2", "-p", str(pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)  # workers allocate now
    truth = json.loads(wait_file(truth_path, target))
    rc, doc, stderr = tracer.stop(signal.SIGINT)

    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert doc["pid"] == pid
    assert doc["heap"]["dropped_count"] == 0, doc["heap"]
    assert_threads_match(doc, truth)
    assert_functions_match(doc, truth)
    # detached: the target frees and checks its blocks, runs a malloc
    # workload and exits on its own
    target.send_signal(signal.SIGUSR1)
    assert target.wait(30) == 0


def test_launch_counts_every_allocation_variant(programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.2", "--",
         programs["variants"], truth_path, "--exit", "3", "--hold-ms", "600"]
    )
    assert rc == 3, f"memtrace must exit with the command's status (3); stderr: {stderr}"
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    truth = json.loads(truth_path.read_text())

    assert_functions_match(doc, truth)
    assert_threads_match(doc, truth)
    assert_views_agree(doc)


def test_free_from_another_thread_is_charged_to_the_allocator(programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.2", "--", programs["crossfree"], truth_path, "--hold-ms", "600"]
    )
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    truth = json.loads(truth_path.read_text())
    owner, freer = truth["threads"]

    assert_threads_match(doc, truth)
    assert_functions_match(doc, truth)
    for stack in called_from(doc, "alloc_in_owner"):
        assert stack["tids"] == [owner["tid"]], stack
    assert not called_from(doc, "free_from_other"), callers_seen(doc)
    assert all(freer["tid"] not in s["tids"] for s in doc["stacks"] if s["alloc_count"]), (
        "the freeing thread allocated nothing but owns a stack"
    )


def test_free_of_a_block_from_before_the_trace_is_not_subtracted(
    programs, spawn, start_memtrace, probes, wait_file, tmp_path
):
    truth_path = tmp_path / "truth.json"
    target = spawn([programs["pretrace"], truth_path])
    pid = int(wait_file(tmp_path / "truth.json.ready", target))

    tracer = start_memtrace(["--json", "--interval", "0.2", "-p", str(pid), "--duration", "120"])
    tracer.wait_attached(probes)
    target.send_signal(signal.SIGUSR1)
    truth = json.loads(wait_file(truth_path, target))
    rc, doc, stderr = tracer.stop(signal.SIGINT)

    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    assert doc["heap"]["untracked_free_count"] >= truth["untracked_free_count"], doc["heap"]
    assert_threads_match(doc, truth)
    assert_functions_match(doc, truth)
    assert not called_from(doc, "alloc_before"), callers_seen(doc)
    target.send_signal(signal.SIGUSR1)
    assert target.wait(30) == 0


def test_command_that_exits_at_once_is_still_symbolized(programs, run_memtrace, tmp_path):
    """The command is gone (and its /proc/PID/maps with it) before the first
    interval: the final snapshot must still name the functions."""
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(
        ["--json", "--interval", "0.2", "--", programs["crossfree"], truth_path]
    )
    assert rc == 0, stderr
    assert doc is not None, f"no JSON on stdout; stderr: {stderr}"
    truth = json.loads(truth_path.read_text())
    assert_functions_match(doc, truth)
    assert_threads_match(doc, truth, names=False)


@pytest.mark.parametrize("found_by", ["marks", "bytes"])
def test_rows_found_by_their_marks_are_every_row_read_afresh(programs, monkeypatch, found_by):
    """Reads that take only the rows the probes marked as changed
    (heap_counts.mark, probes.marked_rows) give, read after read, what
    decoding every row of the map from scratch gives; and so do reads that
    ignore the marks and take the rows whose bytes are not the ones last
    decoded (what every WHOLE_READ_EVERY-th read adds). The target is
    stopped for each comparison, so both see the same map."""
    import os
    import subprocess
    import time

    from memtrace.collect import probes as probes_module
    from memtrace.collect.probes import HEAP_COUNTS, HEAP_KEY, Limits, Probes, _decode, resolve_sites
    from memtrace.model.snapshot import Counters

    if found_by == "marks":
        monkeypatch.setattr(probes_module, "WHOLE_READ_EVERY", 1 << 30)  # marks only, after the first
    else:
        monkeypatch.setattr(probes_module, "WHOLE_READ_EVERY", 1)
        monkeypatch.setattr(probes_module, "marked_rows", lambda marks, epochs: set())
    target = subprocess.Popen([str(programs["manystacks"]), "3000", "8", "20000", "0.5", "4"])
    try:
        time.sleep(0.3)
        with open(f"/proc/{target.pid}/maps") as f:
            libc = next(line.split()[-1] for line in f if "/libc.so" in line)
        probes = Probes(target.pid, libc, Limits(), resolve_sites(libc))
        probes.load()
        probes.attach()
        try:
            for step in range(10):
                time.sleep(0.3)
                os.kill(target.pid, signal.SIGSTOP)
                time.sleep(0.05)  # probes under way end
                reading = probes.read()
                bpf = probes._bpf
                used = int(bpf["heap_next_index"][0].value)
                generation = int(bpf["exec_generation"][0].value)
                keys, counts = probes._mapped("heap_keys"), probes._mapped("heap_counts")
                ks, cs = HEAP_KEY.size, HEAP_COUNTS.size
                want: dict = {}
                for i in range(used):
                    flow = _decode(keys[i * ks:(i + 1) * ks] + counts[i * cs:(i + 1) * cs], generation)
                    if flow is not None:
                        key = (flow.tid, flow.stack_key)
                        want[key] = want.get(key, Counters()) + flow.counters
                got = {key: row.counters for key, row in reading.rows_by_key.items()}
                assert got == want, step
                assert len(want) > 100 * (step + 1)  # rows keep coming, and changing
                os.kill(target.pid, signal.SIGCONT)
        finally:
            probes.detach()
    finally:
        target.kill()
        target.wait()
