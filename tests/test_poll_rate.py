"""No client can shorten the poll deadline or drive the API (hostile input 3), against a real exporter process.

A scrape's X-Prometheus-Scrape-Timeout-Seconds shortens how long that scrape waits, never the
poll: a poll runs to --skillable.timeout and lands for later scrapes. And the default
--skillable.min-poll-interval holds a loop of scrapes to one upstream request per interval.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest

from exporter.config import DEFAULT_MIN_POLL_INTERVAL

from .fakeapi import FakeSkillable, lab
from .harness import parse, total

pytestmark = pytest.mark.integration  # every test here polls the fake API over loopback

UPSTREAM_SECONDS = 0.8  # every answer of the API takes this long: longer than a hostile deadline allows


def env_for(fake: FakeSkillable) -> dict[str, str]:
    return {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
            "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"}


def test_a_client_sending_a_tiny_scrape_timeout_cannot_fail_the_polls(run_exporter: Any, fake: FakeSkillable) -> None:
    fake.add(lab(1, fake.clock() - 600, fake.clock() - 60, status=4))

    def slow(h: Any) -> None:
        time.sleep(UPSTREAM_SECONDS)
        h.answer()

    fake.fault_always(slow)
    # Every scrape may poll (the worst case): the hostile client starts or joins a poll each time.
    exporter = run_exporter("--skillable.min-poll-interval=0", "--skillable.timeout=5", env=env_for(fake))
    stop = threading.Event()
    hostile_answers: list[int] = []

    def hostile() -> None:
        while not stop.is_set():
            response = exporter.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "0.001"})
            hostile_answers.append(response.status_code)
            stop.wait(0.5)

    attacker = threading.Thread(target=hostile, daemon=True)
    attacker.start()
    try:
        ups, timeouts = [], []
        for _ in range(8):
            samples = parse(exporter.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "10"}).text)
            ups.append(total(samples, "skillable_up"))
            timeouts.append(total(samples, "skillable_api_request_failures_total", reason="timeout"))
            time.sleep(1)
    finally:
        stop.set()
        attacker.join(10)
    assert len(hostile_answers) >= 8 and set(hostile_answers) == {200}  # it was answered, from the last poll
    assert ups == [1.0] * 8, ups  # the normal scraper always saw a good poll
    assert timeouts[-1] == 0  # no poll was cut short by the hostile deadline
    assert "Traceback" not in exporter.log()


def test_a_scrape_loop_makes_at_most_one_upstream_request_per_default_interval(
    run_exporter: Any, fake: FakeSkillable
) -> None:
    fake.add(lab(1, fake.clock() - 600, fake.clock() - 60, status=4))
    exporter = run_exporter(env=env_for(fake))  # the default --skillable.min-poll-interval
    assert DEFAULT_MIN_POLL_INTERVAL >= 5
    seconds, scrapes = 4.0, 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        response = exporter.get("/metrics")
        assert response.status_code == 200 and "skillable_up 1.0" in response.text
        scrapes += 1
    elapsed = time.monotonic() - started
    polls = len(fake.latest_requests())
    assert scrapes >= 20, scrapes  # a real loop, many scrapes
    assert polls <= math.ceil(elapsed / DEFAULT_MIN_POLL_INTERVAL), (polls, scrapes)
    metrics = parse(exporter.get("/metrics").text)
    assert total(metrics, "skillable_api_requests_total", endpoint="LatestResults") == polls
