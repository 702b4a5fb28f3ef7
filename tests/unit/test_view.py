"""The views: formatting, the live screen at fixed sizes, the plain-text
batch and summary output, and the key reader on a pseudo-terminal."""

from __future__ import annotations

import io
import os
import re
import select
import sys
import termios

import pytest
from rich.console import Console

from memtrace.errors import MemtraceError
from memtrace.model.notes import LIGHT_ESTIMATES, TEXT, THREAD_ARENAS_RETAIN, TRIM_WOULD_RETURN, Note
from memtrace.model.snapshot import (
    AllocatorStats,
    ArenaStats,
    Counters,
    DropStats,
    Gap,
    HeapTotals,
    OsStats,
    ProcessStats,
    Rates,
    RegionStats,
    Snapshot,
    StackStats,
    ThreadStats,
    TrimCall,
    TrimStats,
)
from memtrace.output.view.fmt import (
    ellipsize,
    fit_list,
    fmt_bytes,
    fmt_count_rate,
    fmt_duration,
    fmt_rate,
    fmt_signed_bytes,
    frame_chain,
    short_frame,
    split_frame,
)
from memtrace.output.view.keys import KEY_BINDINGS, KeyReader, split_keys
from memtrace.output.view.live import MODES, SORTS, LiveView, bar_cells, render
from memtrace.output.reports.text import render_summary
from memtrace.output.view.text import BatchView

MiB = 1 << 20
ESC = "\x1b"

ZLIB_FRAMES = (
    "inflateInit2_+0x1a [libz.so.1]",
    "Java_java_util_zip_Inflater_init+0x30 [libzip.so]",
    "0x7f12abcd [libjvm.so]",
    "start_thread+0x10 [libc.so.6]",
)


def stack(live_mib: int, frames=ZLIB_FRAMES, delta=0, tids=(101,), truncated=False) -> StackStats:
    c = Counters(alloc_bytes=2 * live_mib * MiB, free_bytes=live_mib * MiB, alloc_count=20, free_count=10)
    return StackStats(frames=frames, tids=tids, counters=c, truncated=truncated, live_delta_bytes=delta)


def thread(tid: int, name: str, live_mib: int, alive=True) -> ThreadStats:
    c = Counters(alloc_bytes=3 * live_mib * MiB, free_bytes=2 * live_mib * MiB, alloc_count=9, free_count=6)
    return ThreadStats(tid, name, c, alive)


def snapshot(**overrides) -> Snapshot:
    # Deliberately not sorted: the views must order by live bytes themselves.
    stacks = (
        stack(8, ("parse_config+0x10 [app]", "main+0x5 [app]", "__libc_start_main+0x80 [libc.so.6]"), delta=-MiB),
        stack(64, delta=3 * MiB, tids=(101, 102)),
        stack(16, ("0x7f00dead [libfoo.so]",), truncated=True),
    ) + tuple(stack(1, (f"filler_{i}+0x1 [app]", "start_thread+0x1 [libc.so.6]")) for i in range(30))
    threads = (thread(100, "java", 4), thread(101, "Inflater-1", 40), thread(102, "gone", 20, alive=False)) + tuple(
        thread(200 + i, f"worker-{i}", 1) for i in range(20)
    )
    fields = dict(
        pid=4242,
        comm="java",
        elapsed_s=187.0,
        interval_s=1.0,
        process=ProcessStats(rss_bytes=1300 * MiB, rss_anon_bytes=900 * MiB, peak_rss_bytes=1400 * MiB),
        heap=HeapTotals(
            counters=Counters(alloc_bytes=3 << 30, free_bytes=5 << 29, alloc_count=1234567, free_count=1200000),
            untracked_free_count=321,
            trim_calls=3,
            trim_released_calls=1,
            drops=DropStats(allocs_map_full=123, stack_lost=5),
        ),
        threads=threads,
        stacks=stacks,
        rates=Rates(12 * MiB, 10 * MiB, 1234.0, 1100.0),
        notes=(Note.of(TEXT, text="perf map missing: Java frames show as addresses"),),
    )
    fields.update(overrides)
    return Snapshot(**fields)


GiB = 1 << 30
HINTS = (
    Note.of(THREAD_ARENAS_RETAIN, arenas=8, retained_bytes=3215 * (1 << 20), resident_bytes=3994 * (1 << 20)),
    Note.of(TRIM_WOULD_RETURN, bytes=1229 * (1 << 20)),
)


def arena(i: int, kind="thread", tids=(), live_mib=100, resident_mib=500, reliable=True, estimate=False) -> ArenaStats:
    return ArenaStats(
        id=f"0x7f3a{i:02x}000020",
        kind=kind,
        tids=tids,
        heap_count=2 if kind == "thread" else 1,
        reserved_bytes=128 * MiB if kind == "thread" else 0,
        committed_bytes=(resident_mib + 12) * MiB,
        resident_bytes=resident_mib * MiB,
        live_bytes=live_mib * MiB,
        system_mem_bytes=(resident_mib + 12) * MiB,
        free_bytes=(resident_mib - live_mib) * MiB,
        trimmable_bytes=(resident_mib - live_mib) * MiB // 3,
        live_is_estimate=estimate,
        reliable=reliable,
    )


def region(i: int, kind="glibc-arena-heap", frames=ZLIB_FRAMES, tid=101, in_malloc=True, resident_mib=60) -> RegionStats:
    start = 0x7F3A00000000 + (i << 26)
    return RegionStats(start, start + 64 * MiB, kind, frames, tid, in_malloc, 64 * MiB, resident_mib * MiB)


def full_snapshot(light=False, **overrides) -> Snapshot:
    """The incident: zlib Inflaters on JVM threads filled per-thread arenas
    that glibc keeps resident after the frees."""
    arenas = (arena(0, "main", () if light else (100,), live_mib=300, resident_mib=320, estimate=light),) + tuple(
        arena(i, tids=() if light else (101, 102, 200 + i), live_mib=50, resident_mib=450 + i, estimate=light,
              reliable=i != 7)
        for i in range(1, 9)
    )
    regions = (
        region(1, resident_mib=64),
        region(2, kind="glibc-mmapped-chunk", frames=("deflate_slow+0x1 [libz.so.1]",), tid=102),
        region(3, kind="anonymous", frames=("0x7f00beef [libjvm.so]",), tid=100, in_malloc=False, resident_mib=40),
        region(4, kind="heap", frames=(), tid=None, in_malloc=False, resident_mib=30),
    )
    stacks = list(snapshot().stacks)
    # The Inflater stack left most of what the thread arenas keep.
    stacks[1] = StackStats(stacks[1].frames, stacks[1].tids, stacks[1].counters, live_delta_bytes=3 * MiB,
                           retained_bytes=3 * GiB)
    stacks[0] = StackStats(stacks[0].frames, stacks[0].tids, stacks[0].counters, retained_bytes=100 * MiB)
    heap_live = 700 * MiB if light else snapshot().heap.live_bytes
    fields = dict(
        process=ProcessStats(rss_bytes=7 * GiB + 300 * MiB, rss_anon_bytes=7 * GiB, peak_rss_bytes=8 * GiB),
        light=light,
        os=OsStats(mapped_bytes=20 * GiB, reserved_bytes=9 * GiB, committed_bytes=8 * GiB,
                   resident_bytes=7 * GiB + 300 * MiB, returned_bytes=1536 * MiB),
        allocator=AllocatorStats(arena_count=9, committed_bytes=4 * GiB, resident_bytes=3900 * MiB,
                                 live_bytes=heap_live, retained_bytes=3174 * MiB, mmapped_chunk_count=3,
                                 mmapped_chunk_bytes=12 * MiB, estimate=light),
        arenas=arenas,
        regions=regions,
        trim=TrimStats(calls=3, returned_bytes=40 * MiB, estimate_bytes=1229 * MiB,
                       recent=(TrimCall(tid=100, elapsed_s=120.0, returned_bytes=40 * MiB, result=1),)),
        gap=Gap(rss_anon_bytes=7 * GiB, heap_live_bytes=heap_live, allocator_retained_bytes=3174 * MiB,
                other_anon_bytes=7 * GiB - heap_live - 3174 * MiB),
        hints=HINTS,
    )
    if light:
        # No malloc probes: no stacks, threads or traffic; trim is still probed.
        fields.update(stacks=(), threads=(), heap=HeapTotals(trim_calls=3, trim_released_calls=1), rates=Rates(),
                      notes=(Note.of(LIGHT_ESTIMATES),))
    else:
        fields.update(stacks=tuple(stacks))
    fields.update(overrides)
    return snapshot(**fields)


def screen(snap: Snapshot, width: int, height: int, mode: str = "stacks", sort: str = "live") -> list[str]:
    console = Console(width=width, height=height, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(render(snap, width, height, mode, sort))
    text = console.file.getvalue()
    assert text.endswith("\n")
    return text[:-1].split("\n")


# ---------------------------------------------------------------- fmt


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (int(1.5 * MiB), "1.5 MiB"),
        (MiB - 1, "1.0 MiB"),
        (64 * MiB, "64.0 MiB"),
        (-1536, "-1.5 KiB"),
        (3 << 40, "3.0 TiB"),
    ],
)
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


def test_signed_rates_and_durations():
    assert fmt_signed_bytes(MiB) == "+1.0 MiB"
    assert fmt_signed_bytes(-512) == "-512 B"
    assert fmt_signed_bytes(0) == "0 B"
    assert fmt_rate(1.5 * MiB) == "1.5 MiB/s"
    assert fmt_count_rate(1234) == "1.2k/s"
    assert [fmt_duration(x) for x in (0.25, 42.34, 187, 3720, 2 * 86400 + 3 * 3600)] == [
        "250ms",
        "42.3s",
        "3m07s",
        "1h02m",
        "2d03h",
    ]


def test_frames_shorten():
    assert split_frame("func+0x1a [libc.so.6]") == ("func", "libc.so.6")
    assert split_frame("0x7f12 [libfoo.so]") == (None, "libfoo.so")
    assert short_frame("func+0x1a [libc.so.6]") == "func"
    assert short_frame("0x7f12 [/usr/lib/libfoo.so.1.2]") == "[libfoo]"
    assert short_frame("ns::Foo::bar(int, char const*) const+0x8 [app]") == "ns::Foo::bar"
    assert short_frame("0x7f12") == "0x7f12"
    assert ellipsize("abcdefghij", 5) == "ab…ij"


def test_frame_chain_skips_to_the_python_function():
    frames = ["function at 0x506400+0xf4 [python3.11]", "function at 0x634270+0x8c [python3.11]",
              "_PyObject_MakeTpCall+0x186 [python3.11]", "churn (/srv/busy.py:5) [py]",
              "<module> (/srv/busy.py:8) [py]", "PyEval_EvalCode+0xbb [python3.11]"]
    assert frame_chain(frames, 200) == ("function at 0x506400 [python3.11] ← … ← churn ← <module> "
                                        "← PyEval_EvalCode")
    assert frame_chain(frames[:5], 200) == "function at 0x506400 [python3.11] ← … ← churn ← <module>"
    assert frame_chain(frames, 50) == "function at 0x506400 [python3.11] ← … ← churn ← …"
    # Narrower: the allocating frame is cut so that the function still shows.
    assert frame_chain(frames, 30) == "functi…on3.11] ← … ← churn ← …"
    assert frame_chain(frames, 24) == "funct…n3.11] ← … ← churn"
    assert frame_chain(frames, 20) == "funct…n3.11] ← …"
    # Right after the allocating frame: no skip, the same give.
    assert frame_chain(["function at 0x59b620+0x4a6 [python3.11]", *frames[3:]], 30) == \
        "function…thon3.11] ← churn ← …"
    # A Python frame first or second: the chain as it is.
    assert frame_chain(frames[2:5], 200) == "_PyObject_MakeTpCall ← churn ← <module>"


def test_frame_chain_fits_any_width():
    assert frame_chain(ZLIB_FRAMES, 200) == "inflateInit2_ ← Java_java_util_zip_Inflater_init ← [libjvm] ← start_thread"
    assert frame_chain(ZLIB_FRAMES, 30) == "inflateInit2_ ← …"
    assert frame_chain(ZLIB_FRAMES, 60, sep=" <- ", more="...").endswith(" <- ...")
    for width in range(0, 90):
        assert len(frame_chain(ZLIB_FRAMES, width)) <= width
    assert frame_chain((), 20) == "(no frames)"


# ---------------------------------------------------------------- live


def test_header_shows_the_numbers():
    text = "\n".join(screen(snapshot(), 120, 40))
    for expected in (
        "pid 4242 (java)",
        "up 3m07s",
        "running",
        "RSS 1.3 GiB",
        "anon 900.0 MiB",
        "heap live 512.0 MiB",
        "allocated 3.0 GiB",
        "freed 2.5 GiB",
        "malloc 12.0 MiB/s",
        "free 10.0 MiB/s",
        "untracked frees 321",
        "malloc_trim 3 (1 released)",
        "truncated stacks 1/33",
        "123 allocations untracked",
        "raise --max-allocs",
        "raise --stack-storage-size",
        "perf map missing",
    ):
        assert expected in text, expected


def test_no_drops_no_drop_line():
    snap = snapshot(heap=HeapTotals(counters=Counters(alloc_bytes=10)))
    assert "DROPS" not in "\n".join(screen(snap, 120, 40))


def test_stacks_sorted_by_live_with_growth():
    lines = screen(snapshot(), 120, 40)
    start = next(i for i, line in enumerate(lines) if line.startswith("STACKS")) + 2
    rows = lines[start : start + 3]
    assert [row.split()[0:2] for row in rows] == [["64.0", "MiB"], ["16.0", "MiB"], ["8.0", "MiB"]]
    assert "+3.0 MiB" in rows[0] and "inflateInit2_ ← Java_java_util_zip_Inflater_init" in rows[0]
    assert "~ [libfoo]" in rows[1]  # truncated, unsymbolized
    assert "-1.0 MiB" in rows[2] and "parse_config ← main" in rows[2]


def test_threads_table_and_exited():
    text = "\n".join(screen(snapshot(), 120, 40, mode="threads"))
    assert re.search(r"101\s+Inflater-1\s+40\.0 MiB", text)
    assert re.search(r"102\s+gone\s+20\.0 MiB.*exited", text)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("width, height", [(120, 40), (80, 24), (40, 10), (20, 5), (200, 60), (10, 3), (1, 1)])
def test_fits_every_size(mode, width, height):
    snaps = (snapshot(), Snapshot(pid=1, comm="x", elapsed_s=0.0), full_snapshot(), full_snapshot(light=True))
    for snap in snaps:
        for sort in SORTS:
            lines = screen(snap, width, height, mode, sort)
            assert len(lines) == height
            assert all(len(line) <= width for line in lines)
            if height >= 3:
                assert " q " in lines[-1]  # the keys stay on the bottom line


def test_mode_gives_its_table_the_rows():
    def rows_after(lines, title):
        start = next(i for i, line in enumerate(lines) if line.startswith(title))
        return int(lines[start].split()[1])  # "STACKS 12 of 33 ..."

    stacks_mode, threads_mode = screen(snapshot(), 100, 30), screen(snapshot(), 100, 30, "threads")
    assert rows_after(stacks_mode, "STACKS") > rows_after(stacks_mode, "THREADS")
    assert rows_after(threads_mode, "THREADS") > rows_after(threads_mode, "STACKS")


def test_small_screen_keeps_drops():
    text = "\n".join(screen(snapshot(), 80, 10))
    assert "DROPS" in text and "pid 4242" in text


def test_unknown_mode():
    with pytest.raises(ValueError):
        render(snapshot(), 80, 24, mode="nope")
    with pytest.raises(ValueError):
        render(snapshot(), 80, 24, sort="nope")
    view = LiveView(Console(file=io.StringIO(), width=80, height=24))
    assert view.set_mode("threads") and view.mode == "threads"
    assert not view.set_mode("nope") and view.mode == "threads"


# ---------------------------------------------------------------- the gap, arenas, regions


def test_gap_heads_a_wide_screen_with_its_bar():
    lines = screen(full_snapshot(), 200, 60)
    assert lines[0].startswith(
        "anon RSS 7.0 GiB = heap live █ 512.0 MiB + allocator retained ▒ 3.1 GiB + other ░ 3.4 GiB  █"
    )  # each part after its glyph in the bar: the bar's legend
    bar = lines[0].split("  ")[-1]
    assert 10 <= len(bar) <= 40 and set(bar) == set("█▒░")
    assert bar.index("▒") < bar.index("░")  # live, retained, other: the equation's order
    assert bar.count("▒") > bar.count("█")  # retained outweighs live here
    assert lines[1].startswith("memtrace  pid 4242 (java)")
    text = "\n".join(lines)
    for expected in (
        "glibc arenas 9 (1 main, 8 thread)  committed 4.0 GiB  resident 3.8 GiB  mmapped chunks 3 (12.0 MiB)",
        "malloc_trim(0) would return ~1.2 GiB",
        "1 read unreliably",
        " HINT   8 thread arenas keep 3.1 GiB freed but resident (80 % of their 3.9 GiB): MALLOC_ARENA_MAX=2",
        " HINT   malloc_trim(0) would return about 1.2 GiB now (estimate)",
        "address space: mapped 20.0 GiB  reserved 9.0 GiB  committed 8.0 GiB  resident 7.3 GiB  returned 1.5 GiB",
        "malloc_trim 3 (1 released) returned 40.0 MiB",
        "live blocks 34,567  RSS 7.3 GiB  peak 8.0 GiB",  # the gap line has heap live and anon
    ):
        assert expected in text, expected


def test_gap_says_it_shorter_on_80_columns():
    lines = screen(full_snapshot(), 80, 24)
    assert lines[0].rstrip() == "anon RSS 7.0 GiB = heap live 512.0 MiB + retained 3.1 GiB + other 3.4 GiB"
    allocator = next(line for line in lines if line.startswith("arenas 9"))
    assert allocator.rstrip() == "arenas 9  committed 4.0 GiB  resident 3.8 GiB  trim would return ~1.2 GiB"
    # Hints wrap rather than lose their advice; the lines under the badge line up.
    start = next(i for i, line in enumerate(lines) if line.startswith(" HINT "))
    assert "MALLOC_ARENA_MAX=2" in lines[start + 1] and lines[start + 1].startswith(" " * 8)
    assert "DROPS" in "\n".join(lines)
    # Details give way so the tables keep rows.
    assert not any(line.startswith("address space") for line in lines)
    assert sum(1 for line in lines if re.match(r"\s+\d+\.\d (MiB|GiB)\s", line)) >= 5


def test_light_mode_marks_estimates():
    snap = full_snapshot(light=True)
    lines = screen(snap, 200, 60)
    text = "\n".join(lines)
    assert lines[0].startswith("anon RSS 7.0 GiB = heap live █ ~700.0 MiB + allocator retained ▒ ~3.1 GiB + other")
    assert lines[1].startswith("memtrace  light mode  pid 4242")
    assert "since start" not in text and "malloc 0 B/s" not in text  # no probes, no traffic
    assert "malloc_trim 3 (1 released) returned 40.0 MiB" in text  # still probed
    assert "STACKS  none: no malloc probes in light mode (press a for the arenas)" in text
    arenas = "\n".join(screen(snap, 200, 60, "arenas"))
    assert "~ estimate" in arenas and re.search(r"main\s+1\s+0 B\s+332.0 MiB\s+320.0 MiB\s+~300.0 MiB", arenas)
    assert "~" in screen(snap, 80, 24)[0]


def test_arenas_view():
    lines = screen(full_snapshot(), 200, 60, "arenas")
    text = "\n".join(lines)
    title = next(i for i, line in enumerate(lines) if line.startswith("ARENAS"))
    assert lines[title].startswith("ARENAS  9 of 9 by retained bytes (1 main, 8 thread)  ? unreliable read")
    assert lines[title + 1].split() == [
        "ARENA", "KIND", "HEAPS", "RESERVED", "COMMITTED", "RESIDENT", "LIVE", "RETAINED", "RET%", "TRIMMABLE", "THREADS",
    ]
    rows = lines[title + 2 : title + 11]
    assert rows[0].split()[:2] == ["0x7f3a08000020", "thread"]  # the most retained first
    assert re.search(r"thread\s+2\s+128.0 MiB\s+470.0 MiB\s+458.0 MiB\s+50.0 MiB\s+408.0 MiB\s+89%\s+136.0 MiB\s+"
                     r"Inflater-1, gone, worker-8$", rows[0].rstrip())
    assert "thread?" in rows[1]  # read unreliably
    assert rows[-1].split()[:2] == ["0x7f3a00000020", "main"] and rows[-1].rstrip().endswith("java")
    regions = next(i for i, line in enumerate(lines) if line.startswith("REGIONS"))
    assert "4 of the 4 largest never returned to the OS" in lines[regions]
    assert lines[regions + 1].split()[:6] == ["START", "KIND", "SIZE", "COMMITTED", "RESIDENT", "THREAD"]
    assert re.search(r"arena heap\s+64.0 MiB\s+64.0 MiB\s+64.0 MiB\s+101 Inflater-1\s+malloc\s+"
                     r"inflateInit2_ ← Java_java_util_zip_Inflater_init", text)
    assert re.search(r"mmapped chunk .* 102 gone\s+malloc\s+deflate_slow", text)
    assert re.search(r"anonymous .* 100 java\s+direct\s+\[libjvm\]", text)
    assert re.search(r"brk heap .* before trace\s+direct\s+\(made before the trace began\)", text)
    assert "STACKS" not in text


def test_arenas_view_on_80_columns():
    lines = screen(full_snapshot(), 80, 24, "arenas")
    title = next(i for i, line in enumerate(lines) if line.startswith("ARENAS"))
    assert lines[title + 1].split() == ["KIND", "RESIDENT", "LIVE", "RETAINED", "RET%", "TRIMMABLE", "THREADS"]
    assert lines[title + 2].rstrip().endswith("Inflater-1, gone, +1")
    assert any(line.startswith("REGIONS") for line in lines)
    assert any(re.search(r"arena heap\s+64.0 MiB\s+101 Inflater-1\s+malloc\s+inflateInit2_", line) for line in lines)


def test_snapshots_without_the_new_sections():
    old = snapshot()
    lines = screen(old, 120, 40)
    text = "\n".join(lines)
    assert "anon RSS" not in text and "HINT" not in text and "address space" not in text
    assert not any(line.startswith(("glibc arenas", "arenas")) for line in lines)
    assert lines[0].startswith("memtrace  pid 4242") and "heap live 512.0 MiB" in lines[3]
    assert "RETAINED" not in text
    arenas = screen(old, 80, 24, "arenas")
    assert any(line.startswith("ARENAS  no arena data (address-space layer off, or an older recording)") for line in arenas)
    bare = full_snapshot(arenas=(), regions=())
    bare_text = "\n".join(screen(bare, 120, 40, "arenas"))
    assert "ARENAS  none read yet" in bare_text and "REGIONS" not in bare_text


def test_stacks_ranked_by_retained():
    lines = screen(full_snapshot(), 120, 40, sort="retained")
    start = next(i for i, line in enumerate(lines) if line.startswith("STACKS"))
    assert "by retained bytes (estimates)" in lines[start]
    assert lines[start + 1].split()[:2] == ["LIVE", "RETAINED"]
    rows = lines[start + 2 : start + 5]
    assert "3.0 GiB" in rows[0] and "inflateInit2_" in rows[0]
    assert "100.0 MiB" in rows[1] and "parse_config" in rows[1]
    assert "by live" in lines[-1]  # the key now offers the other order
    # Ranked by live, the column is still there when any stack retains.
    by_live = screen(full_snapshot(), 120, 40)
    start = next(i for i, line in enumerate(by_live) if line.startswith("STACKS"))
    assert "by live bytes" in by_live[start] and "RETAINED" in by_live[start + 1]
    assert "16.0 MiB" in by_live[start + 3]  # live order: the 16 MiB stack second
    assert "by retained" in by_live[-1]
    # Nothing retained yet: ranked by live, and it says why.
    plain = screen(snapshot(), 120, 40, sort="retained")
    start = next(i for i, line in enumerate(plain) if line.startswith("STACKS"))
    assert "by live bytes (no retained bytes yet)" in plain[start] and "RETAINED" not in plain[start + 1]


def test_handle_key():
    view = LiveView(Console(file=io.StringIO(), width=80, height=24))
    assert view.mode == "stacks" and view.sort == "live"
    assert view.handle_key("r") and (view.mode, view.sort) == ("stacks", "retained")
    assert view.handle_key("r") and view.sort == "live"
    assert view.handle_key("a") and view.mode == "arenas"
    # The arenas view has no stacks: 'r' shows them, ranked by retained.
    assert view.handle_key("r") and (view.mode, view.sort) == ("stacks", "retained")
    assert view.handle_key("t") and view.mode == "threads"
    assert view.handle_key("r") and (view.mode, view.sort) == ("threads", "live")
    assert not view.handle_key("q") and not view.handle_key("x") and not view.handle_key("up")
    assert view.mode == "threads"
    assert view.set_mode("arenas") and view.mode == "arenas"
    assert view.set_sort("retained") and not view.set_sort("nope") and view.sort == "retained"


def test_bar_cells_and_lists():
    assert bar_cells([1, 1, 2], 8) == [2, 2, 4]
    assert bar_cells([0, 0, 0], 8) == [0, 0, 0]
    for parts in ([1, 1000, 3], [7, 0, 5], [1, 1, 1], [123, 4567, 89]):
        for width in (3, 10, 17, 40):
            cells = bar_cells(parts, width)
            assert sum(cells) == width
            assert all(c >= 1 for p, c in zip(parts, cells) if p)
    assert fit_list(["a", "b", "c"], 20) == "a, b, c"
    assert fit_list(["alpha", "beta", "gamma"], 14) == "alpha, +2"
    assert fit_list(["Inflater-1234", "b"], 12) == "Inf…1234, +1"
    assert fit_list([], 10) == "-"
    for width in range(1, 30):
        assert len(fit_list(["Inflater-1", "gone", "worker-8"], width)) <= width


def terminal_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=80, height=24, color_system="standard")


def test_live_view_draws_and_restores():
    console = terminal_console()
    view = LiveView(console)
    view.start()
    view.update(snapshot())
    view.set_mode("threads")
    view.stop()
    view.stop()  # twice is fine
    out = console.file.getvalue()
    assert out.startswith(f"{ESC}[?1049h")  # alternate screen on
    assert "Inflater-1" in out
    assert out.rindex(f"{ESC}[?1049l") > out.rindex("Inflater-1")  # and off at the end
    assert out.endswith(f"{ESC}[?25h")  # cursor shown again


def test_live_view_restores_after_exception_and_replays_stderr(capsys):
    console = terminal_console()
    with pytest.raises(RuntimeError):
        with LiveView(console) as view:
            view.update(snapshot())
            print("warning while live", file=sys.stderr)
            raise RuntimeError("boom")
    assert console.file.getvalue().endswith(f"{ESC}[?25h")
    assert "warning while live" in capsys.readouterr().err
    view.stop()


# ---------------------------------------------------------------- text


class Recorder(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_batch_is_plain_and_flushed():
    out = Recorder()
    view = BatchView(file=out, max_stacks=5, max_threads=3)
    view.update(snapshot())
    view.update(snapshot(elapsed_s=188.0))
    text = out.getvalue()
    assert out.flushes == 2
    assert ESC not in text and "\r" not in text
    assert text.isascii()
    assert text.count("STACKS 5 of 33") == 2 and "THREADS 3 of 23" in text
    assert "heap live 512.0 MiB" in text and "raise --max-allocs" in text
    assert "inflateInit2_ <- Java_java_util_zip_Inflater_init" in text


@pytest.mark.parametrize(
    "alive, status, expected",
    [
        (False, 0, "target exited with status 0"),
        (False, 3, "target exited with status 3"),
        (False, -9, "target killed by SIGKILL"),
        (False, None, "target exited (status unknown)"),
        (True, None, "target still running"),
    ],
)
def test_summary(alive, status, expected):
    text = render_summary(snapshot(target_alive=alive, exit_status=status))
    assert ESC not in text
    assert expected in text
    assert "heap live at the end: 512.0 MiB" in text
    assert "top 10 of 33 stacks" in text
    # Full frames, in order, under the biggest stack.
    first = text.index("#1 ")
    assert text.index("inflateInit2_+0x1a [libz.so.1]", first) < text.index("0x7f12abcd [libjvm.so]", first)
    assert "threads: 101 Inflater-1, 102 gone" in text
    assert "stack may be truncated" in text
    assert "DROPS: 5 stacks lost" in text
    assert "102  gone" in text and "exited" in text
    assert "(+3 more threads)" in text
    assert "perf map missing" in text


def test_batch_shows_the_gap_arenas_and_regions():
    out = io.StringIO()
    BatchView(file=out, max_stacks=5, max_arenas=3, max_regions=2).update(full_snapshot())
    text = out.getvalue()
    assert text.isascii() and ESC not in text
    lines = text.split("\n")
    assert lines[1] == "anon RSS 7.0 GiB = heap live 512.0 MiB + allocator retained 3.1 GiB + other 3.4 GiB"
    assert lines[2].startswith("memtrace  pid 4242")
    assert "glibc arenas 9 (1 main, 8 thread)  committed 4.0 GiB" in text
    assert "HINT: 8 thread arenas keep 3.1 GiB freed but resident" in text
    assert "HINT: malloc_trim(0) would return about 1.2 GiB now (estimate)" in text
    assert "malloc_trim 3 (1 released) returned 40.0 MiB" in text
    header = next(line for line in lines if line.lstrip().startswith("LIVE"))
    assert header.split()[:2] == ["LIVE", "RETAINED"]
    assert "ARENAS 3 of 9 by retained bytes (1 main, 8 thread), ? unreliable read" in text
    assert re.search(r"0x7f3a08000020\s+thread\s+2\s+128.0 MiB\s+470.0 MiB\s+458.0 MiB\s+50.0 MiB\s+408.0 MiB\s+89%", text)
    assert "REGIONS 2 of the 4 largest never returned to the OS" in text
    assert re.search(r"arena heap\s+64.0 MiB\s+64.0 MiB\s+64.0 MiB\s+101 Inflater-1\s+malloc\s+inflateInit2_ <- ", text)
    assert all(len(line) <= 160 for line in lines if not line.startswith("HINT"))
    # An older snapshot: none of the new sections.
    out = io.StringIO()
    BatchView(file=out).update(snapshot())
    assert not re.search(r"anon RSS|ARENAS|REGIONS|HINT|RETAINED", out.getvalue())
    # Light mode: estimates marked, and why the stacks are missing.
    out = io.StringIO()
    BatchView(file=out).update(full_snapshot(light=True))
    light = out.getvalue()
    assert "heap live ~700.0 MiB + allocator retained ~3.1 GiB" in light and "memtrace  light mode" in light
    assert "STACKS none: light mode has no malloc probes" in light and "~50.0 MiB" in light


def test_summary_of_the_gap():
    text = render_summary(full_snapshot())
    assert ESC not in text
    for expected in (
        "the gap at the end: anon RSS 7.0 GiB = heap live 512.0 MiB + allocator retained 3.1 GiB + other 3.4 GiB",
        "allocator (glibc): 9 arenas (1 main, 8 thread), committed 4.0 GiB, resident 3.8 GiB,"
        " live 512.0 MiB, retained 3.1 GiB; 3 mmapped chunks (12.0 MiB)",
        "address space: mapped 20.0 GiB, reserved 9.0 GiB, committed 8.0 GiB, resident 7.3 GiB,"
        " returned to the OS since the trace began 1.5 GiB",
        "malloc_trim: 3 calls, 1 of which released memory; returned 40.0 MiB (measured);"
        " malloc_trim(0) would return about 1.2 GiB now (estimate)",
        "  at 2m00s thread 100: returned 40.0 MiB (malloc_trim returned 1)",
        "  - 8 thread arenas keep 3.1 GiB freed but resident (80 % of their 3.9 GiB): MALLOC_ARENA_MAX=2",
        "arenas: 9 of 9 by retained bytes (1 main, 8 thread), ? unreliable read",
        "Inflater-1, gone, worker-8",
        "largest regions never returned to the OS, by resident bytes",
        "inflateInit2_ <- Java_java_util_zip_Inflater_init <- [libjvm] <- start_thread",
        "(made before the trace began)",
        "stacks whose frees the arenas still keep (estimated share of retained bytes):",
        "last interval +3.0 MiB; retained ~3.0 GiB (estimate)",
    ):
        assert expected in text, expected
    assert "  malloc_trim: 3 calls, 1 released memory" not in text  # said once, with its bytes
    # The answer comes before the detail: gap, arenas, regions, then the stacks.
    order = [text.index(s) for s in ("the gap at the end", "arenas: 9", "largest regions", "top 10 of 33 stacks")]
    assert order == sorted(order)
    retained = text.index("stacks whose frees")
    assert text.index("3.0 GiB", retained) < text.index("100.0 MiB", retained)


def test_summary_without_the_new_sections_and_in_light_mode():
    old = render_summary(snapshot())
    assert not re.search(r"the gap|allocator|arenas:|regions|hints|retained", old)
    assert "  malloc_trim: 3 calls, 1 of which released memory" in old
    light = render_summary(full_snapshot(light=True))
    assert "heap live at the end: ~700.0 MiB (estimate); light mode: no malloc probes" in light
    assert "heap live ~700.0 MiB + allocator retained ~3.1 GiB" in light
    assert "light mode: no malloc probes; ~ marks heap figures estimated" in light
    assert "live ~700.0 MiB, retained ~3.1 GiB" in light
    assert "stacks: none (light mode has no malloc probes)" in light
    assert "allocated 0 B" not in light


def test_summary_of_an_empty_trace():
    text = render_summary(Snapshot(pid=7, comm="true", elapsed_s=0.2, target_alive=False, exit_status=0))
    assert "exited with status 0" in text and "drops: none" in text and "no tracked allocations" in text


# ---------------------------------------------------------------- keys


def test_split_keys():
    assert split_keys("qs\x1b[Ab\x1b[5~\x1b") == ["q", "s", "up", "b", "pgup", "esc"]
    assert split_keys("\x1b[1;5Cx") == ["esc", "x"]  # unknown sequence skipped whole
    assert {KEY_BINDINGS[k] for k in "sta"} <= set(MODES)


def test_key_reader_on_a_pty():
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        with KeyReader(slave) as keys:
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & termios.ECHO and not lflag & termios.ICANON
            assert lflag & termios.ISIG  # Ctrl-C still interrupts
            assert keys.read_keys() == []
            os.write(master, b"qt\x1b[B")
            assert select.select([keys], [], [], 5)[0]
            got: list[str] = []
            for _ in range(50):  # the pty may hand the bytes over in pieces
                got += keys.read_keys()
                if len(got) >= 3:
                    break
                select.select([keys], [], [], 0.1)
            assert got == ["q", "t", "down"]
            assert keys.read_keys() == []
        assert termios.tcgetattr(slave) == before
        with pytest.raises(KeyError):
            with KeyReader(slave):
                raise KeyError("boom")
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_key_reader_needs_a_terminal():
    r, w = os.pipe()
    try:
        with pytest.raises(MemtraceError):
            with KeyReader(r):
                pass
    finally:
        os.close(r)
        os.close(w)
