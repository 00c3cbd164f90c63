"""Load and soak: 50 concurrent scrapers on loopback against a real exporter process, bounded in time.

No scrape fails, the API sees one LatestResults poll per --skillable.min-poll-interval,
the exporter's thread count stays bounded and its memory flat, and SIGTERM writes the
state file and exits 0. SOAK_SECONDS (at most 30) sets the length; the default keeps
the test near 25 s of wall time.

Memory: glibc gives each thread that allocates its own malloc arena (up to 8 per core), and
each arena keeps what it once held, so with 50 server threads the RSS of a Python process
climbs for a minute or two before it levels off (measured here: 41 MB -> 83 MB after 2 min,
then flat for minutes more). That is allocator warm-up, not a leak, and it would hide a leak
in a 20 s test. So the exporter runs with MALLOC_ARENA_MAX=2 (as the container image should),
where a leak is what is left to grow.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.persistence import read_state_file

from .fakeapi import FakeSkillable, lab
from .harness import parse, total

pytestmark = pytest.mark.integration  # the fake API and the exporter's server over loopback

SCRAPERS = 50
SECONDS = min(float(os.environ.get("SOAK_SECONDS", "20")), 30.0)
POLL_INTERVAL = 2.0
SAMPLE_EVERY = 0.25


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (kB) and Threads of a process, from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    return out


def test_fifty_scrapers_one_poll_per_interval_bounded_threads_flat_memory(
    run_exporter: Any, tmp_path: Path
) -> None:
    live = FakeSkillable(live=True)
    try:
        now = int(time.time())
        # A few thousand labs in the window, on 40 hosts: a realistic exposition of a few thousand series.
        live.add(*(lab(i, now - 3000 + i % 2900, (now - 60 + i % 50) if i % 3 else None, status=4 if i % 5 else 20,
                       host=100 + i % 40, datacenter=1 + i % 4, region=1 + i % 3) for i in range(3000)))
        state = tmp_path / "state.json"
        exporter = run_exporter(
            f"--skillable.min-poll-interval={POLL_INTERVAL:g}", f"--storage.state-file={state}",
            env={"SKILLABLE_API_URL": live.url, "SKILLABLE_API_KEY": live.state.api_key, "MALLOC_ARENA_MAX": "2"},
        )
        pid = exporter.proc.pid
        assert "skillable_up 1.0" in exporter.get("/metrics").text  # warm: first poll done
        polls_before = len(live.latest_requests())

        stop = threading.Event()
        failures: list[str] = []
        latencies: list[float] = []
        samples: list[tuple[float, dict[str, int]]] = []
        lock = threading.Lock()

        def scraper(index: int) -> None:
            session = requests.Session()
            headers = {"X-Prometheus-Scrape-Timeout-Seconds": "10"}
            if index % 2:
                headers["Accept-Encoding"] = "gzip"
            if index % 5 == 0:
                headers["Accept"] = "application/openmetrics-text; version=1.0.0"
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = session.get(exporter.url + "/metrics", headers=headers, timeout=10)
                    ok = response.status_code == 200 and "skillable_up 1" in response.text
                    problem = "" if ok else f"status {response.status_code} up missing"
                except requests.RequestException as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with lock:
                    latencies.append(time.monotonic() - started)
                    if problem:
                        failures.append(problem)
            session.close()

        def sampler() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(), proc_status(pid)))
                stop.wait(SAMPLE_EVERY)

        def churn() -> None:  # labs keep starting and ending while it is scraped
            next_id = 100_000
            while not stop.is_set():
                t = int(time.time())
                live.add(lab(next_id, t - 5, t - 1, status=4, host=100 + next_id % 40), lab(next_id + 1, t - 2))
                next_id += 2
                stop.wait(0.5)

        threads = [threading.Thread(target=scraper, args=(i,), daemon=True) for i in range(SCRAPERS)]
        threads += [threading.Thread(target=sampler, daemon=True), threading.Thread(target=churn, daemon=True)]
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(15)
        elapsed = time.monotonic() - began

        assert not failures, f"{len(failures)} failed scrapes, e.g. {failures[:3]}"
        assert len(latencies) >= SCRAPERS * 5, len(latencies)
        polls = len(live.latest_requests()) - polls_before
        expected = elapsed / POLL_INTERVAL
        assert expected - 2 <= polls <= expected + 2, (polls, expected)  # one poll per interval, not per scrape

        threads_seen = [s["Threads"] for _, s in samples]
        assert max(threads_seen) <= SCRAPERS + 20, max(threads_seen)
        # Flat memory: after a warm-up of a third, the RSS of the last third is no higher than
        # the middle third's, give or take allocator noise.
        rss = [s["VmRSS"] for _, s in samples]
        third = len(rss) // 3
        middle, last = statistics.median(rss[third:2 * third]), statistics.median(rss[2 * third:])
        assert last <= middle * 1.05 + 4096, (middle, last, rss[::8])
        assert max(rss) < 200 * 1024

        metrics = parse(exporter.get("/metrics").text)
        requests_made = total(metrics, "skillable_api_requests_total", endpoint="LatestResults")
        exporter.proc.send_signal(signal.SIGTERM)
        assert exporter.proc.wait(15) == 0
        saved = read_state_file(str(state))[""]
        assert saved.requests["LatestResults"] == requests_made == len(live.latest_requests())
        assert "state file written" in exporter.log()
        report = (f"soak: {len(latencies)} scrapes in {elapsed:.1f}s by {SCRAPERS} scrapers, "
                  f"p50 {statistics.median(latencies) * 1000:.1f} ms, "
                  f"max {max(latencies) * 1000:.0f} ms, {polls} polls, threads <= {max(threads_seen)}, "
                  f"RSS {rss[0] // 1024}->{rss[-1] // 1024} MB")
        print(report)
    finally:
        live.stop()
