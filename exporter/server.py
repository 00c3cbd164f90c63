"""The HTTP endpoint: /metrics, /probe, /healthz, a landing page, 404 elsewhere.

A plain ThreadingHTTPServer keeps the dependency list short; TLS and basic
auth come from a web config file (see webconfig.py).

Threads are bounded (Connections): each open connection holds one handler thread, at most
MAX_CONNECTIONS of them for the whole process. When the bound is reached, or the process
cannot start another thread (a pids limit, systemd TasksMax), the connection idle the longest
(one waiting for a request, as a slow-header or idle flood's are) is closed to make room; a
connection whose request is being answered is never closed. Polls never need a handler
thread (poller.py), so a flood can slow nothing but other idle connections.
"""

from __future__ import annotations

import gzip
import html
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .app import ExporterApp
from .webconfig import WebConfig

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # handler threads, process-wide: more than 50 concurrent scrapers need
IDLE_TIMEOUT_SECONDS = 30  # a connection that sends nothing for this long is closed
ROOM_WAIT_SECONDS = 1.0  # at the task limit, how long to wait for a closed idle connection's thread
ROOM_ATTEMPTS, ROOM_RETRY_SECONDS = 25, 0.02  # then tries to start the new one, this far apart


class Connections:
    """The open connections of every listener, each with its handler thread, bounded.

    A connection is idle from its accept (and between keep-alive requests) until a request's
    headers are in, then busy until the answer is sent.
    """

    def __init__(self, limit: int = MAX_CONNECTIONS) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[socket.socket, bool] = {}  # connection -> busy; oldest first
        self._threads: dict[socket.socket, threading.Thread] = {}

    def admit(self, sock: socket.socket) -> bool:
        """Make room for a new connection if needed. False if every open connection is busy."""
        with self._lock:
            if len(self._open) >= self.limit and not self._close_oldest_idle()[0]:
                return False
            self._open[sock] = False
            return True

    def make_room(self) -> bool:
        """No thread could be started: close the oldest idle connection and wait for its thread."""
        with self._lock:
            closed, thread = self._close_oldest_idle()
        if thread is not None:
            thread.join(ROOM_WAIT_SECONDS)
        return closed

    def _close_oldest_idle(self) -> tuple[bool, threading.Thread | None]:
        """(whether one was closed, its handler thread if it has one yet)."""
        for sock, busy in self._open.items():
            if not busy:
                del self._open[sock]
                try:
                    # The socket's own shutdown, under TLS too: the thread reading it returns at once.
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
                return True, self._threads.pop(sock, None)
        return False, None

    def started(self, sock: socket.socket) -> None:
        with self._lock:
            self._threads[sock] = threading.current_thread()

    def mark(self, sock: socket.socket, busy: bool) -> bool:
        """False if the connection was closed to make room: its request (cut short) is not answered."""
        with self._lock:
            if sock not in self._open:
                return False
            del self._open[sock]  # re-inserted last: the newest idle is closed last
            self._open[sock] = busy
            return True

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.pop(sock, None)
            self._threads.pop(sock, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int] | None, app: ExporterApp, web: WebConfig | None = None, *,
        sock: socket.socket | None = None, connections: Connections | None = None,
        telemetry_path: str = "/metrics",
    ) -> None:
        """Listen on `address`, or serve `sock`, a listening socket handed over (systemd socket activation)."""
        self.app = app
        self.web = web
        self.connections = connections if connections is not None else Connections()
        self.telemetry_path = telemetry_path
        self._gzip_lock = threading.Lock()
        self._gzipped: tuple[bytes, bytes] | None = None  # (body, its gzip): the last one compressed
        if sock is not None:
            self.address_family = sock.family
            super().__init__(sock.getsockname(), Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()
        else:
            assert address is not None
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            super().__init__(address, Handler)
        if web is not None and web.ssl_context is not None:
            self.socket = web.ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.admit(request):
            log.debug("connection from %s refused: every connection is busy", client_address[0])
            self.shutdown_request(request)
            return
        for attempt in range(ROOM_ATTEMPTS):
            thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                      name="http-conn", daemon=True)
            try:
                thread.start()
                return
            except RuntimeError:  # the process is at its task limit
                if attempt == 0:
                    log.debug("cannot start a handler thread (at the task limit): closing the longest-idle connection")
                    if not self.connections.make_room():
                        break
                else:  # the closed connection's thread has ended, but the kernel may not have reaped it yet
                    time.sleep(ROOM_RETRY_SECONDS)
        log.debug("connection from %s refused: no thread can be started", client_address[0])
        self.connections.release(request)
        self.shutdown_request(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self.connections.started(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that speaks plain HTTP to the TLS port, fails the handshake or hangs up
        # mid-answer is the client's problem: one debug line, not a traceback on stderr. Only
        # what is not a socket error (a bug) keeps its traceback, still at debug level.
        error = sys.exc_info()[1]
        peer = client_address[0] if client_address else "?"
        if isinstance(error, OSError):  # resets, broken pipes, timeouts, TLS errors
            log.debug("connection from %s failed error=%s", peer, error)
        else:
            log.debug("connection from %s failed", peer, exc_info=True)

    def gzipped(self, body: bytes) -> bytes:
        """gzip of `body`. The exposition is the same bytes object until a poll changes it,
        so keeping the last one compresses it once, not once per scrape."""
        with self._gzip_lock:
            if self._gzipped is not None and self._gzipped[0] is body:
                return self._gzipped[1]
        compressed = gzip.compress(body, compresslevel=1)
        with self._gzip_lock:
            self._gzipped = (body, compressed)
        return compressed


class _LastLine:
    """The request's input as http.client.parse_headers reads it, remembering the last line read:
    a complete head ends with a blank line, one cut by the client's EOF does not (and is not
    answered, nor does it make a scrape poll)."""

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile
        self.last = b""

    def readline(self, limit: int = -1) -> bytes:
        self.last = self._rfile.readline(limit)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rfile, name)


class Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle on, the body could wait for the client's
    # delayed ACK of the headers (40 ms on Linux), which showed as the scrape latency p99.
    disable_nagle_algorithm = True
    timeout = IDLE_TIMEOUT_SECONDS  # a client that sends nothing is dropped

    def handle_one_request(self) -> None:
        self.server.connections.mark(self.connection, busy=False)  # waiting for a request
        super().handle_one_request()

    def parse_request(self) -> bool:
        rfile, watched = self.rfile, _LastLine(self.rfile)
        self.rfile = watched  # type: ignore[assignment]
        try:
            if not super().parse_request():
                return False
        finally:
            self.rfile = rfile
        if watched.last not in (b"\r\n", b"\n"):  # the head ended at the client's EOF, cut short
            self.close_connection = True
            return False
        if not self.server.connections.mark(self.connection, busy=True):  # headers in: being answered
            self.close_connection = True  # closed to make room: what arrived is a fragment
            return False
        return True

    def end_headers(self) -> None:
        web = self.server.web
        if web is not None:
            for name, value in web.headers.items():  # http_server_config.headers, on every answer
                self.send_header(name, value)
        super().end_headers()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/healthz":
            # Liveness only: never touches the API, and needs no credentials so probes stay simple.
            self._send(HTTPStatus.OK, b"OK\n", "text/plain; charset=utf-8")
            return
        if not self._authorized():
            return
        if url.path == self.server.telemetry_path:
            body, ctype = self.server.app.metrics(
                self.headers.get("Accept", ""), self.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
            )
            self._send(HTTPStatus.OK, body, ctype, compress=True)
        elif url.path == "/probe":
            account = parse_qs(url.query).get("account", [""])[0]
            answer = self.server.app.probe(
                account, self.headers.get("Accept", ""), self.headers.get("X-Prometheus-Scrape-Timeout-Seconds")
            )
            if answer is None:
                self._send(HTTPStatus.BAD_REQUEST, b"unknown or missing ?account=\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.OK, answer[0], answer[1], compress=True)
        elif url.path == "/":
            page = landing_page(self.server.app, self.server.telemetry_path)
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"404 page not found\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:  # noqa: N802
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"", "text/plain; charset=utf-8")

    def _authorized(self) -> bool:
        web = self.server.web
        if web is None or web.check_authorization(self.headers.get("Authorization")):
            return True
        self.send_response(HTTPStatus.UNAUTHORIZED)
        self.send_header("WWW-Authenticate", 'Basic realm="skillable-exporter"')
        self.send_header("Content-Length", "13")
        self.end_headers()
        self.wfile.write(b"Unauthorized\n")
        return False

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, compress: bool = False) -> None:
        if compress and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = self.server.gzipped(body)
            encoding = "gzip"
        else:
            encoding = None
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("http %s", format % args)


def landing_page(app: ExporterApp, telemetry_path: str = "/metrics") -> str:
    rows = []
    for status in app.status():
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status.last_success))
            if status.last_success
            else "never"
        )
        state = "up" if status.up else ("not polled yet" if status.last_success is None else "down")
        name = html.escape(status.name or "default")
        rows.append(f"<tr><td>{name}</td><td>{state}</td><td>{when}</td></tr>")
    probe_links = "".join(
        f'<li><a href="probe?account={html.escape(s.name)}">probe?account={html.escape(s.name)}</a></li>'
        for s in app.status()
        if s.name
    )
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Skillable Exporter</title></head>
<body>
<h1>Skillable Exporter</h1>
<p>Prometheus exporter for Skillable (Lab on Demand) lab results, version {html.escape(__version__)}.</p>
<ul><li><a href="{html.escape(telemetry_path.lstrip("/"))}">metrics</a></li><li><a href="healthz">healthz</a></li>{probe_links}</ul>
<h2>Upstream</h2>
<table border="1" cellpadding="4"><tr><th>account</th><th>last poll</th><th>last success</th></tr>
{"".join(rows)}
</table>
<p>Polls happen when Prometheus scrapes /metrics; this page does not poll.</p>
</body></html>
"""
