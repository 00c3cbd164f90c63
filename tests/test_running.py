"""Running means running (docs/design-notes.md): labs that run for hours, against the independent fake.

The fake's labs run 3 hours with a 60-minute window, and the exporter starts while they run.
At the first scrape and after every poll, sum(skillable_lab_instances_running) must equal the
fake's truth (started and not ended); an end leaves _running and is counted once; no running
lab is ever in skillable_lab_instances. The same across a restart with a state file, and for
wall-clock steps (hostile input 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest

from exporter.poller import Poller

from .conftest import make_poller
from .fakeapi import FakeSkillable, lab
from .harness import Harness, Samples, harness, parse, total  # noqa: F401 - harness is a fixture

pytestmark = pytest.mark.integration  # every test here polls the fake API over loopback

NOW = 1_800_000_000
HOUR = 3600
WINDOW = 60 * 60


def long_labs(fake: FakeSkillable, first_id: int, starts: range, seconds: int = 3 * HOUR) -> None:
    """Labs of `seconds` each, one per start; one in five fails, so ends have two statuses."""
    for i, start in enumerate(starts):
        fake.run(first_id + i, start, seconds, status=20 if i % 5 == 0 else 4, LabHostId=40 + i % 3)


def ended_since(fake: FakeSkillable, since: float) -> list[dict[str, Any]]:
    now = fake.clock()
    return [r for r in fake.records_now() if r.get("End") is not None and since <= r["End"] <= now]


def check(fake: FakeSkillable, samples: Samples, counted_since: float) -> None:
    """What every scrape must show, against the fake's truth."""
    running = fake.running()
    assert total(samples, "skillable_lab_instances_running") == len(running)
    # skillable_lab_instances: ended labs whose last change is within the window, no running one.
    in_window = ended_since(fake, fake.clock() - WINDOW)
    assert total(samples, "skillable_lab_instances") == len(in_window)
    assert total(samples, "skillable_lab_instances", completion_status="incomplete") == 0
    ended = ended_since(fake, counted_since)
    assert total(samples, "skillable_lab_instances_ended_total") == len(ended)
    failed = [r for r in ended if r["CompletionStatus"] == 20]
    assert total(samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == len(failed)
    assert total(samples, "skillable_lab_instances_expired_total") == 0


def test_labs_running_for_hours_are_running_from_the_first_scrape_to_their_end(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    # Started over the last 2.5 hours (so most before the window), and more while the exporter runs.
    long_labs(fake, 1, range(NOW - int(2.5 * HOUR), NOW, 600))
    long_labs(fake, 100, range(NOW + 300, NOW + 2 * HOUR, 900))
    h = harness()
    first = h.scrape()
    assert first.up == 1
    assert total(first.samples, "skillable_lab_instances_running") == len(fake.running()) == 15
    assert fake.latest_requests()[0].minutes == 1440  # the first poll looks back for running labs
    check(fake, first.samples, NOW - WINDOW)
    for _ in range(5 * 6):  # five hours in 10-minute polls: every lab of the first batch ends
        fake.advance(600)
        h.mono.advance(600)
        check(fake, h.scrape().samples, NOW - WINDOW)
    assert not fake.running()
    # Started: only what started inside the first window or later (what came before was not watched).
    started = [r for r in fake.records_now() if r["Start"] >= NOW - WINDOW]
    assert total(h.scrape().samples, "skillable_lab_instances_started_total") == len(started)


def test_running_labs_stay_running_across_a_restart_and_their_ends_count_once(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = str(tmp_path / "state.json")
    long_labs(fake, 1, range(NOW - 2 * HOUR, NOW, 900))
    first = harness(path)
    check(fake, first.scrape().samples, NOW - WINDOW)
    fake.advance(600)
    first.mono.advance(600)
    check(fake, first.scrape().samples, NOW - WINDOW)
    running_before = len(fake.running())
    assert running_before == 8
    first.close()
    fake.advance(20 * 60)  # down for 20 minutes: some labs end meanwhile
    second = harness(path)
    samples = second.scrape().samples
    assert fake.latest_requests()[-1].minutes == 20 + 2  # since the saved success, plus the overlap
    check(fake, samples, NOW - WINDOW)
    for _ in range(3 * 6):
        fake.advance(600)
        second.mono.advance(600)
        check(fake, second.scrape().samples, NOW - WINDOW)
    assert not fake.running()


def test_a_lab_that_never_ends_expires_at_the_limit_and_is_counted(fake: FakeSkillable) -> None:
    fake.run(1, NOW - 60, 10 * HOUR)  # runs past the limit: its End never comes in time
    fake.run(2, NOW - 60, HOUR)
    poller = make_poller(fake, max_running_minutes=3 * 60)
    poller.refresh(5)
    assert sum(poller.view().snapshot["place"].running.values()) == 2
    for _ in range(4 * 6):
        fake.advance(600)
        poller.refresh(5)
    snap = poller.view().snapshot
    assert sum(snap["place"].running.values()) == 0 and snap.expired_total == 1
    assert sum(snap["place"].ended.values()) == 1 and snap.tracked == 0
    fake.advance(7 * HOUR)  # its End arrives, after it expired: an end, not a start
    poller.refresh(5)
    snap = poller.view().snapshot
    assert sum(snap["place"].ended.values()) == 2 and sum(snap["place"].started.values()) == 2


# -- wall-clock steps (hostile input 4) -------------------------------------------------

class SteppedClock:
    """The exporter's wall clock: the fake's (the API's) plus a step the test sets."""

    def __init__(self, fake: FakeSkillable) -> None:
        self.fake = fake
        self.step = 0.0

    def __call__(self) -> float:
        return self.fake.clock() + self.step


def test_a_wall_clock_step_ahead_and_back_neither_forgets_nor_counts_twice(fake: FakeSkillable) -> None:
    """On main, with a 5-minute window, the step ahead evicted everything and the step back let
    the next overlapping poll count half the labs again."""
    wall = SteppedClock(fake)
    poller: Poller = make_poller(fake, window_minutes=5, clock=wall, monotonic=fake.clock)
    for i in range(20):  # a lab ends every 15 s, each lasting 2 minutes
        fake.run(i, NOW - 120 + i * 15, 120, LabHostId=49)
    poller.refresh(5)
    for minute in range(1, 9):
        fake.advance(60)
        if minute == 2:
            wall.step = 10 * 60  # ten minutes ahead
        if minute == 5:
            wall.step = 0.0  # and back
        poller.refresh(5)
        snap = poller.view().snapshot["place"]
        ended = [r for r in fake.records_now() if r.get("End") is not None]
        in_window = [r for r in ended if r["End"] >= fake.clock() - 5 * 60]
        assert sum(snap.started.values()) == len([r for r in fake.records_now() if r["Start"] <= fake.clock()])
        assert sum(snap.ended.values()) == len([r for r in ended if r["End"] >= NOW - 5 * 60]), minute
        assert sum(snap.running.values()) == len(fake.running()), minute
        assert sum(snap.closed.values()) == len(in_window), minute


def test_an_end_in_the_year_3000_never_keeps_an_instance_in_memory(fake: FakeSkillable) -> None:
    """Hostile input 12: the End was once the instance's last change, so it was never evicted."""
    fake.add(lab(1, NOW - 60, 32_503_680_000, status=4), lab(2, NOW - 60, NOW - 30, status=4))
    poller = make_poller(fake)
    poller.refresh(5)
    snap = poller.view().snapshot
    assert snap.invalid_total == 1 and snap.tracked == 1  # only lab 2
    fake.advance(2 * 3600)
    poller.refresh(5)
    assert poller.view().snapshot.tracked == 0


def test_the_demo_running_labs_match_its_stats_active_labs(run_exporter) -> None:  # type: ignore[no-untyped-def]
    """Once, with --demo, sum(skillable_lab_instances_running) was 450 while /stats said 595."""
    exporter = run_exporter("--demo")
    for _ in range(3):  # the first scrape and the polls after it
        samples = parse(exporter.get("/metrics").text)
        running = total(samples, "skillable_lab_instances_running")
        active = total(samples, "skillable_account_active_labs")
        assert running > 100
        assert abs(running - active) <= max(3, 0.01 * active), (running, active)
