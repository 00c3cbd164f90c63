"""Backfill replays /labinstance/search too: start-up times, labs never ready, errors and launches per
integration land in the history at the time they happened, and their last values equal the fake API's
truth; the state file carries the launch memory on to the live exporter."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest

from exporter.persistence import read_state_file

from .fakeapi import LIFECYCLE_ERROR, OTHER_ERROR, WEBHOOK_ERROR, FakeSkillable
from .test_backfill import DAY, backfill, iso, samples

pytestmark = pytest.mark.integration  # backfill as a process, against the fake on loopback
STEP = 300


@pytest.fixture
def live_fake() -> Iterator[FakeSkillable]:
    server = FakeSkillable(live=True)
    yield server
    server.stop()


def last_values(text: str, name: str, *labels: str) -> dict[Any, float]:
    """The value at the last timestamp of each series of `name`, by the given labels, nonzero ones."""
    latest: dict[Any, tuple[int, float]] = {}
    for ls, value, ts in samples(text, name):
        key = tuple(ls[label] for label in labels)
        key = key if len(key) > 1 else key[0]
        if key not in latest or ts >= latest[key][0]:
            latest[key] = (ts, value)
    return {k: v for k, (_, v) in latest.items() if v}


def test_backfill_replays_start_up_times_and_errors_at_their_time(live_fake: FakeSkillable, tmp_path: Path) -> None:
    fake = live_fake
    end = int(fake.clock()) // DAY * DAY
    start = end - DAY
    rng = random.Random(11)
    for i in range(40):
        begin = start + 3600 + rng.randrange(DAY - 4 * 3600)
        length = rng.randrange(120, 5400)
        errors = tuple((rng.randrange(0, length + 600), rng.choice((LIFECYCLE_ERROR, WEBHOOK_ERROR, OTHER_ERROR)))
                       for _ in range(rng.choice((0, 1, 2))))
        fake.launch(100 + i, begin, length, startup=None if i % 7 == 0 else rng.randrange(20, 600), errors=errors,
                    consumer=rng.choice(("LMS", "Portal", None)), host=rng.choice((11, 12)),
                    LabProfileId=rng.choice((7001, 7002)))
    # One lab whose error, dated 3 hours into its run, the history must show then, not at its end.
    fake.launch(99, start + 7200, 6 * 3600, startup=60, errors=((3 * 3600 + 10, LIFECYCLE_ERROR),),
                host=13, LabProfileId=7003)
    state = tmp_path / "state.json"
    done = backfill(fake, f"--from={iso(start)}", f"--to={iso(end)}", f"--output={tmp_path / 'out'}",
                    f"--step={STEP // 60}m", "--label=job=skillable", "--label=instance=x:1", "--keep-openmetrics",
                    f"--storage.state-file={state}", "--skillable.launch-page-size=9")
    assert done.returncode == 0, done.stderr
    assert fake.search_requests()
    text = "".join(p.read_text() for p in sorted((tmp_path / "out" / "openmetrics").glob("*.om")))
    truth = fake.launch_truth()
    place = ("datacenter_id", "delivery_region_id", "lab_host_id")
    assert last_values(text, "skillable_lab_startup_duration_seconds_count", *place[:2]) == \
        {k: float(v) for k, v in truth["startup_count"].items()}
    assert last_values(text, "skillable_lab_startup_duration_seconds_sum", *place[:2]) == \
        {k: float(v) for k, v in truth["startup_sum"].items()}
    assert last_values(text, "skillable_lab_profile_startup_duration_seconds_count", "lab_profile_id") == \
        {k: float(v) for k, v in truth["profile_startup_count"].items()}
    assert last_values(text, "skillable_lab_instances_not_ready_total", *place) == \
        {k: float(v) for k, v in truth["not_ready"].items()}
    assert last_values(text, "skillable_lab_errors_total", *place, "kind") == \
        {k: float(v) for k, v in truth["errors"].items()}
    assert last_values(text, "skillable_lab_profile_errors_total", "lab_profile_id", "kind") == \
        {k: float(v) for k, v in truth["profile_errors"].items()}
    assert last_values(text, "skillable_lab_integration_instances_started_total", "api_consumer") == \
        {k: float(v) for k, v in truth["launches"].items()}
    # Lab 99's error is in the history at the first step after it happened, three hours before its End.
    error_at = start + 7200 + 3 * 3600 + 10
    series = sorted((ts, v) for ls, v, ts in samples(text, "skillable_lab_errors_total")
                    if ls["lab_host_id"] == "13" and ls["kind"] == "lifecycle_action")
    first = next(ts for ts, v in series if v)
    assert first == error_at - error_at % STEP + STEP
    # The live exporter continues from --to: the state file holds the launch memory and its checkpoints.
    saved = read_state_file(str(state))[""].launch
    assert saved is not None and saved.horizon == start and saved.launches_until == end
