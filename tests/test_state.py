"""FleetState: eviction by age, bounded state, the series guard, and a differential test of
apply/evict against a plain reference implementation of the counting rules."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.__main__ import build_parser
from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.demo import Traffic, latest_results_body
from exporter.model import STATUS_NAMES, LabResult, decode_latest_results
from exporter.state import EXTRA_PLACES, OVERFLOW_PLACE, RATIO_BUCKETS, FleetState, Histogram, Instance

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

def test_snapshot_is_the_same_object_until_the_state_changes() -> None:
    state = FleetState(10)
    state.apply([result(1, NOW - 100)], NOW - 3600)
    snap = state.snapshot()
    assert state.snapshot() is snap
    state.apply([result(1, NOW - 100, NOW - 10)], NOW - 3600)
    changed = state.snapshot()
    assert changed is not snap and sum(changed.running.values()) == 0
    state.invalid_total += 1  # the poller adds to it directly
    assert state.snapshot() is not changed and state.snapshot().invalid_total == 1
    before_evict = state.snapshot()
    assert state.evict(NOW) == 1
    assert state.snapshot() is not before_evict and state.snapshot().tracked == 0
    unchanged = state.snapshot()
    assert state.evict(NOW) == 0 and state.snapshot() is unchanged
    state.changed()
    assert state.snapshot() is not unchanged


# -- eviction by age ---------------------------------------------------------------

def test_eviction_keeps_instances_that_changed_since_and_forgets_the_rest() -> None:
    state = FleetState(10)
    state.apply([result(i, NOW - 3000 + i) for i in range(10)], NOW - 7200)  # running, last change = start
    state.apply([result(3, None, NOW - 100), result(7, None, NOW - 50)], NOW - 7200)  # two end later
    assert state.evict(NOW - 1000) == 8
    assert sorted(state.instances) == [3, 7]
    snap = state.snapshot()
    assert sum(snap.instances.values()) == 2 and sum(snap.running.values()) == 0
    assert state.evict(NOW - 60) == 1 and sorted(state.instances) == [7]


def test_an_evicted_instance_that_comes_back_is_tracked_and_evicted_again() -> None:
    state = FleetState(10)
    state.apply([result(1, NOW - 500, NOW - 400)], NOW - 3600)
    assert state.evict(NOW - 300) == 1
    state.apply([result(1, NOW - 500, NOW - 100)], NOW - 3600)
    assert list(state.instances) == [1]
    assert state.evict(NOW - 300) == 0
    assert state.evict(NOW) == 1 and not state.instances


def test_eviction_index_stays_bounded_under_many_updates() -> None:
    state = FleetState(10)
    for step in range(200):
        # every poll moves every instance's last change on: one new index entry each
        state.apply([result(i, NOW - 10_000 + step) for i in range(50)], NOW - 20_000)
        state.evict(NOW - 20_000)
    assert len(state.instances) == 50
    assert len(state._by_age) <= 2 * len(state.instances) + 1024


def test_eviction_works_on_a_state_filled_from_outside() -> None:
    """Restoring from a state file fills `instances` directly, bypassing apply()."""
    state = FleetState(10)
    place = ("1", "1", "1")
    for i in range(5):
        state.instances[i] = Instance(place, "complete", NOW - 900, NOW - 800 + i * 100, float(NOW - 800 + i * 100))
        state.by_status[(place, "complete")] += 1
        state.places.add(place)
    assert state.evict(NOW - 550) == 3
    assert sorted(state.instances) == [3, 4]
    assert state.by_status[(place, "complete")] == 2


def test_changed_makes_eviction_see_instances_added_from_outside() -> None:
    state = FleetState(10)
    state.apply([result(i, NOW - 900 + i) for i in range(5)], NOW - 3600)
    state.evict(NOW - 3600)  # a heap of five, all live
    place = ("1", "1", "1")
    state.instances[99] = Instance(place, "complete", NOW - 5000, NOW - 4000, NOW - 4000)
    state.by_status[(place, "complete")] += 1
    state.changed()
    assert state.evict(NOW - 3600) == 1 and 99 not in state.instances


def test_eviction_agrees_with_a_full_scan_on_simulated_traffic() -> None:
    """The heap must forget exactly what scanning every instance would."""
    traffic = Traffic(labs_per_minute=20, seed=3)
    state = FleetState(2000)
    now = float(NOW)
    window = 60 * 60
    last = None
    for step in range(40):
        minutes = 60 if last is None else 3
        batch = decode_latest_results(latest_results_body(traffic, now, minutes))
        horizon = now - window if last is None else min(now - window, last - 120)
        state.apply(batch.results, horizon)
        cutoff = now - window
        expected = {k for k, inst in state.instances.items() if inst.last_change >= cutoff}
        state.evict(cutoff)
        assert set(state.instances) == expected
        last, now = now, now + 90


# -- histograms ------------------------------------------------------------------------

@pytest.mark.parametrize("value,bucket", [(0, 0), (60, 0), (60.5, 1), (86400, 8), (86401, 9), (math.nan, 9)])
def test_histogram_buckets_are_upper_inclusive(value: float, bucket: int) -> None:
    hist = Histogram((60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400))
    hist.observe(value)
    assert hist.counts.index(1) == bucket


# -- cardinality ---------------------------------------------------------------------

def test_host_overflow_counts_every_instance_on_a_host_beyond_the_limit() -> None:
    state = FleetState(2)
    state.apply([result(i, NOW - 100, host=10 + i % 4) for i in range(8)], NOW - 3600)  # hosts 10..13
    hosts = {place[2] for place in state.places}
    assert hosts == {"10", "11", "other"}
    assert state.host_overflow_total == 4  # instances on hosts 12 and 13, each counted
    state.apply([result(100, NOW - 50, host=13), result(101, NOW - 50, host=10)], NOW - 3600)
    assert state.host_overflow_total == 5
    assert state.snapshot().host_overflow_total == 5


def test_label_combinations_are_capped_so_total_series_stay_bounded() -> None:
    """A host limit alone leaves datacenter and region ids unbounded: the place cap folds the excess."""
    hosts = 3
    state = FleetState(hosts)
    many = [result(i, NOW - 100, host=i % hosts, datacenter=i, region=i) for i in range(hosts + EXTRA_PLACES + 50)]
    state.apply(many, NOW - 3600)
    assert len(state.places) == hosts + EXTRA_PLACES + 1  # the cap plus the shared overflow place
    assert OVERFLOW_PLACE in state.places
    assert state.host_overflow_total == 50
    assert state.snapshot().started[OVERFLOW_PLACE] == 50
    # A known combination keeps its own labels after the cap is reached.
    state.apply([result(10_000, NOW - 50, host=1, datacenter=1, region=1)], NOW - 3600)
    assert state.host_overflow_total == 50



class ReferenceState:
    """The rules of FleetState written plainly, one result at a time, with a full-scan eviction."""

    def __init__(self, max_hosts: int) -> None:
        self.max_hosts = max_hosts
        self.instances: dict[int, list[Any]] = {}  # id -> [place, status, start, end, last, ended, exam]
        self.hosts: set[str] = set()
        self.started: Counter[Any] = Counter()
        self.ended: Counter[Any] = Counter()
        self.exams: Counter[Any] = Counter()
        self.passed: Counter[Any] = Counter()
        self.run_time: Counter[Any] = Counter()
        self.task: dict[Any, list[int]] = {}
        self.overflow = 0

    def apply(self, results: list[LabResult], horizon: float) -> None:
        for r in results:
            status = STATUS_NAMES.get(r.completion_status, "unknown")
            inst = self.instances.get(r.lab_instance_id)
            if inst is None:
                host = "unknown" if r.lab_host_id is None else str(r.lab_host_id)
                if host not in self.hosts:
                    if len(self.hosts) >= self.max_hosts:
                        self.overflow += 1
                        host = "other"
                    else:
                        self.hosts.add(host)
                place = tuple("unknown" if v is None else str(v) for v in (r.datacenter_id, r.delivery_region_id)) + (host,)
                inst = [place, status, r.start, r.end, max(r.start or 0, r.end or 0), False, False]
                self.instances[r.lab_instance_id] = inst
                if r.start is None or r.start >= horizon:
                    self.started[place] += 1
            else:
                inst[1] = status
                inst[2] = r.start if r.start is not None else inst[2]
                inst[3] = r.end if r.end is not None else inst[3]
                inst[4] = max(inst[4], r.start or 0, r.end or 0)
            event = r.end if r.end is not None else r.start
            in_horizon = event is None or event >= horizon
            if r.end is not None and not inst[5] and in_horizon:
                inst[5] = True
                self.ended[(inst[0], status)] += 1
                if r.total_run_time_seconds is not None and r.total_run_time_seconds >= 0:
                    self.run_time[inst[0][:2]] += r.total_run_time_seconds
                if r.task_complete_percent is not None:
                    ratio = min(max(r.task_complete_percent / 100.0, 0.0), 1.0)
                    counts = self.task.setdefault(inst[0][:2], [0] * 12)
                    counts[next((i for i, b in enumerate(RATIO_BUCKETS) if ratio <= b), 11)] += 1
            if not inst[6] and (r.exam_score is not None or r.exam_passed is not None) and in_horizon:
                inst[6] = True
                self.exams[inst[0]] += 1
                self.passed[inst[0]] += bool(r.exam_passed)

    def evict(self, horizon: float) -> None:
        for key in [k for k, inst in self.instances.items() if inst[4] < horizon]:
            del self.instances[key]

    def gauges(self) -> tuple[Counter[Any], Counter[Any]]:
        by_status = Counter((inst[0], inst[1]) for inst in self.instances.values())
        running = Counter(inst[0] for inst in self.instances.values() if inst[3] is None)
        return by_status, running


def nonzero(counter: Any) -> dict[Any, Any]:
    return {k: v for k, v in counter.items() if v}


@pytest.mark.parametrize("max_hosts", [2000, 12])
def test_apply_and_evict_match_the_plain_rules_over_many_polls(max_hosts: int) -> None:
    traffic = Traffic(labs_per_minute=30, seed=11)
    fast, plain = FleetState(max_hosts), ReferenceState(max_hosts)
    window, overlap = 90 * 60, 120
    now, last = float(NOW), None
    for step in range(60):
        minutes = 90 if last is None else 2 + step % 3
        results = decode_latest_results(latest_results_body(traffic, now, minutes)).results
        horizon = now - window if last is None else min(now - window, last - overlap)
        fast.apply(results, horizon)
        plain.apply(results, horizon)
        fast.evict(now - window)
        plain.evict(now - window)
        by_status, running = plain.gauges()
        snap = fast.snapshot()
        assert set(fast.instances) == set(plain.instances)
        assert nonzero(snap.instances) == dict(by_status)
        assert nonzero(snap.running) == dict(running)
        assert nonzero(snap.started) == dict(plain.started)
        assert nonzero(snap.ended) == dict(plain.ended)
        assert nonzero(snap.exams) == dict(plain.exams)
        assert nonzero(snap.exams_passed) == nonzero(plain.passed)
        assert {r: h.total for r, h in snap.run_time.items() if h.total} == dict(plain.run_time)
        assert {r: h.counts for r, h in snap.task_completion.items() if any(h.counts)} == plain.task
        assert snap.host_overflow_total == plain.overflow
        last, now = now, now + 60 * (1 + step % 4)
    assert plain.overflow > 0 if max_hosts < 36 else plain.overflow == 0
    assert sum(plain.ended.values()) > 1000 and sum(plain.exams.values()) > 100


# -- the line encoder gives the encoders' own bytes ------------------------------------

def test_an_instance_twice_in_one_payload_counts_like_two_polls() -> None:
    """The counts of new instances wait in their bundle until apply() ends; a second sighting in
    the same payload must still see them."""
    fast, plain = FleetState(2000), ReferenceState(2000)
    batch = [
        result(1, NOW - 600, None, status=3),
        result(2, NOW - 500, NOW - 100, status=20, total_run_time_seconds=400, task_complete_percent=10.0),
        result(1, NOW - 600, NOW - 50, status=4, total_run_time_seconds=550, task_complete_percent=100.0),
        result(3, NOW - 400, None, status=3),
        result(3, NOW - 400, None, status=3),
        result(2, NOW - 500, NOW - 100, status=20, total_run_time_seconds=400, task_complete_percent=10.0),
    ]
    fast.apply(batch, NOW - 3600)
    plain.apply(batch, NOW - 3600)
    by_status, running = plain.gauges()
    snap = fast.snapshot()
    assert nonzero(snap.instances) == dict(by_status)
    assert nonzero(snap.running) == dict(running) == {("1", "1", "1"): 1}
    assert nonzero(snap.started) == dict(plain.started) == {("1", "1", "1"): 3}
    assert nonzero(snap.ended) == dict(plain.ended)
    assert sum(h.count for h in snap.run_time.values()) == 2


