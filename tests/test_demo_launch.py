"""The demo's /labinstance/search (mode 5): the same labs as its LatestResults, the faults it is built to show
(one slow datacenter, one profile whose life-cycle script fails, webhook errors on one integration), made-up
credentials in its bodies, and an exporter on the demo that shows the faults and leaks none of them."""

from __future__ import annotations

import json
from collections import defaultdict
from statistics import mean
from typing import Any
from collections.abc import Iterator

import pytest
import requests

from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.demo import (
    DEMO_API_KEY,
    DEMO_SECRET_MARKERS,
    LIFECYCLE_FAILING_PROFILE,
    SLOW_DATACENTER,
    WEBHOOK_CONSUMER,
    SimulatorServer,
    start_simulator,
)
from exporter.model import STATUS_NAMES

from .harness import parse, registry_text
from .test_launch_collector import formatted
from .test_logs import Records, records  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration  # a simulator on loopback
NOW = 1_800_000_000


@pytest.fixture
def demo() -> Iterator[SimulatorServer]:
    server = start_simulator(clock=lambda: NOW, history_minutes=None)
    yield server
    server.shutdown()
    server.server_close()


def get(server: SimulatorServer, path: str, **params: Any) -> Any:
    response = requests.get(server.url + path, params=params, headers={"api_key": DEMO_API_KEY}, timeout=30)
    response.raise_for_status()
    return response.json()


def search_all(server: SimulatorServer, start: int, sort: str = "start") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    index = 0
    while True:
        page = get(server, "/labinstance/search", mode=5, start=start, sort=sort, pageSize=1000, pageIndex=index)
        out += page["Results"]
        index += 1
        if index >= page["TotalPages"]:
            return out


def test_search_shows_the_labs_latest_results_shows(demo: SimulatorServer) -> None:
    latest = {r["LabInstanceId"]: r for r in get(demo, "/LatestResults", minutes=180)["Results"]}
    found = {r["Id"]: r for r in search_all(demo, NOW - 180 * 60)}
    started = {i: r for i, r in latest.items() if r["Start"] >= NOW - 180 * 60}
    assert started and set(started) == set(found)
    for i, r in started.items():
        c = found[i]
        assert (c["Start"], c["End"], c["LabHostId"], c["DatacenterId"], c["DeliveryRegionId"], c["LabProfileId"]) == \
            (r["Start"], r["End"], r["LabHostId"], r["DatacenterId"], r["DeliveryRegionId"], r["LabProfileId"])
        if r["End"] is not None:
            assert c["CompletionStatus"].lower().replace(" ", "_") == STATUS_NAMES.get(r["CompletionStatus"], "unknown")


def test_search_pages_are_sorted_and_running_labs_sort_last_by_end(demo: SimulatorServer) -> None:
    by_end = search_all(demo, NOW - 7200, "end desc")
    ends = [r["End"] for r in by_end]
    ended = [e for e in ends if e is not None]
    assert ended == sorted(ended, reverse=True) and ends[len(ended):] == [None] * (len(ends) - len(ended))
    starts = [r["Start"] for r in search_all(demo, NOW - 7200, "start")]
    assert starts == sorted(starts) and min(starts) >= NOW - 7200


def test_the_demo_faults_and_its_made_up_secrets(demo: SimulatorServer) -> None:
    labs = search_all(demo, NOW - 6 * 3600)
    startup: dict[int, list[int]] = defaultdict(list)
    for r in labs:
        if r["StartupDuration"] is not None:
            startup[r["DatacenterId"]].append(r["StartupDuration"])
    slow = mean(startup[SLOW_DATACENTER])
    assert all(slow > 3 * mean(v) for dc, v in startup.items() if dc != SLOW_DATACENTER)
    lifecycle = [r for r in labs if any("life cycle action" in e["Message"] for e in r["Errors"])]
    assert lifecycle and {r["LabProfileId"] for r in lifecycle} == {LIFECYCLE_FAILING_PROFILE}
    webhook = [r for r in labs if any("webhook" in e["Message"] for e in r["Errors"])]
    assert webhook and {r["ApiConsumerName"] for r in webhook} == {WEBHOOK_CONSUMER}
    assert any(e["Time"] > r["End"] for r in webhook if r["End"] is not None for e in r["Errors"])
    assert any(r["End"] is not None and r["StartupDuration"] is None for r in labs)  # never ready
    text = json.dumps(labs)
    assert all(marker in text for marker in DEMO_SECRET_MARKERS)


def test_an_exporter_on_the_demo_shows_the_faults_and_leaks_no_secret(demo: SimulatorServer, records: Records) -> None:
    app = ExporterApp(load_config({}, {"SKILLABLE_API_URL": demo.url, "SKILLABLE_API_KEY": DEMO_API_KEY}),
                      clock=lambda: NOW)
    try:
        poller = app.pollers[""]
        poller.refresh(30)
        assert poller.wait_launch(1, 30)
        text = registry_text(app).decode()
    finally:
        app.close()
    lines = formatted(records)
    samples = parse(text)

    def mean_startup(dc: str) -> float:
        labels = {("datacenter_id", dc)}
        count = sum(v for (n, ls), v in samples.items()
                    if n == "skillable_lab_startup_duration_seconds_count" and labels <= ls)
        total = sum(v for (n, ls), v in samples.items()
                    if n == "skillable_lab_startup_duration_seconds_sum" and labels <= ls)
        return total / count

    assert mean_startup(str(SLOW_DATACENTER)) > 3 * mean_startup("1")
    assert samples[("skillable_lab_profile_errors_total", frozenset(
        {("lab_profile_id", str(LIFECYCLE_FAILING_PROFILE)), ("kind", "lifecycle_action")}))] > 0
    assert samples[("skillable_lab_integration_instances_started_total",
                    frozenset({("api_consumer", WEBHOOK_CONSUMER)}))] > 0
    assert any("launch poll ok" in line for line in lines)
    for output in (text, *lines):
        assert not any(marker in output for marker in DEMO_SECRET_MARKERS), output[:300]
