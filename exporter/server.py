"""The HTTP endpoint: /metrics, /probe, /healthz, POST /-/reload, a landing page, 404 elsewhere.

Served by aiohttp's low-level server (aiohttp.web.Server, the protocol factory of
asyncio's loop.create_server) on one event loop for every listener and every connection; TLS and
basic auth come from a web config file (see webconfig.py).

What a client gets to use, and for how long:
- Request framing (request line, headers, Content-Length, Transfer-Encoding, pipelining) is the
  HTTP parser's, aiohttp's C one (llhttp), by RFC 9112; nothing here reads a header to find
  where a request ends. A request it refuses is answered 400 and its connection closed.
- A connection costs no thread. An idle or slow one holds a socket and a few kB; one whose
  client does not read holds about 128 kB: answers go out in 64 kB pieces, each once the client
  has taken all but 64 kB of the ones before (_write_body).
- A head is at most MAX_HEADERS headers of MAX_FIELD_BYTES each; aiohttp parses at most 32
  pipelined requests ahead of the one being answered, then stops reading. A connection that has
  sent more than MAX_AHEAD_BYTES since its last request was taken (a huge head, a pile of
  pipelined requests behind a stalled answer, a body nobody asked for) is closed: what the parser
  holds for one connection stays under that.
- IDLE_TIMEOUT_SECONDS after its accept or its last answer, a connection without a whole new
  request is closed; bytes trickling in do not reset that clock (a slow head is cut as an idle
  connection is). A TLS handshake has HANDSHAKE_TIMEOUT_SECONDS.
- Every answer is written within WRITE_TIMEOUT_SECONDS, or its connection is aborted: a client
  that does not read (a slow reader, a pipelining flood) loses its connection, nothing else.
  A connection being closed (after aiohttp's own 400, say) whose peer takes no more bytes is
  aborted CLOSE_GRACE_SECONDS on.
- At most Connections.limit connections are open; a new one past that closes the one idle the
  longest (waiting for a request: an idle or slow-header flood's), never one being answered.
- Blocking work (waiting for a poll, rendering, gzip, the landing page, a reload) runs in a pool
  of WORKERS threads (workers.py), never on the loop; bcrypt in a pool of its own, one check at a
  time, a check waiting at most BCRYPT_QUEUE_SECONDS (then 401), as exporter-toolkit does.

Single flight is judged by when a scrape arrived (Poller.request): a connection's first request
by its accept, a later one by the first bytes received after the previous request was taken.
"""

from __future__ import annotations

import asyncio
import html
import logging
import resource
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Any
from collections.abc import Callable
from urllib.parse import SplitResult, parse_qs, urlsplit

from aiohttp import web as aioweb

from .app import DEFAULT_ACCOUNT_NAME, AccountStatus, ExporterApp, ReloadStatus
from .collector import without_eof
from .config import ConfigError
from .listeners import bind
from .version import build_info
from .webconfig import BCRYPT_QUEUE_SECONDS, SETTING as WEB_SETTING, WebConfig, handshake_changes
from .workers import NoWorker, Workers

log = logging.getLogger(__name__)

IDLE_TIMEOUT_SECONDS = 30.0  # no whole request this long after the accept or the last answer: closed
WRITE_TIMEOUT_SECONDS = 30.0  # an answer not taken by the client within this: connection aborted
HANDSHAKE_TIMEOUT_SECONDS = 10.0
TLS_SHUTDOWN_SECONDS = 5.0
CLOSE_GRACE_SECONDS = 5.0  # a closing connection whose peer takes nothing more: aborted after this
LINGER_SECONDS = 2.0  # after answering, a request body nobody asked for is read and dropped this long
SHUTDOWN_SECONDS = 2.0  # at SIGTERM, answers under way get this long to finish
MAX_CONNECTIONS = 1000  # open connections, all listeners together (fewer if the open-file limit is low)
FDS_KEPT = 64  # file descriptors kept back from connections: listeners, the API, the state file
MAX_HEADERS, MAX_FIELD_BYTES, MAX_LINE_BYTES = 32, 8190, 8190  # a request head's limits
MAX_AHEAD_BYTES = 128 * 1024  # sent by a client and not yet taken by a request being answered
WORKERS = 16  # threads for blocking work: scrapes waiting for a poll wait here
SWEEP_SECONDS = 1.0
CHUNK_BYTES = 64 * 1024  # a large answer is written in pieces of this size (see _write_body)
TEXT = "text/plain; charset=utf-8"


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one, as Go's runtime does for every Go exporter:
    each connection is a file descriptor, and a soft limit of 1024 is the common default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass


def connection_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft - FDS_KEPT))


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's protocol for it inside, and what the limits need to know
    (whether a request is being answered, when the next one arrived, when it began closing)."""

    def __init__(self, inner: asyncio.Protocol, connections: Connections) -> None:
        self.inner = inner
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.closing_since: float | None = None
        self._arrival: float | None = connections.clock()  # the accept: its first request's arrival
        self._ahead = 0  # bytes received since a request was last taken
        self._admitted = False

    def take_arrival(self) -> float:
        """When the request now being answered arrived (see the module docstring)."""
        arrival, self._arrival = self._arrival, None
        self._ahead = 0
        return arrival if arrival is not None else self.connections.clock()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.connections.admit(self):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._admitted = True
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return
        self._ahead += len(data)
        if self._ahead > MAX_AHEAD_BYTES:
            log.debug("connection closed: too much sent ahead of its answers", extra={"bytes": self._ahead})
            assert self.transport is not None
            self.transport.abort()  # its connection_lost follows, as for any other
            return
        if self._arrival is None:
            self._arrival = self.connections.clock()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self._admitted else None

    def pause_writing(self) -> None:
        if self._admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._admitted:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self.connections.release(self)
            self.inner.connection_lost(exc)


class Connections:
    """The open connections of every listener, bounded (see the module docstring). Loop-only."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        """`clock`: the app's monotonic clock, which arrivals are stamped with."""
        self.limit = limit
        self.clock = clock
        self._open: dict[_Connection, None] = {}  # least recently changed first
        self._by_transport: dict[asyncio.BaseTransport, _Connection] = {}

    def admit(self, connection: _Connection) -> bool:
        """Make room for a new connection if needed. False if every open connection is busy."""
        if len(self._open) >= self.limit and not self._close_longest_idle():
            log.debug("connection refused: every connection is busy", extra={"open": len(self._open)})
            return False
        self._open[connection] = None
        assert connection.transport is not None
        self._by_transport[connection.transport] = connection
        return True

    def _close_longest_idle(self) -> bool:
        for connection in self._open:
            transport = connection.transport
            if not connection.busy and transport is not None and not transport.is_closing():
                transport.abort()  # its connection_lost releases it
                return True
        return False

    def of(self, transport: asyncio.BaseTransport | None) -> _Connection | None:
        return self._by_transport.get(transport) if transport is not None else None

    def mark(self, connection: _Connection, busy: bool) -> None:
        """A request is being answered (busy) or the connection waits for the next (idle)."""
        if connection in self._open:
            del self._open[connection]  # re-inserted last: the newest idle is closed last
            self._open[connection] = None
        connection.busy = busy

    def release(self, connection: _Connection) -> None:
        self._open.pop(connection, None)
        self._by_transport.pop(connection.transport, None)  # type: ignore[arg-type]

    def close_idle(self) -> None:
        """At stop: the connections waiting for a request go at once (no TLS goodbye to wait for)."""
        for connection in list(self._open):
            if not connection.busy and connection.transport is not None:
                connection.transport.abort()

    def sweep(self, now: float) -> None:
        """Abort the connections that have been closing for CLOSE_GRACE_SECONDS (`now`: time.monotonic)."""
        for connection in list(self._open):
            transport = connection.transport
            if transport is None or not transport.is_closing():
                continue
            if connection.closing_since is None:
                connection.closing_since = now
            elif now - connection.closing_since >= CLOSE_GRACE_SECONDS:
                transport.abort()

    def __len__(self) -> int:
        return len(self._open)


class _ClientErrorLog(logging.LoggerAdapter):
    """aiohttp's server log. What it logs as an exception is a request its parser refused or a
    connection that failed: the client's problem, one debug line with the error, no traceback."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **_kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        self.logger.debug(msg, *args, extra={"err": str(error)})


def _loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's errors: a connection's (a reset, a failed handshake) at debug, anything
    else (no file descriptor left for accept) as one warning; never a traceback."""
    error = context.get("exception")
    fields = {"err": str(error) if error is not None else "", "detail": str(context.get("message", ""))}
    if isinstance(error, (ConnectionError, ssl.SSLError, TimeoutError)):
        log.debug("connection failed", extra=fields)
    else:
        log.warning("event loop error", extra=fields)


@dataclass
class Answer:
    status: int
    parts: tuple[bytes | memoryview, ...]  # the body, in pieces (a cached exposition is not copied)
    content_type: str = TEXT
    gzip: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def _text(status: HTTPStatus, body: bytes) -> Answer:
    return Answer(int(status), (body,))


UNAUTHORIZED = Answer(int(HTTPStatus.UNAUTHORIZED), (b"Unauthorized\n",),
                      headers={"WWW-Authenticate": 'Basic realm="skillable-exporter"'})


class ExporterServer:
    """The exporter's HTTP server on `address`, or on `sockets` (listening, e.g. systemd's).

    In a program: `await start()`, then `await stop()`, on the caller's event loop. In a thread
    of its own (tests): serve_forever(), then shutdown() and server_close() from another thread.
    """

    def __init__(
        self, address: tuple[str, int] | None, app: ExporterApp, web: WebConfig | None = None, *,
        sockets: list[socket.socket] | None = None, telemetry_path: str = "/metrics",
        idle_timeout: float = IDLE_TIMEOUT_SECONDS, write_timeout: float = WRITE_TIMEOUT_SECONDS,
        max_connections: int | None = None,
    ) -> None:
        self.app = app
        self.web = web
        self.telemetry_path = telemetry_path
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        # POST /-/reload calls this (set by the CLI); it returns None or why the reload was refused.
        self.reload: Callable[[], str | None] | None = None
        if sockets is None:
            assert address is not None
            sockets = [bind(address)]
        self.sockets = sockets
        self.connections = Connections(max_connections or connection_limit(), app.monotonic)
        self.workers = Workers("http-work", WORKERS)
        self._bcrypt = Workers("bcrypt", 1)
        self._bcrypt_turn: asyncio.Lock | None = None
        self._tls = web.ssl_context if web is not None else None
        if self._tls is not None:
            # Every handshake runs this callback (with or without SNI), which hands the connection
            # the newest context: a reload swaps certificates without a new listening socket.
            self._tls.sni_callback = self._current_tls_context
        self._http: aioweb.Server | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None
        self._shutdown_asked = threading.Event()
        self._stopped = threading.Event()
        self._serving_forever = False

    # -- serving -------------------------------------------------------------

    async def start(self) -> None:
        """Serve every socket, from the running loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        loop.set_exception_handler(_loop_error)
        self._bcrypt_turn = asyncio.Lock()
        self.workers.start(1)  # at least one thread, whatever a task limit says later
        self._http = aioweb.Server(
            self._handle, access_log=None, logger=_ClientErrorLog(log, {}), keepalive_timeout=self.idle_timeout,
            max_line_size=MAX_LINE_BYTES, max_field_size=MAX_FIELD_BYTES, max_headers=MAX_HEADERS,
            lingering_time=LINGER_SECONDS,
        )
        tls: dict[str, Any] = {}
        if self._tls is not None:
            tls = {"ssl": self._tls, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT_SECONDS,
                   "ssl_shutdown_timeout": TLS_SHUTDOWN_SECONDS}
        for sock in self.sockets:
            self._listeners.append(await loop.create_server(self._protocol, sock=sock, **tls))
        self._sweeper = loop.create_task(self._sweep())

    def _protocol(self) -> asyncio.Protocol:
        assert self._http is not None
        return _Connection(self._http(), self.connections)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            self.connections.sweep(time.monotonic())

    async def stop(self) -> None:
        """Stop listening, give answers under way SHUTDOWN_SECONDS, close every connection."""
        for listener in self._listeners:
            listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.connections.close_idle()  # aiohttp's shutdown would wait its whole timeout for their next request
        if self._http is not None:
            await self._http.shutdown(SHUTDOWN_SECONDS)
        for listener in self._listeners:
            await listener.wait_closed()
        self.workers.close()
        self._bcrypt.close()

    async def run_blocking(self, work: Callable[[], Any]) -> Any:
        """`work()` in a worker thread (a reload on SIGHUP)."""
        return await self.workers.run(work)

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve in this thread until shutdown() is called from another."""
        self._serving_forever = True
        try:
            asyncio.run(self._serve_until_shutdown())
        finally:
            self._stopped.set()

    async def _serve_until_shutdown(self) -> None:
        self._stop_requested = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        await self.start()
        if not self._shutdown_asked.is_set():
            await self._stop_requested.wait()
        await self.stop()

    def shutdown(self) -> None:
        """Make serve_forever() return, and wait until it has."""
        self._shutdown_asked.set()
        loop, event = self._loop, self._stop_requested
        if loop is not None and event is not None:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop has ended already
                pass
        if self._serving_forever:
            self._stopped.wait(SHUTDOWN_SECONDS + 10)

    def server_close(self) -> None:
        for sock in self.sockets:
            sock.close()

    @property
    def server_address(self) -> Any:
        return self.sockets[0].getsockname()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    # -- the web config --------------------------------------------------------

    def _current_tls_context(self, sock: ssl.SSLObject, _name: str | None, context: ssl.SSLContext) -> None:
        current = self.web.ssl_context if self.web is not None else None
        if current is not None and current is not context:
            sock.context = current

    def check_web(self, web: WebConfig | None) -> None:
        """A reloaded web config may change users, headers, the certificate, its key and the client
        CA; whether TLS is on, and how a handshake is made, need a restart (handshake_changes)."""
        was_tls = self.web is not None and self.web.ssl_context is not None
        if was_tls != (web is not None and web.ssl_context is not None):
            raise ConfigError(WEB_SETTING, "turning TLS on or off needs a restart")
        changed = handshake_changes(self.web, web)
        if changed:
            names = ", ".join(f"tls_server_config.{name}" for name in changed)
            raise ConfigError(f"{WEB_SETTING}: {names}", "changing it needs a restart (needs_restart): "
                              "a running listener keeps its handshake settings")

    def set_web(self, web: WebConfig | None) -> None:
        self.web = web

    def gzipped(self, body: bytes, tail: bytes | None = None) -> tuple[bytes, bytes]:
        """gzip of `body` (then `tail`), in two pieces: an exposition's is kept with it in the one
        exposition cache (collector.py), so it is compressed once, not once per scrape."""
        return self.app.gzipped(body, tail)

    # -- requests --------------------------------------------------------------

    async def _handle(self, request: aioweb.BaseRequest) -> aioweb.StreamResponse:
        connection = self.connections.of(request.transport)
        arrived = connection.take_arrival() if connection is not None else self.app.monotonic()
        if connection is not None:
            self.connections.mark(connection, busy=True)
        try:
            try:
                answer = await self._answer(request, arrived)
            except NoWorker:  # only at a task limit that left no thread at all
                answer = _text(HTTPStatus.SERVICE_UNAVAILABLE, b"no worker thread could be started\n")
            except Exception:
                log.error("bug: answering a request failed", exc_info=True)
                answer = _text(HTTPStatus.INTERNAL_SERVER_ERROR, b"500 internal server error\n")
            return await self._send(request, answer)
        finally:
            if connection is not None:
                self.connections.mark(connection, busy=False)

    async def _answer(self, request: aioweb.BaseRequest, arrived: float) -> Answer:
        url = urlsplit(request.raw_path)
        if request.method == "GET":
            return await self._get(request, url, arrived)
        if request.method == "POST":
            return await self._post(request, url.path)
        if request.method == "HEAD":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, b"")
        return _text(HTTPStatus.NOT_IMPLEMENTED, b"501 method not implemented\n")

    async def _get(self, request: aioweb.BaseRequest, url: SplitResult, arrived: float) -> Answer:
        if url.path == "/healthz":
            # Liveness only: never touches the API, and needs no credentials so probes stay simple.
            return _text(HTTPStatus.OK, b"OK\n")
        if not await self._authorized(request):
            return UNAUTHORIZED
        headers = request.headers
        accept = headers.get("Accept", "")
        scrape_timeout = headers.get("X-Prometheus-Scrape-Timeout-Seconds")
        gzip = "gzip" in headers.get("Accept-Encoding", "")
        if url.path == self.telemetry_path:
            return await self.workers.run(partial(self._metrics, accept, scrape_timeout, arrived, gzip))
        if url.path == "/probe":
            account = parse_qs(url.query).get("account", [""])[0]
            return await self.workers.run(partial(self._probe, account, accept, scrape_timeout, arrived, gzip))
        if url.path == "/":
            page = await self.workers.run(partial(landing_page, self.app, self.telemetry_path))
            return Answer(int(HTTPStatus.OK), (page.encode(),), "text/html; charset=utf-8")
        if url.path == "/-/reload":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, b"This endpoint requires a POST request.\n")
        return _text(HTTPStatus.NOT_FOUND, b"404 page not found\n")

    def _metrics(self, accept: str, scrape_timeout: str | None, arrived: float, gzip: bool) -> Answer:
        """The (cached) exposition followed by the runtime metrics, gzipped if the client takes it."""
        body, content_type = self.app.metrics(accept, scrape_timeout, arrived)
        runtime = self.app.runtime_metrics(accept)
        parts = self.gzipped(body, runtime) if gzip else (without_eof(body), runtime)
        return Answer(int(HTTPStatus.OK), parts, content_type, gzip)

    def _probe(self, account: str, accept: str, scrape_timeout: str | None, arrived: float, gzip: bool) -> Answer:
        answer = self.app.probe(account, accept, scrape_timeout, arrived)
        if answer is None:
            return _text(HTTPStatus.BAD_REQUEST, unknown_account(account, list(self.app.pollers)).encode())
        body, content_type = answer
        return Answer(int(HTTPStatus.OK), self.gzipped(body) if gzip else (body,), content_type, gzip)

    async def _post(self, request: aioweb.BaseRequest, path: str) -> Answer:
        if path != "/-/reload":
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, b"405 method not allowed\n")
        if not await self._authorized(request):
            return UNAUTHORIZED
        reload = self.reload
        error = await self.workers.run(reload) if reload is not None else "reloading is not enabled"
        if error is None:
            return _text(HTTPStatus.OK, b"OK\n")
        # as blackbox_exporter answers
        return _text(HTTPStatus.INTERNAL_SERVER_ERROR, f"failed to reload config: {error}\n".encode())

    async def _authorized(self, request: aioweb.BaseRequest) -> bool:
        """Basic auth: decided on the loop when no bcrypt is needed, else one bcrypt check at a time
        in its own thread, waiting at most BCRYPT_QUEUE_SECONDS for its turn (then refused)."""
        web_config = self.web
        if web_config is None:
            return True
        header = request.headers.get("Authorization")
        verdict = web_config.authorization_without_bcrypt(header)
        if verdict is not None:
            return verdict
        assert self._bcrypt_turn is not None
        try:
            await asyncio.wait_for(self._bcrypt_turn.acquire(), BCRYPT_QUEUE_SECONDS)
        except TimeoutError:
            return False
        try:
            return await self._bcrypt.run(partial(web_config.check_authorization, header))
        finally:
            self._bcrypt_turn.release()

    @staticmethod
    async def _write_body(request: aioweb.BaseRequest, response: aioweb.StreamResponse,
                          parts: tuple[bytes | memoryview, ...]) -> None:
        """A small body in one write (the head leaves with it, in one send). A large one in pieces of
        CHUNK_BYTES, each written once the client has taken all but 64 kB of the ones before: asyncio
        copies what the socket does not take at once, so a client that does not read holds one piece,
        never a copy of a whole exposition (the pieces are views of the cached one)."""
        if sum(len(part) for part in parts) <= CHUNK_BYTES:
            await response.write_eof(b"".join(parts))  # a copy of at most CHUNK_BYTES
            return
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), CHUNK_BYTES):
                await response.write(view[start:start + CHUNK_BYTES])
                await request.writer.drain()
        await response.write_eof()

    async def _send(self, request: aioweb.BaseRequest, answer: Answer) -> aioweb.StreamResponse:
        """Write `answer` within the write deadline, or abort the connection."""
        headers = {"Content-Type": answer.content_type, "Content-Length": str(sum(len(p) for p in answer.parts))}
        if answer.gzip:
            headers["Content-Encoding"] = "gzip"
        headers.update(answer.headers)
        if self.web is not None:
            headers.update(self.web.headers)  # http_server_config.headers, on every answer
        response = aioweb.StreamResponse(status=answer.status, headers=headers)
        try:
            async with asyncio.timeout(self.write_timeout):
                await response.prepare(request)
                await self._write_body(request, response, answer.parts)
        except TimeoutError:
            log.debug("answer not taken within the write deadline: connection aborted",
                      extra={"peer": request.remote or "?", "seconds": self.write_timeout})
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:  # the client went away; aiohttp ends the connection
            pass
        return response


MAX_NAMED_ACCOUNTS = 20  # a /probe refusal names this many accounts at most: a config may have hundreds
MAX_ECHOED_CHARS = 64  # of the account asked for, in a /probe refusal


def unknown_account(asked: str, names: list[str]) -> str:
    """/probe's 400 body: the account asked for (cut short, one line) and the valid names, sorted and
    bounded. Names only, and only to a client that passed basic auth, like the landing page's list."""
    valid = sorted(name or DEFAULT_ACCOUNT_NAME for name in names)
    listed = ", ".join(valid[:MAX_NAMED_ACCOUNTS])
    if len(valid) > MAX_NAMED_ACCOUNTS:
        listed += f" and {len(valid) - MAX_NAMED_ACCOUNTS} more (the landing page lists every account)"
    if not asked:
        return f"missing ?account=NAME; the accounts are: {listed}\n"
    shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in asked[:MAX_ECHOED_CHARS])
    more = "..." if len(asked) > MAX_ECHOED_CHARS else ""
    return f"unknown account \"{shown}{more}\"; the accounts are: {listed}\n"


# In the manner of exporter-toolkit's landing page (web/landing_page.css).
_CSS = """
body { font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, sans-serif; margin: 0; }
header { background-color: #e6522c; color: #fff; font-size: 1rem; padding: 1rem; }
header h1 { margin: 0; font-size: 1.5rem; }
main { padding: 1rem; }
.banner { background: #fff3cd; border: 1px solid #e0b000; padding: .5rem 1rem; margin-bottom: 1rem; }
.refused { background: #fdecea; border-color: #c62828; }
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


def _reload_banner(status: ReloadStatus) -> str:
    """A refused reload, at the top of the page until a reload succeeds: when, why, and what still runs."""
    if status.refused_at is None:
        return ""
    return ('<p class="banner refused" id="reload-refused"><strong>Configuration reload refused</strong> at '
            f"{_when(status.refused_at)}: <code>{html.escape(status.refused_reason or '')}</code>. The exporter "
            f"keeps running the configuration loaded at {_when(status.loaded_at)}; fix the file and reload again "
            "(skillable_exporter_config_last_reload_successful is 0 until then).</p>")


def _configuration(status: ReloadStatus) -> str:
    how = "by a reload" if status.by_reload else "at start"
    refused = f"; a reload was refused at {_when(status.refused_at)} (see above)" if status.refused_at else ""
    return (f'<p id="configuration">Configuration loaded {how}, {_when(status.loaded_at)}{refused}. '
            "SIGHUP or POST /-/reload reloads it.</p>")


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
    metrics_link = html.escape(telemetry_path.lstrip("/"))
    headings = ("account", "status", "last success", "window", "min poll interval")
    columns = "".join(f"<th>{name}</th>" for name in headings)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Skillable Exporter</title><style>{_CSS}</style></head>
<body>
<header><h1>Skillable Exporter</h1></header>
<main>
{banner}{_reload_banner(app.reload_status)}
<p id="description">Prometheus exporter for Skillable (Lab on Demand) lab results.</p>
<p id="version">Version: ({version})</p>
<ul>
<li><a href="{metrics_link}">Metrics</a>: every account's metrics (polls the API when a poll is due)</li>
{probe_links}<li><a href="healthz">healthz</a>: liveness, never calls the API</li>
<li><a href="{DOCS_URL}">Skillable LatestResults API</a>: the data behind the metrics</li>
<li>Documentation: README.md and docs/ of the exporter's source (configuration, metrics, failure modes)</li>
</ul>
<h2>Accounts</h2>
<table id="accounts"><tr>{columns}</tr>
{"".join(_account_row(s) for s in statuses)}
</table>
<p>Polls happen when Prometheus scrapes /metrics; this page does not poll.</p>
{_configuration(app.reload_status)}
</main>
<footer>skillable-exporter {html.escape(info.version)}</footer>
</body></html>
"""
