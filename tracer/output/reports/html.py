"""The HTML report: one self-contained page, readable offline.

Everything is inline: the CSS, the flame graph's data (JSON in a
non-executed script tag) and its small renderer, and the over-time chart,
drawn here as SVG. A Content-Security-Policy forbids any network fetch, so
the page behaves the same on an air-gapped machine. Text from the recording
(frames, names, the command line) is escaped everywhere it lands.
"""

from __future__ import annotations

import html
import json
from typing import Any, Sequence, TextIO

from memtrace.record.timeline import TimePoint
from memtrace.output.notes import note_text
from memtrace.output.reports.common import (
    ReportData,
    peak_of,
    command_line,
    frame_label,
    retained_at,
    moment,
    recorded_on,
    unit,
    selected_stacks,
)
from memtrace.output.view.fmt import fmt_bytes, fmt_count, fmt_duration, fmt_signed_bytes

CHART_W, CHART_H = 960, 260
_PAD_L, _PAD_R, _PAD_T, _PAD_B = 78, 16, 14, 34
_MAX_POINTS = 600  # per series: one per horizontal pixel or so
TOP_STACKS = 15
# Stacks below this share of the total weight are one box in the flame
# graph, "other (N stacks)": 50,000 stacks drawn one by one made a 19 MB
# page that no browser draws, for boxes too thin to see.
OTHER_BELOW_SHARE = 0.001

# name, colour, TimePoint attribute. The gap's parts are named as in the
# view's gap line and the text report.
SERIES = (
    ("RSS", "#4e79a7", "rss_bytes"),
    ("heap live", "#e15759", "heap_live_bytes"),
    ("allocator retained", "#f28e2b", "allocator_retained_bytes"),
    ("other", "#76b7b2", "other_anon_bytes"),
)
TOP_REGIONS = 20  # the largest regions; a JVM can have thousands

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.2em 2em;color:#222;background:#fff}
h1{font-size:1.35em;margin:.2em 0}h2{font-size:1.1em;margin:1.4em 0 .4em}
.facts{display:flex;flex-wrap:wrap;gap:.4em 1.6em;margin:.6em 0}
.facts div b{display:block;font-size:1.15em}.facts div span{color:#666;font-size:.85em}
.muted{color:#666}.warn{color:#a35200}
svg text{font:11px system-ui,sans-serif}
#chart .axis{stroke:#bbb}#chart .grid{stroke:#eee}
#flame{width:100%;overflow:hidden;border:1px solid #ddd}
#flame rect{stroke:#fff;stroke-width:.5;cursor:pointer}
#flame text{pointer-events:none;fill:#000}
#flame .dim rect{opacity:.45}
#flame-info{min-height:1.4em;font-family:ui-monospace,monospace;font-size:12px;margin:.3em 0}
button{font:inherit;padding:.1em .7em}
table{border-collapse:collapse;font-size:13px}td,th{padding:.15em .6em;text-align:right;vertical-align:top}
td.frames,th.frames{text-align:left;font-family:ui-monospace,monospace;font-size:12px;white-space:pre}
tr:nth-child(even) td{background:#f6f6f6}
"""

# The flame graph renderer: root at the top, each row one call depth, a
# box's width its share of the weight. Click a box to zoom in on it, click
# the root (or Reset) to zoom out.
_JS = """
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("flame-data").textContent);
  var svg = document.getElementById("flame-svg");
  var info = document.getElementById("flame-info");
  var NS = "http://www.w3.org/2000/svg", ROW = 18, unit = svg.getAttribute("data-unit");
  var maxDepth = 0;
  (function link(node, parent, depth) {
    node.p = parent; node.d = depth; if (depth > maxDepth) maxDepth = depth;
    (node.c || []).forEach(function (child) { link(child, node, depth + 1); });
  })(data, null, 0);
  function human(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0, v = n;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : String(Math.round(v))) + " " + units[i];
  }
  function colour(name) {
    var h = 0;
    for (var i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return "hsl(" + (10 + h % 45) + "," + (60 + h % 30) + "%," + (55 + (h >> 8) % 15) + "%)";
  }
  function box(node, x, w, y, dim) {
    var g = document.createElementNS(NS, "g");
    if (dim) g.setAttribute("class", "dim");
    var r = document.createElementNS(NS, "rect");
    r.setAttribute("x", x); r.setAttribute("y", y);
    r.setAttribute("width", Math.max(w, 0.5)); r.setAttribute("height", ROW - 1);
    r.setAttribute("fill", colour(node.n));
    var share = (100 * node.v / data.v).toFixed(2) + "%";
    var tip = document.createElementNS(NS, "title");
    tip.textContent = node.n + "\\n" + human(node.v) + " " + unit + " (" + share + ")";
    r.appendChild(tip);
    r.addEventListener("click", function () { draw(node === focus && node.p ? node.p : node); });
    r.addEventListener("mouseover", function () { info.textContent = node.n + " - " + human(node.v) + " (" + share + ")"; });
    g.appendChild(r);
    if (w > 36) {
      var t = document.createElementNS(NS, "text");
      t.setAttribute("x", x + 3); t.setAttribute("y", y + ROW - 5);
      var chars = Math.floor((w - 6) / 6.5);
      t.textContent = node.n.length > chars ? node.n.slice(0, Math.max(chars - 1, 1)) + "\\u2026" : node.n;
      g.appendChild(t);
    }
    svg.appendChild(g);
  }
  var focus = data;
  function draw(node) {
    focus = node;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var width = svg.clientWidth || svg.parentNode.clientWidth || 1200;
    svg.setAttribute("height", (maxDepth + 1) * ROW);
    for (var a = node.p; a; a = a.p) box(a, 0, width, a.d * ROW, true);
    (function walk(n, x, w) {
      box(n, x, w, n.d * ROW, false);
      var cx = x;
      (n.c || []).forEach(function (child) {
        var cw = w * child.v / n.v;
        if (cw >= 0.3) walk(child, cx, cw);
        cx += cw;
      });
    })(node, 0, width);
    svg.setAttribute("data-boxes", svg.querySelectorAll("rect").length);
  }
  document.getElementById("flame-reset").addEventListener("click", function () { draw(data); });
  window.addEventListener("resize", function () { draw(focus); });
  draw(data);
})();
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _json_for_script(value: Any) -> str:
    # Inside <script>, "</script>" in a frame name would end the element:
    # escape the characters HTML cares about; JSON.parse restores them.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def flame_tree(data: ReportData) -> dict[str, Any]:
    """{'n': name, 'v': weight, 'c': [children]}, root first, children
    heaviest first."""
    root: dict[str, Any] = {"n": "all", "v": 0, "k": {}}
    chosen = selected_stacks(data, data.by, min_share=OTHER_BELOW_SHARE)
    if chosen.other_count:
        root["v"] = chosen.other_weight
        root["k"][chosen.other_label] = {"n": chosen.other_label, "v": chosen.other_weight, "k": {}}
    for stack, weight in zip(chosen.shown, chosen.weights):
        root["v"] += weight
        node = root
        for frame in reversed(stack.frames):
            label = frame_label(frame)
            child = node["k"].get(label)
            if child is None:
                child = node["k"][label] = {"n": label, "v": 0, "k": {}}
            child["v"] += weight
            node = child

    def finish(node: dict[str, Any]) -> dict[str, Any]:
        kids = sorted(node.pop("k").values(), key=lambda c: (-c["v"], c["n"]))
        if kids:
            node["c"] = [finish(k) for k in kids]
        return node

    return finish(root)


# ---------------------------------------------------------------- chart


def _downsample(points: Sequence[TimePoint], attr: str) -> list[tuple[float, int]]:
    """(t, value) pairs, at most _MAX_POINTS: each bucket keeps its largest
    value, so a short spike still shows."""
    pairs = [(p.elapsed_s, getattr(p, attr)) for p in points if getattr(p, attr) is not None]
    if len(pairs) <= _MAX_POINTS:
        return pairs
    size = len(pairs) / _MAX_POINTS
    out = []
    for b in range(_MAX_POINTS):
        bucket = pairs[int(b * size) : int((b + 1) * size)] or pairs[-1:]
        out.append(max(bucket, key=lambda p: p[1]))
    return out


def _nice_step(top: float, ticks: int = 4) -> float:
    """A grid step that reads well in binary units (256 MiB, 2 GiB...)."""
    raw = max(top / ticks, 1.0)
    base = 1
    while raw >= base * 1024:
        base *= 1024
    for m in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 256, 500, 512, 1024):
        if m * base >= raw:
            return float(m * base)
    return raw


def chart_svg(points: Sequence[TimePoint], marks: Sequence[tuple[str, float]]) -> str:
    """Memory over time as an inline SVG: one polyline per series present."""
    if not points:
        return '<p class="muted">No snapshots.</p>'
    series = [(name, colour, _downsample(points, attr)) for name, colour, attr in SERIES]
    series = [s for s in series if s[2]]
    t_end = max(points[-1].elapsed_s, 1e-9)
    top = float(max([v for _, _, pairs in series for _, v in pairs] + [1]))
    step = _nice_step(top)
    top = step * max(1, -(-top // step))
    x0, y0 = _PAD_L, CHART_H - _PAD_B
    w, h = CHART_W - _PAD_L - _PAD_R, CHART_H - _PAD_T - _PAD_B

    def sx(t: float) -> float:
        return x0 + w * t / t_end

    def sy(v: float) -> float:
        return y0 - h * max(v, 0) / top

    parts = [
        f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_W} {CHART_H}"'
        f' width="100%" style="max-width:{CHART_W}px" role="img" aria-label="memory over time">'
    ]
    v = 0.0
    while v <= top + 1e-9:
        y = sy(v)
        parts.append(f'<line class="grid" x1="{x0}" x2="{x0 + w}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{_esc(fmt_bytes(v))}</text>')
        v += step
    for i in range(6):
        t = t_end * i / 5
        label = fmt_duration(t) if t > 0 else "0s"
        parts.append(f'<text x="{sx(t):.1f}" y="{y0 + 16}" text-anchor="middle">{_esc(label)}</text>')
    parts.append(f'<line class="axis" x1="{x0}" x2="{x0 + w}" y1="{y0}" y2="{y0}"/>')
    for label, t in marks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_PAD_T}" y2="{y0}" stroke="#888" stroke-dasharray="4 3"/>')
        # Near the right edge the label goes to the left of its line.
        right = x > x0 + w * 0.85
        anchor = ' text-anchor="end"' if right else ""
        parts.append(
            f'<text x="{x - 3 if right else x + 3:.1f}" y="{_PAD_T + 10}" fill="#555"{anchor}>{_esc(label)}</text>'
        )
    for name, colour, pairs in series:
        coords = " ".join(f"{sx(t):.1f},{sy(v):.1f}" for t, v in pairs)
        if len(pairs) == 1:
            (t, val), = pairs
            parts.append(f'<circle cx="{sx(t):.1f}" cy="{sy(val):.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<polyline class="series" data-name="{_esc(name)}" fill="none" stroke="{colour}"'
            f' stroke-width="1.6" points="{coords}"/>'
        )
    lx = x0 + 8
    for name, colour, _ in series:
        parts.append(f'<rect x="{lx}" y="{y0 + 22}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{lx + 14}" y="{y0 + 31}">{_esc(name)}</text>')
        lx += 24 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- page


def _fact(value: str, label: str) -> str:
    return f"<div><b>{_esc(value)}</b><span>{_esc(label)}</span></div>"


def _facts(d: ReportData) -> str:
    s = d.snapshot
    c = s.heap.counters
    facts = []
    if s.process.rss_bytes:
        facts.append(_fact(fmt_bytes(s.process.rss_bytes), "RSS"))
    facts.append(_fact(fmt_bytes(c.live_bytes), f"heap live, {fmt_count(c.live_count)} blocks"))
    facts.append(_fact(fmt_bytes(c.alloc_bytes), f"allocated, {fmt_count(c.alloc_count)} calls"))
    retained = retained_at(s)
    if retained is not None:
        facts.append(_fact(fmt_bytes(retained), "allocator retained (freed, not returned)"))
    if d.since is not None:
        b = d.since
        if b.rss_bytes is not None:
            facts.append(_fact(fmt_signed_bytes(b.rss_bytes), f"RSS since {b.label}"))
        facts.append(_fact(fmt_signed_bytes(b.heap_live_bytes), f"heap live since {b.label}"))
        if b.retained_bytes is not None:
            facts.append(_fact(fmt_signed_bytes(b.retained_bytes), "retained since then"))
    p = peak_of(d)
    if p.rss_bytes:
        near = (f", nearest snapshot {fmt_bytes(p.nearest.process.rss_bytes)} at "
                f"{p.nearest.elapsed_s:.1f}s" if p.nearest is not None and p.below_bytes else "")
        facts.append(_fact(fmt_bytes(p.rss_bytes), f"peak RSS (kernel high-water mark{near})"))
    if p.heap_live_bytes:
        at = f" at {p.heap_live_elapsed_s:.1f}s" if p.heap_live_elapsed_s is not None else ""
        facts.append(_fact(fmt_bytes(p.heap_live_bytes), f"peak heap live{at}"))
    if d.peak is not None:
        peak_retained = retained_at(d.peak)
        if peak_retained is not None and d.peak is not s:
            facts.append(_fact(fmt_bytes(peak_retained), "retained at the peak"))
    return '<div class="facts">' + "".join(facts) + "</div>"


def _stack_table(d: ReportData) -> str:
    ranked = selected_stacks(d, d.by, limit=TOP_STACKS).shown
    if not ranked:
        return f'<p class="muted">No stack has {_esc(unit(d.by))}.</p>'
    retained = d.snapshot.has_retained
    head = ["live", "allocated"] + (["retained"] if retained else []) + ["blocks", "threads"]
    rows = ["<tr>" + "".join(f"<th>{h}</th>" for h in head)
            + '<th class="frames">frames (innermost first)</th></tr>']
    for st in ranked:
        c = st.counters
        frames = "\n".join(st.frames) + ("\n… (outer frames may be missing)" if st.truncated else "")
        cells = [fmt_bytes(c.live_bytes), fmt_bytes(c.alloc_bytes)]
        cells += [fmt_bytes(st.retained_bytes)] if retained else []
        cells += [fmt_count(c.live_count), str(len(st.tids))]
        rows.append("<tr>" + "".join(f"<td>{_esc(x)}</td>" for x in cells)
                    + f'<td class="frames">{_esc(frames)}</td></tr>')
    return "<table>" + "".join(rows) + "</table>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], left: int = -1) -> str:
    """A plain table; column `left` (e.g. names, frames) is set left."""
    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="frames"' if i == left else ""
        return f"<{tag}{cls}>{_esc(text)}</{tag}>"

    out = ["<tr>" + "".join(cell("th", i, h) for i, h in enumerate(head)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, x) for i, x in enumerate(r)) + "</tr>" for r in rows]
    return "<table>" + "".join(out) + "</table>"


def _threads(d: ReportData) -> str:
    threads = sorted(d.snapshot.threads, key=lambda t: (-t.counters.live_bytes, t.tid))
    if not threads:
        return ""
    rows = [[str(t.tid), t.name + ("" if t.alive else " (exited)"), fmt_bytes(t.counters.live_bytes),
             fmt_count(t.counters.live_count), fmt_bytes(t.counters.alloc_bytes),
             fmt_bytes(t.counters.free_bytes)] for t in threads]
    return ("<h2>Threads</h2>"
            + _table(["tid", "name", "live", "blocks", "allocated", "freed"], rows, left=1))


def _arenas(d: ReportData) -> str:
    arenas = sorted(d.snapshot.arenas, key=lambda a: -a.committed_bytes)
    if not arenas:
        return ""
    rows = []
    for a in arenas:
        rows.append([a.id, a.kind, fmt_count(len(a.tids)), str(a.heap_count),
                     fmt_bytes(a.committed_bytes), fmt_bytes(a.resident_bytes),
                     fmt_bytes(a.all_live_bytes) + (" (est.)" if a.live_is_estimate else ""),
                     fmt_bytes(a.retained_bytes), fmt_bytes(a.trimmable_bytes)])
    intro = ('<p class="muted">What each glibc arena took from the OS and what the program holds in it;'
             " retained is resident less live: freed memory the arena keeps.</p>")
    head = ["arena", "kind", "threads", "heaps", "committed", "resident", "live", "retained",
            "malloc_trim would return"]
    return "<h2>Allocator arenas</h2>" + intro + _table(head, rows)


def _regions(d: ReportData) -> str:
    regions = sorted(d.snapshot.regions, key=lambda r: (-r.resident_bytes, r.start))
    if not regions:
        return ""
    rows = []
    for r in regions[:TOP_REGIONS]:
        origin = " <- ".join(r.origin_frames[:3]) or "(before the trace)"
        rows.append([f"{r.start:#x}-{r.end:#x}", r.kind, fmt_bytes(r.end - r.start),
                     fmt_bytes(r.committed_bytes), fmt_bytes(r.resident_bytes),
                     "" if r.origin_tid is None else str(r.origin_tid), origin])
    more = len(regions) - TOP_REGIONS
    tail = f'<p class="muted">and {more} smaller {"region" if more == 1 else "regions"}.</p>' if more > 0 else ""
    head = ["range", "kind", "size", "committed", "resident", "tid", "mapped by"]
    return ("<h2>Address-space regions, largest resident first</h2>"
            + _table(head, rows, left=6) + tail)


def render_html(d: ReportData) -> str:
    s = d.snapshot
    title = f"memtrace: {s.comm} (pid {s.pid}) {moment(d)}"
    if d.since is not None:
        title += f", changes since {d.since.label}"
    marks: list[tuple[str, float]] = [("report", s.elapsed_s)]
    if d.peak is not None and d.peak.elapsed_s != s.elapsed_s:
        marks.append(("peak", d.peak.elapsed_s))
    cmd = command_line(d.metadata)
    meta_bits = recorded_on(d.metadata)
    tree = flame_tree(d)
    notes = [note_text(n) for n in (*s.hints, *s.notes)]
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="muted">{_esc(", ".join(meta_bits))}</p>' if meta_bits else "",
        f"<p>command: <code>{_esc(cmd)}</code></p>" if cmd else "",
        "" if d.complete else '<p class="warn">The recording was not closed (memtrace was killed or crashed);'
        " it holds every interval up to its last write.</p>",
        _facts(d),
        "<h2>Memory over time</h2>",
        chart_svg(d.timeline, marks),
        f"<h2>Flame graph: {_esc(unit(d.by))} by call stack {_esc(moment(d))}</h2>",
        '<p class="muted">Root at the top; width is the share of the weight. Click a box to zoom in,'
        ' click it again to zoom out. <button id="flame-reset" type="button">Reset</button></p>',
        '<div id="flame-info"></div>',
        f'<div id="flame"><svg id="flame-svg" xmlns="http://www.w3.org/2000/svg" width="100%" height="20"'
        f' data-unit="{_esc(unit(d.by))}"></svg></div>',
        f'<script id="flame-data" type="application/json">{_json_for_script(tree)}</script>',
        f"<h2>Top stacks by {_esc(unit(d.by))}</h2>",
        _stack_table(d),
        _threads(d),
        _arenas(d),
        _regions(d),
    ]
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # Nothing may be fetched: the page is complete as it is.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
        f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_esc(title)}</title>"
        f"<style>{_CSS}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + f"\n<script>{_JS}</script>\n</body></html>\n"
    )


class HtmlReporter:
    binary = False

    def __init__(self, data: ReportData) -> None:
        self.data = data

    def render(self, out: TextIO) -> None:
        out.write(render_html(self.data))
