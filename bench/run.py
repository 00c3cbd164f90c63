"""The benchmark: the exporter against the decode floor and the afternoon-script baseline, one run, one payload.

    python3 bench/run.py                  # 1k, 10k and 100k windows, then the fleet; writes BENCHMARKS.md
    python3 bench/run.py --quick          # one start per target, fewer samples; --no-write leaves BENCHMARKS.md
    python3 bench/run.py --sizes fleet    # only the fleet: 2,000 hosts x 500 profiles, spread vs tied
    python3 bench/run.py --server-before ../server-base    # and the HTTP server against that checkout (bench/server.py)

Every process is separate: the simulator (bench/simulator.py: exporter.demo's, with
a frozen clock and the /_bench hooks), the baseline (bench/baseline.py) and the exporter
(python3 -m exporter). BENCHMARKS.md explains the method.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
LABS_PER_MINUTE = 25  # about 50 changes (starts + ends) per simulated minute
# window minutes -> about 1k, 10k and 100k results at 25 labs per minute
SIZES = {"1k": 22, "10k": 350, "100k": 3950}
# The fleet: a tenant at the default caps (--skillable.max-lab-hosts, --skillable.max-lab-profiles), its
# profiles spread over every host of their datacenter or tied to four hosts each, at the 100k window.
FLEET = "fleet"
FLEET_HOSTS, FLEET_PROFILES = 2000, 500
PLACEMENTS = ("tied", "spread")
STEP_SECONDS = 60  # the simulator's clock moves this much between steady-state polls
OVERLAP_MINUTES = 2  # the exporter's default --skillable.overlap-minutes
CONCURRENT_SCRAPES = 50
# What Prometheus 3 sends by default (scrape_protocols OpenMetrics 1.0.0 first), and gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
              "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
              "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


# -- the floor's typed record: the same fields the exporter reads --------------

class Record(msgspec.Struct, rename="pascal", gc=False):
    lab_instance_id: int
    start: int | None = None
    end: int | None = None
    completion_status: int | None = None
    total_run_time_seconds: int | None = None
    task_complete_percent: float | None = None
    is_exam: bool | None = None
    exam_passed: bool | None = None
    exam_score: float | None = None
    exam_max_possible_score: float | None = None
    lab_host_id: int | None = None
    datacenter_id: int | None = None
    delivery_region_id: int | None = None
    lab_profile_id: int | None = None


class Envelope(msgspec.Struct):
    Results: list[Record] | None = None
    Status: int | None = None
    Error: str | None = None


DECODER = msgspec.json.Decoder(Envelope)


# -- small HTTP helpers ----------------------------------------------------------

def split_url(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return host, int(port)


def fetch(url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 300) -> tuple[bytes, str]:
    """One GET on a fresh connection: (body as sent, its Content-Encoding). The body is read
    into a buffer of its announced length."""
    host, port = split_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is None:
            body = response.read()
        else:
            buf = bytearray(int(length))
            view, got = memoryview(buf), 0
            while got < len(buf):
                n = response.readinto(view[got:])
                if not n:
                    break
                got += n
            body = bytes(buf) if got == len(buf) else bytes(buf[:got])
        if response.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {response.status}")
        return body, response.getheader("Content-Encoding") or ""
    finally:
        conn.close()


def http_get(url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 300) -> bytes:
    return fetch(url, path, headers, timeout)[0]


def scrape(url: str, timeout: float = 300) -> tuple[float, int, bytes]:
    """A scrape as Prometheus makes it: (seconds, bytes on the wire, the exposition)."""
    start = time.perf_counter()
    body, encoding = fetch(url, "/metrics", PROMETHEUS_HEADERS, timeout)
    seconds = time.perf_counter() - start
    return seconds, len(body), gzip.decompress(body) if encoding == "gzip" else body


def timed_get(url: str) -> tuple[float, bytes]:
    seconds, _, body = scrape(url)
    return seconds, body


def die_with_parent() -> None:
    """In a child before exec: be sent SIGTERM when the benchmark dies, however it dies (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the simulator ---------------------------------------------------------------

class Simulator:
    def __init__(self, placement: str | None = None) -> None:
        """The demo's traffic, or with `placement` the fleet's (FLEET_HOSTS x FLEET_PROFILES)."""
        fleet = [] if placement is None else ["--hosts", str(FLEET_HOSTS), "--profiles", str(FLEET_PROFILES),
                                              "--placement", placement]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.simulator", "--listen", "127.0.0.1:0",
             "--labs-per-minute", str(LABS_PER_MINUTE), "--freeze-clock", *fleet],
            stdout=subprocess.PIPE, cwd=ROOT, text=True, preexec_fn=die_with_parent,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError("the simulator did not print its URL")

    def counters(self) -> dict[str, Any]:
        return json.loads(http_get(self.url, "/_bench/counters"))

    def advance(self, seconds: float, warm: list[int]) -> dict[str, Any]:
        query = f"advance={seconds}&warm={','.join(map(str, warm))}"
        return json.loads(http_get(self.url, f"/_bench/clock?{query}"))

    def catch_up(self, warm: list[int]) -> None:
        """Put the frozen clock on a whole minute at least 60 s ahead of real time, so that the
        exporter (on real time) never finds the simulator's events older than its own horizon."""
        now = self.counters()["now"]
        target = (math.floor(time.time() / 60) + 2) * 60
        self.advance(max(0.0, target - now), warm)

    def latest(self, minutes: int) -> bytes:
        return http_get(self.url, f"/LatestResults?minutes={minutes}", {"api_key": "bench"})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- the targets under test ------------------------------------------------------

class Target:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=die_with_parent)

    def wait_listening(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                http_get(self.url, "/healthz", timeout=5)
                return
            except (ConnectionError, OSError, RuntimeError):
                self.check_alive()
                time.sleep(0.002)
        raise RuntimeError(f"{self.name} did not start")

    def first_good_scrape(self, timeout: float = 300) -> tuple[float, bytes]:
        """Seconds from the process start to the first /metrics answer with skillable_up 1."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body = scrape(self.url, timeout)[2]
            except (ConnectionError, OSError):
                self.check_alive()
                time.sleep(0.002)
                continue
            if re.search(rb"^skillable_up 1\.0$", body, re.M):
                return time.perf_counter() - self.started, body
        raise RuntimeError(f"{self.name}: no good scrape")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise RuntimeError(f"{self.name} exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def start_baseline(sim: Simulator, window: int) -> Target:
    port = free_port()
    argv = [sys.executable, str(ROOT / "bench" / "baseline.py"), "--port", str(port), "--url", sim.url,
            "--window-minutes", str(window)]
    return Target("baseline", argv, dict(os.environ), port)


def start_exporter(sim: Simulator, window: int, min_interval: float = 0.0) -> Target:
    port = free_port()
    argv = [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{port}",
            f"--skillable.window-minutes={window}", "--skillable.timeout=120",
            # The first poll asks max(window, max-running-minutes): the same window as the baseline's.
            f"--skillable.max-running-minutes={window}",
            f"--skillable.min-poll-interval={min_interval}", "--no-collector.stats",
            "--no-collector.delivery-regions", "--no-collector.catalog", "--log.level=warn"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    # The launch collector (/labinstance/search) is another endpoint on a cadence of its own: not what this
    # measures. By the environment, which versions without it ignore.
    env.update(SKILLABLE_API_URL=sim.url, SKILLABLE_API_KEY="bench", SKILLABLE_COLLECTOR_LAUNCH="false")
    return Target("exporter", argv, env, port)


# -- measurements ----------------------------------------------------------------

@dataclass
class Result:
    size: str
    window_minutes: int
    results: int = 0
    payload_bytes: int = 0
    pairs: int = 0  # distinct (lab host, lab profile) in the window
    floor_read: float = 0.0
    floor_decode: float = 0.0
    m: dict[str, dict[str, float]] = field(default_factory=lambda: {"baseline": {}, "exporter": {}})

    @property
    def floor(self) -> float:
        return self.floor_read + self.floor_decode


def measure_floor(sim: Simulator, res: Result, reps: int, reads: list[float] | None = None,
                  decodes: list[float] | None = None) -> None:
    """The floor's median of `reps` reads and decodes, and of those in `reads` and `decodes` (which gain these)."""
    reads = [] if reads is None else reads
    decodes = [] if decodes is None else decodes
    body = b""
    for _ in range(reps):
        start = time.perf_counter()
        body = sim.latest(res.window_minutes)
        reads.append(time.perf_counter() - start)
    for _ in range(reps):
        start = time.perf_counter()
        env = DECODER.decode(body)
        decodes.append(time.perf_counter() - start)
        res.results = len(env.Results or [])
        res.pairs = len({(r.lab_host_id, r.lab_profile_id) for r in env.Results or []})
        del env
    res.payload_bytes = len(body)
    res.floor_read = statistics.median(reads)
    res.floor_decode = statistics.median(decodes)


def latest_counters(sim: Simulator) -> tuple[int, int]:
    c = sim.counters()
    return c["requests"].get("latestresults", 0), c["bytes_sent"]


def steady(sim: Simulator, target: Target, warm: list[int], samples: int, warmup: int) -> dict[str, float]:
    """Scrapes with the simulator's clock moved STEP_SECONDS before each; the body each asks for is prebuilt."""
    for _ in range(warmup):
        sim.advance(STEP_SECONDS, warm)
        timed_get(target.url)
    req0, bytes0 = latest_counters(sim)
    latencies = []
    body, wire = b"", 0
    for _ in range(samples):
        sim.advance(STEP_SECONDS, warm)
        latency, wire, body = scrape(target.url)
        latencies.append(latency)
    req1, bytes1 = latest_counters(sim)
    return {
        "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
        "bytes_per_poll": (bytes1 - bytes0) / samples, "requests_per_scrape": (req1 - req0) / samples,
        "exposition_bytes": len(body), "exposition_wire_bytes": wire,
    }


def concurrent_scrapes(target: Target, n: int) -> list[bytes]:
    barrier = threading.Barrier(n)
    bodies: list[bytes] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            bodies.append(scrape(target.url)[2])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} concurrent scrapes failed: {errors[0]!r}")
    return bodies


def poll_duration(body: bytes) -> float:
    match = re.search(rb"^skillable_poll_duration_seconds ([0-9.e+-]+)$", body, re.M)
    if not match:
        raise RuntimeError("no skillable_poll_duration_seconds in the exposition")
    return float(match.group(1))


class Profiler:
    """py-spy recording one exporter process (--py-spy DIR), written as speedscope JSON."""

    def __init__(self, directory: str | None, name: str, pid: int) -> None:
        self.proc = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.path = Path(directory) / f"{name}.speedscope.json"
            beside = Path(sys.executable).parent / "py-spy"
            spy = str(beside) if beside.exists() else shutil.which("py-spy")
            if spy is None:
                raise SystemExit("--py-spy needs py-spy: pip install py-spy")
            self.proc = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", "1000", "--format", "speedscope",
                 "--output", str(self.path), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
            time.sleep(0.3)  # let it attach before the first scrape

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(2)  # py-spy writes its file on SIGINT
            self.proc.wait(30)

    def summary(self, top: int = 15) -> str:
        """The functions of exporter/ with the largest share of the recorded samples (inclusive)."""
        if self.proc is None or not self.path.exists():
            return ""
        doc = json.loads(self.path.read_text())
        frames = doc["shared"]["frames"]
        shares: dict[str, float] = {}
        total = 0.0
        for profile in doc["profiles"]:
            for stack, weight in zip(profile["samples"], profile["weights"]):
                names = {f"{frames[i]['name']} ({Path(frames[i].get('file', '')).name})"
                         for i in stack if "/exporter/" in frames[i].get("file", "")}
                if names:
                    total += weight
                    for name in names:
                        shares[name] = shares.get(name, 0.0) + weight
        rows = sorted(shares.items(), key=lambda item: -item[1])[:top]
        return "\n".join(f"  {weight / total:6.1%}  {name}" for name, weight in rows)


def measure_size(sim: Simulator, size: str, quick: bool, log: Any, profile_dir: str | None = None) -> Result:
    window = SIZES[size]
    res = Result(size, window)
    big = size == "100k"
    incremental = [1 + OVERLAP_MINUTES]  # what the exporter asks for when less than a minute went by

    sim.catch_up([window])
    measure_floor(sim, res, reps=3 if big or quick else 5)
    log(f"{size}: {res.results} results, {res.payload_bytes / 1e6:.1f} MB; floor read {res.floor_read:.3f}s "
        f"decode {res.floor_decode:.3f}s")

    # The baseline: cold (median of a few fresh starts), then steady state (it fetches the whole window).
    reps = 1 if quick else 5
    b = res.m["baseline"]
    colds = []
    for rep in range(reps):
        sim.catch_up([window])
        base = start_baseline(sim, window)
        try:
            colds.append(base.first_good_scrape()[0])
            if rep == reps - 1:
                b.update(steady(sim, base, [window], samples=3 if quick else (10 if big else 20), warmup=1))
                b["rss"] = peak_rss_mb(base.proc.pid)
        finally:
            base.stop()
    b["cold"] = statistics.median(colds)
    log(f"{size}: baseline cold starts {', '.join(f'{c:.3f}' for c in colds)} s")
    log(f"{size}: baseline cold {b['cold']:.3f}s steady p50 {b['p50']:.3f}s rss {b['rss']:.0f} MB")

    # The exporter: cold start and full sync, then steady state with ~50 changes per poll.
    e = res.m["exporter"]
    colds, syncs = [], []
    for rep in range(reps):
        sim.catch_up([window])
        exp = start_exporter(sim, window)
        profiler = Profiler(profile_dir if rep == reps - 1 else None, f"exporter-{size}", exp.proc.pid)
        try:
            cold, body = exp.first_good_scrape()
            colds.append(cold)
            syncs.append(poll_duration(body))
            if rep == reps - 1:
                e.update(steady(sim, exp, incremental, samples=50 if quick else 200, warmup=2))
                e["rss"] = peak_rss_mb(exp.proc.pid)
                e["series"] = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
                e["hosts"] = len(set(re.findall(rb'lab_host_id="([^"]+)"', body)))
        finally:
            profiler.stop()
            exp.stop()
        if profiler.proc is not None:
            log(f"{size}: exporter profile {profiler.path} (cold start and steady state):\n{profiler.summary()}")
    e["cold"] = statistics.median(colds)
    e["sync"] = statistics.median(syncs)
    log(f"{size}: exporter cold starts {', '.join(f'{c:.3f}' for c in colds)} s, "
        f"syncs {', '.join(f'{c:.3f}' for c in syncs)} s")

    # A second exporter: 50 concurrent scrapes fired while its cold poll is in flight, with
    # --skillable.min-poll-interval set so a scrape landing after that poll reuses it too.
    # Then scrapes with no poll due time the exposition alone.
    sim.catch_up([window])
    exp2 = start_exporter(sim, window, min_interval=3600)
    try:
        exp2.wait_listening()
        req0, _ = latest_counters(sim)
        bodies = concurrent_scrapes(exp2, CONCURRENT_SCRAPES)
        req1, _ = latest_counters(sim)
        e["concurrent_requests"] = req1 - req0
        e["concurrent_good"] = sum(1 for body in bodies if re.search(rb"^skillable_up 1\.0$", body, re.M))
        times = [timed_get(exp2.url)[0] for _ in range(20 if quick else 50)]
        e["exposition_time"] = statistics.median(times)
    finally:
        exp2.stop()

    # A third: the same burst with --skillable.min-poll-interval=0, so single flight alone
    # keeps it to one request, as long as every scrape lands while the cold poll runs.
    sim.catch_up([window])
    exp3 = start_exporter(sim, window)
    try:
        exp3.wait_listening()
        req0, _ = latest_counters(sim)
        concurrent_scrapes(exp3, CONCURRENT_SCRAPES)
        e["concurrent_requests_no_interval"] = latest_counters(sim)[0] - req0
    finally:
        exp3.stop()
    log(f"{size}: exporter cold {e['cold']:.3f}s sync {e['sync']:.3f}s steady p50 {e['p50'] * 1000:.1f}ms "
        f"p99 {e['p99'] * 1000:.1f}ms bytes/poll {e['bytes_per_poll']:.0f} rss {e['rss']:.0f} MB "
        f"concurrent→{e['concurrent_requests']} requests")
    return res


def measure_fleet(quick: bool, log: Any) -> dict[str, Result]:
    """The fleet at the 100k window, tied and spread, in the same run: the floor, the baseline's cold start
    and peak RSS, and the exporter's cold start, full sync and peak RSS after it (the cold poll's peak),
    the exporter started in turns, tied then spread, so that load on the machine falls on both alike. The
    floor is measured again before each start of the exporter, so that it sees the same load too."""
    window = SIZES["100k"]
    reps = 1 if quick else 7
    floors: dict[str, tuple[list[float], list[float]]] = {placement: ([], []) for placement in PLACEMENTS}
    sims = {placement: Simulator(placement) for placement in PLACEMENTS}
    results = {placement: Result(f"{FLEET} {placement}", window) for placement in PLACEMENTS}
    try:
        for placement, sim in sims.items():
            res = results[placement]
            sim.catch_up([window])
            measure_floor(sim, res, 3, *floors[placement])
            log(f"fleet {placement}: {res.results} results, {res.pairs} (host, profile) pairs; floor read "
                f"{res.floor_read:.3f}s decode {res.floor_decode:.3f}s")
        runs: dict[str, dict[str, list[float]]] = {p: {"cold": [], "sync": [], "rss": [], "baseline_cold": [],
                                                       "baseline_rss": []} for p in PLACEMENTS}
        for _ in range(1 if quick else 3):
            for placement, sim in sims.items():
                sim.catch_up([window])
                base = start_baseline(sim, window)
                try:
                    runs[placement]["baseline_cold"].append(base.first_good_scrape()[0])
                    runs[placement]["baseline_rss"].append(peak_rss_mb(base.proc.pid))
                finally:
                    base.stop()
        for _ in range(reps):
            for placement, sim in sims.items():
                sim.catch_up([window])
                measure_floor(sim, results[placement], 1, *floors[placement])
                exp = start_exporter(sim, window)
                try:
                    cold, body = exp.first_good_scrape()
                    runs[placement]["cold"].append(cold)
                    runs[placement]["sync"].append(poll_duration(body))
                    runs[placement]["rss"].append(peak_rss_mb(exp.proc.pid))
                finally:
                    exp.stop()
        for placement, measured in runs.items():
            m = results[placement].m
            m["exporter"] = {k: statistics.median(v) for k, v in measured.items() if not k.startswith("baseline")}
            m["exporter"]["sync_min"] = min(measured["sync"])
            m["exporter"]["cold_min"] = min(measured["cold"])
            m["floor_min"] = {"read": min(floors[placement][0]), "decode": min(floors[placement][1])}
            m["baseline"] = {"cold": statistics.median(measured["baseline_cold"]),
                             "rss": statistics.median(measured["baseline_rss"])}
            log(f"fleet {placement}: " + "; ".join(f"{k} {', '.join(f'{v:.3f}' for v in vs)}"
                                                   for k, vs in measured.items()))
    finally:
        for sim in sims.values():
            sim.stop()
    return results


def fleet_report(results: dict[str, Result]) -> str:
    tied, spread = results["tied"], results["spread"]
    te, se = tied.m["exporter"], spread.m["exporter"]

    def verdict(ok: bool, text: str) -> str:
        return f"{text} {'met' if ok else 'MISSED'}"

    lines = [f"The fleet: {FLEET_HOSTS} lab hosts and {FLEET_PROFILES} lab profiles at the 100k window, each "
             "profile's labs on four hosts of its own (tied) or on every host of its datacenter (spread), "
             "in the same run; medians, the exporter started in turns and the floor measured again before each "
             "start.", "",
             "| measure | tied | spread | spread / tied | target |", "| --- | --- | --- | --- | --- |"]

    def row(measure: str, t: str, s: str, ratio: str = "", target: str = "") -> None:
        lines.append(f"| {measure} | {t} | {s} | {ratio} | {target} |")

    row("results, (lab host, lab profile) pairs", f"{tied.results}, {tied.pairs}", f"{spread.results}, {spread.pairs}")
    row("floor: socket read + msgspec decode", f"{fmt_s(tied.floor_read)} + {fmt_s(tied.floor_decode)}",
        f"{fmt_s(spread.floor_read)} + {fmt_s(spread.floor_decode)}")
    row("cold full sync (exporter's poll)", f"{fmt_s(te['sync'])} ({te['sync'] / tied.floor:.2f}x floor)",
        f"{fmt_s(se['sync'])} ({se['sync'] / spread.floor:.2f}x floor)", f"{se['sync'] / te['sync']:.2f}x",
        verdict(se["sync"] <= 1.2 * te["sync"], "spread ≤ 1.2x tied") + "; "
        + verdict(se["sync"] <= 3 * spread.floor and te["sync"] <= 3 * tied.floor, "≤ 3x floor"))
    tf, sf = sum(tied.m["floor_min"].values()), sum(spread.m["floor_min"].values())
    row("the fastest of each: floor, cold full sync (a loaded machine slows some starts more than others)",
        f"{fmt_s(tf)}, {fmt_s(te['sync_min'])} ({te['sync_min'] / tf:.2f}x)",
        f"{fmt_s(sf)}, {fmt_s(se['sync_min'])} ({se['sync_min'] / sf:.2f}x)", f"{se['sync_min'] / te['sync_min']:.2f}x")
    row("peak RSS (VmHWM after the first good scrape)", f"{te['rss']:.0f} MB", f"{se['rss']:.0f} MB",
        f"{se['rss'] / te['rss']:.2f}x", verdict(se["rss"] <= 1.1 * te["rss"], "spread ≤ 1.1x tied"))
    for name, res in (("tied", tied), ("spread", spread)):
        b, e = res.m["baseline"], res.m["exporter"]
        row(f"{name}: cold start to first good scrape, exporter / baseline",
            f"{fmt_s(e['cold'])} / {fmt_s(b['cold'])}" if name == "tied" else "",
            f"{fmt_s(e['cold'])} / {fmt_s(b['cold'])}" if name == "spread" else "", f"{e['cold'] / b['cold']:.2f}x",
            verdict(e["cold"] <= 0.5 * b["cold"], "exporter ≤ 0.5x baseline"))
        row(f"{name}: peak RSS, exporter / baseline", f"{e['rss']:.0f} / {b['rss']:.0f} MB" if name == "tied" else "",
            f"{e['rss']:.0f} / {b['rss']:.0f} MB" if name == "spread" else "", f"{e['rss'] / b['rss']:.2f}x",
            verdict(2 * e["rss"] <= b["rss"], "exporter ≤ half"))
    return "\n".join(lines)


def series_per_100_hosts() -> tuple[int, int, int]:
    """Series in the exposition for 100 and 200 lab hosts (one datacenter and region), and per region.

    Counted in what the exporter's own collector serves, not computed from a formula."""
    from exporter.model import LabResult

    def series(hosts: int, regions: int) -> int:
        return exposition_series([LabResult(i, start=1000, end=2000, completion_status=4, lab_host_id=i,
                                            datacenter_id=i % regions, delivery_region_id=1) for i in range(hosts)])

    return series(100, 1), series(200, 1), series(200, 2) - series(200, 1)


def exposition_series(results: list[Any], catalog: Any = None) -> int:
    """Samples the exporter's own collector serves for these results (and a /catalog), one account."""
    from prometheus_client import CollectorRegistry, generate_latest

    from exporter.collector import SkillableCollector
    from exporter.config import Names
    from exporter.poller import Health, PollView
    from exporter.state import FleetState

    class Stub:
        window_minutes = 60

        def __init__(self, state: FleetState) -> None:
            self.state = state

        def view(self) -> PollView:
            return PollView(self.state.snapshot(), Health(up=True, catalog=catalog))

    state = FleetState(10_000, 10_000)
    state.apply(results, 0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SkillableCollector([("", Stub(state))], Names(), 60, 10_000))
    return sum(1 for line in generate_latest(registry).splitlines() if not line.startswith(b"#"))


def series_per_100_profiles() -> tuple[int, int]:
    """Series added by 100 more active lab profiles (one host), without and with a /catalog naming them."""
    from exporter.catalog import Catalog, LabProfile
    from exporter.model import LabResult

    def series(profiles: int, named: bool) -> int:
        results = [LabResult(i, start=1000, end=2000, completion_status=4, lab_host_id=1, datacenter_id=1,
                             delivery_region_id=1, lab_profile_id=5000 + i) for i in range(profiles)]
        catalog = Catalog({str(5000 + i): LabProfile(str(5000 + i), f"Lab {i}", "", "1", "azure", False, True, 3600.0)
                           for i in range(profiles)}, {"1": "Series"}) if named else None
        return exposition_series(results, catalog)

    return series(200, False) - series(100, False), series(200, True) - series(100, True)


RENDER_HOSTS = 2000  # --skillable.max-lab-hosts' default: the largest exposition a tenant gets
RENDER_PROFILES = 400  # lab profiles with series of their own (the cap, --skillable.max-lab-profiles, is 500)
RENDER_SAMPLES = 15


def render_after_new_series(samples: int = RENDER_SAMPLES) -> dict[str, float]:
    """Seconds of a render (snapshot and exposition, OpenMetrics as Prometheus asks for it) at RENDER_HOSTS
    hosts and RENDER_PROFILES profiles: after a poll that changed a known host and profile, after one that
    brought a new host, and after one that brought a new profile; each the median of `samples`, taken in
    turns, in this process. The renderer learns only a new host's 26 series or a new profile's 17
    (render.py), so the target is a ratio: at most 2x."""
    from exporter.collector import SkillableCollector
    from exporter.config import Names
    from exporter.model import LabResult
    from exporter.poller import Health, PollView
    from exporter.render import choose_encoding
    from exporter.state import FleetState

    state = FleetState(10 * RENDER_HOSTS, 10 * RENDER_PROFILES)

    def lab(instance: int, host: int, profile: int) -> LabResult:  # four datacenters over three regions
        return LabResult(instance, start=1000, end=2000, completion_status=4, lab_host_id=host,
                         datacenter_id=host % 4, delivery_region_id=host % 3, lab_profile_id=profile)

    class Stub:
        window_minutes = 60

        def view(self) -> PollView:
            return PollView(state.snapshot(), Health(up=True))

    collector = SkillableCollector([("", Stub())], Names(), 60)
    encoding = choose_encoding(PROMETHEUS_HEADERS["Accept"])
    state.apply([lab(i, i, i % RENDER_PROFILES) for i in range(RENDER_HOSTS)], 0)
    body = collector.exposition(encoding)
    times: dict[str, list[float]] = {"known": [], "new_host": [], "new_profile": []}
    instance = RENDER_HOSTS
    for k in range(samples):
        for case, host, profile in (("known", k, k), ("new_host", RENDER_HOSTS + k, k),
                                    ("new_profile", k, RENDER_PROFILES + k)):
            instance += 1
            state.apply([lab(instance, host, profile)], 0)
            start = time.perf_counter()
            body = collector.exposition(encoding)
            times[case].append(time.perf_counter() - start)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    return {case: statistics.median(seconds) for case, seconds in times.items()} | {"series": series}


# -- report ----------------------------------------------------------------------

def machine_facts(load_before: tuple[float, float, float]) -> list[str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return [
        f"- Machine: {os.cpu_count()} CPUs ({cpu}), {mem_kb / 1024 / 1024:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}; msgspec {version('msgspec')}, "
        f"prometheus-client {version('prometheus-client')}, requests {version('requests')}",
        f"- Load average {load_before[0]:.2f} before the run, {os.getloadavg()[0]:.2f} after (other work on the"
        f" machine shows in the p99s)",
        f"- Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, simulator at {LABS_PER_MINUTE} labs/minute "
        f"(~{2 * LABS_PER_MINUTE} changes per simulated minute), clock moved {STEP_SECONDS} s between steady polls",
    ]


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def report(results: list[Result]) -> str:
    lines = ["| window | measure | floor | baseline | exporter | exporter / floor | baseline / exporter | target |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def row(w: str, measure: str, floor: str, base: str, exp: str, ef: str, be: str, target: str) -> None:
        lines.append(f"| {w} | {measure} | {floor} | {base} | {exp} | {ef} | {be} | {target} |")

    def verdict(ok: bool, text: str) -> str:
        return f"{text} {'met' if ok else 'MISSED'}"

    for r in results:
        b, e = r.m["baseline"], r.m["exporter"]
        big = r.size == "100k"
        w = f"{r.size} ({r.results} results, {r.payload_bytes / 1e6:.1f} MB, {r.window_minutes} min)"
        row(w, "floor: socket read + msgspec decode", f"{fmt_s(r.floor_read)} + {fmt_s(r.floor_decode)}",
            "", "", "", "", "")
        row(w, "cold start to first good scrape", "", fmt_s(b["cold"]), fmt_s(e["cold"]),
            f"{e['cold'] / r.floor:.1f}x", f"{b['cold'] / e['cold']:.1f}x",
            verdict(e["cold"] <= 0.5 * b["cold"], "exporter ≤ 0.5x baseline") if big else "")
        row(w, "full-window sync (exporter's poll)", fmt_s(r.floor), "", fmt_s(e["sync"]),
            f"{e['sync'] / r.floor:.2f}x", "", verdict(e["sync"] <= 3 * r.floor, "≤ 3x floor") if big else "")
        row(w, "steady scrape latency p50", "", fmt_s(b["p50"]), fmt_s(e["p50"]), "",
            f"{b['p50'] / e['p50']:.0f}x", verdict(b["p50"] >= 20 * e["p50"], "≥ 20x") if big else "")
        row(w, "steady scrape latency p99", "", fmt_s(b["p99"]), fmt_s(e["p99"]), "",
            f"{b['p99'] / e['p99']:.0f}x", verdict(b["p99"] >= 20 * e["p99"], "≥ 20x") if big else "")
        share = e["bytes_per_poll"] / r.payload_bytes
        row(w, "upstream bytes per steady poll", "", f"{b['bytes_per_poll'] / 1e6:.1f} MB",
            f"{e['bytes_per_poll'] / 1e3:.1f} kB ({share:.2%} of window)", "",
            f"{b['bytes_per_poll'] / e['bytes_per_poll']:.0f}x", verdict(share < 0.01, "< 1% of window") if big else "")
        row(w, "peak RSS (VmHWM)", "", f"{b['rss']:.0f} MB", f"{e['rss']:.0f} MB", "", f"{b['rss'] / e['rss']:.1f}x",
            verdict(b["rss"] >= 2 * e["rss"], "exporter ≤ half") if big else "")
        row(w, "exposition: time with no poll due / size (on the wire)", "",
            f"— / {b['exposition_bytes'] / 1e3:.1f} kB ({b['exposition_wire_bytes'] / 1e3:.1f} kB)",
            f"{fmt_s(e['exposition_time'])} / {e['exposition_bytes'] / 1e3:.1f} kB "
            f"({e['exposition_wire_bytes'] / 1e3:.1f} kB gzip); {e['series']} series, {e['hosts']} hosts",
            "", "", "")
        row(w, f"upstream requests for {CONCURRENT_SCRAPES} concurrent scrapes during the cold poll, "
            "min-poll-interval 3600 s", "", "",
            f"{e['concurrent_requests']} ({e['concurrent_good']} good answers)", "", "",
            verdict(e["concurrent_requests"] == 1, "exactly 1"))
        row(w, "the same with min-poll-interval 0 (single flight alone; a scrape landing after the poll "
            "polls again)", "", "", str(e["concurrent_requests_no_interval"]), "", "",
            verdict(e["concurrent_requests_no_interval"] == 1, "exactly 1") if big else "")
    return "\n".join(lines)


def render_report(r: dict[str, float]) -> str:
    host, profile = r["new_host"] / r["known"], r["new_profile"] / r["known"]
    return (f"Render at {RENDER_HOSTS} lab hosts and {RENDER_PROFILES} lab profiles ({r['series']:.0f} series), "
            f"median of {RENDER_SAMPLES}: {fmt_s(r['known'])} after a poll that changed a known host and profile, "
            f"{fmt_s(r['new_host'])} after one that brought a new host ({host:.2f}x, target ≤ 2x "
            f"{'met' if host <= 2 else 'MISSED'}), {fmt_s(r['new_profile'])} after one that brought a new "
            f"profile ({profile:.2f}x, target ≤ 2x {'met' if profile <= 2 else 'MISSED'}).")


def write_benchmarks(table: str, facts: list[str], command: str, series: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    block = "\n".join([BEGIN, f"Last run: `{command}`", "", *facts, "", table, "", series, END])
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one cold start per target, fewer samples (< 60 s)")
    parser.add_argument("--sizes", help="comma-separated subset of " + ",".join([*SIZES, FLEET]))
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers as JSON")
    parser.add_argument("--server-before", metavar="DIR", dest="server_before",
                        help="also run the HTTP server's benchmark (bench/server.py) against that checkout")
    parser.add_argument("--py-spy", metavar="DIR", dest="py_spy",
                        help="record the exporter (last cold start and its steady state) with py-spy into DIR; "
                             "the profiler slows what it records, so take timings from a run without it")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",") if args.sizes else [*SIZES, FLEET]
    started = time.monotonic()
    load_before = os.getloadavg()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    results: list[Result] = []
    if set(sizes) & set(SIZES):
        sim = Simulator()
        try:
            results = [measure_size(sim, size, args.quick, log, args.py_spy) for size in sizes if size in SIZES]
        finally:
            sim.stop()
    fleet = measure_fleet(args.quick, log) if FLEET in sizes else {}
    facts = machine_facts(load_before)
    table = "\n\n".join(filter(None, [report(results) if results else "", fleet_report(fleet) if fleet else ""]))
    s100, s200, per_region = series_per_100_hosts()
    per_100_profiles, per_100_named = series_per_100_profiles()
    render = render_after_new_series()
    series = (f"Series per 100 lab hosts, counted in the exposition: {s200 - s100} "
              f"(100 hosts: {s100} series in all, 200 hosts: {s200}); each further datacenter/region pair "
              f"adds {per_region}.\n\nSeries per 100 active lab profiles: {per_100_profiles}, or {per_100_named} "
              f"with /catalog names (skillable_lab_profile_info, _enabled, _max_duration_seconds).\n\n"
              + render_report(render))
    print("\n".join(facts) + "\n\n" + table + "\n\n" + series)
    if args.json:
        Path(args.json).write_text(json.dumps(
            [r.__dict__ | {"floor": r.floor, "render": render} for r in [*results, *fleet.values()]], indent=2))
    if not args.no_write:
        command = "python3 bench/run.py" + (" --quick" if args.quick else "") + (
            f" --sizes {args.sizes}" if args.sizes else "")
        write_benchmarks(table, facts, command, series)
        log("wrote BENCHMARKS.md")
    if args.server_before:
        from bench.server import main as server_main

        server_main(["--before", args.server_before, *(["--quick"] if args.quick else []),
                     *(["--no-write"] if args.no_write else [])])
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
