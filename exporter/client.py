"""HTTP client for the Skillable Lab API: one GET with a hard total deadline.

Skillable documents no HTTP error codes and no rate limits, so every kind of
answer is expected: each failure becomes an ApiError with a short `reason`
that the failure counter uses as a label (docs/failure-modes.md lists them).

`timeout` in requests bounds each socket operation, not the whole answer: a
server that trickles its headers or body one byte at a time never trips it. So
every request also has a watchdog that shuts the connection's socket down at
the deadline, which makes the blocked read return at once.
"""

from __future__ import annotations

import email.utils
import functools
import heapq
import itertools
import mmap
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Mapping
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from . import __version__

CHUNK_BYTES = 1024 * 1024
POPULATE_BYTES = 4 * 1024 * 1024  # a body of announced length from this size is read into a populated mapping
CONNECT_TIMEOUT_CAP = 5.0

# The bounded set of failure reasons the client raises (the poller adds a few).
CONNECT_TIMEOUT = "connect_timeout"  # no TCP connection within the connect timeout
CONNECT_ERROR = "connect_error"  # refused, name not resolved, TLS handshake or certificate refused
TIMEOUT = "timeout"  # connected, but the whole answer did not arrive before the deadline
CONNECTION_RESET = "connection_reset"  # the connection was reset or closed before the whole answer
UNAUTHORIZED = "unauthorized"  # HTTP 401 or 403: the API key was refused
RATE_LIMITED = "rate_limited"  # HTTP 429
HTTP_ERROR = "http_error"  # any other status but 200 (5xx, 404, a redirect)
TOO_LARGE = "too_large"  # the body exceeds --skillable.max-response-bytes
INVALID_RESPONSE = "invalid_response"  # the body cannot be read as what it claims to be


class ApiError(Exception):
    """A failed API call. `reason` is a bounded label value; the message never holds the key."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class Response:
    body: bytes
    status: int


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


# -- the deadline watchdog ---------------------------------------------------

_current = threading.local()  # the _Deadline of the request this thread is making


class _Watchdog:
    """One long-lived thread that fires every request's deadline: a request starts no thread of
    its own, so polling goes on in a process at its task limit."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._count = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="deadline-watchdog", daemon=True)
                thread.start()
                self._thread = thread

    def add(self, when: float, deadline: _Deadline) -> None:
        self.start()
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._count), deadline))
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._lock.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, deadline = heapq.heappop(self._heap)
            deadline.fire()


_WATCHDOG = _Watchdog()


class _Deadline:
    """Shuts down the socket of the connection a request uses once the deadline passes."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._connection: HTTPConnection | None = None
        self.fired = False
        self._done = False
        self._seconds = max(0.0, seconds)

    def __enter__(self) -> _Deadline:
        _current.deadline = self
        _WATCHDOG.add(time.monotonic() + self._seconds, self)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True  # a later fire() finds nothing to do
            self._connection = None
        _current.deadline = None

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            self._connection = connection
            fired = self.fired
        if fired:
            _shutdown(connection)

    def fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            connection = self._connection
        if connection is not None:
            _shutdown(connection)


def _shutdown(connection: HTTPConnection) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _attach(connection: HTTPConnection) -> None:
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(connection)


class _WatchedHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _attach(self)

    def request(self, *args: Any, **kwargs: Any) -> None:  # a reused keep-alive connection
        _attach(self)
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _attach(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter with connections the deadline watchdog can find, direct or through a proxy."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


# -- the client --------------------------------------------------------------


class SkillableClient:
    def __init__(self, base_url: str, api_key: str, max_response_bytes: int) -> None:
        self._base_url = base_url.rstrip("/")
        self._host = urlsplit(self._base_url).netloc.rpartition("@")[2]  # for error messages: never userinfo
        self._api_key = api_key
        self._max_bytes = max_response_bytes
        _WATCHDOG.start()  # with the client, at start-up: a request never starts a thread
        self._session = requests.Session()
        adapter = _WatchedAdapter()
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["User-Agent"] = f"skillable-exporter/{__version__}"
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"SkillableClient({self._base_url!r})"

    @property
    def base_url(self) -> str:
        """The API URL polled (no trailing slash); the state file records it, never the key."""
        return self._base_url

    def close(self) -> None:
        self._session.close()

    def redact(self, text: str) -> str:
        """`text` with the API key blanked out, for anything that reaches a log or a metric."""
        return text.replace(self._api_key, "<redacted>") if self._api_key else text

    def get(self, endpoint: str, params: Mapping[str, int | str] | None, timeout: float,
            max_bytes: int | None = None) -> bytes:
        """GET <base>/<endpoint> and return the body of a 200 answer, within `timeout` seconds in total.
        `max_bytes` replaces the client's body cap for this call (the catalog has its own)."""
        deadline = time.monotonic() + timeout
        try:
            with _Deadline(timeout) as watchdog:
                return self._get(endpoint, params, deadline, watchdog, max_bytes or self._max_bytes)
        except ApiError as exc:
            raise ApiError(exc.reason, self.redact(str(exc)), exc.retry_after) from None

    def _get(
        self, endpoint: str, params: Mapping[str, int | str] | None, deadline: float, watchdog: _Deadline,
        max_bytes: int
    ) -> bytes:
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            response = self._session.get(
                f"{self._base_url}/{endpoint}",
                params=params,
                headers={"api_key": self._api_key},
                timeout=(min(remaining, CONNECT_TIMEOUT_CAP), remaining),
                stream=True,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise _request_error(endpoint, exc, watchdog.fired, "no answer", self._host) from None
        with response:
            self._check_status(endpoint, response)
            return self._read_body(endpoint, response, deadline, watchdog, max_bytes)

    def _check_status(self, endpoint: str, response: requests.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if status in (401, 403):
            raise ApiError(UNAUTHORIZED, f"{endpoint}: HTTP {status}: the API key was refused")
        if status == 429:
            raise ApiError(RATE_LIMITED, f"{endpoint}: HTTP 429 Too Many Requests", retry_after)
        raise ApiError(HTTP_ERROR, f"{endpoint}: HTTP {status}", retry_after)

    def _read_body(
        self, endpoint: str, response: requests.Response, deadline: float, watchdog: _Deadline, max_bytes: int
    ) -> bytes:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise ApiError(TOO_LARGE, f"{endpoint}: body of {length} bytes exceeds the limit of {max_bytes}")
        encoding = response.headers.get("Content-Encoding", "").strip().lower()
        if length.isdigit() and encoding in ("", "identity"):
            return self._read_into(endpoint, response, int(length), deadline, watchdog)
        chunks: list[bytes] = []
        size = 0
        try:
            # Decoded (gunzipped) bytes are counted, so a compressed bomb stops at the cap too.
            for chunk in response.iter_content(CHUNK_BYTES):
                size += len(chunk)
                if size > max_bytes:
                    raise ApiError(TOO_LARGE, f"{endpoint}: body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    break
        except requests.RequestException as exc:
            raise _request_error(endpoint, exc, watchdog.fired, "body cut off", self._host) from None
        _check_deadline(endpoint, size, deadline, watchdog)
        return b"".join(chunks)

    def _read_into(
        self, endpoint: str, response: requests.Response, length: int, deadline: float, watchdog: _Deadline
    ) -> bytes:
        """A body of announced length (already checked against the cap), not compressed: read
        straight into one buffer of that length. Joining chunks held the body twice at the peak
        and, with the pages that costs, took half again as long for a 50 MB answer (measured)."""
        buffer = _body_buffer(length)
        view = memoryview(buffer)
        got = 0
        try:
            while got < length:
                n = response.raw.readinto(view[got:got + CHUNK_BYTES])
                if not n:
                    break
                got += n
                if time.monotonic() > deadline:
                    break
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # As _request_error maps them on the chunked path: a socket read timeout is a timeout too.
            if watchdog.fired or time.monotonic() > deadline or isinstance(exc, urllib3.exceptions.ReadTimeoutError):
                raise ApiError(TIMEOUT, f"{endpoint}: body cut off: the deadline passed") from None
            raise ApiError(CONNECTION_RESET, f"{endpoint}: body cut off: connection reset or closed "
                                             f"({type(exc).__name__})") from None
        finally:
            view.release()
        _check_deadline(endpoint, got, deadline, watchdog)
        if got < length:
            raise ApiError(CONNECTION_RESET, f"{endpoint}: body cut off: connection closed after {got} of "
                                             f"{length} bytes")
        # A bytearray, or an mmap (_body_buffer): the decoders take any buffer, and where they need bytes
        # (a repair, an error message) they copy it first (model.py).
        return buffer  # type: ignore[return-value]


def _body_buffer(length: int) -> bytearray | mmap.mmap:
    """A zeroed, writable buffer of `length` bytes for a body. From POPULATE_BYTES on (Linux), an anonymous
    mapping: a bytearray's pages are faulted in one at a time as it is zeroed, and page faults are dear on a
    virtual machine. Where transparent huge pages may be asked for (_huge_pages_advised), the mapping asks for
    them, so a 50 MB body faults 25 times instead of 12,000; else the kernel maps its pages in one call
    (MAP_POPULATE). A 50 MB body read over loopback, medians of 15 reads each taking turns in-process: 52.6 ms
    into a bytearray, 44.6 ms populated, 30.0 ms on huge pages. Where the kernel's THP defrag setting lets a
    fault compact memory for a huge page, a fragmented host may make that fault wait; it falls back to small
    pages when none can be had."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if length < POPULATE_BYTES or not populate:
        return bytearray(length)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    try:
        if _huge_pages_advised():
            buffer = mmap.mmap(-1, length, flags=flags)
            buffer.madvise(mmap.MADV_HUGEPAGE)
            return buffer
        return mmap.mmap(-1, length, flags=flags | populate)
    except OSError:  # no mapping to be had (a limit on them): the buffer then comes from the allocator
        return bytearray(length)


@functools.cache
def _huge_pages_advised() -> bool:
    """Whether a mapping gets transparent huge pages when it asks (madvise) or always: the kernel's setting,
    read once. With "never", asking does nothing and the pages would be faulted one at a time."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return hasattr(mmap, "MADV_HUGEPAGE") and ("[madvise]" in setting or "[always]" in setting)


def _check_deadline(endpoint: str, read: int, deadline: float, watchdog: _Deadline) -> None:
    """A body read to its end or cut off by the deadline: the latter is a timeout, whatever was read."""
    if watchdog.fired or time.monotonic() > deadline:
        raise ApiError(TIMEOUT, f"{endpoint}: answer not complete before the deadline ({read} body bytes read)")


def _request_error(
    endpoint: str, exc: requests.RequestException, fired: bool, what: str, host: str = "?"
) -> ApiError:
    """Map what requests raised to a failure reason; connect failures name the host and the cause."""
    name = type(exc).__name__
    cause = _root_cause(exc)
    if isinstance(exc, requests.ConnectTimeout):
        return ApiError(CONNECT_TIMEOUT, f"{endpoint}: no connection within the connect timeout")
    if isinstance(cause, urllib3.exceptions.NewConnectionError):
        # A refused connect or a failed name lookup (NameResolutionError), also one that hung past the deadline.
        return ApiError(CONNECT_ERROR, f"{endpoint}: cannot connect to {host}: {_os_error(cause)}")
    if fired or isinstance(exc, requests.Timeout) or isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        # Checked before SSLError: the watchdog shutting a TLS connection down surfaces as one.
        return ApiError(TIMEOUT, f"{endpoint}: {what}: the deadline passed")
    if isinstance(exc, requests.exceptions.SSLError):
        detail = _os_error(cause) if cause is not None else name
        return ApiError(CONNECT_ERROR, f"{endpoint}: TLS with {host} failed: {detail}")
    if isinstance(exc, requests.exceptions.ContentDecodingError):
        return ApiError(INVALID_RESPONSE, f"{endpoint}: {what}: body does not match its Content-Encoding")
    detail = f"{name}: {type(cause).__name__}" if cause is not None else name
    return ApiError(CONNECTION_RESET, f"{endpoint}: {what}: connection reset or closed ({detail})")


def _os_error(cause: BaseException) -> str:
    """The socket, DNS or TLS error under a urllib3 error ("[Errno 111] Connection refused"),
    else the urllib3 error's class name: never the object's repr with its addresses."""
    inner: BaseException | None = cause
    while inner is not None and not isinstance(inner, OSError | ssl.SSLError):
        inner = inner.__cause__ or inner.__context__
    if isinstance(inner, ssl.SSLError):
        return f"{type(inner).__name__}: {inner.reason or inner}"
    if isinstance(inner, OSError) and not isinstance(inner, urllib3.exceptions.HTTPError):
        return str(inner) or type(inner).__name__
    return type(cause).__name__


def _root_cause(exc: BaseException) -> BaseException | None:
    """The urllib3 error requests wrapped (MaxRetryError's reason, or the first argument)."""
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        return inner.reason
    return inner
