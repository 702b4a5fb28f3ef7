"""The arena / gap layer end to end, against a program that knows its arenas.

tests/programs/retention.c runs 4 workers, each in its own glibc arena
(found from inside the way glibc finds it), that allocate 40 MiB in 1-32 KiB
blocks and free 90 % in a shuffled order. It writes, per worker, the arena's
address, the bytes it still holds (as requested), its heaps' heap_info sizes
and the arena's resident bytes by mincore(); with --trim, the anonymous RSS
right before and after its malloc_trim(0). memtrace attaches before the
workers start, so it sees every allocation: its per-arena live bytes must be
exact. The last tests launch it instead, and check the final snapshot of a
program that exits while memtrace is reading its arenas.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.bpf

PAGE = 4096
THREADS = 4
# Resident figures come from different reads of the same idle memory
# (smaps vs mincore): equal, give or take a few pages.
RESIDENT_SLACK = 4 * PAGE


def arenas_by_id(doc: dict) -> dict[str, dict]:
    return {a["id"]: a for a in doc["arenas"]}


def worker_arenas(doc: dict, truth: dict) -> list[tuple[dict, dict]]:
    """(truth thread, memtrace arena) for each worker, matched by address."""
    by_id = arenas_by_id(doc)
    pairs = []
    for thread in truth["threads"]:
        arena = by_id.get(thread["arena"])
        assert arena is not None, (
            f"{thread['name']}'s arena {thread['arena']} is not in memtrace's table: "
            f"{sorted(by_id)}"
        )
        pairs.append((thread, arena))
    return pairs


def resident_drop(truth: dict) -> int:
    return truth["trim"]["rss_anon_before_bytes"] - truth["trim"]["rss_anon_after_bytes"]


@pytest.fixture(scope="module")
def fragmented(traced_retention):
    return traced_retention()


@pytest.fixture(scope="module")
def trimmed(traced_retention):
    return traced_retention("--trim")


def test_one_arena_per_worker_plus_main(fragmented):
    doc, truth = fragmented
    arenas = [t["arena"] for t in truth["threads"]]
    # the program's own check that the premise holds
    assert len(set(arenas)) == THREADS and "0x0" not in arenas, truth["threads"]
    assert all(t["foreign_blocks"] == 0 for t in truth["threads"]), truth["threads"]

    assert doc["allocator"]["arena_count"] == THREADS + 1, doc["allocator"]
    assert sorted(a["kind"] for a in doc["arenas"]) == ["main"] + ["thread"] * THREADS, [
        (a["id"], a["kind"]) for a in doc["arenas"]
    ]
    for thread, arena in worker_arenas(doc, truth):
        assert arena["kind"] == "thread"
        assert arena["tids"] == [thread["tid"]], (thread["name"], arena)
        assert arena["reliable"] and not arena["live_is_estimate"], arena


def test_arena_live_bytes_are_exact(fragmented):
    doc, truth = fragmented
    assert doc["heap"]["dropped_count"] == 0, doc["heap"]
    for thread, arena in worker_arenas(doc, truth):
        assert arena["live_bytes"] == thread["live_bytes"], (
            f"{thread['name']} arena {arena['id']}: memtrace live {arena['live_bytes']} "
            f"!= truth {thread['live_bytes']}"
        )
    by_tid = {t["tid"]: t for t in doc["threads"]}
    for thread in truth["threads"]:
        got = by_tid[thread["tid"]]
        assert got["live_bytes"] == thread["live_bytes"], (thread, got)
        assert got["alloc_count"] == thread["alloc_count"], (thread, got)


def test_arena_heaps_match_heap_info(fragmented):
    doc, truth = fragmented
    for thread, arena in worker_arenas(doc, truth):
        heaps = thread["heaps"]
        assert arena["heap_count"] == len(heaps), (thread["name"], arena)
        assert arena["system_mem_bytes"] == sum(h["size"] for h in heaps), (thread["name"], arena)
        assert arena["committed_bytes"] == sum(h["mprotect_size"] for h in heaps), (
            thread["name"], arena)
        # a thread heap reserves its whole 64 MiB, committed or not
        assert arena["reserved_bytes"] == len(heaps) * truth["heap_max_size"], arena


def test_retained_is_resident_minus_live(fragmented):
    doc, truth = fragmented
    for thread, arena in worker_arenas(doc, truth):
        label = f"{thread['name']} arena {arena['id']}"
        assert abs(arena["resident_bytes"] - thread["resident_bytes"]) <= RESIDENT_SLACK, (
            f"{label}: memtrace resident {arena['resident_bytes']} vs mincore "
            f"{thread['resident_bytes']}"
        )
        assert abs(arena["retained_bytes"] - (arena["resident_bytes"] - arena["live_bytes"])) <= PAGE
        truth_retained = thread["resident_bytes"] - thread["live_bytes"]
        assert abs(arena["retained_bytes"] - truth_retained) <= RESIDENT_SLACK, (
            f"{label}: memtrace retained {arena['retained_bytes']} vs truth {truth_retained}"
        )
        # 90 % was freed and free() gave (almost) none of it back
        assert arena["retained_bytes"] >= 8 * arena["live_bytes"], (label, arena)
    workers_retained = sum(a["retained_bytes"] for _, a in worker_arenas(doc, truth))
    assert doc["allocator"]["retained_bytes"] >= workers_retained, doc["allocator"]
    assert doc["gap"]["allocator_retained_bytes"] == doc["allocator"]["retained_bytes"], doc["gap"]


def test_retention_is_charged_to_the_allocating_stack(fragmented):
    doc, truth = fragmented
    stacks = [s for s in doc["stacks"] if s["frames"] and s["frames"][0].startswith("retain_alloc+")]
    assert stacks, [s["frames"][:1] for s in doc["stacks"]]
    workers_retained = sum(a["retained_bytes"] for _, a in worker_arenas(doc, truth))
    charged = sum(s["retained_bytes"] for s in stacks)
    # shares are rounded down per (stack, arena): a few bytes each
    assert workers_retained - 64 <= charged <= workers_retained, (charged, workers_retained)
    assert sum(s["live_bytes"] for s in stacks) == sum(t["live_bytes"] for t in truth["threads"])


def test_hint_names_malloc_arena_max(fragmented):
    doc, _ = fragmented
    assert any("MALLOC_ARENA_MAX" in h for h in (x["text"] for x in doc["hints"])), doc["hints"]


def test_malloc_trim_is_measured(trimmed, fragmented):
    doc, truth = trimmed
    assert truth["trim"]["result"] == 1, truth["trim"]
    dropped = resident_drop(truth)
    assert dropped > 100 * 2**20, truth["trim"]  # most of the 4 x 36 MiB freed
    assert doc["trim"]["calls"] == 1, doc["trim"]
    assert doc["heap"]["trim_calls"] == 1, doc["heap"]
    slack = max(8 * PAGE, dropped // 50)
    assert abs(doc["trim"]["returned_bytes"] - dropped) <= slack, (
        f"memtrace trim.returned_bytes {doc['trim']['returned_bytes']} vs the program's "
        f"anon RSS drop {dropped}; trim: {json.dumps(doc['trim'])}"
    )
    # the same deterministic program, traced without --trim, estimated it
    estimate = fragmented.doc["trim"]["estimate_bytes"]
    assert abs(estimate - dropped) <= slack, (estimate, dropped)


def test_retained_falls_after_trim(trimmed, fragmented):
    doc, truth = trimmed
    before = {t["name"]: a for t, a in worker_arenas(*fragmented)}
    for thread, arena in worker_arenas(doc, truth):
        label = f"{thread['name']} arena {arena['id']}"
        assert arena["live_bytes"] == thread["live_bytes"], label  # trim frees nothing
        assert abs(arena["resident_bytes"] - thread["resident_after_trim_bytes"]) <= RESIDENT_SLACK, (
            f"{label}: memtrace resident {arena['resident_bytes']} vs mincore after trim "
            f"{thread['resident_after_trim_bytes']}"
        )
        assert arena["retained_bytes"] < before[thread["name"]]["retained_bytes"] // 4, (
            f"{label}: retained {arena['retained_bytes']} after trim, "
            f"{before[thread['name']]['retained_bytes']} without"
        )
        # the mappings stay: trim madvises, it does not unmap
        assert arena["committed_bytes"] == before[thread["name"]]["committed_bytes"], label
    assert doc["allocator"]["retained_bytes"] < fragmented.doc["allocator"]["retained_bytes"] // 4
    assert not any("MALLOC_ARENA_MAX" in h for h in (x["text"] for x in doc["hints"])), doc["hints"]


# ---------------------------------------------------------------- launch mode

# Arenas that take long to read: each worker also leaves ~20,000 small free
# chunks, so one read of the arenas takes a few hundred ms, longer than the
# interval. memtrace is reading them most of the time, and the program's
# exit lands in a read.
BUSY_ARGS = ["--mib", "2", "--chunks", "40000", "--hold-ms", "1500"]


@pytest.fixture(scope="module")
def launched_busy(retention_binary, memtrace_json, tmp_path_factory):
    truth_path = tmp_path_factory.mktemp("launched") / "truth.json"
    doc = memtrace_json(["--json", "--interval", "0.1", "--",
                         str(retention_binary), str(truth_path), *BUSY_ARGS])
    return doc, json.loads(truth_path.read_text())


def test_launch_counts_arena_live_bytes_exactly(launched_busy):
    doc, truth = launched_busy
    assert doc["heap"]["dropped_count"] == 0, doc["heap"]
    assert doc["allocator"]["arena_count"] == THREADS + 1, doc["allocator"]
    for thread, arena in worker_arenas(doc, truth):
        assert arena["live_bytes"] == thread["live_bytes"], (thread, arena)
        assert arena["tids"] == [thread["tid"]], (thread, arena)


def test_final_snapshot_keeps_arenas_read_before_the_exit(launched_busy):
    """The final snapshot of a launched program is its last sample while it
    lived. A read of the arenas cut short by the exit must not replace the
    last complete one: the program was idle, nothing changed."""
    doc, truth = launched_busy
    for thread, arena in worker_arenas(doc, truth):
        heap_bytes = sum(h["size"] for h in thread["heaps"])
        assert arena["reliable"] and arena["system_mem_bytes"] == heap_bytes, (
            f"{thread['name']} arena {arena['id']} in the final snapshot: reliable="
            f"{arena['reliable']} system_mem_bytes={arena['system_mem_bytes']} "
            f"free_bytes={arena['free_bytes']} trimmable_bytes={arena['trimmable_bytes']}; "
            f"heap_info says {heap_bytes} (trim estimate_bytes {doc['trim']['estimate_bytes']})"
        )


def test_no_address_space_event_lost_while_arenas_are_read(launched_busy):
    """Heap growth is one mprotect per few pages; while memtrace reads slow
    arenas, those events must still reach the address-space model."""
    doc, _ = launched_busy
    assert doc["heap"]["drops"]["vm_events_lost"] == 0, doc["heap"]["drops"]
