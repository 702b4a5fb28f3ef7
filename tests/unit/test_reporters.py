"""Reports from recordings: text, json, folded, pprof and html, and the
`memtrace report` command around them. Built from synthetic sessions."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memtrace.errors import MemtraceError
from memtrace.model.notes import TEXT, Note
from memtrace.output.reports.jsonreport import snapshot_document
from memtrace.model.snapshot import Counters, Snapshot, StackStats
from memtrace.record.recorder import Recorder
from memtrace.record.synthetic import session
from memtrace.output.reports import reporter_class
from memtrace.output.reports.common import ReportData, frame_label
from memtrace.output.reports.folded import folded_lines
from memtrace.output.reports.html import flame_tree, render_html
from memtrace.output.reports.text import render_text

COUNT = 40


@pytest.fixture(scope="module")
def snapshots() -> list[Snapshot]:
    return list(session(COUNT))


@pytest.fixture(scope="module")
def recording(tmp_path_factory, snapshots) -> Path:
    path = tmp_path_factory.mktemp("rep") / "app.rec"
    with Recorder(str(path), {"command_line": ["java", "-Xmx1g", "-jar", "app.jar"], "pid": 4242}) as rec:
        for s in snapshots:
            rec.write(s)
    return path


@pytest.fixture(scope="module")
def plain_recording(tmp_path_factory) -> Path:
    """No address-space sections: what a trace without them records."""
    path = tmp_path_factory.mktemp("rep") / "plain.rec"
    with Recorder(str(path), {}) as rec:
        for s in session(10, sections=False):
            rec.write(s)
    return path


def report(path: Path, *args: str) -> str:
    """`memtrace report` through the CLI's own entry point."""
    from memtrace.cli import main

    out = io.StringIO()
    old = sys.stdout
    sys.stdout = out
    try:
        code = main(["report", str(path), *args])
    finally:
        sys.stdout = old
    assert code == 0
    return out.getvalue()


def data_for(s: Snapshot, by: str = "live", **kw) -> ReportData:
    return ReportData(snapshot=s, by=by, **kw)


# ---------------------------------------------------------------- text


def test_text_report_answers_the_main_questions(recording, snapshots):
    text = report(recording, "--at", "peak")
    rss = [s.process.rss_bytes for s in snapshots]
    peak = snapshots[rss.index(max(rss))]
    assert text.startswith(f"memtrace report: pid 4242 (java) at {peak.elapsed_s:.1f}s (peak)")
    assert "command: java -Xmx1g -jar app.jar" in text
    for heading in ("gap at", "address space:", "allocator (glibc)", "top 10 of", "stacks by live bytes",
                    "stacks by allocated bytes", "threads:", "arenas:", "largest regions never returned", "hints ("):
        assert heading in text, heading
    assert "\x1b[" not in text


def test_text_report_shows_the_gap_at_the_end_and_at_the_peak(recording):
    text = report(recording)
    assert re.search(r"gap at [\d.]+s \(end\): anon RSS .* = heap live .* \+ allocator retained", text)
    assert "gap at the peak" in text


def test_text_report_without_sections(plain_recording):
    text = report(plain_recording)
    assert "gap" not in text and "arenas" not in text
    assert "top " in text and "threads:" in text


def test_retained_needs_arena_data(plain_recording, recording):
    from memtrace.cli import main

    assert main(["report", str(plain_recording), "--by", "retained"]) == 2
    assert "stacks by retained bytes" in report(recording, "--by", "retained")


def test_light_mode_is_flagged(snapshots):
    assert "estimated" in render_text(data_for(dataclasses.replace(snapshots[-1], light=True)))


# ---------------------------------------------------------------- json


def test_json_report_is_the_snapshot(recording, snapshots):
    assert json.loads(report(recording, "--format", "json")) == snapshot_document(snapshots[-1])
    assert json.loads(report(recording, "--format", "json", "--at", "5.5")) == snapshot_document(snapshots[5])


# ---------------------------------------------------------------- folded


def test_folded_is_root_first_sanitized_and_summed():
    stacks = (
        StackStats(("leaf;x+0x10 [libapp.so]", "mid+0x1 [libapp.so]", "start_thread+0x7d [libc.so.6]"), (1,), Counters(100, 40, 2, 1)),
        StackStats(("leaf;x+0x99 [libapp.so]", "mid+0x1 [libapp.so]", "start_thread+0x7d [libc.so.6]"), (2,), Counters(10, 0, 1, 0)),
        StackStats(("0x7f0012 [libz.so.1]",), (1,), Counters(5, 0, 1, 0)),
        StackStats(("freed+0x1 [a.so]",), (1,), Counters(5, 5, 1, 1)),
    )
    s = Snapshot(1, "x", 1.0, stacks=stacks)
    assert folded_lines(data_for(s)) == ["[libz.so.1] 5", "start_thread;mid;leaf:x 70"]
    assert folded_lines(data_for(s, "allocated"))[-1] == "start_thread;mid;leaf:x 110"


def test_folded_weights_add_up(recording, snapshots):
    lines = report(recording, "--format", "folded").splitlines()
    total = sum(int(line.rsplit(" ", 1)[1]) for line in lines)
    assert total == sum(s.counters.live_bytes for s in snapshots[-1].stacks if s.counters.live_bytes > 0)
    assert all(line.startswith("start_thread;") or "fn_" in line for line in lines)


# ---------------------------------------------------------------- pprof


def parse_pprof(blob: bytes):
    from memtrace.output.reports.profile_proto import Profile

    profile = Profile()
    profile.ParseFromString(gzip.decompress(blob))
    return profile


def test_pprof_parses_back(recording, snapshots, tmp_path):
    out = tmp_path / "heap.pb.gz"
    report(recording, "--format", "pprof", "-o", str(out))
    p = parse_pprof(out.read_bytes())
    strings = list(p.string_table)
    types = [(strings[t.type], strings[t.unit]) for t in p.sample_type]
    assert types[:4] == [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")]
    assert strings[p.default_sample_type] == "inuse_space"
    last = snapshots[-1]
    assert sum(s.value[3] for s in p.sample) == sum(s.counters.live_bytes for s in last.stacks)
    assert sum(s.value[1] for s in p.sample) == sum(s.counters.alloc_bytes for s in last.stacks)
    functions = {f.id: strings[f.name] for f in p.function}
    locations = {loc.id: functions[loc.line[0].function_id] for loc in p.location}
    first = max(last.stacks, key=lambda s: s.counters.alloc_count)
    sample = next(s for s in p.sample if list(s.value[:2]) == [first.counters.alloc_count, first.counters.alloc_bytes])
    assert [locations[i] for i in sample.location_id] == [frame_label(f) for f in first.frames]


def test_pprof_default_follows_by(recording, tmp_path):
    out = tmp_path / "alloc.pb.gz"
    report(recording, "--format", "pprof", "--by", "allocated", "-o", str(out))
    p = parse_pprof(out.read_bytes())
    assert p.string_table[p.default_sample_type] == "alloc_space"


def test_go_tool_pprof_reads_it(recording, tmp_path):
    if shutil.which("go") is None:
        pytest.fail("go is not installed: sudo ./install.sh --test-tools (apt-get install golang-go)")
    out = tmp_path / "heap.pb.gz"
    report(recording, "--format", "pprof", "-o", str(out))
    env = {"HOME": str(tmp_path), "GOPATH": str(tmp_path / "go"), "GOCACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["go", "tool", "pprof", "-top", str(out)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "Type: inuse_space" in result.stdout and "fn_" in result.stdout


def test_binary_output_refuses_a_terminal(recording, monkeypatch, capsys):
    from memtrace.cli import main

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert main(["report", str(recording), "--format", "pprof"]) == 2
    assert "binary" in capsys.readouterr().err


# ---------------------------------------------------------------- html


def test_flame_tree_is_root_first_and_consistent(snapshots):
    tree = flame_tree(data_for(snapshots[-1]))
    assert tree["n"] == "all"
    assert tree["v"] == sum(s.counters.live_bytes for s in snapshots[-1].stacks if s.counters.live_bytes > 0)

    def check(node):
        kids = node.get("c", [])
        assert sum(k["v"] for k in kids) <= node["v"]
        for k in kids:
            check(k)

    check(tree)
    assert "start_thread" in {c["n"] for c in tree["c"]}


def test_html_is_self_contained_and_escaped(snapshots):
    evil = StackStats(('</script><script>alert(1)</script>+0x1 [x.so]', "start_thread+0x1 [libc.so.6]"), (1,), Counters(10**6, 0, 1, 0))
    s = dataclasses.replace(snapshots[-1], stacks=snapshots[-1].stacks + (evil,), notes=(Note.of(TEXT, text="<b>note</b>"),))
    page = render_html(data_for(s, metadata={"command_line": ["x", "<y>"]}))
    assert "<script>alert(1)" not in page and "<b>note</b>" not in page
    # No fetch of anything: no external sources, and a policy that forbids them.
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:|//)', page)
    assert "default-src 'none'" in page
    assert page.count("<script") == 2  # the data block and the renderer


def test_html_shows_threads_arenas_and_regions(snapshots):
    s = snapshots[-1]
    assert s.threads and s.arenas and s.regions
    page = render_html(data_for(s))
    for heading in ("<h2>Threads</h2>", "<h2>Allocator arenas</h2>", "Address-space regions"):
        assert heading in page
    # Every thread has a row, named; the largest region comes first.
    assert all(f"<td>{t.tid}</td>" in page for t in s.threads)
    largest = max(s.regions, key=lambda r: r.resident_bytes)
    regions = page.split("Address-space regions", 1)[1]
    assert regions.index(f"{largest.start:#x}") < regions.index("</table>")
    # The top stacks table has a retained column where arenas were measured.
    stacks = page.split("<h2>Top stacks", 1)[1].split("</table>", 1)[0]
    assert "<th>retained</th>" in stacks
    assert "gap (held" not in page  # "gap" is the whole equation, not the retained part


def test_html_report_defaults_to_the_peak(recording, tmp_path):
    page = tmp_path / "r.html"
    report(recording, "-o", str(page))
    assert "(peak)" in page.read_text().split("</h1>", 1)[0]
    report(recording, "--at", "end", "-o", str(page))
    assert "(end)" in page.read_text().split("</h1>", 1)[0]
    assert "(end)" in report(recording)  # text: the end, as before


def test_html_draws_in_a_browser_without_errors(recording, tmp_path):
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: sudo ./install.sh --test-tools (apt-get install chromium)")
    page = tmp_path / "report.html"
    report(recording, "--format", "html", "-o", str(page))
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    boxes = re.search(r'id="flame-svg"[^>]*data-boxes="(\d+)"', result.stdout) or re.search(
        r'data-boxes="(\d+)"', result.stdout
    )
    assert boxes and int(boxes.group(1)) > 10
    assert "<rect" in result.stdout.split('id="flame"', 1)[1]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


def _chart_series(page: str) -> dict[str, list[tuple[float, float]]]:
    """Each polyline of the over-time chart: name -> [(x, y)]."""
    chart = page.split('<svg id="chart"', 1)[1].split("</svg>", 1)[0]
    return {
        name: [tuple(map(float, xy.split(","))) for xy in coords.split()]
        for name, coords in re.findall(r'class="series" data-name="([^"]+)"[^>]* points="([^"]*)"', chart)
    }


def _chart_origin(page: str) -> float:
    chart = page.split('<svg id="chart"', 1)[1]
    return float(re.search(r'class="axis"[^>]* y1="([\d.]+)"', chart).group(1))


def test_html_chart_plots_allocator_retained_and_other_apart(recording, snapshots, tmp_path):
    page = tmp_path / "r.html"
    report(recording, "--format", "html", "--at", "end", "-o", str(page))
    text = page.read_text()
    series = _chart_series(text)
    assert list(series) == ["RSS", "heap live", "allocator retained", "other"]
    # The legend names them as the view's gap line and the text report do.
    legend = text.split('<svg id="chart"', 1)[1].split("</svg>", 1)[0]
    assert ">allocator retained</text>" in legend and ">other</text>" in legend
    other = [s.gap.other_anon_bytes for s in snapshots]
    retained = [s.gap.allocator_retained_bytes for s in snapshots]
    assert len(set(other)) > 1 and all(o != r for o, r in zip(other, retained))
    # One point per snapshot, at its time, and every series on one scale:
    # each height above the axis is its value times the same factor.
    y0 = _chart_origin(text)
    rss = [s.process.rss_bytes for s in snapshots]
    per_byte = (y0 - series["RSS"][rss.index(max(rss))][1]) / max(rss)
    for name, values in (("other", other), ("allocator retained", retained), ("RSS", rss)):
        points = series[name]
        assert len(points) == len(snapshots), name
        assert [x for x, _ in points] == sorted(x for x, _ in points)
        for (_, y), value in zip(points, values):
            assert abs((y0 - y) - value * per_byte) <= 0.1, (name, y, value)


def _edited(recording: Path, tmp_path: Path, sql: str) -> tuple[list, dict[str, list]]:
    """A copy of the recording changed by `sql`: its index points, and the
    series of its HTML page's chart."""
    import sqlite3

    from memtrace.record.reader import open_recording

    copy = tmp_path / "edited.rec"
    shutil.copyfile(recording, copy)
    with sqlite3.connect(copy) as db:
        db.execute(sql)
    db.close()
    with open_recording(str(copy)) as rec:
        points = list(rec.points)
    page = tmp_path / "edited.html"
    report(copy, "--format", "html", "-o", str(page))
    return points, _chart_series(page.read_text())


def test_a_recording_without_the_other_column_plots_as_before(recording, tmp_path):
    # Recordings made before the index had other_anon_bytes.
    points, series = _edited(recording, tmp_path, "ALTER TABLE snapshots DROP COLUMN other_anon_bytes")
    assert points and all(p.other_anon_bytes is None for p in points)
    assert all(p.allocator_retained_bytes is not None for p in points)
    assert list(series) == ["RSS", "heap live", "allocator retained"]


def test_index_figures_of_the_wrong_type_are_left_out_of_the_chart(recording, tmp_path):
    # Damage (or a hand edit) can leave text where SQLite's loose typing
    # expected an integer: that point is unknown, and the page still renders.
    points, series = _edited(
        recording, tmp_path,
        "UPDATE snapshots SET other_anon_bytes = 'x', gap_bytes = 1.5, rss_bytes = X'00' WHERE id = 2")
    p = points[1]
    assert (p.rss_bytes, p.allocator_retained_bytes, p.other_anon_bytes) == (None, None, None)
    assert points[2].other_anon_bytes is not None
    assert len(series["other"]) == len(series["heap live"]) - 1


def test_html_chart_without_a_gap_has_no_gap_parts(plain_recording, tmp_path):
    page = tmp_path / "plain.html"
    report(plain_recording, "--format", "html", "-o", str(page))
    assert list(_chart_series(page.read_text())) == ["RSS", "heap live"]


# ---------------------------------------------------------------- command


def test_output_file_and_errors(recording, tmp_path, capsys):
    from memtrace.cli import main

    out = tmp_path / "r.txt"
    assert main(["report", str(recording), "-o", str(out)]) == 0
    assert out.read_text().startswith("memtrace report:")
    assert main(["report", str(tmp_path / "missing.rec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    with pytest.raises(SystemExit):
        main(["report", str(recording), "--at", "yesterday"])


def test_every_format_is_registered():
    for fmt in ("text", "json", "folded", "pprof", "html"):
        assert hasattr(reporter_class(fmt), "render")
    with pytest.raises(MemtraceError):
        reporter_class("pdf")


# ---------------------------------------------------------------- --since


def _stack_live(doc, frames):
    return sum(s["live_bytes"] for s in doc["stacks"] if tuple(s["frames"]) == tuple(frames))


def test_since_reports_what_changed_between_two_moments(recording, snapshots):
    a, b = snapshots[len(snapshots) // 3], snapshots[-1]
    doc = json.loads(report(recording, "--at", "end", "--since", str(a.elapsed_s), "--format", "json"))
    assert doc["since"]["elapsed_s"] == a.elapsed_s
    assert doc["since"]["heap_live_bytes_change"] == b.heap.live_bytes - a.heap.live_bytes
    assert doc["heap"]["live_bytes"] == b.heap.live_bytes - a.heap.live_bytes
    assert doc["heap"]["alloc_bytes"] == b.heap.counters.alloc_bytes - a.heap.counters.alloc_bytes
    # Every stack's live bytes are its change; unchanged stacks are left out.
    before = {st.frames: st.counters.live_bytes for st in a.stacks}
    for st in b.stacks:
        change = st.counters.live_bytes - before.get(st.frames, 0)
        if st.counters != next((o.counters for o in a.stacks if o.frames == st.frames), None):
            assert _stack_live(doc, st.frames) == change, st.frames
    text = report(recording, "--since", str(a.elapsed_s))
    assert f"changes since {a.elapsed_s:.1f}s" in text and "stacks grew" in text
    folded = report(recording, "--since", str(a.elapsed_s), "--format", "folded")
    assert all(int(line.rsplit(" ", 1)[1]) > 0 for line in folded.splitlines())  # what grew


def test_since_another_recording_matches_stacks_by_frames(recording, tmp_path, snapshots):
    old = tmp_path / "old.rec"
    with Recorder(str(old), {"pid": 1}) as rec:
        rec.write(snapshots[0])
    doc = json.loads(report(recording, "--since", str(old), "--format", "json"))
    assert doc["since"]["label"].startswith("old.rec at ")
    assert doc["since"]["heap_live_bytes_change"] == (snapshots[-1].heap.live_bytes
                                                       - snapshots[0].heap.live_bytes)
    same = json.loads(report(recording, "--since", f"{old}@end", "--format", "json"))
    assert same["since"] == doc["since"]


def test_since_errors_are_one_line(recording, snapshots, capsys):
    from memtrace.cli import main

    assert main(["report", str(recording), "--since", "no-such.rec"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FILE@MOMENT" in err
    assert main(["report", str(recording), "--at", "1", "--since", "end"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "swap --at and --since" in err


# ---------------------------------------------------------------- --top / --min-size


from memtrace.output.reports import select  # noqa: E402


def many_stacks(n: int) -> Snapshot:
    """n stacks, stack i holding i KiB live and allocating 2i KiB."""
    stacks = tuple(
        StackStats((f"f{i}+0x1 [app]", "main+0x2 [app]", "__libc_start_main+0x80 [libc.so.6]"), (1,),
                   Counters(2048 * i, 1024 * i, 2, 1), truncated=i % 3 == 0, retained_bytes=(n - i) * 10)
        for i in range(n)
    )
    return Snapshot(1, "app", 1.0, 1.0, stacks=tuple(reversed(stacks)))


def test_selection_ranks_by_weight_then_bounds_by_top_and_min_size():
    s = many_stacks(50)
    every = select.select_stacks(s.stacks, "live", policy=select.StackPolicy())
    assert [st.counters.live_bytes for st in every.shown] == [1024 * i for i in range(49, -1, -1)]
    assert every.other_count == 0
    top = select.select_stacks(s.stacks, "live", policy=select.StackPolicy(top=5))
    assert [st.frames[0] for st in top.shown] == ["f49+0x1 [app]", "f48+0x1 [app]", "f47+0x1 [app]",
                                                  "f46+0x1 [app]", "f45+0x1 [app]"]
    assert top.other_count == 45 and top.other_weight == sum(1024 * i for i in range(45))
    assert top.other_counters.alloc_bytes == sum(2048 * i for i in range(45))
    assert top.other_label == "other (45 stacks)"
    small = select.select_stacks(s.stacks, "live", policy=select.StackPolicy(min_bytes=40 * 1024))
    assert len(small.shown) == 10 and small.other_count == 40
    both = select.select_stacks(s.stacks, "live", policy=select.StackPolicy(top=3, min_bytes=48 * 1024))
    assert len(both.shown) == 2
    # A limit of rows (the view's room) and the policy: the smaller wins.
    assert len(select.select_stacks(s.stacks, "live", limit=4, policy=select.StackPolicy(top=7)).shown) == 4
    # Retained ranks the other way round; positive leaves zeros out.
    by_retained = select.select_stacks(s.stacks, "retained", policy=select.StackPolicy(top=1))
    assert by_retained.shown[0].frames[0] == "f0+0x1 [app]"
    assert len(select.select_stacks(s.stacks, "live", positive=True, policy=select.StackPolicy()).shown) == 49


def test_selection_ties_fall_the_same_way_whatever_the_input_order():
    twins = [StackStats((name,), (1,), Counters(100, 0, 1, 0)) for name in ("b", "a", "c")]
    for order in (twins, twins[::-1]):
        assert [st.frames for st in select.select_stacks(order, policy=select.StackPolicy()).shown] == \
            [("a",), ("b",), ("c",)]
        assert [st.frames for st in select.select_stacks(order, policy=select.StackPolicy(top=2)).shown] == \
            [("a",), ("b",)]


def test_sizes_read_as_bytes_with_binary_units():
    assert select.parse_size("4096") == 4096
    assert select.parse_size("64K") == 64 << 10
    assert select.parse_size("1M") == 1 << 20
    assert select.parse_size("1.5GiB") == 3 << 29
    assert select.parse_size("2mb") == 2 << 20
    for bad in ("", "-1K", "1X", "M"):
        with pytest.raises(ValueError):
            select.parse_size(bad)


def _trace_args(*argv: str) -> argparse.Namespace:
    from memtrace.cli.common import add_trace_options

    parser = argparse.ArgumentParser()
    add_trace_options(parser)
    return parser.parse_args(list(argv))


def test_the_run_policy_reaches_every_output():
    from memtrace.cli.common import make_sinks
    from memtrace.output.sinks.console import BatchSink, SummarySink
    from memtrace.output.sinks.jsonout import JsonSink
    from memtrace.output.view.context import Context
    from memtrace.output.view.panes import STACKS

    s = many_stacks(30)
    # From the command line to each sink a trace makes, with no state between.
    (json_sink,), _ = make_sinks(_trace_args("--json", "--top", "3"), False, {})
    (batch, summary), _ = make_sinks(_trace_args("--batch", "--top", "3"), False, {})
    assert isinstance(batch, BatchSink) and isinstance(summary, SummarySink)
    out = io.StringIO()
    json_sink.out = out
    json_sink.close(s)
    doc = json.loads(out.getvalue())
    assert len(doc["stacks"]) == 3 and doc["stacks_left_out"]["count"] == 27
    # Figures about all stacks stay those of all of them.
    assert doc["truncated_stack_count"] == s.truncated_stack_count == 10
    assert "STACKS 3 of 30" in batch.view.render_block(s)
    summary.out = out = io.StringIO()
    summary.close(s)
    assert "top 3 of 29 stacks" in out.getvalue()  # the one whose live bytes are 0 is not ranked
    rendered = STACKS.build(s, 160, 20, Context(policy=batch.view.policy))
    assert "3 of 30" in str(rendered[0])
    # Without options, nothing is left out.
    (json_sink,), _ = make_sinks(_trace_args("--json"), False, {})
    assert select.snapshot_json(s, policy=json_sink.policy) == s.to_json()
    assert "30 of 30" in str(STACKS.build(s, 160, 40, Context())[0])


def test_output_file_sinks(tmp_path):
    """-o FILE: JSON in the file, with the console sinks only when no JSON
    flag asked for JSON alone; the file is written whole at the close."""
    from memtrace.cli.common import json_on_stdout, make_sinks
    from memtrace.output.sinks.console import BatchSink, SummarySink
    from memtrace.output.sinks.jsonout import JsonSink, JsonStreamSink

    s = many_stacks(5)
    path = tmp_path / "out.json"
    args = _trace_args("--batch", "-o", str(path))
    (json_sink, batch, summary), _ = make_sinks(args, False, {})
    assert isinstance(json_sink, JsonSink) and isinstance(batch, BatchSink)
    assert isinstance(summary, SummarySink) and not json_on_stdout(args)
    json_sink.update(s)
    assert not path.exists()
    json_sink.close(s)
    assert len(json.loads(path.read_text())["stacks"]) == 5
    args = _trace_args("--json-stream", "-o", str(path))
    (stream,), _ = make_sinks(args, False, {})
    assert isinstance(stream, JsonStreamSink) and not json_on_stdout(args)
    stream.update(s)
    stream.close(s)
    assert len(path.read_text().splitlines()) == 2
    assert json_on_stdout(_trace_args("--json")) and not json_on_stdout(_trace_args("--batch"))


def test_reports_bound_json_and_folded_and_count_the_rest(recording, snapshots):
    last = snapshots[-1]
    doc = json.loads(report(recording, "--format", "json", "--top", "2"))
    assert len(doc["stacks"]) == 2 and doc["stacks_left_out"]["count"] == len(last.stacks) - 2
    whole = json.loads(report(recording, "--format", "json"))
    assert "stacks_left_out" not in whole and whole["stacks"][:2] == doc["stacks"]
    folded = report(recording, "--format", "folded", "--min-size", "1M").splitlines()
    other = [line for line in folded if line.startswith("other (")]
    assert len(other) == 1
    total = sum(int(line.rsplit(" ", 1)[1]) for line in folded)
    assert total == sum(st.counters.live_bytes for st in last.stacks if st.counters.live_bytes > 0)
    assert all(int(line.rsplit(" ", 1)[1]) >= 1 << 20 for line in folded if line not in other)


def test_bad_top_and_min_size_are_one_line_errors(recording, capsys):
    from memtrace.cli import main

    for args in (["--top", "0"], ["--top", "x"], ["--min-size", "12Q"]):
        with pytest.raises(SystemExit) as e:
            main(["report", str(recording), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("--top" in err[0] or "size" in err[0])


def test_html_folds_small_stacks_into_other():
    s = many_stacks(3000)
    tree = flame_tree(data_for(s))
    names = [c["n"] for c in tree["c"]]
    total = sum(1024 * i for i in range(3000))
    kept = [i for i in range(3000) if 1024 * i >= 0.001 * total]
    assert tree["v"] == total
    assert f"other ({3000 - len(kept) - 1} stacks)" in names  # stack 0 holds nothing: not drawn
    assert len(render_html(data_for(s))) < 5e6


# ---------------------------------------------------------------- filters


def test_filters_keep_the_stacks_asked_for(recording, snapshots):
    from memtrace.output.reports.select import StackPolicy, select_stacks

    s = snapshots[-1]
    some = next(st for st in s.stacks if st.tids)
    tid = some.tids[0]
    by_tid = select_stacks(s.stacks, policy=StackPolicy(tids=frozenset({tid}))).shown
    assert by_tid and all(tid in st.tids for st in by_tid)
    name = next(t.name for t in s.threads if t.tid == tid)
    by_name = select_stacks(s.stacks, policy=StackPolicy(thread=f"^{name}$"), threads=s.threads).shown
    assert {st.frames for st in by_tid} <= {st.frames for st in by_name}
    module = some.frames[0].rsplit("[", 1)[1].rstrip("]")
    by_module = select_stacks(s.stacks, policy=StackPolicy(module=module)).shown
    assert by_module and all(any(f"[{module}" in f for f in st.frames) for st in by_module)
    func = some.frames[0].split("+", 1)[0]
    by_function = select_stacks(s.stacks, policy=StackPolicy(function=f"^{func}$")).shown
    assert some.frames in {st.frames for st in by_function}
    nothing = select_stacks(s.stacks, policy=StackPolicy(function="^no_such_function$"))
    assert not nothing.shown and nothing.other_count == 0  # filtered out is not 'other'
    doc = json.loads(report(recording, "--format", "json", "--function", f"^{func}$"))
    assert doc["stack_filter"]["options"] == f"--function ^{func}$"
    assert {tuple(st["frames"]) for st in doc["stacks"]} == {st.frames for st in by_function}
    assert "stacks shown: only those that pass --function" in report(recording, "--function", func)


def test_a_bad_filter_is_one_line(recording, capsys):
    from memtrace.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(recording), "--function", "(unclosed"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid regular expression" in err
