"""--serve without a target: the exposition of synthetic snapshots, content
negotiation, promtool's lint, the HTTP server's answers, and the pprof
endpoint against `report --format pprof`."""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import shutil
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from memtrace.model.snapshot import Snapshot
from memtrace.record.synthetic import session
from memtrace.output.reports.common import ReportData
from memtrace.output.reports.metrics import SelfStats, exposition
from memtrace.output.reports.pprof import build_fleet_profile, build_profile
from memtrace.output.serve import Board, ServeAddress, Server, parse_address, serve_address

HOST = "box"
OPENMETRICS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                      "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.fixture(scope="module")
def snaps() -> list[Snapshot]:
    """Two targets: a full trace and a light one."""
    *_, full = session(12)
    *_, other = session(6, seed=7)
    light = dataclasses.replace(other, pid=other.pid + 1, comm="light one", light=True)
    return [full, light]


def samples(body: bytes, parse=parse_text) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value."""
    out = {}
    for family in parse(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict, name: str, s: Snapshot, **extra) -> float:
    labels = {"pid": str(s.pid), "comm": s.comm, "host": HOST, **extra}
    return found[(name, tuple(sorted(labels.items())))]


def test_text_exposition_holds_each_target_figure(snaps):
    full, light = snaps
    body, ctype = exposition(snaps, None, SelfStats(1.5, 123 << 20, 2), HOST)
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    found = samples(body)
    for s in snaps:
        assert value(found, "memtrace_rss_bytes", s) == s.process.rss_bytes
        assert value(found, "memtrace_rss_anon_bytes", s) == s.process.rss_anon_bytes
        assert value(found, "memtrace_heap_live_bytes", s) == s.gap.heap_live_bytes
        assert value(found, "memtrace_allocator_retained_bytes", s) == s.allocator.retained_bytes
        assert value(found, "memtrace_allocator_committed_bytes", s) == s.allocator.committed_bytes
        assert value(found, "memtrace_trim_returned_bytes_total", s) == s.trim.returned_bytes
        for a in s.arenas:
            assert value(found, "memtrace_arena_retained_bytes", s, arena=a.id,
                         kind=a.kind) == a.retained_bytes
    assert value(found, "memtrace_heap_allocated_bytes_total", full) == full.heap.counters.alloc_bytes
    assert value(found, "memtrace_heap_freed_bytes_total", full) == full.heap.counters.free_bytes
    assert value(found, "memtrace_drops_total", full, reason="allocs_map_full") == \
        full.heap.drops.allocs_map_full
    assert value(found, "memtrace_light_mode", light) == 1
    # light mode counts no malloc: no counter that would read 0 as if measured
    assert not [k for k in found if k[0].startswith("memtrace_heap_alloc")
                and ("pid", str(light.pid)) in k[1]]
    assert found[("memtrace_self_cpu_seconds_total", (("host", HOST),))] == 1.5
    assert found[("memtrace_self_rss_bytes", (("host", HOST),))] == 123 << 20
    assert found[("memtrace_targets", (("host", HOST),))] == 2


def test_names_follow_prometheus_conventions(snaps):
    body, _ = exposition(snaps, None, SelfStats(0, 0, 2), HOST)
    families = list(parse_text(body.decode()))
    assert families
    for family in families:
        assert family.name.startswith("memtrace_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        for s in family.samples:
            # a stack as a label would be a series per call path
            assert set(s.labels) <= {"pid", "comm", "host", "arena", "kind", "reason"}, s
            assert not any("[" in v or "+0x" in v for v in s.labels.values()), s


def test_openmetrics_when_the_scraper_asks(snaps):
    body, ctype = exposition(snaps, OPENMETRICS_ACCEPT, SelfStats(0, 0, 2), HOST)
    assert ctype.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    text = samples(exposition(snaps, None, SelfStats(0, 0, 2), HOST)[0])
    assert samples(body, parse_openmetrics) == text


def test_promtool_accepts_the_exposition(snaps):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: sudo ./install.sh --test-tools (apt-get install prometheus)",
                    pytrace=False)
    body, _ = exposition(snaps, None, SelfStats(0.25, 1 << 20, 2), HOST)
    done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


# ---------------------------------------------------------------- addresses


def test_addresses_default_to_loopback():
    assert parse_address("9480") == ServeAddress("127.0.0.1", 9480)
    assert parse_address(":9480") == ServeAddress("127.0.0.1", 9480)
    assert parse_address("0.0.0.0:9480") == ServeAddress("0.0.0.0", 9480)
    assert parse_address("[::1]:9480") == ServeAddress("::1", 9480)
    assert str(ServeAddress("::1", 9480)) == "[::1]:9480"
    for bad in ("http", "1.2.3.4:", "::1:9480", "70000", "host:0"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_a_port_in_use_is_refused_before_tracing():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(argparse.ArgumentTypeError, match=f"cannot serve on 127.0.0.1:{port}"):
            serve_address(str(port))


# ---------------------------------------------------------------- the server


@pytest.fixture
def server(snaps):
    board = Board()
    for s in snaps:
        board.update(s)
    srv = Server(ServeAddress("127.0.0.1", 0), board)
    yield srv
    srv.close()


def get(server: Server, path: str, method: str = "GET", headers=None):
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def parse_pprof(blob: bytes):
    from memtrace.output.reports.profile_proto import Profile

    profile = Profile()
    profile.ParseFromString(gzip.decompress(blob))
    return profile


def test_server_answers_metrics_and_negotiates(server, snaps):
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert value(samples(body), "memtrace_rss_bytes", snaps[0], host=socket.gethostname()) \
        == snaps[0].process.rss_bytes
    status, headers, body = get(server, "/metrics", headers={"Accept": OPENMETRICS_ACCEPT})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_server_writes_nothing(server):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = get(server, "/metrics", method=method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
    assert get(server, "/nope")[0] == 404
    assert get(server, "/debug/pprof/heap?pid=x")[0] == 400
    assert get(server, "/debug/pprof/heap?pid=1")[0] == 400


def test_heap_endpoint_is_the_pprof_report(server, snaps):
    full = snaps[0]
    _, headers, body = get(server, f"/debug/pprof/heap?pid={full.pid}")
    served = parse_pprof(body)
    reported = build_profile(ReportData(snapshot=full))
    strings = list(served.string_table)
    types = [(strings[t.type], strings[t.unit]) for t in served.sample_type]
    assert types == [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"),
                     ("inuse_space", "bytes"), ("retained_space", "bytes")]
    assert strings[served.default_sample_type] == "inuse_space"
    for field in ("sample_type", "sample", "location", "function", "mapping", "string_table"):
        assert list(getattr(served, field)) == list(getattr(reported, field)), field
    # every target at once, each sample labelled with its pid
    whole = parse_pprof(get(server, "/debug/pprof/heap")[2])
    pids = {whole.string_table[lab.str] for s in whole.sample for lab in s.label
            if whole.string_table[lab.key] == "pid"}
    assert pids == {str(s.pid) for s in snaps if s.stacks}
    assert len(whole.sample) == len(build_fleet_profile(snaps, 0).sample)


def test_board_keeps_no_recorder_events(snaps):
    board = Board()
    board.update(dataclasses.replace(snaps[0], vm_events=({"kind": "mmap"},)))
    assert board.snapshots()[0].vm_events == ()
    board.forget(snaps[0].pid)
    assert board.snapshots() == []
