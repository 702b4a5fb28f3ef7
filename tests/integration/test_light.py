"""Light mode (no malloc probes) against full mode, on one process in one
state.

retention.c parks before its workers start; a full-mode memtrace attaches,
the workers fill and fragment their arenas, and the program parks again.
While the full trace still runs, a light-mode memtrace attaches to the same
idle process for a few intervals; then the full trace is stopped. Both
describe the same memory.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.bpf

PAGE = 4096
INTERVAL = 0.25
THREADS = 4


@pytest.fixture(scope="module")
def full_and_light(retention_run, memtrace_json):
    """(full doc, light doc, truth) of one retention process."""
    with retention_run() as run:
        light = memtrace_json(["--json", "--light", "--interval", str(INTERVAL),
                               "-p", str(run.pid), "--duration", str(6 * INTERVAL)])
        full = run.stop()
    return full, light, run.truth


def table(doc: dict) -> list[tuple[str, str]]:
    return sorted((a["id"], a["kind"]) for a in doc["arenas"])


def test_light_sees_the_same_arenas(full_and_light):
    full, light, truth = full_and_light
    assert light["light"] is True and light["allocator"]["estimate"] is True, light["allocator"]
    assert light["heap"]["alloc_count"] == 0, "light mode must not probe malloc"
    assert light["allocator"]["arena_count"] == full["allocator"]["arena_count"] == THREADS + 1
    assert table(light) == table(full)
    assert {t["arena"] for t in truth["threads"]} <= {a["id"] for a in light["arenas"]}
    assert all(a["reliable"] for a in light["arenas"]), light["arenas"]


def test_light_retained_is_within_5_percent_of_full(full_and_light):
    full, light, _ = full_and_light
    full_by_id = {a["id"]: a for a in full["arenas"]}
    for arena in light["arenas"]:
        exact = full_by_id[arena["id"]]
        label = f"{arena['kind']} arena {arena['id']}: light {arena} vs full {exact}"
        assert arena["live_is_estimate"] is True, label
        # same process, same state: what the kernel says is the same
        assert abs(arena["resident_bytes"] - exact["resident_bytes"]) <= 2 * PAGE, label
        # the main arena holds a few KiB: 5 % of it is less than one chunk
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
    assert any("MALLOC_ARENA_MAX" in h for h in (x["text"] for x in light["hints"])), light["hints"]


def test_light_names_the_stack_that_made_each_arena_heap(run_memtrace):
    """No malloc probe, and glibc has no frame pointers: the stack's top,
    scanned for return addresses after call instructions, still names the
    function whose malloc made glibc map each new arena heap."""
    rc, doc, stderr = run_memtrace(["--light", "--json", "--interval", str(INTERVAL),
                                    "demo", "arena-retention", "--",
                                    "--threads", "2", "--mib", "16", "--hold", "1"])
    assert rc == 0, stderr
    heaps = [r for r in doc["regions"] if r["kind"] == "glibc-arena-heap" and r["origin_tid"]]
    assert heaps, doc["regions"]
    for region in heaps:
        assert any(f.startswith("inflate_block+") for f in region["origin_frames"]), region
