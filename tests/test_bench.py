"""The benchmark's plumbing: simulator hooks and a quick smoke run (no timings: bench/run.py measures)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.__main__ import build_parser
from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.demo import BenchClock, start_simulator
from exporter.model import LabResult

from .conftest import MonotonicStub
from .fakeapi import FakeSkillable

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000
OPENMETRICS = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;q=0.3"


def result(instance_id: int, start: int | None, end: int | None = None, status: int = 4, host: int | None = 1,
           datacenter: int | None = 1, region: int | None = 1, **extra: Any) -> LabResult:
    return LabResult(lab_instance_id=instance_id, start=start, end=end, completion_status=status,
                     lab_host_id=host, datacenter_id=datacenter, delivery_region_id=region, **extra)


def make_app(fake: FakeSkillable, mono: MonotonicStub, *argv: str) -> ExporterApp:
    flags = vars(build_parser().parse_args(["--no-collector.stats", "--no-collector.delivery-regions", *argv]))
    config = load_config(flags, {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    return ExporterApp(config, clock=fake.clock, monotonic=mono)


def registry_text(app: ExporterApp) -> bytes:
    """The plain path: prometheus_client rendering the registry, no cache involved."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(app.collector)
    return generate_latest(registry)


# -- the exposition cache ------------------------------------------------------

def test_simulator_bench_hooks_freeze_move_and_count() -> None:
    clock = BenchClock(frozen=True)
    sim = start_simulator(labs_per_minute=5, clock=clock)
    sim.bench_hooks = True
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


def test_bench_hooks_are_off_by_default() -> None:
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
    subprocess.run([sys.executable, "bench/run.py", "--quick", "--sizes", "1k", "--no-write", "--json", str(out)],
                   cwd=ROOT, check=True, timeout=120, capture_output=True)
    after = (ROOT / "BENCHMARKS.md").read_text() if (ROOT / "BENCHMARKS.md").exists() else None
    assert before == after
    [row] = json.loads(out.read_text())
    assert row["results"] > 500
    exporter = row["m"]["exporter"]
    assert exporter["concurrent_requests"] == 1 and exporter["concurrent_good"] == 50
    assert exporter["requests_per_scrape"] == 1.0  # every steady scrape polled once, incrementally
    assert exporter["bytes_per_poll"] < row["payload_bytes"]


# -- the hand-inlined apply() against the plain per-result rules ----------------------

