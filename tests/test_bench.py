"""The benchmark's plumbing: simulator hooks and a quick smoke run (no timings: bench/run.py measures)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from bench.simulator import BenchClock
from bench.simulator import start as start_bench_simulator
from exporter.demo import start_simulator

from .harness import ROOT

pytestmark = pytest.mark.integration  # the benchmark's simulator serves on loopback; the smoke run starts bench/run.py


def test_simulator_bench_hooks_freeze_move_and_count() -> None:
    sim = start_bench_simulator(labs_per_minute=5, clock=BenchClock(frozen=True))
    try:
        def get(path: str, **headers: str) -> bytes:
            request = urllib.request.Request(sim.url + path, headers=headers)
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.read()

        first = get("/LatestResults?minutes=30", api_key="k")
        assert get("/LatestResults?minutes=30", api_key="k") == first  # frozen: same body
        counters = json.loads(get("/_bench/counters"))
        assert counters["requests"] == {"latestresults": 2} and counters["bytes_sent"] == 2 * len(first)
        moved = json.loads(get("/_bench/clock?advance=60&warm=3"))
        assert moved["now"] == pytest.approx(counters["now"] + 60)
        assert moved["requests"] == {"latestresults": 2}  # warming is not counted
        assert get("/LatestResults?minutes=30", api_key="k") != first
    finally:
        sim.shutdown()
        sim.server_close()


def test_the_shipped_demo_has_no_bench_hooks() -> None:
    sim = start_simulator(labs_per_minute=5)
    try:
        with urllib.request.urlopen(sim.url + "/_bench/counters", timeout=10) as response:
            body = json.loads(response.read())
        assert "bytes_sent" not in body and body["Status"] == 0  # an ordinary API refusal
        with urllib.request.urlopen(sim.url + "/_bench/clock?advance=600", timeout=10) as response:
            assert "now" not in json.loads(response.read())
    finally:
        sim.shutdown()
        sim.server_close()


def test_bench_quick_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end on the 1k window and writes nothing unless asked."""
    out = tmp_path / "bench.json"
    before = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    command = [sys.executable, "bench/run.py", "--quick", "--sizes", "1k", "--no-write", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert before == after
    [row] = json.loads(out.read_text())
    assert row["results"] > 500
    exporter = row["m"]["exporter"]
    assert exporter["concurrent_requests"] == 1 and exporter["concurrent_good"] == 50
    assert exporter["requests_per_scrape"] == 1.0  # every steady scrape polled once, incrementally
    assert exporter["bytes_per_poll"] < row["payload_bytes"]
    assert set(row["render"]) == {"known", "new_host", "new_profile", "series"}  # the render ratios were measured
    assert row["render"]["series"] > 2000 * 26


