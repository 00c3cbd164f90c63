"""FleetState: eviction by age, bounded state, the series guard, and a differential test of
apply/evict against a plain reference implementation of the counting rules."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.demo import Traffic, latest_results_body
from exporter.model import STATUS_NAMES, LabResult, decode_latest_results
from bench.simulator import FleetTraffic
from exporter.collector import SkillableCollector
from exporter.config import Names
from exporter.families import lab_families
from exporter.persistence import load_state_file
from exporter.poller import Health, PollView
from exporter.model import ALL_STATUSES
from exporter.state import (
    EXTRA_KEYS, MAX_FUTURE_SECONDS, OVERFLOW_PLACE, PROFILE_ZERO_STATUSES, RATIO_BUCKETS, RUN_TIME_BUCKETS, FleetExport,
    FleetState, Histogram, _bucketed, _ratio, bucket_of,
)

from . import state_v2
from .harness import NOW, examples, result

FIXTURES = Path(__file__).parent / "fixtures"


# -- the exposition cache ------------------------------------------------------

def test_snapshot_is_the_same_object_until_the_state_changes() -> None:
    state = FleetState(10)
    state.apply([result(1, NOW - 100)], NOW - 3600)
    snap = state.snapshot()
    assert state.snapshot() is snap
    state.apply([result(1, NOW - 100, NOW - 10)], NOW - 3600)
    changed = state.snapshot()
    assert changed is not snap and sum(changed["place"].running.values()) == 0
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

def test_eviction_forgets_ended_instances_by_age_and_expires_running_ones_at_the_limit() -> None:
    state = FleetState(10)
    state.apply([result(i, NOW - 3000 + i) for i in range(10)], NOW - 7200)  # running, last change = start
    state.apply([result(3, None, NOW - 100), result(7, None, NOW - 50)], NOW - 7200)  # two end later
    assert state.evict(NOW - 1000) == 0  # the running ones stay, however old their start
    assert len(state.instances) == 10 and sum(state.snapshot()["place"].running.values()) == 8
    assert state.evict(NOW - 1000, NOW - 2995) == 4  # 0, 1, 2, 4 opened before the running horizon
    snap = state.snapshot()
    assert snap.expired_total == 4 and sum(snap["place"].running.values()) == 4
    assert sum(snap["place"].closed.values()) == 2  # the ended ones, not the running ones
    assert state.evict(NOW - 60) == 1 and sorted(state.instances) == [5, 6, 7, 8, 9]
    assert state.snapshot().expired_total == 4  # an ended instance is forgotten, not expired


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
        state.apply([result(i, NOW - 10_000, NOW - 10_000 + step) for i in range(50)], NOW - 20_000)
        state.evict(NOW - 20_000)
    assert len(state.instances) == 50
    assert len(state._closed_by_age) + len(state._open_by_age) <= 2 * len(state.instances) + 1024


def test_a_restored_state_evicts_expires_and_counts_like_the_one_it_was_saved_from() -> None:
    state = FleetState(10)
    state.apply([result(i, NOW - 900 + i * 100, NOW - 800 + i * 100) for i in range(5)], NOW - 3600)
    state.apply([result(10 + i, NOW - 5000 + i * 1000, status=3, lab_profile_id=7) for i in range(3)], NOW - 3600)
    saved = msgspec.json.decode(msgspec.json.encode(state.export()), type=FleetExport)
    restored = FleetState.restore(saved, 10)
    assert restored.snapshot() == state.snapshot()
    for s in (state, restored):
        assert s.evict(NOW - 550, NOW - 4500) == 3 + 1
        s.apply([result(11, NOW - 4000, NOW - 10, status=4, lab_profile_id=7),
                 result(3, NOW - 600, NOW - 500)], NOW - 3600)
    assert restored.snapshot() == state.snapshot()
    snap = restored.snapshot()
    assert snap["profile"].ended[(("7",), "complete")] == 1 and snap["profile"].running[("7",)] == 1
    assert snap.expired_total == 1


def test_eviction_agrees_with_a_full_scan_on_simulated_traffic() -> None:
    """The heaps must forget exactly what scanning every instance would."""
    traffic = Traffic(labs_per_minute=20, seed=3)
    state = FleetState(2000)
    now = float(NOW)
    window, max_running = 60 * 60, 45 * 60
    last = None
    for _ in range(40):
        minutes = 60 if last is None else 3
        batch = decode_latest_results(latest_results_body(traffic, now, minutes))
        horizon = now - window if last is None else min(now - window, last - 120)
        state.apply(batch.results, horizon, seen_at=now)
        cutoff = now - window
        expected = {k for k, inst in state.instances.items()
                    if (inst.end is not None and inst.last_change >= cutoff)
                    or (inst.end is None and inst.opened >= now - max_running)}
        state.evict(cutoff, now - max_running)
        assert set(state.instances) == expected
        last, now = now, now + 90


# -- histograms ------------------------------------------------------------------------

@pytest.mark.parametrize("value,bucket", [(0, 0), (60, 0), (60.5, 1), (86400, 8), (86401, 9), (math.nan, 9)])
def test_histogram_buckets_are_upper_inclusive(value: float, bucket: int) -> None:
    hist = Histogram((60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400))
    hist.observe(value)
    assert hist.counts.index(1) == bucket


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                          st.sampled_from([0.0, 0.1, 0.3, 0.7, 1.0, -0.0, 1.0000001, -1e-9]),
                          st.integers(-5, 90_000).map(float)), max_size=60),
       st.booleans(), st.sampled_from([RATIO_BUCKETS, RUN_TIME_BUCKETS]))
def test_sorted_bucketing_is_bucket_of_each_value(values: list[float], clamp: bool,
                                                   bounds: tuple[float, ...]) -> None:
    """The fold buckets a group's values by sorting them (_bucketed): the reference is bucket_of,
    value by value, after the clamp to 0..1 that ratios get (_ratio)."""
    expected = [_ratio(v) if clamp else v for v in values]
    counts, total = _bucketed(bounds, list(values), clamp)
    want = [0] * (len(bounds) + 1)
    for value in expected:
        want[bucket_of(bounds, value)] += 1
    assert counts == want
    exact = math.fsum(expected) if all(math.isfinite(v) for v in expected) else sum(expected)
    assert total == pytest.approx(exact, nan_ok=True, rel=1e-9, abs=1e-9) or math.isinf(exact)


# -- cardinality ---------------------------------------------------------------------

def test_host_overflow_counts_every_instance_on_a_host_beyond_the_limit() -> None:
    state = FleetState(2)
    state.apply([result(i, NOW - 100, host=10 + i % 4) for i in range(8)], NOW - 3600)  # hosts 10..13
    hosts = {place[2] for place in state.snapshot()["place"].keys}
    assert hosts == {"10", "11", "other"}
    assert state.snapshot()["place"].overflow_total == 4  # instances on hosts 12 and 13, each counted
    state.apply([result(100, NOW - 50, host=13), result(101, NOW - 50, host=10)], NOW - 3600)
    assert state.snapshot()["place"].overflow_total == 5


def test_label_combinations_are_capped_so_total_series_stay_bounded() -> None:
    """A host limit alone leaves datacenter and region ids unbounded: the place cap folds the excess."""
    hosts = 3
    state = FleetState(hosts)
    many = [result(i, NOW - 100, host=i % hosts, datacenter=i, region=i) for i in range(hosts + EXTRA_KEYS + 50)]
    state.apply(many, NOW - 3600)
    places = state.snapshot()["place"].keys
    assert len(places) == hosts + EXTRA_KEYS + 1  # the cap plus the shared overflow place
    assert OVERFLOW_PLACE in places
    assert state.snapshot()["place"].overflow_total == 50
    assert state.snapshot()["place"].started[OVERFLOW_PLACE] == 50
    # A known combination keeps its own labels after the cap is reached.
    state.apply([result(10_000, NOW - 50, host=1, datacenter=1, region=1)], NOW - 3600)
    assert state.snapshot()["place"].overflow_total == 50



class ReferenceState:
    """The rules of FleetState (state.py's module docstring) written plainly: one result at a time,
    a dict per instance, every dimension spelled out, eviction and expiry by full scan."""

    def __init__(self, max_hosts: int, max_profiles: int = 500) -> None:
        self.max_hosts, self.max_profiles = max_hosts, max_profiles
        self.instances: dict[int, dict[str, Any]] = {}
        self.hosts: set[str] = set()
        self.profiles: set[str] = set()
        self.started: Counter[Any] = Counter()
        self.ended: Counter[Any] = Counter()
        self.exams: Counter[Any] = Counter()
        self.passed: Counter[Any] = Counter()
        self.run_time: Counter[Any] = Counter()
        self.task: dict[Any, list[int]] = {}
        self.scores: Counter[Any] = Counter()
        self.p_started: Counter[Any] = Counter()
        self.p_ended: Counter[Any] = Counter()
        self.p_exams: Counter[Any] = Counter()
        self.p_passed: Counter[Any] = Counter()
        self.p_run_time: Counter[Any] = Counter()
        self.p_runs: Counter[Any] = Counter()
        self.p_tasks: Counter[Any] = Counter()
        self.p_scores: Counter[Any] = Counter()
        self.overflow = self.p_overflow = self.expired = self.invalid = 0

    def _place(self, r: LabResult) -> tuple[str, ...]:
        host = "unknown" if r.lab_host_id is None else str(r.lab_host_id)
        if host not in self.hosts:
            if len(self.hosts) >= self.max_hosts:
                self.overflow += 1
                host = "other"
            else:
                self.hosts.add(host)
        return tuple("unknown" if v is None else str(v) for v in (r.datacenter_id, r.delivery_region_id)) + (host,)

    def _profile(self, r: LabResult) -> tuple[str]:
        profile = "unknown" if r.lab_profile_id is None else str(r.lab_profile_id)
        if profile not in self.profiles:
            if len(self.profiles) >= self.max_profiles:
                self.p_overflow += 1
                return ("other",)
            self.profiles.add(profile)
        return (profile,)

    def apply(self, results: list[LabResult], horizon: float, seen_at: float | None = None) -> None:
        now = horizon if seen_at is None else seen_at
        for r in results:
            stamps = [t for t in (r.start, r.end) if t is not None]
            last = max(stamps) if stamps else now
            if seen_at is not None and last > seen_at + MAX_FUTURE_SECONDS:
                self.invalid += 1
                continue
            status = STATUS_NAMES.get(r.completion_status, "unknown")  # type: ignore[arg-type]
            inst = self.instances.get(r.lab_instance_id)
            if inst is None:
                opened = now if r.start is None else r.start if seen_at is None else min(r.start, now)
                inst = {"place": self._place(r), "profile": self._profile(r), "end": r.end, "last": last,
                        "opened": opened, "ended": False, "exam": False}
                self.instances[r.lab_instance_id] = inst
                if r.start is None or r.start >= horizon:
                    self.started[inst["place"]] += 1
                    self.p_started[inst["profile"]] += 1
            else:
                inst["end"] = r.end if r.end is not None else inst["end"]
                inst["last"] = max(inst["last"], last)
            inst["status"] = status
            place, profile = inst["place"], inst["profile"]
            if r.end is not None and r.end >= horizon and not inst["ended"]:
                inst["ended"] = True
                self.ended[(place, status)] += 1
                self.p_ended[(profile, status)] += 1
                if r.total_run_time_seconds is not None and r.total_run_time_seconds >= 0:
                    self.run_time[place[:2]] += r.total_run_time_seconds
                    self.p_run_time[profile] += r.total_run_time_seconds
                    self.p_runs[profile] += 1
                if r.task_complete_percent is not None:
                    ratio = min(max(r.task_complete_percent / 100.0, 0.0), 1.0)
                    counts = self.task.setdefault(place[:2], [0] * 12)
                    counts[next((i for i, b in enumerate(RATIO_BUCKETS) if ratio <= b), 11)] += 1
                    self.p_tasks[profile] += 1
            event = r.end if r.end is not None else r.start
            if not inst["exam"] and (r.exam_score is not None or r.exam_passed is not None) \
                    and (event is None or event >= horizon):
                inst["exam"] = True
                self.exams[place] += 1
                self.passed[place] += bool(r.exam_passed)
                self.p_exams[profile] += 1
                self.p_passed[profile] += bool(r.exam_passed)
                if r.exam_score is not None and r.exam_max_possible_score:
                    self.scores[place[:2]] += 1
                    self.p_scores[profile] += 1

    def evict(self, horizon: float, running_horizon: float | None = None) -> None:
        for key, inst in list(self.instances.items()):
            if inst["end"] is not None and inst["last"] < horizon:
                del self.instances[key]
            elif inst["end"] is None and running_horizon is not None and inst["opened"] < running_horizon:
                del self.instances[key]
                self.expired += 1

    def gauges(self, dimension: str = "place") -> tuple[Counter[Any], Counter[Any]]:
        """A dimension's `closed` (by key and status) and `running` (by key), counted from the instances."""
        ended = [i for i in self.instances.values() if i["end"] is not None]
        running = [i for i in self.instances.values() if i["end"] is None]
        return Counter((i[dimension], i["status"]) for i in ended), Counter(i[dimension] for i in running)


def nonzero(counter: Any) -> dict[Any, Any]:
    return {k: v for k, v in counter.items() if v}


def with_profiles(results: list[LabResult], profiles: int) -> list[LabResult]:
    """The demo's results with a LabProfileId each (a few null), spread unevenly and independently of the
    host: every profile runs on every host."""
    return [msgspec.structs.replace(r, lab_profile_id=None if r.lab_instance_id % 29 == 0
                                    else 5000 + (r.lab_instance_id * r.lab_instance_id) % profiles)
            for r in results]


def traffic_window(kind: str) -> Any:
    """(now, minutes) -> the results of a LatestResults answer, for one kind of fleet."""
    if kind == "demo, every profile on every host":
        demo = Traffic(labs_per_minute=30, seed=11)
        return lambda now, minutes: with_profiles(
            decode_latest_results(latest_results_body(demo, now, minutes)).results, 40)
    fleet = FleetTraffic(30, 11, hosts=60, profiles=50, placement=kind.split()[1])
    return lambda now, minutes: decode_latest_results(latest_results_body(fleet, now, minutes)).results


@pytest.mark.parametrize("kind", ["demo, every profile on every host", "profiles spread over their datacenter",
                                  "profiles tied to four hosts"])
@pytest.mark.parametrize("max_hosts,max_profiles,max_running", [(2000, 500, 24 * 3600), (12, 8, 40 * 60)])
def test_apply_and_evict_match_the_plain_rules_over_many_polls(kind: str, max_hosts: int, max_profiles: int,
                                                                max_running: int) -> None:
    window_of = traffic_window(kind)
    fast, plain = FleetState(max_hosts, max_profiles, max_running), ReferenceState(max_hosts, max_profiles)
    window, overlap = 90 * 60, 120
    now, last = float(NOW), None
    hosts_seen: set[Any] = set()
    profiles_seen: set[Any] = set()
    pairs: set[Any] = set()
    for step in range(60):
        minutes = 90 if last is None else 2 + step % 3
        results = window_of(now, minutes)
        hosts_seen |= {r.lab_host_id for r in results}
        profiles_seen |= {r.lab_profile_id for r in results}
        pairs |= {(r.lab_host_id, r.lab_profile_id) for r in results}
        if step == 7:  # a hostile record: an End in the year 3000 (rule 9)
            results.append(result(10**9, int(now) - 60, 32_503_680_000))
        horizon = now - window if last is None else min(now - window, last - overlap)
        fast.apply(results, horizon, seen_at=now)
        plain.apply(results, horizon, seen_at=now)
        fast.evict(now - window, now - max_running)
        plain.evict(now - window, now - max_running)
        by_status, running = plain.gauges("place")
        p_by_status, p_running = plain.gauges("profile")
        snap = fast.snapshot()
        place, profile = snap["place"], snap["profile"]
        assert set(fast.instances) == set(plain.instances)
        assert nonzero(place.closed) == dict(by_status)
        assert nonzero(place.running) == dict(running)
        assert nonzero(place.started) == dict(plain.started)
        assert nonzero(place.ended) == dict(plain.ended)
        assert nonzero(place.exams) == dict(plain.exams)
        assert nonzero(place.exams_passed) == nonzero(plain.passed)
        assert {r: h.total for r, h in place.run_time.items() if h.total} == dict(plain.run_time)
        assert {r: h.counts for r, h in place.task_completion.items() if any(h.counts)} == plain.task
        assert {r: h.count for r, h in place.exam_score.items() if h.count} == dict(plain.scores)
        assert place.overflow_total == plain.overflow
        assert snap.expired_total == plain.expired and snap.invalid_total == plain.invalid
        assert nonzero(profile.closed) == dict(p_by_status)
        assert nonzero(profile.running) == dict(p_running)
        assert nonzero(profile.started) == dict(plain.p_started)
        assert nonzero(profile.ended) == dict(plain.p_ended)
        assert nonzero(profile.exams) == dict(plain.p_exams)
        assert nonzero(profile.exams_passed) == nonzero(plain.p_passed)
        assert {p: (s.count, s.total) for p, s in profile.run_time.items() if s.count} == \
            {p: (plain.p_runs[p], plain.p_run_time[p]) for p in plain.p_runs}
        assert {p: s.count for p, s in profile.task_completion.items() if s.count} == dict(plain.p_tasks)
        assert {p: s.count for p, s in profile.exam_score.items() if s.count} == dict(plain.p_scores)
        assert profile.overflow_total == plain.p_overflow
        last, now = now, now + 60 * (1 + step % 4)
    assert (plain.overflow > 0) == (len(hosts_seen) > max_hosts)
    assert (plain.p_overflow > 0) == (len(profiles_seen) > max_profiles)
    assert plain.expired > 0 if max_running < 3600 else plain.expired == 0
    assert plain.invalid == 1
    assert sum(plain.ended.values()) > 1000 and sum(plain.exams.values()) > 50
    # The kind of fleet is what it says: (host, profile) pairs many, or four per profile.
    assert len(pairs) > 5 * len(hosts_seen) if "tied" not in kind else len(pairs) <= 4 * len(profiles_seen) + 1


def test_every_profile_has_every_table_and_every_status_at_zero() -> None:
    """Every completion status exists at 0 per profile from its first activity, so increase()
    over a range that holds a profile's first resume_failed end counts it."""
    state = FleetState(10, max_lab_profiles=2)
    state.apply([result(1, NOW - 100, lab_profile_id=1), result(2, NOW - 100, NOW - 10, status=30, lab_profile_id=2),
                 result(3, NOW - 100, lab_profile_id=3), result(4, NOW - 100, lab_profile_id=None)], NOW - 3600)
    profile = state.snapshot()["profile"]
    assert profile.keys == [("1",), ("2",), ("other",)]  # the cap: two profiles of their own
    assert profile.overflow_total == 2  # profiles 3 and "unknown", one instance each
    for table in ("running", "started", "run_time", "task_completion", "exams", "exams_passed", "exam_score"):
        assert set(getattr(profile, table)) == set(profile.keys), table
    for key in profile.keys:
        assert [s for k, s in profile.ended if k == key] == list(ALL_STATUSES)
    assert PROFILE_ZERO_STATUSES == ALL_STATUSES
    assert profile.ended[(("2",), "resume_failed")] == 1 and profile.ended[(("1",), "resume_failed")] == 0
    assert profile.running == {("1",): 1, ("2",): 0, ("other",): 2}


def test_an_end_in_the_year_3000_is_refused_and_never_held() -> None:
    """Hostile input 12: the instance's last change was once its End, so it was never evicted."""
    state = FleetState(10)
    refused = state.apply([result(1, NOW - 100, 32_503_680_000), result(2, 32_503_680_000)], NOW - 3600, seen_at=NOW)
    assert refused == 2 and state.snapshot().invalid_total == 2 and not state.instances
    state.apply([result(3, NOW - 100, NOW + 3000)], NOW - 3600, seen_at=NOW)  # clock skew, not hostility
    assert state.evict(NOW + 3000 + 1, NOW) == 1 and not state.instances


def test_an_instance_twice_in_one_payload_counts_like_two_polls() -> None:
    """The counts of new instances wait in the ledger until apply() ends; a second sighting in
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
    snap = fast.snapshot()["place"]
    assert nonzero(snap.closed) == dict(by_status)
    assert nonzero(snap.running) == dict(running) == {("1", "1", "1"): 1}
    assert nonzero(snap.started) == dict(plain.started) == {("1", "1", "1"): 3}
    assert nonzero(snap.ended) == dict(plain.ended)
    assert sum(h.count for h in snap.run_time.values()) == 2




# -- the state file of the layout before the declarations (version 2) -------------------------

def served(states: dict[str, FleetState]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every lab sample and the fleet's own counters that a collector over these accounts serves."""
    class Stub:
        window_minutes = state_v2.WINDOW_MINUTES

        def __init__(self, name: str) -> None:
            self.name = name

        def view(self) -> PollView:
            return PollView(states[self.name].snapshot(), Health(up=True))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SkillableCollector([(n, Stub(n)) for n in states], Names(),  # type: ignore[misc]
                                         state_v2.WINDOW_MINUTES, state_v2.MAX_LAB_PROFILES))
    return samples_of(generate_latest(registry).decode())


FLEET_FAMILIES = {f.name for f in lab_families()} | {
    "skillable_results_invalid_total", "skillable_lab_host_overflow_total", "skillable_lab_profile_overflow_total",
    "skillable_lab_instances_expired_total", "skillable_tracked_instances"}


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            if f.name in FLEET_FAMILIES or f"{f.name}_total" in FLEET_FAMILIES for s in f.samples}


def test_a_state_file_of_version_2_restores_with_every_counter_intact() -> None:
    """The migration: a state file written by the exporter at commit 5737f51, before the dimensions
    were declared (tests/state_v2.py made the fixtures with that commit's code), restores with every series that
    exporter served at the value it served, and the next poll counts what it counted there. The only new series
    are the profile statuses that now exist at 0."""
    saved = load_state_file(str(FIXTURES / "state_v2.json"))
    assert not saved.refused and not saved.left_out and set(saved.accounts) == set(state_v2.ACCOUNTS)
    assert json.loads((FIXTURES / "state_v2.json").read_text())["version"] == 2
    before, after = (FIXTURES / "state_v2.prom").read_text().split("# after\n")
    states = {name: FleetState.restore(saved.accounts[name].fleet, state_v2.MAX_LAB_HOSTS, state_v2.MAX_LAB_PROFILES,
                                       state_v2.MAX_RUNNING_SECONDS) for name in state_v2.ACCOUNTS}
    for restored, expected in ((True, samples_of(before)), (False, samples_of(after))):
        got = served(states)
        assert len(expected) > 500 and set(got) >= set(expected)
        if restored:  # the very values saved
            assert {k: got[k] for k in expected} == expected
        else:  # sums of new values: added in another order than 5737f51 grouped them, so the last bits differ
            assert {k: got[k] for k in expected if not k[0].endswith("_sum")} == \
                {k: v for k, v in expected.items() if not k[0].endswith("_sum")}
            assert {k: got[k] for k in expected} == pytest.approx(expected, rel=1e-12, abs=0)
        new = {k: v for k, v in got.items() if k not in expected}
        assert new and all(name == "skillable_lab_profile_instances_ended_total" and v == 0
                           for (name, _), v in new.items())
        for name, seed in state_v2.ACCOUNTS.items():
            results, horizon, seen_at = state_v2.after(seed)
            states[name].apply(results, horizon, seen_at=seen_at)
            state_v2.evict(states[name], seen_at)
    # What the fixture holds is what the test says: every kind of counter, and not at zero.
    old = samples_of(before)
    for family in ("skillable_lab_instances_ended_total", "skillable_lab_profile_instances_ended_total",
                   "skillable_lab_run_time_seconds_bucket", "skillable_exam_score_ratio_count",
                   "skillable_lab_profile_exam_score_ratio_sum", "skillable_lab_instances_running",
                   "skillable_lab_host_overflow_total", "skillable_lab_profile_overflow_total",
                   "skillable_lab_instances_expired_total", "skillable_results_invalid_total"):
        assert sum(v for (name, _), v in old.items() if name == family) > 0, family
    assert any(dict(labels).get("lab_profile_id") == "unknown" for _, labels in old)
    assert any(dict(labels).get("completion_status") == "save_failed" for _, labels in old)
