"""`--serve [HOST:]PORT`: the latest snapshots over HTTP, for Prometheus
(/metrics) and the pprof-based profilers (/debug/pprof/heap).

The trace's loop puts each snapshot on a `Board`; a server thread renders
whatever the board holds when a scraper asks. Nothing is rendered between
scrapes, and no endpoint changes anything: every method but GET and HEAD is
refused. The server binds loopback unless an address is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from memtrace.errors import MemtraceError
from memtrace.model.snapshot import Snapshot

DEFAULT_HOST = "127.0.0.1"
PPROF_TYPE = "application/octet-stream"
INDEX = b"""memtrace
/metrics            Prometheus text format (OpenMetrics if the Accept header asks)
/debug/pprof/heap   gzipped pprof: inuse/alloc space and objects, retained_space (?pid=N: one target)
"""


@dataclass(frozen=True)
class ServeAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str) -> ServeAddress:
    """'9480' and ':9480' mean loopback; '0.0.0.0:9480', 'host:9480' and
    '[::1]:9480' name the address. Raises ValueError with the reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets: [{host}]:{port_text}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"not a port: {port_text!r} (give [HOST:]PORT)") from None
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return ServeAddress(host or DEFAULT_HOST, port)


def serve_address(text: str) -> ServeAddress:
    """argparse type of --serve: a well-formed address that can be bound now,
    so that a port in use is said before any probe is attached."""
    try:
        address = parse_address(text)
        _bind(address).close()
    except (ValueError, MemtraceError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return address


def _family(host: str) -> int:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: resolved by the server
        return socket.AF_INET


def _bind(address: ServeAddress) -> socket.socket:
    sock = socket.socket(_family(address.host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
    except OSError as e:
        sock.close()
        raise MemtraceError(f"cannot serve on {address}: {e.strerror or e}: "
                            "choose another --serve [HOST:]PORT") from None
    return sock


class Board:
    """The latest snapshot of each target, shared with the server thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[int, Snapshot] = {}

    def update(self, snapshot: Snapshot) -> None:
        # The recorder's events are not served: don't keep them.
        kept = dataclasses.replace(snapshot, vm_events=()) if snapshot.vm_events else snapshot
        with self._lock:
            self._latest[snapshot.pid] = kept

    def forget(self, pid: int) -> None:
        with self._lock:
            self._latest.pop(pid, None)

    def snapshots(self, pid: Optional[int] = None) -> list[Snapshot]:
        with self._lock:
            if pid is not None:
                return [self._latest[pid]] if pid in self._latest else []
            return [self._latest[p] for p in sorted(self._latest)]


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "memtrace"
    protocol_version = "HTTP/1.1"
    timeout = 60  # a connection left idle this long is closed, and its thread ends

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n",
                   "text/plain; charset=utf-8", True, {"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/metrics":
                from memtrace.output.reports.metrics import exposition

                payload, ctype = exposition(self.server.board.snapshots(),
                                            self.headers.get("Accept"))
            elif url.path == "/debug/pprof/heap":
                payload, ctype = self._heap(parse_qs(url.query)), PPROF_TYPE
            elif url.path == "/":
                payload, ctype = INDEX, "text/plain; charset=utf-8"
            else:
                self._send(HTTPStatus.NOT_FOUND, b"not found: try /metrics or /debug/pprof/heap\n",
                           "text/plain; charset=utf-8", body)
                return
        except ValueError as e:
            self._send(HTTPStatus.BAD_REQUEST, f"{e}\n".encode(), "text/plain; charset=utf-8", body)
            return
        except Exception as e:  # noqa: BLE001 - a bug of ours must not end the trace
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR,
                       f"memtrace: internal error ({type(e).__name__}: {e})\n".encode(),
                       "text/plain; charset=utf-8", body)
            return
        self._send(HTTPStatus.OK, payload, ctype, body)

    def _heap(self, query: dict) -> bytes:
        from memtrace.output.reports.pprof import build_fleet_profile, gzipped

        pid = None
        if "pid" in query:
            try:
                pid = int(query["pid"][0])
            except ValueError:
                raise ValueError(f"pid must be a number: {query['pid'][0]!r}") from None
        snapshots = self.server.board.snapshots(pid)
        if pid is not None and not snapshots:
            raise ValueError(f"pid {pid} is not traced here")
        return gzipped(build_fleet_profile(snapshots, time.time_ns()))

    def _send(self, status: HTTPStatus, payload: bytes, ctype: str, body: bool,
              headers: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # the terminal belongs to the live view


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    board: Board

    def handle_error(self, request, client_address) -> None:
        pass  # a scraper that hung up: nothing to print over the live view


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class Server:
    """The HTTP server on its own thread, serving one board."""

    def __init__(self, address: ServeAddress, board: Board) -> None:
        self.address = address
        self.board = board
        cls = _HTTPServer6 if _family(address.host) == socket.AF_INET6 else _HTTPServer
        try:
            self._http = cls((address.host, address.port), _Handler)
        except OSError as e:
            raise MemtraceError(f"cannot serve on {address}: {e.strerror or e}: "
                                "choose another --serve [HOST:]PORT") from None
        self._http.board = board
        self._thread = threading.Thread(target=self._http.serve_forever, name="memtrace-serve",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._http.server_address[1]

    def close(self) -> None:
        """Stop answering; safe to call more than once."""
        if self._thread.is_alive():
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()
