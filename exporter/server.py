"""The HTTP endpoint: /metrics, /probe, /healthz, a landing page, 404 elsewhere.

A plain ThreadingHTTPServer keeps the dependency list short; TLS and basic
auth come from a web config file (see webconfig.py).
"""

from __future__ import annotations

import html
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .app import ExporterApp
from .webconfig import WebConfig

log = logging.getLogger(__name__)


class ExporterServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: ExporterApp, web: WebConfig | None = None) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.app = app
        self.web = web
        super().__init__(address, Handler)
        if web is not None and web.ssl_context is not None:
            self.socket = web.ssl_context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that speaks plain HTTP to the TLS port, fails the handshake or hangs up
        # mid-answer is the client's problem: one debug line, not a traceback on stderr.
        log.debug("connection from %s failed", client_address[0] if client_address else "?", exc_info=True)

    def gzipped(self, body: bytes) -> bytes:
        """gzip of `body`. An exposition's is kept with it, in the exposition cache (collector.py)."""
        return self.app.gzipped(body)


class Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle on, the body could wait for the client's
    # delayed ACK of the headers (40 ms on Linux), which showed as the scrape latency p99.
    disable_nagle_algorithm = True
    timeout = 60  # a client that sends nothing is dropped

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlsplit(self.path)
        if url.path == "/healthz":
            # Liveness only: never touches the API, and needs no credentials so probes stay simple.
            self._send(HTTPStatus.OK, b"OK\n", "text/plain; charset=utf-8")
            return
        if not self._authorized():
            return
        if url.path == "/metrics":
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
            self._send(HTTPStatus.OK, landing_page(self.server.app).encode(), "text/html; charset=utf-8")
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


def landing_page(app: ExporterApp) -> str:
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
<ul><li><a href="metrics">metrics</a></li><li><a href="healthz">healthz</a></li>{probe_links}</ul>
<h2>Upstream</h2>
<table border="1" cellpadding="4"><tr><th>account</th><th>last poll</th><th>last success</th></tr>
{"".join(rows)}
</table>
<p>Polls happen when Prometheus scrapes /metrics; this page does not poll.</p>
</body></html>
"""
