"""A process that is already running, as users meet it: busy when memtrace
attaches, with a heap from before the trace, dying right after its frees,
holding blocks it never touched, exec'ing. Real BPF against programs that
print their own ground truth (tests/programs/busy.c, heapstates.c)."""

from __future__ import annotations

import json
import signal
import time

import pytest

pytestmark = pytest.mark.bpf

ATTACHES = 10  # per kind of busy program: 20 in all


def _counts(path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _mark(program, path, before: int) -> int:
    """Ask the program for its call count; wait for the answer."""
    program.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = _counts(path)
        if len(counts) > before:
            return counts[-1]
        time.sleep(0.01)
    pytest.fail("busy did not answer SIGUSR1", pytrace=False)


@pytest.mark.parametrize("mode", ["--every-ms", "--hot"])
def test_every_attach_to_a_busy_process_counts_the_calls_after_it(
        mode, programs, spawn, start_memtrace, probes, wait_file, tmp_path):
    out = tmp_path / "calls"
    program = spawn([programs["busy"], out, mode])
    wait_file(tmp_path / "calls.ready", program)
    marks = 0
    for attempt in range(ATTACHES):
        tracer = start_memtrace(["--json", "-p", str(program.pid), "--interval", "0.5",
                                 "--duration", "60"])
        tracer.wait_attached(probes)
        first = _mark(program, out, marks)
        time.sleep(0.3)
        last = _mark(program, out, marks + 1)
        marks += 2
        rc, doc, stderr = tracer.stop(signal.SIGINT)
        assert rc == 0, stderr
        made = last - first
        heap = doc["heap"]
        assert made > 0
        assert heap["alloc_count"] >= made, (
            f"attach {attempt + 1}: the program made {made} calls while traced, memtrace "
            f"counted {heap['alloc_count']} ({heap})")
        assert heap["free_count"] >= made, heap
        assert heap["dropped_count"] == 0, heap
        busy = [s for s in doc["stacks"] if s["frames"] and s["frames"][0].startswith("busy_alloc")]
        assert sum(s["alloc_count"] for s in busy) >= made, doc["stacks"]
    assert program.poll() is None, "the busy program died"


@pytest.fixture(scope="module")
def existing(programs, tmp_path_factory):
    """heapstates existing, running with its heap built; its truth."""
    import subprocess

    out = tmp_path_factory.mktemp("existing") / "truth.json"
    program = subprocess.Popen([str(programs["heapstates"]), str(out), "existing"],
                               stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert out.exists(), "heapstates existing wrote no truth"
    yield program, json.loads(out.read_text())
    program.kill()
    program.wait()


def _within(got: int, want: int, share: float = 0.05) -> bool:
    return abs(got - want) <= share * want


@pytest.mark.parametrize("light", [False, True], ids=["full", "light"])
def test_attach_counts_the_heap_from_before_as_live(light, existing, start_memtrace, probes):
    program, truth = existing
    args = ["--json", "-p", str(program.pid), "--interval", "0.5", "--duration", "60"]
    tracer = start_memtrace(args + (["--light"] if light else []))
    tracer.wait_attached(probes)
    time.sleep(1.5)
    rc, doc, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    gap = doc["gap"]
    assert _within(gap["heap_live_bytes"], truth["live_bytes"]), (gap, truth)
    assert _within(gap["allocator_retained_bytes"], truth["freed_bytes"]), (gap, truth)
    assert gap["heap_live_bytes"] + gap["allocator_retained_bytes"] + gap["other_anon_bytes"] \
        == gap["rss_anon_bytes"], gap
    for hint in (x["text"] for x in doc["hints"]):
        assert "would return" not in hint or "only about" in hint, doc["hints"]
    if not light:
        heap = doc["heap"]
        assert heap["live_bytes"] == 0, "nothing was allocated while traced"
        assert heap["live_before_trace_is_estimate"] is True
        assert _within(heap["live_before_trace_bytes"], truth["live_bytes"]), (heap, truth)
        assert doc["allocator"]["mmapped_chunk_count"] == 2, doc["allocator"]


def test_the_final_figures_are_those_at_the_exit(programs, run_memtrace, memtrace_cmd, tmp_path):
    import subprocess

    from memtrace.output.view.fmt import fmt_bytes

    truth_path, recording = tmp_path / "truth.json", tmp_path / "exit.memtrace"
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.5", "--record", recording, "--",
                                    programs["heapstates"], truth_path, "exitfree"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    process, gap, heap = doc["process"], doc["gap"], doc["heap"]
    assert process["at_exit"] is True, process
    # Nothing was given back: the RSS at exit still holds the 300 MiB.
    assert process["rss_anon_bytes"] >= 0.95 * truth["peak_live_bytes"], process
    assert heap["live_bytes"] == truth["live_bytes"], heap
    assert heap["peak_live_bytes"] == truth["peak_live_bytes"], heap
    assert gap["heap_live_bytes"] == truth["live_bytes"], gap
    assert _within(gap["allocator_retained_bytes"], truth["freed_bytes"], 0.1), (gap, truth)
    assert sum(gap[k] for k in ("heap_live_bytes", "allocator_retained_bytes",
                                "other_anon_bytes")) == gap["rss_anon_bytes"], gap
    assert doc["memory_read_elapsed_s"] <= doc["elapsed_s"]
    assert process["peak_rss_bytes"] >= process["rss_bytes"], process
    # One peak everywhere: the kernel's, in JSON and in every report.
    peak = f"peak RSS {fmt_bytes(process['peak_rss_bytes'])} (the kernel's high-water mark)"
    text = subprocess.run([*memtrace_cmd, "report", str(recording)], capture_output=True,
                          text=True, timeout=60)
    assert peak in text.stdout, text.stdout
    assert f"peak heap live {fmt_bytes(truth['peak_live_bytes'])}" in text.stdout, text.stdout
    page = subprocess.run([*memtrace_cmd, "report", str(recording), "--format", "html"],
                          capture_output=True, text=True, timeout=60)
    assert fmt_bytes(process["peak_rss_bytes"]) + "</" in page.stdout
    again = subprocess.run([*memtrace_cmd, "report", str(recording), "--format", "json"],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(again.stdout)["process"]["peak_rss_bytes"] == process["peak_rss_bytes"]


def test_the_summary_shows_the_process_at_its_exit(programs, memtrace_cmd, tmp_path):
    import subprocess

    done = subprocess.run([*memtrace_cmd, "--batch", "--interval", "0.5", "--",
                           str(programs["heapstates"]), str(tmp_path / "t.json"), "exitfree"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = done.stdout[done.stdout.rfind("memtrace summary"):]
    assert "process at its exit: RSS" in summary, summary
    assert "RSS as the kernel counted it at the exit" in summary, summary
    assert "anon RSS 0 B" not in summary, summary
    assert "heap peak: 300.0 MiB" in summary, summary


def test_heap_never_touched_is_shown_apart_and_the_gap_adds_up(programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.5", "--",
                                    programs["heapstates"], truth_path, "untouched"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    gap = doc["gap"]
    assert all(v >= 0 for v in gap.values()), gap
    assert gap["heap_live_bytes"] + gap["allocator_retained_bytes"] + gap["other_anon_bytes"] \
        == gap["rss_anon_bytes"], gap
    assert gap["heap_live_bytes"] <= gap["rss_anon_bytes"], gap
    assert gap["heap_live_not_resident_bytes"] >= 0.95 * truth["untouched_bytes"], gap
    assert doc["heap"]["live_bytes"] >= truth["untouched_bytes"] + truth["touched_bytes"]


def test_exec_drops_the_old_images_blocks(programs, run_memtrace, tmp_path):
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.5", "--",
                                    programs["heapstates"], truth_path, "exec"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    live = doc["heap"]["live_bytes"]
    # The new image's own blocks, and what its libc keeps (stdio buffers).
    assert truth["new_live_bytes"] <= live < truth["new_live_bytes"] + (64 << 10), doc["heap"]
    new = [s for s in doc["stacks"] if any("new_image_alloc" in f for f in s["frames"])]
    assert sum(s["live_bytes"] for s in new) == truth["new_live_bytes"], new
    assert any("exec" in n for n in (x["text"] for x in doc["notes"])), doc["notes"]



def test_a_wrapper_that_runs_the_program_as_a_child_says_so(programs, run_memtrace):
    """A shell that runs the program without exec: the heap traced is the
    shell's, and the output names the child to trace instead."""
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.5", "--", "/bin/sh", "-c",
                                    "sleep 0.5; true"])
    assert rc == 0, stderr
    said = [n for n in doc["notes"] if n["kind"] == "children_not_traced"]
    assert len(said) == 1 and said[0]["count"] == 1, doc["notes"]
    assert said[0]["argv"] == "sleep 0.5", said
    # The final snapshot comes after the child's exit.
    assert said[0]["alive"] is False and f"{said[0]['pid']} (exited)" in said[0]["text"], said
    # A program that starts nothing gets no such note.
    rc, doc, stderr = run_memtrace(["--json", "--", programs["idle"], "--exit"])
    assert rc == 0, stderr
    assert not [n for n in doc["notes"] if n["kind"] == "children_not_traced"], doc["notes"]


PYTHON_BUSY = """
import sys, time
keep = [bytearray(1 << 20) for _ in range(100)]   # glibc mmapped chunks
for b in keep:
    b[::4096] = b"x" * len(b[::4096])
small = [b"y" * 5000 for _ in range(20000)]        # glibc's main arena
open(sys.argv[1], "w").write("ready")
while True:
    x = [str(i) * 50 for i in range(2000)]
"""


def test_python_attached_while_busy_has_its_heap_counted(spawn, start_memtrace, probes,
                                                         wait_file, tmp_path):
    """Debian's python3, busy allocating when memtrace attaches, holding
    about 205 MB it allocated before: live, not retained, not other."""
    ready = tmp_path / "ready"
    program = spawn(["/usr/bin/python3", "-c", PYTHON_BUSY, ready])
    wait_file(ready, program)
    tracer = start_memtrace(["--json", "-p", str(program.pid), "--interval", "0.5",
                             "--duration", "60"])
    tracer.wait_attached(probes)
    time.sleep(1.0)
    rc, doc, stderr = tracer.stop(signal.SIGINT)
    assert rc == 0, stderr
    held = 100 * (1 << 20) + 20000 * 5000
    gap = doc["gap"]
    assert _within(gap["heap_live_bytes"], held, 0.1), gap
    assert gap["allocator_retained_bytes"] < 0.05 * held, gap
    assert doc["heap"]["alloc_count"] > 1000, doc["heap"]
    assert doc["allocator"]["mmapped_chunk_count"] >= 100, doc["allocator"]
    assert not any("retained" in h for h in (x["text"] for x in doc["hints"])), doc["hints"]


def test_threads_that_come_and_go_are_folded_and_still_counted(programs, run_memtrace, tmp_path):
    """A pool's threads come and go: past the latest 64 that exited, their
    rows are folded into one "(exited threads)" row (tid 0), so the work per
    interval follows the threads alive; every block is still counted."""
    truth_path = tmp_path / "truth.json"
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.2", "--",
                                    programs["churn"], truth_path, "200", "--hold-ms", "600"])
    assert rc == 0, stderr
    truth = json.loads(truth_path.read_text())
    workers = [s for s in doc["stacks"] if s["frames"] and s["frames"][0].startswith("thread_alloc")]
    assert sum(s["live_bytes"] for s in workers) == truth["live_bytes"], workers
    assert sum(s["alloc_count"] for s in workers) == truth["alloc_count"], workers
    threads = doc["threads"]
    assert len(threads) <= 64 + 3, [t["name"] for t in threads]
    folded = [t for t in threads if t["tid"] == 0]
    assert folded and folded[0]["name"] == "(exited threads)", threads[:3]
    for field in ("live_bytes", "alloc_bytes", "free_bytes", "alloc_count", "free_count"):
        assert sum(t[field] for t in threads) == doc["heap"][field], field


def test_json_stream_prints_every_interval(programs, memtrace_cmd, tmp_path):
    import subprocess

    done = subprocess.run([*memtrace_cmd, "--json-stream", "--interval", "0.3", "--",
                           str(programs["heapstates"]), str(tmp_path / "t.json"), "untouched"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) >= 3, done.stdout[:2000]
    times = [doc["elapsed_s"] for doc in lines]
    assert times == sorted(times)
    assert lines[-1]["target_alive"] is False and lines[0]["target_alive"] is True
