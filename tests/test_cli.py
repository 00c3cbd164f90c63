"""The exporter as a user runs it: a real process, real HTTP, the demo and the fake API."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .fakeapi import FakeSkillable, lab
from .harness import parse, total

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000
UPSTREAM_SECONDS = 3.5  # a slow API answer: longer than a 2 s scrape timeout, shorter than --skillable.timeout


def readme_metric_names() -> set[str]:
    return set(re.findall(r"^\| `((?:skillable|process|python)_[a-z_]+)` \|", (ROOT / "README.md").read_text(),
                          flags=re.M))


@pytest.mark.integration
def test_demo_serves_every_metric_with_up_and_all_labels(run_exporter) -> None:  # type: ignore[no-untyped-def]
    exporter = run_exporter("--demo")
    text = exporter.get("/metrics").text
    served = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))
    assert readme_metric_names() <= served
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "python_info"} <= served
    assert re.search(r"^process_resident_memory_bytes [1-9]", text, flags=re.M)
    assert re.search(r"^skillable_up 1\.0$", text, flags=re.M)
    sample = re.search(r"^skillable_lab_instances\{([^}]*)\} ", text, flags=re.M)
    assert sample is not None
    for label in ("datacenter_id", "delivery_region_id", "lab_host_id", "completion_status"):
        assert f'{label}="' in sample.group(1)
    # Every completion status shows up in the demo, and the unhealthy host fails.
    for status in ("complete", "lab_creation_failed", "unknown", "submitted_for_grading"):
        assert re.search(rf'^skillable_lab_instances\{{completion_status="{status}"[^}}]*\}} [1-9]', text, re.M), status
    assert re.search(r'^skillable_lab_instances\{completion_status="lab_creation_failed",[^}]*lab_host_id="117"\} '
                     r'[1-9]', text, re.M)
    assert re.search(r"^skillable_exams_total\{[^}]*\} [1-9]", text, re.M)
    # The demo names its datacenters and hosts, as a user's config would.
    assert 'skillable_lab_host_info{lab_host_id="117",lab_host_name="eu-west-host-117"} 1.0' in text
    assert 'skillable_datacenter_info{datacenter_id="3",datacenter_name="EU West"} 1.0' in text
    assert re.search(r"^skillable_lab_instances_running\{[^}]*\} [1-9]", text, re.M)
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: .ci/run installs Debian's prometheus package"
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.mark.integration
def test_against_the_fake_the_key_never_leaks(run_exporter, fake: FakeSkillable) -> None:  # type: ignore[no-untyped-def]
    fake.state.live_offset = 0.0  # the exporter process runs on the real clock: so does the fake
    now = int(fake.clock())
    fake.add(lab(1, now - 600, now - 60, status=20), lab(2, now - 300))
    key = fake.state.api_key
    # Every scrape polls (not the default), so the second scrape meets the refused key.
    exporter = run_exporter("--log.level=debug", "--skillable.min-poll-interval=0",
                            env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": key})
    metrics = exporter.get("/metrics").text
    assert "skillable_up 1.0" in metrics
    assert 'completion_status="lab_creation_failed"' in metrics
    fake.state.api_key = "rotated"  # now the fake refuses the key: an error gets logged
    fake.fault(lambda h: h.send_raw(401, f"bad key {key}".encode(), "text/plain"))
    metrics += exporter.get("/metrics").text
    landing = exporter.get("/").text
    assert "Skillable Exporter" in landing and 'href="metrics"' in landing
    assert exporter.stop() == 0  # SIGTERM is a clean shutdown
    log = exporter.log()
    assert "API key refused" in log
    for output in (metrics, landing, log):
        assert key not in output


@pytest.mark.integration
def test_healthz_and_landing_page_never_call_the_api(run_exporter, fake: FakeSkillable) -> None:  # type: ignore[no-untyped-def]
    exporter = run_exporter(env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    for _ in range(5):
        assert exporter.get("/healthz").text == "OK\n"
        assert exporter.get("/").status_code == 200
    assert fake.state.seen == []
    assert exporter.get("/nothing-here").status_code == 404
    assert exporter.get("/metrics").status_code == 200
    assert len(fake.latest_requests()) == 1


@pytest.mark.integration
def test_scrape_timeout_header_caps_the_scrapes_wait_and_the_poll_lands_later(  # type: ignore[no-untyped-def]
    run_exporter, fake: FakeSkillable
) -> None:
    """Prometheus' header shortens how long a scrape waits for a slow poll (answering from memory in
    time), never the poll itself, whose result reaches the next scrape."""
    import time

    fake.state.live_offset = 0.0  # the exporter process runs on the real clock: so does the fake
    fake.add(lab(1, int(fake.clock()) - 600, int(fake.clock()) - 60, status=4))

    def slow(h: Any) -> None:
        time.sleep(UPSTREAM_SECONDS)
        h.answer()

    fake.fault(slow, endpoint="LatestResults")
    exporter = run_exporter(env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                                 "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false",
                                 "SKILLABLE_COLLECTOR_CATALOG": "false"})
    started = time.monotonic()
    response = exporter.get("/metrics", headers={"X-Prometheus-Scrape-Timeout-Seconds": "2"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 1.0 < elapsed < 2.0  # waited for the poll, up to the header's 2 s less the render margin
    samples = parse(response.text)
    assert total(samples, "skillable_up") == 0  # the poll had not answered yet
    assert total(samples, "skillable_lab_instances_started_total") == 0
    assert total(samples, "skillable_api_requests_total", endpoint="LatestResults") == 1  # but it was asked
    time.sleep(UPSTREAM_SECONDS + 0.5 - elapsed)  # the slow answer arrives; no new poll is due yet
    samples = parse(exporter.get("/metrics").text)
    assert total(samples, "skillable_up") == 1  # the same poll, not cut at 2 s, landed
    assert total(samples, "skillable_lab_instances_started_total") == 1
    assert total(samples, "skillable_api_requests_total", endpoint="LatestResults") == 1
    assert total(samples, "skillable_api_request_failures_total") == 0


def test_demo_traffic_is_deterministic_and_bounded_in_memory() -> None:
    from exporter.demo import MAX_LAB_SECONDS, Traffic

    a, b = Traffic(labs_per_minute=2.0), Traffic(labs_per_minute=2.0)
    now = 1_800_000_000.0
    assert a.changed_within(now, 60) == b.changed_within(now, 60)
    limit = 10080 + MAX_LAB_SECONDS // 60 + 60
    for day in range(10):  # ten days of a long-running demo, polled once a simulated hour
        for hour in range(24):
            a.changed_within(now + day * 86400 + hour * 3600, 60)
    assert a.minutes_held <= limit + 24 * 60 + MAX_LAB_SECONDS // 60
