"""The HTTP endpoint: /metrics, /probe, /healthz, POST /-/reload, a landing page, 404 elsewhere.

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

import html
import logging
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import ssl
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from .app import AccountStatus, ExporterApp
from .collector import without_eof
from .config import ConfigError
from .version import build_info
from .webconfig import SETTING as WEB_SETTING, WebConfig

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
        self._accepted: dict[socket.socket, float] = {}  # connection -> when it was accepted

    def admit(self, sock: socket.socket, accepted: float | None = None) -> bool:
        """Make room for a new connection if needed. False if every open connection is busy.
        `accepted`: when it was accepted (the app's monotonic clock), for accepted_at."""
        with self._lock:
            if len(self._open) >= self.limit and not self._close_oldest_idle()[0]:
                return False
            self._open[sock] = False
            if accepted is not None:
                self._accepted[sock] = accepted
            return True

    def accepted_at(self, sock: socket.socket) -> float | None:
        """When the connection was accepted, the first time it is asked (its first request's arrival)."""
        with self._lock:
            return self._accepted.pop(sock, None)

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
                self._accepted.pop(sock, None)
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
            self._accepted.pop(sock, None)

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
        # POST /-/reload calls this (set by the CLI); it returns None or why the reload was refused.
        self.reload: Callable[[], str | None] | None = None
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
            # Every handshake runs this callback (with or without SNI), which hands the connection
            # the newest context: a reload swaps certificates without a new listening socket.
            web.ssl_context.sni_callback = self._current_tls_context
            self.socket = web.ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def _current_tls_context(self, sock: ssl.SSLObject, _name: str | None, context: ssl.SSLContext) -> None:
        current = self.web.ssl_context if self.web is not None else None
        if current is not None and current is not context:
            sock.context = current

    def check_web(self, web: WebConfig | None) -> None:
        """A reloaded web config may change users and certificates, not whether TLS is on."""
        was_tls = self.web is not None and self.web.ssl_context is not None
        if was_tls != (web is not None and web.ssl_context is not None):
            raise ConfigError(WEB_SETTING, "turning TLS on or off needs a restart")

    def set_web(self, web: WebConfig | None) -> None:
        self.web = web

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.admit(request, self.app.monotonic()):
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
            log.debug("connection failed", extra={"peer": peer, "err": str(error)})
        else:
            log.debug("connection from %s failed", peer, exc_info=True)

    def gzipped(self, body: bytes, tail: bytes | None = None) -> tuple[bytes, bytes]:
        """gzip of `body` (then `tail`), in two pieces: an exposition's is kept with it in the one
        exposition cache (collector.py), so it is compressed once, not once per scrape."""
        return self.app.gzipped(body, tail)


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
        # When the request came in: the first on a connection with its accept, a later one as its
        # request line is read. A scrape arriving while a poll runs shares that poll, even if this
        # thread only gets to read it after the poll has ended (Poller.request).
        accepted = self.server.connections.accepted_at(self.connection)
        self.arrived = accepted if accepted is not None else self.server.app.monotonic()
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
            accept = self.headers.get("Accept", "")
            body, ctype = self.server.app.metrics(accept, self.headers.get("X-Prometheus-Scrape-Timeout-Seconds"),
                                                  self.arrived)
            self._send_metrics(body, ctype, self.server.app.runtime_metrics(accept))
        elif url.path == "/probe":
            account = parse_qs(url.query).get("account", [""])[0]
            answer = self.server.app.probe(
                account, self.headers.get("Accept", ""), self.headers.get("X-Prometheus-Scrape-Timeout-Seconds"),
                self.arrived,
            )
            if answer is None:
                self._send(HTTPStatus.BAD_REQUEST, b"unknown or missing ?account=\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.OK, answer[0], answer[1], compress=True)
        elif url.path == "/":
            page = landing_page(self.server.app, self.server.telemetry_path)
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        elif url.path == "/-/reload":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"This endpoint requires a POST request.\n",
                       "text/plain; charset=utf-8")
        else:
            self._send(HTTPStatus.NOT_FOUND, b"404 page not found\n", "text/plain; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        # No request body is read: one sent would be taken for the next request, so close after.
        if self.headers.get("Content-Length", "0") != "0" or "chunked" in self.headers.get("Transfer-Encoding", ""):
            self.close_connection = True
        if urlsplit(self.path).path != "/-/reload":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"405 method not allowed\n", "text/plain; charset=utf-8")
            return
        if not self._authorized():
            return
        reload = self.server.reload
        error = reload() if reload is not None else "reloading is not enabled"
        if error is None:
            self._send(HTTPStatus.OK, b"OK\n", "text/plain; charset=utf-8")
        else:  # as blackbox_exporter answers
            body = f"failed to reload config: {error}\n".encode()
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, body, "text/plain; charset=utf-8")

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

    def _send_metrics(self, body: bytes, content_type: str, runtime: bytes) -> None:
        """The (cached) exposition followed by the runtime metrics, gzipped if the client takes it."""
        compress = "gzip" in self.headers.get("Accept-Encoding", "")
        if compress:
            parts: tuple[bytes | memoryview, ...] = self.server.gzipped(body, runtime)
        else:
            parts = (without_eof(body), runtime)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(len(part) for part in parts)))
        if compress:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        for part in parts:
            self.wfile.write(part)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, compress: bool = False) -> None:
        if compress and "gzip" in self.headers.get("Accept-Encoding", ""):
            body = b"".join(self.server.gzipped(body))
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


# In the manner of exporter-toolkit's landing page (web/landing_page.css).
_CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, sans-serif; margin: 0; }
header { background-color: #e6522c; color: #fff; font-size: 1rem; padding: 1rem; }
header h1 { margin: 0; font-size: 1.5rem; }
main { padding: 1rem; }
.banner { background: #fff3cd; border: 1px solid #e0b000; padding: .5rem 1rem; margin-bottom: 1rem; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; vertical-align: top; }
.up { color: #1a7f37; font-weight: bold; }
.failing { color: #c62828; font-weight: bold; }
footer { padding: 1rem; color: #555; font-size: .9rem; }
"""
DOCS_URL = "https://docs.skillable.com/returns-information-about-all-lab-instance-results-that-have-recently-started-or-ended-1"


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp)) if timestamp else "never"


def _account_row(status: AccountStatus) -> str:
    """One account: up, failing since when and why, or not polled yet; its window and interval."""
    if status.up:
        state = '<span class="up">up</span>'
    elif status.failure is not None:
        failure = status.failure
        state = (f'<span class="failing">failing</span> since {_when(failure.since)}: '
                 f"<code>{html.escape(failure.reason)}</code> ({html.escape(failure.error)})")
    else:
        state = "not polled yet (the first scrape of /metrics polls)"
    interval = f"{status.min_poll_interval:g} s" if status.min_poll_interval else "every scrape"
    cells = (html.escape(status.name or "default"), state, _when(status.last_success),
             f"{status.window_minutes} min", interval)
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def landing_page(app: ExporterApp, telemetry_path: str = "/metrics") -> str:
    """The page at /: name, version, links, and each account's polling as last seen. Read from
    memory only: it never calls the API (and never shows a key: errors are redacted at the source)."""
    info = build_info()
    statuses = app.status()
    probe_links = "".join(
        f'<li><a href="probe?account={html.escape(s.name)}">probe?account={html.escape(s.name)}</a>: '
        f"the metrics of account {html.escape(s.name)} alone</li>"
        for s in statuses
        if s.name
    )
    banner = (
        '<p class="banner" id="demo-banner"><strong>Demo mode:</strong> these metrics come from a built-in '
        "simulation of the Skillable API, not from a Skillable account.</p>"
        if app.config.demo else ""
    )
    version = (f"version={html.escape(info.version)}, branch={html.escape(info.branch)}, "
               f"revision={html.escape(info.revision)}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Skillable Exporter</title><style>{_CSS}</style></head>
<body>
<header><h1>Skillable Exporter</h1></header>
<main>
{banner}<p id="description">Prometheus exporter for Skillable (Lab on Demand) lab results.</p>
<p id="version">Version: ({version})</p>
<ul>
<li><a href="{html.escape(telemetry_path.lstrip("/"))}">Metrics</a>: every account's metrics (polls the API when a poll is due)</li>
{probe_links}<li><a href="healthz">healthz</a>: liveness, never calls the API</li>
<li><a href="{DOCS_URL}">Skillable LatestResults API</a>: the data behind the metrics</li>
<li>Documentation: README.md and docs/ of the exporter's source (configuration, metrics, failure modes)</li>
</ul>
<h2>Accounts</h2>
<table id="accounts"><tr><th>account</th><th>status</th><th>last success</th><th>window</th><th>min poll interval</th></tr>
{"".join(_account_row(s) for s in statuses)}
</table>
<p>Polls happen when Prometheus scrapes /metrics; this page does not poll.</p>
</main>
<footer>skillable-exporter {html.escape(info.version)}</footer>
</body></html>
"""
