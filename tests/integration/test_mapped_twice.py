"""Memory mapped at more than one address, which the RSS counts once per
address (memtrace.model.multimapped): a C program with one memfd mapped
three times and touched through each (every byte known), and a JVM on
ZGC, which maps its heap so (a service's RSS reads up to three times what
it holds, all of it outside the gap's anonymous memory). The note gives
the views, the RSS and the PSS."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.bpf

MIB = 1 << 20
VIEW_BYTES = 48 * MIB  # tests/programs/views.c


def _said(doc: dict) -> list[dict]:
    return [n for n in doc["notes"] if n["kind"] == "mapped_more_than_once"]


def test_a_memfd_mapped_three_times_is_counted_once(programs, run_memtrace):
    rc, doc, stderr = run_memtrace(["--json", "--", programs["views"], "1500"])
    assert rc == 0, stderr
    said = _said(doc)
    assert len(said) == 1, doc["notes"]
    note = said[0]
    assert note["path"] == "/memfd:views_heap" and note["views"] == 3, note
    assert abs(note["rss_bytes"] - 3 * VIEW_BYTES) <= MIB, note
    assert abs(note["pss_bytes"] - VIEW_BYTES) <= MIB, note
    assert note["text"].startswith("RSS counts /memfd:views_heap once per address"), note


def test_a_zgc_heap_is_said_to_be_counted_three_times(java_tools, run_memtrace, tmp_path):
    """JDK 17's ZGC maps its heap at three addresses: what the process
    holds is the PSS, not the RSS."""
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "programs" / "ZHeap.java"
    built = subprocess.run([java_tools[1], "-d", str(tmp_path), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"javac failed: {built.stderr}", pytrace=False)
    rc, doc, stderr = run_memtrace(["--json", "--interval", "0.5", "--", java_tools[0], "-XX:+UseZGC",
                                    "-Xmx512m", "-cp", str(tmp_path), "ZHeap", "2000"])
    assert rc == 0, stderr[-2000:]
    said = _said(doc)
    assert said, doc["notes"]
    note = said[0]
    assert note["path"] == "/memfd:java_heap" and note["views"] == 3, note
    # The 160 MiB it holds is its PSS. A page is counted again in the RSS
    # once the JVM reaches it through another view (after a collection
    # flips the colour): a few tens of MiB here, 3x after minutes of work.
    assert note["pss_bytes"] >= 150 * MIB and note["rss_bytes"] > note["pss_bytes"], note
