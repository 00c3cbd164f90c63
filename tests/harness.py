"""In-process exporter for tests: ExporterApp + ExporterServer on loopback with the fake's clocks, and
helpers to read an exposition."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.persistence import StateStore
from exporter.server import ExporterServer

from .conftest import MonotonicStub
from .fakeapi import FakeSkillable

SCRAPE_TIMEOUT = 3.0  # what Prometheus would send in X-Prometheus-Scrape-Timeout-Seconds
MAX_BODY = 64 * 1024  # --skillable.max-response-bytes in these tests


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# The counters whose values must never be lost or doubled (the exporter's lab counters).
LAB_COUNTERS = (
    "skillable_lab_instances_started_total",
    "skillable_lab_instances_ended_total",
    "skillable_exams_total",
    "skillable_exams_passed_total",
    "skillable_lab_run_time_seconds_count",
    "skillable_lab_task_completion_ratio_count",
    "skillable_exam_score_ratio_count",
)


def lab_counters(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {key: value for key, value in samples.items() if key[0] in LAB_COUNTERS}


@dataclass
class Scrape:
    status: int
    text: str
    elapsed: float

    @property
    def samples(self) -> Samples:
        return parse(self.text)

    @property
    def up(self) -> float:
        return total(self.samples, "skillable_up")

    def failures(self, reason: str | None = None) -> float:
        labels = {"endpoint": "LatestResults"} | ({"reason": reason} if reason else {})
        return total(self.samples, "skillable_api_request_failures_total", **labels)


class Harness:
    """ExporterApp + ExporterServer in this process, on loopback, polling the fake with its clocks."""

    def __init__(self, fake: FakeSkillable, state_file: str | None = None, **env: str) -> None:
        environ = {
            "SKILLABLE_API_URL": fake.url,
            "SKILLABLE_API_KEY": fake.state.api_key,
            "SKILLABLE_COLLECTOR_STATS": "false",
            "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false",
            "SKILLABLE_COLLECTOR_CATALOG": "false",
            "SKILLABLE_MAX_RESPONSE_BYTES": str(MAX_BODY),
        }
        environ.update(env)
        self.fake = fake
        self.mono = MonotonicStub()
        self.app = ExporterApp(load_config({}, environ), clock=fake.clock, monotonic=self.mono)
        self.store = StateStore(state_file) if state_file else None
        if self.store is not None:
            self.store.attach(self.app.pollers)
        self.server = ExporterServer(("127.0.0.1", 0), self.app)
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.session = requests.Session()
        self._closed = False

    def scrape(self, scrape_timeout: float | None = SCRAPE_TIMEOUT) -> Scrape:
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": f"{scrape_timeout:g}"} if scrape_timeout else {}
        started = time.monotonic()
        response = self.session.get(self.url + "/metrics", headers=headers, timeout=30)
        return Scrape(response.status_code, response.text, time.monotonic() - started)

    @property
    def poller(self):  # type: ignore[no-untyped-def]
        return self.app.pollers[""]

    def close(self) -> None:
        """As on SIGTERM: stop serving, write the state file a last time, close."""
        if self._closed:
            return
        self._closed = True
        self.session.close()
        self.server.shutdown()
        self.server.server_close()
        if self.store is not None:
            self.store.shutdown(self.app.pollers, 5)
        self.app.close()


@pytest.fixture
def harness(fake: FakeSkillable) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(state_file: str | None = None, **env: str) -> Harness:
        made.append(Harness(fake, state_file, **env))
        return made[-1]

    yield make
    for h in made:
        h.close()


