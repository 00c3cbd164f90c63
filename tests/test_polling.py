"""Polling, dedup, incremental minutes and eviction, against the independent fake over real HTTP."""

from __future__ import annotations

import threading

import pytest

from exporter.poller import Poller

from .harness import MonotonicStub, make_poller
from .fakeapi import FakeSkillable, lab

pytestmark = pytest.mark.integration  # every test here polls the fake API over loopback

NOW = 1_800_000_000


def instances_total(poller: Poller) -> int:
    return sum(poller.view().snapshot["place"].closed.values())


def ended(poller: Poller, status: str) -> int:
    snap = poller.view().snapshot["place"]
    return sum(v for (place, s), v in snap.ended.items() if s == status)


def started(poller: Poller) -> int:
    return sum(poller.view().snapshot["place"].started.values())


def test_gauge_sum_equals_instances_changed_in_window(fake: FakeSkillable) -> None:
    fake.add(
        lab(1, NOW - 30 * 60, NOW - 10 * 60, status=4),          # started and ended inside
        lab(2, NOW - 50 * 60),                                    # running, started inside
        lab(3, NOW - 5 * 3600, NOW - 20 * 60, status=1),          # started before, ended inside
        lab(4, NOW - 5 * 3600, NOW - 2 * 3600, status=4),         # entirely before the window
        lab(5, NOW - 90 * 60, NOW - 61 * 60, status=20),          # ended just before the window
        lab(6, NOW - 59 * 60, None, host=None, datacenter=None, region=None),
    )
    poller = make_poller(fake)
    poller.refresh(5)
    truth = fake.changed_within(60)
    assert {r["LabInstanceId"] for r in truth} == {1, 2, 3, 6}
    assert poller.view().health.up
    # skillable_lab_instances holds the ended ones (1 and 3), _running the others (2 and 6).
    assert instances_total(poller) == len([r for r in truth if r["End"] is not None]) == 2
    assert sum(poller.view().snapshot["place"].running.values()) == 2


def test_five_new_failures_count_exactly_five_and_repeat_polls_add_nothing(fake: FakeSkillable) -> None:
    fake.add(*(lab(i, NOW - 40 * 60, NOW - 30 * 60, status=4) for i in range(1, 11)))
    mono = MonotonicStub()
    poller = make_poller(fake, monotonic=mono)
    poller.refresh(5)
    before = ended(poller, "lab_creation_failed")
    assert before == 0
    fake.advance(60)
    fake.add(*(lab(100 + i, NOW + 10, NOW + 40, status=20) for i in range(5)))
    poller.refresh(5)
    assert ended(poller, "lab_creation_failed") == 5
    for _ in range(3):  # overlapping polls return the same five again
        fake.advance(30)
        mono.advance(30)
        poller.refresh(5)
    assert ended(poller, "lab_creation_failed") == 5
    assert ended(poller, "complete") == 10
    assert started(poller) == 15


def test_first_poll_asks_window_then_only_minutes_since_last_success(fake: FakeSkillable) -> None:
    poller = make_poller(fake, window_minutes=2400, overlap_minutes=2)
    poller.refresh(5)
    fake.advance(60)
    poller.refresh(5)
    fake.advance(150)  # 2.5 minutes -> ceil to 3, plus 2 overlap
    poller.refresh(5)
    asked = [s.minutes for s in fake.latest_requests()]
    assert asked == [2400, 1 + 2, 3 + 2]


def test_first_poll_looks_back_as_far_as_a_lab_may_run_capped_at_seven_days(fake: FakeSkillable) -> None:
    for max_running, window, expected in ((1440, 60, 1440), (30, 60, 60), (20_000, 60, 10080)):
        poller = make_poller(fake, window_minutes=window, max_running_minutes=max_running)
        poller.refresh(5)
        assert fake.latest_requests()[-1].minutes == expected


def test_ended_instance_changing_status_later_is_not_counted_again(fake: FakeSkillable) -> None:
    fake.add(lab(7, NOW - 600, NOW - 60, status=50, IsExam=True))
    poller = make_poller(fake)
    poller.refresh(5)
    fake.advance(60)
    fake.update(7, CompletionStatus=4, ExamScore=81.5, ExamMaxPossibleScore=100, ExamPassed=True)
    poller.refresh(5)
    snap = poller.view().snapshot["place"]
    place = ("3", "2", "49")
    assert snap.ended[(place, "submitted_for_grading")] == 1
    assert snap.ended[(place, "complete")] == 0
    assert snap.closed[(place, "complete")] == 1  # the gauge follows the current status
    assert snap.closed[(place, "submitted_for_grading")] == 0
    assert snap.exams[place] == 1 and snap.exams_passed[place] == 1
    assert snap.exam_score[("3", "2")].count == 1


def test_eviction_forgets_ended_instances_older_than_window_and_keeps_running_ones(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 20 * 60, NOW - 10 * 60, status=4), lab(2, NOW - 5 * 60))
    poller = make_poller(fake, window_minutes=30)
    poller.refresh(5)
    assert poller.view().snapshot.tracked == 2
    fake.advance(26 * 60)  # lab 1 last changed 36 minutes ago; lab 2 started 31 minutes ago
    poller.refresh(5)
    snap = poller.view().snapshot
    assert snap.tracked == 1  # lab 2 runs on, older than the window
    assert instances_total(poller) == 0 and sum(snap["place"].running.values()) == 1
    fake.update(2, End=fake.state.now - 10, CompletionStatus=4)  # the long lab ends now
    fake.advance(60)
    poller.refresh(5)
    snap = poller.view().snapshot
    assert started(poller) == 2  # lab 2's start is not counted a second time
    assert ended(poller, "complete") == 2
    assert snap.tracked == 1 and sum(snap["place"].running.values()) == 0 and instances_total(poller) == 1


def test_unknown_fields_and_status_codes_keep_up(fake: FakeSkillable) -> None:
    fake.state.extra_top_level = {"Paging": {"Next": None}, "ServerVersion": "9.9"}
    fake.add(lab(1, NOW - 60, NOW - 30, status=77, Tag="new", ExamDetails=[{"x": 1}]))
    poller = make_poller(fake)
    poller.refresh(5)
    view = poller.view()
    assert view.health.up
    assert view.snapshot["place"].ended[(("3", "2", "49"), "unknown")] == 1
    assert view.snapshot.invalid_total == 0


def test_concurrent_refreshes_share_one_poll(fake: FakeSkillable) -> None:
    fake.add(*(lab(i, NOW - 100, None) for i in range(200)))
    gate = threading.Event()

    def slow(handler) -> None:  # type: ignore[no-untyped-def]
        gate.wait(5)
        handler.send_json({"Results": [], "Status": 1, "Error": None})

    fake.fault(slow)
    poller = make_poller(fake)
    threads = [threading.Thread(target=poller.refresh, args=(8,)) for _ in range(20)]
    for t in threads:
        t.start()
    while not fake.latest_requests():
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(10)
    assert len(fake.latest_requests()) == 1


def test_a_scrape_that_arrived_during_a_poll_it_could_not_join_is_answered_by_that_poll(fake: FakeSkillable) -> None:
    """Every scrape polls (min interval 0), but single flight is judged by when a scrape came in:
    one that arrived while a poll ran and was only read after it ended (a busy exporter) is that
    poll's; one arriving after the poll's result gets a poll of its own."""
    mono = MonotonicStub()
    poller = make_poller(fake, min_interval=0.0, monotonic=mono)
    arrived_during = mono()  # this scrape arrives as the first poll starts; it is read only afterwards
    poller.refresh(5, arrived=mono())
    mono.advance(0.5)
    poller.refresh(5, arrived=arrived_during)
    assert len(fake.latest_requests()) == 1
    poller.refresh(5, arrived=mono())  # arrived after that poll's result
    assert len(fake.latest_requests()) == 2
    poller.refresh(5)  # no arrival time (a caller that keeps none): polls, as min interval 0 says
    assert len(fake.latest_requests()) == 3


def test_min_poll_interval_reuses_last_poll(fake: FakeSkillable) -> None:
    mono = MonotonicStub()
    poller = make_poller(fake, min_interval=30.0, monotonic=mono)
    poller.refresh(5)
    mono.advance(10)
    poller.refresh(5)
    assert len(fake.latest_requests()) == 1
    mono.advance(25)
    poller.refresh(5)
    assert len(fake.latest_requests()) == 2


def test_failed_poll_keeps_counters_and_sets_up_zero(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=20))
    mono = MonotonicStub()
    poller = make_poller(fake, monotonic=mono)
    poller.refresh(5)
    fake.fault(lambda h: h.send_json({"Results": None, "Status": 0, "Error": "Something broke"}))
    fake.advance(60)
    mono.advance(60)
    poller.refresh(5)
    view = poller.view()
    assert not view.health.up
    assert view.health.failures[("LatestResults", "api_error")] == 1
    assert ended(poller, "lab_creation_failed") == 1
    mono.advance(600)  # past any backoff
    fake.advance(60)
    poller.refresh(5)
    assert poller.view().health.up
    assert ended(poller, "lab_creation_failed") == 1


def test_api_key_is_sent_as_header(fake: FakeSkillable) -> None:
    poller = make_poller(fake)
    poller.refresh(5)
    request = fake.latest_requests()[0]
    assert request.api_key == fake.state.api_key
    assert fake.state.api_key not in request.path


def test_host_limit_sends_extra_hosts_to_other(fake: FakeSkillable) -> None:
    fake.add(*(lab(i, NOW - 100, NOW - 50, status=4, host=200 + i) for i in range(5)))
    poller = make_poller(fake, max_lab_hosts=3)
    poller.refresh(5)
    snap = poller.view().snapshot["place"]
    hosts = {place[2] for place in snap.keys}
    assert hosts == {"200", "201", "202", "other"}
    assert snap.overflow_total == 2
    assert sum(snap.started.values()) == 5


def test_per_profile_counts_follow_the_fake_across_overlapping_polls_and_the_cap(fake: FakeSkillable) -> None:
    for i in range(30):
        fake.add(lab(i, NOW - 1800 + i * 30, NOW - 1200 + i * 30, status=20 if i % 3 == 0 else 4,
                     LabProfileId=100 + i % 4, IsExam=i % 2 == 0, ExamScore=80 if i % 2 == 0 else None,
                     ExamMaxPossibleScore=100, ExamPassed=True if i % 2 == 0 else None))
    poller = make_poller(fake, max_lab_profiles=3)
    for _ in range(4):  # overlapping polls return the same records again
        poller.refresh(5)
        fake.advance(30)
    snap = poller.view().snapshot["profile"]
    truth: dict[tuple[tuple[str], str], int] = {}
    for r in fake.records_now():
        profile = (str(r["LabProfileId"]) if r["LabProfileId"] < 103 else "other",)  # the first three seen
        status = "lab_creation_failed" if r["CompletionStatus"] == 20 else "complete"
        truth[(profile, status)] = truth.get((profile, status), 0) + 1
    assert snap.keys == [("100",), ("101",), ("102",), ("other",)]
    assert {k: v for k, v in snap.ended.items() if v} == truth
    assert snap.started == {p: sum(v for (q, _), v in truth.items() if q == p) for p in snap.keys}
    assert snap.overflow_total == 7  # the instances of profile 103
    assert sum(snap.exams.values()) == 15 == sum(snap.exams_passed.values())
    assert snap.exam_score[("100",)].count == snap.exams[("100",)]
