"""The benchmark's simulator: exporter.demo's simulated API with a clock the benchmark moves, and two hooks.

    python3 -m bench.simulator --labs-per-minute 25 --freeze-clock    # prints its URL, as exporter.demo does

- The clock (BenchClock) is real time, or an instant frozen at start (--freeze-clock), plus an
  offset that /_bench/clock?advance=S moves. Frozen, the same (now, minutes) always gives the
  same LatestResults body, so bodies are kept (a few, by (now, minutes)) and
  /_bench/clock?advance=S&warm=M,M builds the next ones before the benchmark times a request.
- /_bench/counters: the requests (by endpoint) and bytes the API answered so far, and the clock
  (the hooks are not counted).
- --hosts N --profiles M --placement spread|tied (FleetTraffic): a tenant of the benchmark's size instead
  of the demo's 36 hosts and 40 profiles. Each lab profile belongs to one datacenter (the one holding its
  storage); `spread` runs its labs on any host of that datacenter, as Skillable does, `tied` on four hosts
  of its own. Both give every host and profile the same series; only the (host, profile) pairs differ:
  about 95,000 in a 100k window spread, 2,000 tied.

None of this is in the shipped demo: there /_bench/... is an ordinary unknown path.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import msgspec

from exporter.demo import (
    CATALOG_PROFILES, STATUS_MIX, STATUS_MIX_TOTAL, UNHEALTHY_FAILURE_SHARE, Lab, SimulatorHandler, SimulatorServer,
    Traffic, _duration, _weighted, argument_parser, listen_address, serve,
)

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


PLACEMENTS = ("spread", "tied")
DATACENTER_REGIONS = {1: 1, 2: 1, 3: 2, 4: 3}  # four datacenters over three delivery regions, as the demo's
HOSTS_PER_PROFILE = 4  # `tied`: the hosts a profile runs on
FIRST_HOST, FIRST_PROFILE = 1000, 100_000
# The demo's exam profiles (their pass marks are the demo's) stand among the benchmark's profiles, so
# exams and their scores are in the traffic too.
EXAM_PROFILES = tuple(p.id for p in CATALOG_PROFILES if p.pass_mark is not None)


class FleetTraffic(Traffic):
    """The demo's traffic (statuses, run times, one unhealthy host) at a tenant's size: `hosts` lab hosts in
    four datacenters and `profiles` lab profiles, each profile in one datacenter and placed on its hosts as
    `placement` says (module docstring). A pure function of (seed, minute), as Traffic is."""

    def __init__(self, labs_per_minute: float, seed: int, hosts: int, profiles: int, placement: str) -> None:
        super().__init__(labs_per_minute, seed)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
        datacenters = len(DATACENTER_REGIONS)
        # host index i is in datacenter i % 4 + 1; profile index j in datacenter j % 4 + 1
        self.hosts_of = [list(range(FIRST_HOST + dc, FIRST_HOST + hosts, datacenters)) for dc in range(datacenters)]
        self.profile_ids = [*EXAM_PROFILES, *range(FIRST_PROFILE, FIRST_PROFILE + profiles - len(EXAM_PROFILES))]
        self.placement = placement

    def hosts_for(self, j: int) -> list[int]:
        """The hosts profile index j runs on."""
        hosts = self.hosts_of[j % len(self.hosts_of)]
        if self.placement == "spread":
            return hosts
        first = (j // len(self.hosts_of) * HOSTS_PER_PROFILE) % len(hosts)
        return (hosts + hosts)[first:first + HOSTS_PER_PROFILE]

    def _generate(self, minute: int) -> tuple[Lab, ...]:
        """A flat rate of launches (no daily rhythm, no demo fault streams), each placed by _fleet_lab."""
        rng = random.Random(f"{self.seed}:{minute}")
        whole = int(self.labs_per_minute)
        count = whole + (1 if rng.random() < self.labs_per_minute - whole else 0)
        return tuple(self._fleet_lab(rng, minute, i) for i in range(count))

    def _fleet_lab(self, rng: random.Random, minute: int, index: int) -> Lab:
        j = rng.randrange(len(self.profile_ids))
        dc = j % len(self.hosts_of)
        hosts = self.hosts_for(j)
        host = hosts[rng.randrange(len(hosts))]
        start = minute * 60 + rng.randrange(60)
        if host == hosts[0] and j % 7 == 0 and rng.random() < UNHEALTHY_FAILURE_SHARE:  # a few unhealthy hosts
            status, duration = 20, rng.randrange(20, 120)
        else:
            status = _weighted(rng, STATUS_MIX, STATUS_MIX_TOTAL)
            duration = _duration(rng, status)
        profile = self.profile_ids[j]
        exam = profile in EXAM_PROFILES
        score = min(100, max(0, int(rng.gauss(76, 14)))) if exam and status == 4 else None
        return Lab(instance_id=minute * 1000 + index, profile_id=profile, start=start, end=start + duration,
                   status=status, host=host, datacenter=dc + 1, region=DATACENTER_REGIONS[dc + 1],
                   task_percent=100 if status == 4 and not exam else rng.randrange(0, 101), exam=exam,
                   exam_score=score, user=rng.randrange(1, 5000))


def make_traffic(labs_per_minute: float, seed: int, hosts: int | None, profiles: int | None,
                 placement: str) -> Traffic:
    """The demo's traffic, or FleetTraffic when a size is given."""
    if hosts is None and profiles is None:
        return Traffic(labs_per_minute, seed)
    return FleetTraffic(labs_per_minute, seed, hosts or 2000, profiles or 500, placement)


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
    parser.add_argument("--freeze-clock", action="store_true",
                        help="stop the clock (it then moves only by /_bench/clock)")
    parser.add_argument("--hosts", type=int, help="lab hosts (FleetTraffic; default: the demo's traffic)")
    parser.add_argument("--profiles", type=int, help="lab profiles (FleetTraffic)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="spread",
                        help="FleetTraffic: a profile's labs on every host of its datacenter, or on four")
    args = parser.parse_args(argv)
    clock = BenchClock(args.clock_offset, args.freeze_clock)
    traffic = make_traffic(args.labs_per_minute, args.seed, args.hosts, args.profiles, args.placement)
    return serve(BenchSimulator(listen_address(args.listen), traffic, clock))


if __name__ == "__main__":
    sys.exit(main())

