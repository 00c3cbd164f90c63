"""HTTP client for the Skillable Lab API: one GET with a hard total deadline.

Skillable documents no HTTP error codes and no rate limits, so every kind of
answer is expected: each failure becomes an ApiError with a short `reason`
that the failure counter uses as a label.
"""

from __future__ import annotations

import email.utils
import socket
import threading
import time

import requests

from . import __version__

CHUNK_BYTES = 256 * 1024
CONNECT_TIMEOUT_CAP = 5.0


class ApiError(Exception):
    """A failed API call. `reason` is a bounded label value; the message never holds the key."""

    def __init__(self, reason: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


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


class SkillableClient:
    def __init__(self, base_url: str, api_key: str, max_response_bytes: int) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._max_bytes = max_response_bytes
        self._session = requests.Session()
        self._session.headers["User-Agent"] = f"skillable-exporter/{__version__}"
        self._session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:
        return f"SkillableClient({self._base_url!r})"

    def close(self) -> None:
        self._session.close()

    def get(self, endpoint: str, params: dict[str, int] | None, timeout: float) -> bytes:
        """GET <base>/<endpoint> and return the body of a 200 answer, within `timeout` seconds in total."""
        deadline = time.monotonic() + timeout
        try:
            return self._get(endpoint, params, deadline)
        except ApiError as exc:
            raise ApiError(exc.reason, self._redact(str(exc)), exc.retry_after) from None

    def _get(self, endpoint: str, params: dict[str, int] | None, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        try:
            response = self._session.get(
                f"{self._base_url}/{endpoint}",
                params=params,
                headers={"api_key": self._api_key},
                timeout=(min(remaining, CONNECT_TIMEOUT_CAP), remaining),
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise ApiError("timeout", f"{endpoint}: no answer within {remaining:.1f}s") from None
        except requests.RequestException as exc:
            raise ApiError("connection_error", f"{endpoint}: {type(exc).__name__}") from None
        with response:
            self._check_status(endpoint, response)
            return self._read_body(endpoint, response, deadline)

    def _check_status(self, endpoint: str, response: requests.Response) -> None:
        status = response.status_code
        if status == 200:
            return
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if status in (401, 403):
            raise ApiError("unauthorized", f"{endpoint}: HTTP {status}: the API key was refused")
        if status == 429:
            raise ApiError("rate_limited", f"{endpoint}: HTTP 429 Too Many Requests", retry_after)
        raise ApiError("http_error", f"{endpoint}: HTTP {status}", retry_after)

    def _read_body(self, endpoint: str, response: requests.Response, deadline: float) -> bytes:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._max_bytes:
            raise ApiError("too_large", f"{endpoint}: body of {length} bytes exceeds the limit")
        # A per-read timeout does not bound a body that trickles in; a watchdog
        # shuts the socket down at the deadline so the read below returns.
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shutdown, (response,))
        watchdog.daemon = True
        watchdog.start()
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(CHUNK_BYTES):
                size += len(chunk)
                if size > self._max_bytes:
                    raise ApiError("too_large", f"{endpoint}: body exceeds {self._max_bytes} bytes")
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    break
        except requests.RequestException as exc:
            if time.monotonic() < deadline:
                raise ApiError("connection_error", f"{endpoint}: body cut off ({type(exc).__name__})") from None
        finally:
            watchdog.cancel()
        if time.monotonic() > deadline:
            raise ApiError("timeout", f"{endpoint}: body not complete before the deadline")
        return b"".join(chunks)

    def _redact(self, text: str) -> str:
        return text.replace(self._api_key, "<redacted>") if self._api_key else text


def _shutdown(response: requests.Response) -> None:
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
