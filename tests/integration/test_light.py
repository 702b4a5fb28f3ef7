"""Light mode (no malloc probes) against full mode, on one process in one
state.

retention.c is launched under full-mode memtrace and parks once its workers
have filled and fragmented their arenas (--wait). While the full trace is
still running, a light-mode memtrace attaches to the same idle process for a
few intervals. Then the program exits and the full trace prints its final
snapshot: both describe the same memory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

pytestmark = pytest.mark.bpf

PAGE = 4096
INTERVAL = 0.25
THREADS = 4


def _json_of(proc: subprocess.Popen, what: str, timeout: float = 60) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what} still running after {timeout}s: {err[-2000:]}", pytrace=False)
    if proc.returncode != 0 or not out.strip():
        pytest.fail(f"{what}: rc={proc.returncode}, stderr: {err[-2000:]}", pytrace=False)
    return json.loads(out)


@pytest.fixture(scope="module")
def full_and_light(retention_binary, memtrace_cmd, _prerequisites, wait_file, tmp_path_factory):
    """(full doc, light doc, truth) of one retention process."""
    if _prerequisites:
        pytest.fail("; ".join(_prerequisites), pytrace=False)
    truth_path = tmp_path_factory.mktemp("light") / "truth.json"
    pipes = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    full = subprocess.Popen([*memtrace_cmd, "--json", "--interval", str(INTERVAL), "--",
                             str(retention_binary), str(truth_path), "--wait"], **pipes)
    light, truth = None, None
    try:
        truth = json.loads(wait_file(truth_path, full))
        time.sleep(3 * INTERVAL)  # the full trace samples the parked state
        light = subprocess.Popen([*memtrace_cmd, "--json", "--light", "--interval", str(INTERVAL),
                                  "-p", str(truth["pid"]), "--duration", str(6 * INTERVAL)], **pipes)
        light_doc = _json_of(light, "memtrace --light -p")
        time.sleep(2 * INTERVAL)
        os.kill(truth["pid"], signal.SIGUSR1)  # the program exits
        full_doc = _json_of(full, "memtrace -- retention")
    finally:
        if full.poll() is None and truth is not None:
            # a failed run left the program parked (it is memtrace's child)
            os.kill(truth["pid"], signal.SIGKILL)
        for proc in (full, light):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return full_doc, light_doc, truth


def table(doc: dict) -> list[tuple[str, str]]:
    return sorted((a["id"], a["kind"]) for a in doc["arenas"])


def test_light_sees_the_same_arenas(full_and_light):
    full, light, truth = full_and_light
    assert light["light"] is True and light["allocator"]["estimate"] is True, light["allocator"]
    assert light["heap"]["alloc_count"] == 0, "light mode must not probe malloc"
    assert light["allocator"]["arena_count"] == full["allocator"]["arena_count"] == THREADS + 1
    assert table(light) == table(full)
    assert {t["arena"] for t in truth["threads"]} <= {a["id"] for a in light["arenas"]}


def test_light_retained_is_within_5_percent_of_full(full_and_light):
    full, light, _ = full_and_light
    full_by_id = {a["id"]: a for a in full["arenas"]}
    for arena in light["arenas"]:
        exact = full_by_id[arena["id"]]
        label = f"{arena['kind']} arena {arena['id']}: light {arena} vs full {exact}"
        assert arena["live_is_estimate"] is True, label
        # same process, same state: what the kernel says is the same
        assert abs(arena["resident_bytes"] - exact["resident_bytes"]) <= 2 * PAGE, label
        # the main arena holds a few KiB: 5 % of it is less than one chunk header
        slack = max(0.05 * exact["retained_bytes"], 2 * PAGE)
        assert abs(arena["retained_bytes"] - exact["retained_bytes"]) <= slack, label
    assert light["allocator"]["retained_bytes"] == pytest.approx(
        full["allocator"]["retained_bytes"], rel=0.05)
    assert light["trim"]["estimate_bytes"] == pytest.approx(full["trim"]["estimate_bytes"], rel=0.05)


def test_light_live_estimate_is_close_to_the_truth(full_and_light):
    _, light, truth = full_and_light
    by_id = {a["id"]: a for a in light["arenas"]}
    for thread in truth["threads"]:
        arena = by_id[thread["arena"]]
        # chunk headers and rounding: ~16 bytes on each of ~250 blocks
        assert arena["live_bytes"] == pytest.approx(thread["live_bytes"], rel=0.05), (thread, arena)
    assert any("MALLOC_ARENA_MAX" in h for h in light["hints"]), light["hints"]
