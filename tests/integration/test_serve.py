"""--serve against the tools that read it: Debian's Prometheus scrapes a
real trace, promtool lints the exposition, `go tool pprof` reads the heap
endpoint.

One traced run serves them all: threads.c parks, memtrace attaches with
`--serve PORT --json`, the workers allocate and the program parks again.
While it is idle, a Prometheus started here on loopback scrapes memtrace;
then memtrace is stopped and its final JSON is what the scraped series must
equal (the target is idle, so one interval apart they are the same).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.bpf

INTERVAL = 0.5
SCRAPE_S = 1
WAIT_S = 60.0

# series name -> the final JSON's figure it must equal
SERIES = {
    "memtrace_rss_bytes": ("process", "rss_bytes"),
    "memtrace_rss_anon_bytes": ("process", "rss_anon_bytes"),
    "memtrace_heap_live_bytes": ("gap", "heap_live_bytes"),
    "memtrace_heap_allocated_bytes_total": ("heap", "alloc_bytes"),
    "memtrace_heap_freed_bytes_total": ("heap", "free_bytes"),
    "memtrace_heap_allocations_total": ("heap", "alloc_count"),
    "memtrace_heap_frees_total": ("heap", "free_count"),
    "memtrace_allocator_committed_bytes": ("allocator", "committed_bytes"),
    "memtrace_allocator_resident_bytes": ("allocator", "resident_bytes"),
    "memtrace_allocator_retained_bytes": ("allocator", "retained_bytes"),
    "memtrace_allocator_arenas": ("allocator", "arena_count"),
    "memtrace_trim_returned_bytes_total": ("trim", "returned_bytes"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: sudo ./install.sh --test-tools (apt-get install {package})",
                    pytrace=False)
    return path


def http_get(url: str, headers=None) -> tuple[dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return dict(r.headers), r.read()


def listening_address(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].split(":")
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(addr)
    return found


class Prometheus:
    """Debian's prometheus on a loopback port with its own config and
    storage, scraping one target every SCRAPE_S."""

    def __init__(self, work: Path, target: str) -> None:
        self.port = free_port()
        config = work / "prometheus.yml"
        config.write_text(
            "global:\n"
            f"  scrape_interval: {SCRAPE_S}s\n"
            f"  scrape_timeout: {SCRAPE_S}s\n"
            "scrape_configs:\n"
            "  - job_name: memtrace\n"
            f"    static_configs:\n      - targets: ['{target}']\n")
        self.log = (work / "prometheus.log").open("w+")
        self.proc = subprocess.Popen(
            [tool("prometheus", "prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={work / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def query(self, promql: str) -> list[dict]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        _, body = http_get(url)
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return doc["data"]["result"]

    def wait_for(self, promql: str, accept, what: str) -> list[dict]:
        deadline = time.monotonic() + WAIT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited (rc={self.proc.returncode}): {self.output()}",
                            pytrace=False)
            try:
                last = self.query(promql)
                if accept(last):
                    return last
            except OSError:
                pass  # not listening yet
            time.sleep(0.2)
        pytest.fail(f"prometheus: {what} not seen within {WAIT_S}s (last answer {last}); "
                    f"its log: {self.output()}", pytrace=False)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def served(programs, tracers, wait_attached, wait_file, tmp_path_factory):
    """A parked threads.c traced with --serve, scraped by Prometheus: what
    each reader got, and memtrace's final JSON."""
    work = tmp_path_factory.mktemp("serve")
    truth_path = work / "truth.json"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    target = subprocess.Popen([str(programs["threads"]), str(truth_path), "--wait"],
                              stdin=subprocess.DEVNULL)
    tracer = prometheus = None
    try:
        pid = int(wait_file(truth_path.with_name("truth.json.ready"), target))
        # No host: loopback.
        tracer = tracers.start(["--json", "--serve", str(port), "--interval", str(INTERVAL),
                                "-p", str(pid), "--duration", "300"])
        prometheus = Prometheus(work, f"127.0.0.1:{port}")
        wait_attached([tracer])
        target.send_signal(signal.SIGUSR1)  # the workers allocate
        truth = json.loads(wait_file(truth_path, target))
        time.sleep(3 * INTERVAL)  # a snapshot of the idle program is on the board
        settled = time.time()
        selector = f'{{pid="{pid}"}}'
        prometheus.wait_for(f"timestamp(memtrace_rss_bytes{selector})",
                            lambda r: r and float(r[0]["value"][1]) > settled,
                            "a scrape after the program parked")
        series = prometheus.query(f'{{__name__=~"memtrace_.*",pid="{pid}"}}')
        targets = prometheus.query('up{job="memtrace"}')
        text_headers, text = http_get(f"{base}/metrics")
        om_headers, om = http_get(f"{base}/metrics",
                                  {"Accept": "application/openmetrics-text;version=1.0.0"})
        heap_headers, heap = http_get(f"{base}/debug/pprof/heap")
        pprof_home = work / "pprof-home"
        pprof = subprocess.run(
            [tool("go", "golang-go"), "tool", "pprof", "-top", f"{base}/debug/pprof/heap"],
            capture_output=True, text=True, timeout=120,
            env={"HOME": str(pprof_home), "PPROF_TMPDIR": str(pprof_home),
                 "GOPATH": str(work / "go"), "GOCACHE": str(work / "cache"),
                 "PATH": "/usr/bin:/bin"})
        listening = listening_address(port)
        doc = tracers.finish(tracer, f"memtrace --serve -p {pid}")
        target.send_signal(signal.SIGUSR1)  # frees, checks its heap, exits
        assert target.wait(30) == 0, "the traced program was harmed"
        return SimpleNamespace(
            pid=pid, doc=doc, truth=truth, series=series, targets=targets,
            text=text, text_type=text_headers["Content-Type"], om=om,
            om_type=om_headers["Content-Type"], heap=heap, pprof=pprof, listening=listening)
    finally:
        if prometheus is not None:
            prometheus.stop()
        tracers.kill_all([tracer, target])


def test_prometheus_scrapes_the_json_figures(served):
    assert [t["value"][1] for t in served.targets] == ["1"], served.targets
    values: dict[str, float] = {}
    for s in served.series:
        labels = s["metric"]
        assert labels["comm"] == "threads" and labels["host"] == socket.gethostname(), labels
        if "arena" not in labels and "reason" not in labels:
            values[labels["__name__"]] = float(s["value"][1])
    assert served.doc["heap"]["alloc_bytes"] > 0, served.doc["heap"]
    for name, (section, key) in SERIES.items():
        assert name in values, f"{name} not scraped: {sorted(values)}"
        assert values[name] == served.doc[section][key], (name, values[name], served.doc[section])
    arenas = {s["metric"]["arena"]: float(s["value"][1]) for s in served.series
              if s["metric"]["__name__"] == "memtrace_arena_retained_bytes"}
    assert arenas == {a["id"]: a["retained_bytes"] for a in served.doc["arenas"]}
    self_rss = [s for s in served.series if s["metric"]["__name__"] == "memtrace_self_rss_bytes"]
    assert not self_rss, "memtrace's own figures carry no pid label"


def test_promtool_accepts_the_exposition(served):
    assert served.text_type.startswith("text/plain; version=0.0.4")
    done = subprocess.run([tool("promtool", "prometheus"), "check", "metrics"],
                          input=served.text, capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()
    assert b"memtrace_self_cpu_seconds_total{" in served.text
    assert b"memtrace_self_rss_bytes{" in served.text


def test_openmetrics_by_accept_header(served):
    assert served.om_type.startswith("application/openmetrics-text")
    assert served.om.endswith(b"# EOF\n")
    assert b"# TYPE memtrace_heap_allocated_bytes counter" in served.om


def test_go_tool_pprof_reads_the_heap_endpoint(served):
    assert served.pprof.returncode == 0, served.pprof.stderr
    out = served.pprof.stdout
    assert "Type: inuse_space" in out, out
    assert "alloc_small" in out and "alloc_large" in out, out


def test_serves_loopback_by_default(served):
    assert served.listening == {"0100007F"}, served.listening


def test_a_port_in_use_fails_before_attaching(run_memtrace, programs, spawn):
    target = spawn([programs["idle"]])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, doc, stderr = run_memtrace(["--json", "--serve", f"127.0.0.1:{port}",
                                        "-p", str(target.pid)])
    assert rc == 2 and doc is None, stderr
    assert f"cannot serve on 127.0.0.1:{port}" in stderr and "Traceback" not in stderr, stderr
