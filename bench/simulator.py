"""The benchmark's simulator: exporter.demo's simulated API with a clock the benchmark moves, and two hooks.

    python -m bench.simulator --labs-per-minute 25 --freeze-clock    # prints its URL, as exporter.demo does

- The clock (BenchClock) is real time, or an instant frozen at start (--freeze-clock), plus an
  offset that /_bench/clock?advance=S moves. Frozen, the same (now, minutes) always gives the
  same LatestResults body, so bodies are kept (a few, by (now, minutes)) and
  /_bench/clock?advance=S&warm=M,M builds the next ones before the benchmark times a request.
- /_bench/counters: the requests (by endpoint) and bytes the API answered so far, and the clock
  (the hooks are not counted).

None of this is in the shipped demo: there /_bench/... is an ordinary unknown path.
"""

from __future__ import annotations

import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import msgspec

from exporter.demo import SimulatorHandler, SimulatorServer, Traffic, argument_parser, listen_address, serve

CACHED_BODIES = 4
_encoder = msgspec.json.Encoder()


class BenchClock:
    """Real time (or a frozen instant) plus a movable offset."""

    def __init__(self, offset: float = 0.0, frozen: bool = False) -> None:
        self.offset = offset
        self._frozen_at = time.time() if frozen else None

    def __call__(self) -> float:
        base = time.time() if self._frozen_at is None else self._frozen_at
        return base + self.offset


class BenchSimulator(SimulatorServer):
    """The demo's simulator with the hooks above; LatestResults bodies kept by (now, minutes)."""

    def __init__(self, address: tuple[str, int], traffic: Traffic, clock: BenchClock) -> None:
        super().__init__(address, traffic, clock, handler=BenchHandler)
        self.bench_clock = clock
        self._lock = threading.Lock()
        self._bodies: dict[tuple[float, int], bytes] = {}
        self.requests: dict[str, int] = {}
        self.bytes_sent = 0

    def count(self, endpoint: str, size: int) -> None:
        with self._lock:
            self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
            self.bytes_sent += size

    def counters(self) -> dict[str, object]:
        with self._lock:
            return {"requests": dict(self.requests), "bytes_sent": self.bytes_sent, "now": self.clock()}

    def latest_results(self, now: float, minutes: int) -> bytes:
        key = (now, minutes)
        with self._lock:
            body = self._bodies.get(key)
        if body is None:
            body = super().latest_results(now, minutes)
            with self._lock:
                if len(self._bodies) >= CACHED_BODIES:
                    self._bodies.pop(next(iter(self._bodies)))
                self._bodies[key] = body
        return body


class BenchHandler(SimulatorHandler):
    server: BenchSimulator

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if not url.path.startswith("/_bench/"):
            super().do_GET()
            return
        server, query = self.server, parse_qs(url.query)
        if url.path == "/_bench/clock":
            server.bench_clock.offset += float(query.get("advance", ["0"])[0])
            for minutes in query.get("warm", [""])[0].split(","):
                if minutes.strip():
                    server.latest_results(server.bench_clock(), int(minutes))
        elif url.path != "/_bench/counters":
            self.send_error(404)
            return
        body = _encoder.encode(server.counters())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send(self, body: bytes, endpoint: str) -> None:
        self.server.count(endpoint, len(body))
        super()._send(body, endpoint)


def start(labs_per_minute: float = 12.0, seed: int = 7, clock: BenchClock | None = None) -> BenchSimulator:
    """A BenchSimulator on loopback in a background thread; stop it with .shutdown() and .server_close()."""
    server = BenchSimulator(("127.0.0.1", 0), Traffic(labs_per_minute, seed), clock or BenchClock())
    threading.Thread(target=server.serve_forever, name="bench-simulator", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser(__doc__ or "")
    parser.add_argument("--clock-offset", type=float, default=0.0, help="seconds added to the clock")
    parser.add_argument("--freeze-clock", action="store_true", help="stop the clock (it then moves only by /_bench/clock)")
    args = parser.parse_args(argv)
    clock = BenchClock(args.clock_offset, args.freeze_clock)
    return serve(BenchSimulator(listen_address(args.listen), Traffic(args.labs_per_minute, args.seed), clock))


if __name__ == "__main__":
    sys.exit(main())

