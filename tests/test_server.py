"""The HTTP server against hostile and heavy clients (docs/failure-modes.md), on real sockets: keep-alive
load past the old connection slots, pipelining clients that never read, request framing (RFC 9112:
Transfer-Encoding in any case, duplicate Content-Length, bodies on GET), and the server's own limits
(write deadline, slow heads, the connection bound, scrapes stamped by their arrival)."""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

from exporter.app import ExporterApp
from exporter.server import ExporterServer

from .fakeapi import FakeSkillable, lab
from .harness import NOW, ExporterProcess, Harness, harness  # noqa: F401 - harness is a fixture
from .test_web import start  # noqa: F401 - the fixture: an exporter process against the fake

pytestmark = pytest.mark.integration

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n"


def statuses(port: int, data: bytes, quiet: float = 1.0) -> list[int]:
    """Send `data` on one connection; the status of every answer read until the server closes it
    or says nothing for `quiet` seconds."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):  # closed by the server before all was sent
            pass
        sock.settimeout(quiet)
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


@contextmanager
def serving(app: ExporterApp, **options: Any) -> Iterator[ExporterServer]:
    """An ExporterServer of its own on `app`, with `options` (shorter limits), in a thread."""
    server = ExporterServer(("127.0.0.1", 0), app, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def eventually(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- load: item 1 ------------------------------------------------------------------------------

KEEP_ALIVE_SCRAPERS = 200
LOAD_SECONDS = 8.0  # bench/server.py runs the same load for 30 s


def test_two_hundred_keep_alive_scrapers_get_every_answer(start: Any, fake: FakeSkillable) -> None:
    """On main, connections past the 64 slots were closed unanswered: 43,812 failed requests in 30 s."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    exporter = start()
    assert exporter.get("/metrics").status_code == 200  # polled once; then the 10 s interval holds
    stop = threading.Event()
    answered: list[int] = [0] * KEEP_ALIVE_SCRAPERS
    failures: list[str] = []
    go = threading.Barrier(KEEP_ALIVE_SCRAPERS + 1)

    def scraper(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=20)
        go.wait()
        while not stop.is_set():
            try:
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                if response.status != 200 or b"skillable_up 1" not in body:
                    failures.append(f"status {response.status}")
                answered[index] += 1
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=20)
        connection.close()

    threads = [threading.Thread(target=scraper, args=(i,), daemon=True) for i in range(KEEP_ALIVE_SCRAPERS)]
    for thread in threads:
        thread.start()
    go.wait()
    time.sleep(LOAD_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:3]}"
    assert min(answered) >= 1, "every scraper was answered"  # none starved
    assert exporter.proc.poll() is None and "Traceback" not in exporter.log()


# -- slow readers: item 2 ----------------------------------------------------------------------

NON_READERS = 70


@pytest.fixture
def big_exporter(tmp_path: Path) -> Iterator[ExporterProcess]:
    """An exporter process whose exposition is about 1 MB (3,000 labs on 300 hosts), against a fake on
    the real clock: ten answers are more than the kernel's socket buffers hold."""
    live = FakeSkillable(live=True)
    now = int(time.time())
    live.add(*(lab(i, now - 3000 + i % 2900, (now - 60 + i % 50) if i % 3 else None, status=4 if i % 5 else 20,
                   host=100 + i % 300, datacenter=1 + i % 4, region=1 + i % 3) for i in range(3000)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env.update({"SKILLABLE_API_URL": live.url, "SKILLABLE_API_KEY": live.state.api_key,
                "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false",
                # The launch collector's first poll runs beside the first scrape: its memory is not the server's.
                "SKILLABLE_COLLECTOR_LAUNCH": "false"})
    exporter = ExporterProcess([], env, tmp_path / "exporter.log")
    try:
        yield exporter
    finally:
        exporter.stop()
        live.stop()


def test_seventy_pipelining_clients_that_never_read_leave_real_scrapes_alone(big_exporter: ExporterProcess) -> None:
    """On main they took every slot: 0 of 15 real scrapes were answered until they left."""
    exporter = big_exporter
    assert len(exporter.get("/metrics").content) > 500_000
    rss_before = rss_kb(exporter.proc.pid)
    flood: list[socket.socket] = []
    try:
        for _ in range(NON_READERS):
            sock = socket.create_connection(("127.0.0.1", exporter.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(SCRAPE * 20)  # 20 MB of answers asked for, and never read
            flood.append(sock)
        time.sleep(1.0)  # every flood connection has its answers stuck
        for _ in range(15):
            began = time.monotonic()
            response = exporter.get("/metrics", timeout=5)  # a new connection, as Prometheus makes
            assert response.status_code == 200 and "skillable_up 1.0" in response.text
            assert time.monotonic() - began < 2.0
        # Each stalled connection holds a piece of its answer, not a copy of the 1 MB exposition.
        grown = rss_kb(exporter.proc.pid) - rss_before
        assert grown < 24 * 1024, grown
    finally:
        for sock in flood:
            sock.close()
    assert exporter.proc.poll() is None and "Traceback" not in exporter.log()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))


# -- request framing: item 3 -------------------------------------------------------------------

SMUGGLED = b"GET /-/smuggled HTTP/1.1\r\nHost: exporter\r\n\r\n"  # would be answered 404 if it were read
FOLLOW_UP = b"GET /healthz HTTP/1.1\r\nHost: exporter\r\n\r\n"


def test_request_framing_is_the_parsers_and_nothing_is_smuggled(start: Any) -> None:
    """On main: 'Transfer-Encoding: Chunked' had its body read as the next request, and with two
    Content-Length headers or a GET body the smuggled request was answered."""
    exporter = start()
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
    # A chunked body (Transfer-Encoding in any case) is a body: one answer, then the next request.
    for name in (b"chunked", b"Chunked", b"CHUNKED"):
        head = b"POST /-/reload-not HTTP/1.1\r\nHost: exporter\r\nTransfer-Encoding: " + name + b"\r\n\r\n"
        assert statuses(exporter.port, head + chunk + FOLLOW_UP) == [405, 200], name
    # Two Content-Length headers (0 and N), or Content-Length beside Transfer-Encoding: refused, closed.
    two_lengths = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    assert statuses(exporter.port, two_lengths + SMUGGLED + FOLLOW_UP) == [400]
    both = (b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
            % len(chunk))
    assert statuses(exporter.port, both + chunk + FOLLOW_UP) == [400]
    # A GET with a body holding a whole request: the body is a body, never a request.
    get_body = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED)
    assert statuses(exporter.port, get_body + SMUGGLED + FOLLOW_UP) == [200, 200]
    assert exporter.get("/metrics").status_code == 200
    assert exporter.proc.poll() is None and "Traceback" not in exporter.log()
    assert "/-/smuggled" not in exporter.log()


# -- the server's own limits --------------------------------------------------------------------


def test_a_client_that_does_not_read_its_answers_loses_its_connection_at_the_write_deadline(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    with serving(h.app, write_timeout=1.0) as server:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", server.port))
        stalled.sendall(SCRAPE * 1000)  # far more answers than the socket buffers hold
        try:
            assert eventually(lambda: len(server.connections) == 1, 5)
            began = time.monotonic()
            assert eventually(lambda: len(server.connections) == 0, 10), "the stalled connection was never closed"
            assert time.monotonic() - began < 5
            assert statuses(server.port, FOLLOW_UP, quiet=0.5) == [200]  # serving went on
        finally:
            stalled.close()


def test_a_head_trickled_byte_by_byte_is_cut_at_the_idle_timeout(harness: Callable[..., Harness]) -> None:
    """Bytes arriving do not reset the clock: a slowloris head is closed as an idle connection is."""
    h = harness()
    with serving(h.app, idle_timeout=1.0) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            began = time.monotonic()
            closed = False
            while time.monotonic() - began < 6 and not closed:
                try:
                    sock.sendall(b"a")
                    sock.settimeout(0.2)
                    closed = sock.recv(1024) == b""
                except TimeoutError:
                    pass
                except OSError:
                    closed = True
            assert closed and time.monotonic() - began < 3
        assert len(h.fake.latest_requests()) == 0  # never answered, never polled


def test_past_the_connection_bound_the_longest_idle_connection_makes_room(harness: Callable[..., Harness]) -> None:
    h = harness()
    with serving(h.app, max_connections=8) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
        try:
            assert eventually(lambda: len(server.connections) == 8, 5)
            assert statuses(server.port, FOLLOW_UP, quiet=0.5) == [200]  # a ninth is answered
            idle[0].settimeout(2)
            assert idle[0].recv(1) == b""  # the oldest idle one was closed for it
            assert len(server.connections) <= 8
        finally:
            for sock in idle:
                sock.close()


def test_a_request_is_stamped_when_its_connection_was_accepted(harness: Callable[..., Harness]) -> None:
    """Single flight by arrival (docs/design-notes.md): a scrape on a connection accepted before a poll
    ended is that poll's, even when its request is read after; one accepted later polls again."""
    h = harness()  # every scrape may poll (min interval 0); the monotonic clock moves by hand
    assert h.scrape().status == 200
    polls = len(h.fake.latest_requests())
    early = socket.create_connection(("127.0.0.1", h.server.port), timeout=5)
    try:
        assert eventually(lambda: len(h.server.connections) == 2, 5)  # accepted (beside the session's)
        h.mono.advance(1)
        assert h.scrape().status == 200  # a poll, ending after the early accept
        assert len(h.fake.latest_requests()) == polls + 1
        h.mono.advance(1)  # the early request is sent and read after that poll
        early.sendall(SCRAPE)
        assert b"200 OK" in early.recv(65536)
        assert len(h.fake.latest_requests()) == polls + 1  # answered by that poll
    finally:
        early.close()
    with socket.create_connection(("127.0.0.1", h.server.port), timeout=5) as late:
        late.sendall(SCRAPE)  # accepted after that poll: a poll of its own
        assert b"200 OK" in late.recv(65536)
    assert len(h.fake.latest_requests()) == polls + 2


def test_only_complete_heads_reach_the_app(harness: Callable[..., Harness]) -> None:
    """Heads the parser refuses (too many headers, a bad request line) are answered 400 by it,
    without a poll and without a traceback."""
    h = harness()
    too_many = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(100)) + b"\r\n"
    assert statuses(h.server.port, too_many) == [400]
    assert statuses(h.server.port, b"GARBAGE\x00\r\n\r\n") == [400]
    # 20 headers of 8000 bytes are each within the parser's limits, but 160 kB in all is more than
    # a connection may send ahead of its answers: closed without one.
    huge = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 8000) for i in range(20)) + b"\r\n"
    assert statuses(h.server.port, huge) == []
    assert len(h.fake.latest_requests()) == 0
    assert h.scrape().status == 200
