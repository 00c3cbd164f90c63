"""The numbers people read are true: every dashboard panel and recording rule that shows a lab
quantity equals the fake API's truth, on a real Prometheus with the shipped rules.

The stack: the exporter (a subprocess, polling on every scrape) against tests/fakeapi.py on the
wall clock, and Prometheus 2.42 scraping it every second with every shipped rule file. The fake
holds a history (labs that ended in the last hour, and more labs still running than ended: the
case where the old headline formula read -10 for a truth of 0.13) and, once Prometheus has its
first sample, a live phase of starts and ends at known seconds, including a lab profile's first
save_failed end and two failed /stats requests. Then nothing happens for a few seconds, and each
panel query (Grafana variables as for "All", `$__range` and `$__rate_interval` the span Prometheus
has seen) and each recording rule is compared with the truth computed here from the plan, with
the same semantics:

- window gauges (skillable_lab_instances and the `:window` rules: ended labs whose last change is
  within the exporter's lookback window, by current status) and running labs: exact. They are
  read after the quiet seconds, and no lab's last change lies near the window's edge.
- rate() and increase() over a range: Prometheus sees only what it scraped, so the truth is the
  events after its first sample (the live phase), counted with the labels of the query. Their
  value may exceed it by increase()'s extrapolation only: it stretches the increase between the
  first and last sample in range over at most 1.1 average scrape intervals at each end
  (Prometheus' extrapolatedRate), never shrinks it, and no event lies near the first sample. So
  count <= value <= count * f with f = 1 + 2.2 * interval / sampled span, computed from the
  samples themselves; a ratio of two such increases lies within [truth / f, truth * f].
- averages over time (lab-hours of running labs) and peaks: from the samples, within one scrape
  interval per event and per range edge (see Tolerance).

The launch collector is part of the plan: every lab has a start-up time or none, errors
(with messages of the three kinds) and an API consumer; the exporter polls /labinstance/search every
60 s, so its first launch poll (at the first scrape) holds the history and its second (a minute
later, after every live event) the live phase's launches, start-ups, labs never ready and errors
(including errors dated after a history lab's End), which the launch panels' range queries count.
The quantile panels lie in the bucket holding the truth's quantile (histogram_quantile interpolates
within it).

Every target of every dashboard and every recording rule is either checked here or listed with
the reason it is not (PANEL_EXCLUDED, RULE_EXCLUDED): a new panel without a check fails
test_every_panel_and_rule_is_checked_or_excluded. Every percentunit panel stays within 0..1 over
the whole run.

The check fails the formula the overview's headline "Failure ratio (window)" had before it read the window rules,
`sum(skillable_lab_instances{failed}) / (sum(skillable_lab_instances) - sum(skillable_lab_instances_running))`,
from before skillable_lab_instances held ended labs only:
test_the_old_headline_formula_fails_the_check runs it through the same check and expects a
mismatch (with this history its denominator is negative).
"""

from __future__ import annotations

import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterator

import pytest
import yaml

from .dashboard_queries import ROOT, Query, all_panels, dashboard_paths, load, panel_queries, substitute
from .fakeapi import FakeSkillable, catalog_profile, catalog_series, http_status, lab
from .harness import free_port
from .monitoring_stack import STARTUP_DEADLINE, Stack, eventually, prometheus_args

pytestmark = pytest.mark.integration

# The vendor's CompletionStatus table (skillable-api.md), written here, not taken from exporter/.
STATUS = {1: "cancelled", 2: "no_show", 3: "incomplete", 4: "complete", 10: "storage_provisioning_failed",
          20: "lab_creation_failed", 30: "resume_failed", 40: "save_failed", 50: "submitted_for_grading",
          60: "grading_in_progress"}
FAILED = {"storage_provisioning_failed", "lab_creation_failed", "resume_failed", "save_failed"}
WINDOW = 3600  # the exporter's default lookback window
OBJECTIVE = 0.99  # skillable:lab_delivery_slo:objective as shipped
HOSTS = {301: ("1", "1"), 302: ("1", "1"), 303: ("2", "2"), 304: ("2", "3")}  # host -> (datacenter, region)
PROFILES = {8001: ("1", "Configure networks", 60), 8002: ("1", "Deploy servers", 120), 8003: ("2", "Final exam", 90)}
UNUSED_PROFILE, DISABLED_PROFILE = 8004, 8005
SERIES = {"1": "Networking", "2": "Exams"}
NAMES = {"datacenter": {"1": "Test West"}, "lab_host": {"301": "host-a"}}  # dc 2 and the other hosts: ids
REGION_NAMES = {"1": "Region One"}  # from /deliveryregions; regions 2 and 3 have none
# Ids whose names /labinstance/search leaves out (the fake's search names the others: DC-2, HV-302, Region 2):
# they show their ids.
SEARCH_NAMELESS = {"datacenter": {2}, "lab_host": {304}, "delivery_region": {3}}
ACTIVE_LABS, SAVED_LABS, MAX_ACTIVE_LABS = 95, 7, 120
LIVE_DELAY = 5  # the first live event, seconds after Prometheus' first sample
LAUNCH_INTERVAL = 60  # --skillable.launch-interval here: the second launch poll follows every live event
CONSUMERS = ("LMS", "Portal", None)  # None: the API does not say (api_consumer="unknown")
LIFECYCLE_MESSAGE = "Configuration error encountered when executing life cycle action 12 script."
WEBHOOK_MESSAGE = 'Error calling API Consumer webhook Scored "Scored" at URL https://hooks.example.invalid/x?t=1.'
OTHER_MESSAGE = "The remote console could not connect."
STARTUP_BUCKETS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, math.inf)  # the exporter's
QUIET = 4  # seconds without events before the checks


# -- the plan: every lab, and the truth computed from it --------------------------------------


@dataclass
class Lab:
    id: int
    profile: int
    host: int
    start: int
    end: int | None  # None: still running after the test
    status: int = 4
    score: float | None = None  # an exam's score out of 100, known at its end
    startup: int | None = 30  # ready this long after its Start (if before its End); None: never
    errors: tuple[tuple[int, str], ...] = ()  # (seconds after its Start, message)
    consumer: str | None = None  # the API consumer that launched it

    def ready_at(self) -> int | None:
        if self.startup is None or (self.end is not None and self.start + self.startup > self.end):
            return None
        return self.start + self.startup

    @property
    def datacenter(self) -> str:
        return HOSTS[self.host][0]

    @property
    def region(self) -> str:
        return HOSTS[self.host][1]

    @property
    def status_name(self) -> str:
        return STATUS.get(self.status, "unknown")

    def ended_by(self, t: float) -> bool:
        return self.end is not None and self.end <= t

    def running_at(self, t: float) -> bool:
        return self.start <= t and not self.ended_by(t)


def add_to_fake(fake: FakeSkillable, labs: list[Lab], now: float) -> None:
    for lb in labs:
        extra: dict[str, Any] = {"host": lb.host, "datacenter": int(lb.datacenter), "region": int(lb.region),
                                 "LabProfileId": lb.profile, "IsExam": lb.score is not None, "TaskCompletePercent": 50,
                                 "_startup": lb.startup, "_errors": list(lb.errors), "_consumer": lb.consumer}
        at_end = {}
        if lb.score is not None:
            at_end = {"IsExam": True, "ExamScore": lb.score, "ExamMaxPossibleScore": 100, "ExamPassed": lb.score >= 70}
        if lb.end is not None and lb.end <= now:
            fake.add(lab(lb.id, lb.start, lb.end, status=lb.status, **(extra | at_end)))
        else:
            seconds = (lb.end if lb.end is not None else lb.start + 86400 * 30) - lb.start
            fake.run(lb.id, lb.start, seconds, status=lb.status, at_end=at_end, **extra)


def history(now: int, rng: random.Random) -> list[Lab]:
    """Labs before the exporter starts: 40 ended in the last 50 minutes (within the window), and 90
    running, started in the last 50 minutes (within every profile's time limit), 12 of which end in
    the live phase (their ends are set by live()): more labs running than ended."""
    labs = []
    hosts, profiles = list(HOSTS), list(PROFILES)
    statuses = (4, 4, 4, 4, 3, 1, 2, 10, 20, 20, 50)  # no resume_failed or save_failed yet
    for i in range(40):
        start = now - rng.randrange(600, 3000)
        end = min(start + rng.randrange(60, 1800), now - 60)
        profile = profiles[i % 3]
        status = rng.choice(statuses)
        score = float(rng.randrange(40, 100)) if profile == 8003 and status == 4 else None
        labs.append(Lab(1000 + i, profile, hosts[i % 4], start, end, status, score, consumer=CONSUMERS[i % 3]))
    for i in range(90):
        labs.append(Lab(2000 + i, profiles[i % 3], hosts[(i + 1) % 4], now - rng.randrange(120, 3000), None,
                        consumer=CONSUMERS[i % 3]))
    return labs


def live(first_sample: float, old: list[Lab], rng: random.Random) -> tuple[list[Lab], int]:
    """Events at whole seconds from LIVE_DELAY after Prometheus' first sample: 12 running labs of
    the history end, 33 labs start (18 of them end too, four of them scored exams). Profile 8001's first
    save_failed is among the ends. Returns the new labs (and sets the ends of the old ones) and the last
    event's time."""
    t0 = math.ceil(first_sample) + LIVE_DELAY
    statuses = (4, 4, 4, 3, 1, 2, 10, 20, 30, 50, 60, 99)
    running = [lb for lb in old if lb.end is None]
    for i, lb in enumerate(running[:12]):
        lb.end = t0 + 2 * i + 1
        lb.status = statuses[i % len(statuses)]
        if i % 3 == 0:  # a webhook that fails on scoring, just after the End of a lab that ran for minutes
            lb.errors = ((lb.end + 1 - lb.start, WEBHOOK_MESSAGE),)
    new = []
    for i in range(33):
        start = t0 + i
        end = start + rng.randrange(3, 15) if i < 18 else None
        profile = list(PROFILES)[i % 3]
        status = rng.choice(statuses) if end is not None else 4
        if i == 4:
            profile, status = 8001, 40  # profile 8001's first save_failed end
        if profile == 8003 and i in (2, 5, 8, 11):
            status = 4  # scored exams: two pass, two fail
        score = (85.0, 40.0, 72.5, 69.0)[(i - 2) // 3] if profile == 8003 and i in (2, 5, 8, 11) else None
        # Launch facts, all before the exporter's second launch poll (a minute after the first sample):
        # start-ups of 3 to 25 s (some labs end first: never ready), errors of the three kinds.
        startup = (3, 8, 14, 25, 5)[i % 5] if i < 25 else 3
        errors = (((2, LIFECYCLE_MESSAGE),) if profile == 8002 else ()) + (((1, OTHER_MESSAGE),) if i % 7 == 0 else ())
        new.append(Lab(3000 + i, profile, list(HOSTS)[i % 4], start, end, status, score, startup, errors,
                       CONSUMERS[i % 3]))
    last = max([lb.end for lb in running[:12]] + [lb.start for lb in new] + [lb.end for lb in new if lb.end])
    return new, int(last)


def ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


Key = tuple[str, ...]


@dataclass
class Truth:
    """What the fake says, at `at`, with live events after `since` (Prometheus' first sample)."""

    labs: list[Lab]
    at: float
    since: float
    api_requests: dict[str, int] = field(default_factory=dict)  # endpoint -> requests after `since`
    api_failures: dict[str, int] = field(default_factory=dict)

    # -- window gauges --
    def in_window(self) -> list[Lab]:
        return [lb for lb in self.labs if lb.ended_by(self.at) and max(lb.start, lb.end or 0) > self.at - WINDOW]

    def window_count(self, by: Callable[[Lab], Key], only: Callable[[Lab], bool] = lambda lb: True) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for lb in self.in_window():
            if only(lb):
                out[by(lb)] = out.get(by(lb), 0) + 1
        return out

    def window_ratio(self, by: Callable[[Lab], Key], only: Callable[[Lab], bool] = lambda lb: lb.status_name in FAILED,
                     per_status: bool = False) -> dict[Key, float]:
        ended = self.window_count(by)
        if per_status:
            failed = self.window_count(lambda lb: by(lb) + (lb.status_name,), only)
            return {k: ratio(failed.get(k, 0), ended[k[:-1]]) for k in
                    {by(lb) + (s,) for lb in self.in_window() for s in FAILED}}
        failed = self.window_count(by, only)
        return {k: ratio(failed.get(k, 0), v) for k, v in ended.items()}

    def running(self, by: Callable[[Lab], Key], at: float | None = None) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for lb in self.labs:
            if lb.running_at(self.at if at is None else at):
                out[by(lb)] = out.get(by(lb), 0) + 1
        return out

    # -- events Prometheus saw (after its first sample) --
    def started(self) -> list[Lab]:
        return [lb for lb in self.labs if self.since < lb.start <= self.at]

    def ended(self) -> list[Lab]:
        return [lb for lb in self.labs if lb.end is not None and self.since < lb.end <= self.at]

    def exams(self) -> list[Lab]:
        return [lb for lb in self.ended() if lb.score is not None and lb.status == 4]

    @staticmethod
    def count(labs: list[Lab], by: Callable[[Lab], Key]) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for lb in labs:
            out[by(lb)] = out.get(by(lb), 0) + 1
        return out

    def events_ratio(self, labs: list[Lab], by: Callable[[Lab], Key], num: Callable[[Lab], bool]) -> dict[Key, float]:
        den = self.count(labs, by)
        hit = self.count([lb for lb in labs if num(lb)], by)
        return {k: ratio(hit.get(k, 0), v) for k, v in den.items()}

    def events_mean(self, labs: list[Lab], by: Callable[[Lab], Key], value: Callable[[Lab], float]) -> dict[Key, float]:
        sums: dict[Key, float] = {}
        for lb in labs:
            sums[by(lb)] = sums.get(by(lb), 0.0) + value(lb)
        counts = self.count(labs, by)
        return {k: sums[k] / counts[k] for k in counts}

    def peak(self, span: float) -> dict[Key, tuple[float, float]]:
        """The bounds of max_over_time(sum(running)[span:1s]) at `at`: each second's point reads the
        latest sample, taken (and polled) within a scrape interval before it, so it holds the running
        count of some moment in [point - 1.5 s, point + 0.5 s]."""
        def running(u: float) -> int:
            return sum(1 for lb in self.labs if lb.running_at(u))

        points = [float(t) for t in range(math.floor(self.at - span) + 1, math.floor(self.at) + 1)]
        low = max(min(running(p + d / 10) for d in range(-15, 6)) for p in points)
        high = max(running(self.at - span + d / 10) for d in range(-15, int(span * 10) + 6))
        return {(): (float(low), float(high))}

    # -- launch facts Prometheus saw (counted by the second launch poll, after its first sample) --
    def readied(self) -> list[Lab]:
        return [lb for lb in self.labs if (t := lb.ready_at()) is not None and self.since < t <= self.at]

    def never_ready(self) -> list[Lab]:
        return [lb for lb in self.labs
                if lb.ready_at() is None and lb.end is not None and self.since < lb.end <= self.at]

    def settled(self) -> list[Lab]:
        """Labs that became ready or ended never ready: the not-ready share's denominator."""
        return self.readied() + self.never_ready()

    def launch_errors(self, by: Callable[[Lab], Key]) -> dict[Key, float]:
        """Each distinct (time, message) entry, by `by` and the message's kind."""
        out: dict[Key, float] = {}
        for lb in self.labs:
            for t, message in {(lb.start + after, m) for after, m in lb.errors}:
                if self.since < t <= self.at:
                    key = by(lb) + (error_kind(message),)
                    out[key] = out.get(key, 0) + 1
        return out

    def quantile_bounds(self, q: float, by: Callable[[Lab], Key]) -> dict[Key, tuple[float, float]]:
        """Where histogram_quantile(q) of the start-ups lies: the bucket holding the q-quantile's rank (in the
        +Inf bucket, the highest finite bound, as Prometheus answers)."""
        values: dict[Key, list[int]] = {}
        for lb in self.readied():
            values.setdefault(by(lb), []).append(lb.startup or 0)
        out: dict[Key, tuple[float, float]] = {}
        for key, vs in values.items():
            rank, lower = q * len(vs), 0.0
            for upper in STARTUP_BUCKETS:
                if sum(1 for v in vs if v <= upper) >= rank:
                    out[key] = (lower, upper) if upper != math.inf else (lower, lower)
                    break
                lower = upper
        return out

    def running_integral(self, start: float) -> float:
        """Lab-seconds of running labs in (start, at]."""
        total = 0.0
        for lb in self.labs:
            end = self.at if lb.end is None else min(lb.end, self.at)
            total += max(0.0, end - max(lb.start, start))
        return total


ALL: Callable[[Lab], Key] = lambda lb: ()  # noqa: E731
BY_DC: Callable[[Lab], Key] = lambda lb: (lb.datacenter,)  # noqa: E731
BY_REGION: Callable[[Lab], Key] = lambda lb: (lb.region,)  # noqa: E731
BY_HOST: Callable[[Lab], Key] = lambda lb: (str(lb.host),)  # noqa: E731
BY_PLACE: Callable[[Lab], Key] = lambda lb: (lb.datacenter, lb.region, str(lb.host))  # noqa: E731
BY_STATUS: Callable[[Lab], Key] = lambda lb: (lb.status_name,)  # noqa: E731
BY_PROFILE: Callable[[Lab], Key] = lambda lb: (str(lb.profile),)  # noqa: E731
BY_SERIES: Callable[[Lab], Key] = lambda lb: (PROFILES[lb.profile][0],)  # noqa: E731
IS_FAILED: Callable[[Lab], bool] = lambda lb: lb.status_name in FAILED  # noqa: E731
BY_CONSUMER: Callable[[Lab], Key] = lambda lb: (lb.consumer or "unknown",)  # noqa: E731


def error_kind(message: str) -> str:
    """The kind of an error message, as docs/launch.md says the exporter reads it (written here, not imported)."""
    lowered = message.lower()
    return "lifecycle_action" if "life cycle action" in lowered else "webhook" if "webhook" in lowered else "other"


# -- checks --------------------------------------------------------------------------------


EXACT = "exact"  # window gauges, running labs, constants from the fake: no tolerance
COUNT = "count"  # increase() over a range, or a rate times its range: count <= value <= count * f
RATIO = "ratio"  # a ratio (or mean) of two increases: truth / f <= value <= truth * f
LAB_SECONDS = "lab-seconds"  # an average over time times the range: see Tolerance.integral
PEAK = "peak"  # a max_over_time of a subquery: between the lowest and highest the samples can hold


@dataclass
class Tolerance:
    """What the samples allow, from Prometheus itself: f bounds increase()'s extrapolation."""

    f: float  # 1 + 2.2 * average scrape interval / sampled span (the shorter span of the checks' ranges)
    interval: float  # the average scrape interval
    events: int  # starts and ends in the range


@dataclass
class Check:
    kind: str
    truth: Callable[[Truth], dict[Key, float]]
    labels: tuple[str, ...] = ()  # the result's labels that key the truth
    scale: Callable[[float], float] = lambda v: v  # turns the value into the truth's unit (a rate into a count)
    counts: bool = False  # a count: a series at 0 may stand for a key the truth has no lab for
    offset: float = 0.0  # read at this many seconds after the checks' time (`offset 1w` lines: a week on)


def compare(check: Check, result: list[dict[str, Any]], truth: Truth, tol: Tolerance) -> list[str]:
    """The differences between a query's result and the truth, as messages (empty: equal)."""
    got: dict[Key, float] = {}
    for sample in result:
        key = tuple(sample["metric"].get(label, "") for label in check.labels)
        assert key not in got, f"two series for {key}: {result}"
        got[key] = check.scale(float(sample["value"][1]))
    want = check.truth(truth)
    problems = []
    for key in sorted(set(got) | set(want)):
        expected, value = want.get(key), got.get(key)
        if (check.kind == COUNT or check.counts) and expected is None:
            expected = 0.0  # a series that exists at 0 (every status of every place seen) for a key without labs
        if check.kind == PEAK:
            assert isinstance(expected, tuple) and value is not None
            low, high = expected
            if not low <= value <= high:
                problems.append(f"{key}: {value} outside the peak's bounds {expected}")
            continue
        if expected is None or math.isnan(expected):
            if value is not None and not math.isnan(value):
                problems.append(f"{key}: {value} where the truth has no value")
            continue
        if value is None or math.isnan(value):
            problems.append(f"{key}: missing (truth {expected})")
            continue
        if check.kind == EXACT:
            ok = math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-9)
        elif check.kind == COUNT:
            ok = expected - 1e-9 <= value <= expected * tol.f + 1e-9
        elif check.kind == RATIO:
            ok = expected / tol.f - 1e-9 <= value <= expected * tol.f + 1e-9
        elif check.kind == LAB_SECONDS:
            # avg_over_time times the range against the integral: each start or end moves the
            # integral by at most one scrape interval of one lab, and each edge of the range by at
            # most one interval of every running lab.
            running = max(truth.running(ALL).get((), 0), 1)
            slack = (tol.events + 2 * running) * tol.interval
            ok = abs(value - expected) <= slack
        else:
            raise AssertionError(check.kind)
        if not ok:
            problems.append(f"{key}: {value} for a truth of {expected} ({check.kind}, f={tol.f:.4f})")
    return problems


def per_minute(span: float) -> Callable[[float], float]:
    """A rate per minute over `span` seconds, as the count of events it stands for."""
    return lambda v: v * span / 60


def per_second(span: float) -> Callable[[float], float]:
    return lambda v: v * span


@dataclass
class Run:
    """What a module's checks share: the stack, the plan and the times."""

    stack: Stack
    labs: list[Lab]
    first_sample: float
    last_event: int
    at: float = 0.0
    span: int = 0  # $__range and $__rate_interval: whole seconds inside what Prometheus has seen
    truth: Truth | None = None
    tol: Tolerance | None = None
    fake: FakeSkillable | None = None


# The checks of each dashboard target, by (dashboard uid, panel title, refId). `span` is what
# is substituted for $__range and $__rate_interval; rules over a fixed range (1h, 1d, ...) are
# longer than what Prometheus has seen, so their truth is also every event since its first sample.
def panel_checks(span: int) -> dict[tuple[str, str, str], Check]:
    c: dict[tuple[str, str, str], Check] = {}
    ov, hosts, prof, exp = "skillable-overview", "skillable-lab-hosts", "skillable-lab-profiles", "skillable-exporter"
    failed = IS_FAILED
    c[(ov, "Labs started / min", "A")] = Check(COUNT, lambda T: T.count(T.started(), ALL), (), per_minute(span))
    c[(ov, "Labs ended / min", "A")] = Check(COUNT, lambda T: T.count(T.ended(), ALL), (), per_minute(span))
    c[(ov, "Running labs", "A")] = Check(EXACT, lambda T: T.running(ALL))
    c[(ov, "Active labs (account)", "A")] = Check(EXACT, lambda T: {(): ACTIVE_LABS})
    c[(ov, "Failure ratio (window)", "A")] = Check(EXACT, lambda T: T.window_ratio(ALL))
    c[(ov, "Error budget left", "A")] = Check(RATIO, lambda T: {
        k: max(0.0, 1 - v / (1 - OBJECTIVE)) for k, v in T.events_ratio(T.ended(), ALL, failed).items()})
    c[(ov, "Labs started per minute by datacenter", "A")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_DC), ("datacenter_id",), per_minute(span))
    c[(ov, "Labs ended per minute by completion status", "A")] = Check(
        COUNT, lambda T: T.count(T.ended(), BY_STATUS), ("completion_status",), per_minute(span))
    c[(ov, "Running labs by datacenter", "A")] = Check(EXACT, lambda T: T.running(BY_DC), ("datacenter_id",))
    c[(ov, "Running labs by datacenter", "B")] = Check(EXACT, lambda T: {(): ACTIVE_LABS})
    c[(ov, "Running labs by datacenter", "C")] = Check(EXACT, lambda T: T.running(ALL))
    c[(ov, "Outcomes of labs ended in the window", "A")] = Check(
        EXACT, lambda T: T.window_count(BY_STATUS), ("completion_status",), counts=True)
    c[(ov, "Failure ratio by datacenter (window)", "A")] = Check(
        EXACT, lambda T: T.window_ratio(BY_DC), ("datacenter_id",))
    c[(ov, "Failure ratio by delivery region (window)", "A")] = Check(
        EXACT, lambda T: T.window_ratio(BY_REGION), ("delivery_region_id",))
    c[(ov, "Worst lab hosts (failure ratio, window)", "A")] = Check(
        EXACT, lambda T: T.window_ratio(BY_HOST), ("lab_host_id",))
    c[(ov, "Failure ratio per status and datacenter (alert input)", "A")] = Check(
        EXACT, lambda T: {k: v for k, v in T.window_ratio(BY_DC, per_status=True).items() if v > 0},
        ("datacenter_id", "completion_status"))
    c[(ov, "Exams scored per hour", "A")] = Check(
        COUNT, lambda T: T.count(T.exams(), ALL), (), lambda v: v * span / 3600)
    c[(ov, "Exams scored per hour", "B")] = Check(
        COUNT, lambda T: T.count([lb for lb in T.exams() if (lb.score or 0) >= 70], ALL), (), lambda v: v * span / 3600)
    pass_ratio = Check(RATIO, lambda T: T.events_ratio(T.exams(), ALL, lambda lb: (lb.score or 0) >= 70))
    c[(ov, "Exam pass ratio (1h)", "A")] = pass_ratio
    c[(ov, "Exam pass ratio (1h)", "B")] = pass_ratio
    burn = Check(RATIO, lambda T: {k: v / (1 - OBJECTIVE) for k, v in T.events_ratio(T.ended(), ALL, failed).items()})
    for ref in "ABCD":
        c[(ov, "Error-budget burn rate", ref)] = burn
    for ref in "ABCDEFG":
        c[(ov, "Error ratio by window", ref)] = Check(RATIO, lambda T: T.events_ratio(T.ended(), ALL, failed))

    # Lab hosts: the table's columns, and the graphs.
    host_failures = ("lab_creation_failed", "storage_provisioning_failed", "resume_failed", "save_failed")
    for ref, status in zip("BCDE", host_failures):
        c[(hosts, "Lab hosts by failure ratio (lookback window)", ref)] = Check(
            EXACT, lambda T, s=status: T.window_ratio(BY_HOST, only=lambda lb: lb.status_name == s), ("lab_host_id",))
    c[(hosts, "Lab hosts by failure ratio (lookback window)", "A")] = Check(
        EXACT, lambda T: T.window_ratio(BY_HOST), ("lab_host_id",))
    c[(hosts, "Lab hosts by failure ratio (lookback window)", "F")] = Check(
        EXACT, lambda T: T.window_count(BY_HOST), ("lab_host_id",), counts=True)
    c[(hosts, "Lab hosts by failure ratio (lookback window)", "G")] = Check(
        EXACT, lambda T: T.running(BY_HOST), ("lab_host_id",), counts=True)
    c[(hosts, "Lab hosts by failure ratio (lookback window)", "H")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_HOST), ("lab_host_id",), lambda v: v * 3600 / 3600)  # rate[1h]*3600
    c[(hosts, "Failure ratio per lab host (window, top 10)", "A")] = Check(
        EXACT, lambda T: T.window_ratio(BY_HOST), ("lab_host_id",))
    c[(hosts, "Ended labs per minute by status (selected hosts)", "A")] = Check(
        COUNT, lambda T: T.count(T.ended(), BY_STATUS), ("completion_status",), per_minute(span))
    c[(hosts, "Running labs per lab host (top 10)", "A")] = Check(EXACT, lambda T: T.running(BY_HOST), ("lab_host_id",))
    c[(hosts, "Lab starts per minute per lab host (top 10)", "A")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_HOST), ("lab_host_id",), per_minute(span))

    # Lab profiles.
    tbl = "Lab profiles (selected range)"
    c[(prof, tbl, "A")] = Check(COUNT, lambda T: T.count(T.started(), BY_PROFILE), ("lab_profile_id",))
    c[(prof, tbl, "B")] = Check(RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, failed), ("lab_profile_id",))
    c[(prof, tbl, "C")] = Check(RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, lambda lb: lb.status == 4),
                                ("lab_profile_id",))
    c[(prof, tbl, "D")] = Check(RATIO, lambda T: T.events_mean(T.ended(), BY_PROFILE, lambda lb: lb.end - lb.start),
                                ("lab_profile_id",))
    c[(prof, tbl, "E")] = Check(EXACT, lambda T: {(str(p),): m * 60.0 for p, (_, _, m) in PROFILES.items()} | {
        (str(UNUSED_PROFILE),): 7200.0}, ("lab_profile_id",))  # catalog_profile's default DurationMinutes
    c[(prof, tbl, "F")] = Check(RATIO, lambda T: {
        k: v / (PROFILES[int(k[0])][2] * 60) for k, v in
        T.events_mean(T.ended(), BY_PROFILE, lambda lb: lb.end - lb.start).items()}, ("lab_profile_id",))
    c[(prof, tbl, "G")] = Check(
        RATIO, lambda T: T.events_ratio(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) >= 70), ("lab_profile_id",))
    c[(prof, tbl, "H")] = Check(RATIO, lambda T: T.events_mean(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) / 100),
                                ("lab_profile_id",))
    c[(prof, tbl, "I")] = Check(COUNT, lambda T: T.count(T.ended(), BY_PROFILE), ("lab_profile_id",))
    c[(prof, "Worst lab profiles by failure ratio (last hour)", "A")] = Check(
        RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, failed), ("lab_profile_id",))
    c[(prof, "Enabled lab profiles unused in the range", "A")] = Check(
        EXACT, lambda T: {(str(UNUSED_PROFILE),): 1.0}, ("lab_profile_id",))
    c[(prof, "Exam pass rate per exam (1h)", "A")] = Check(
        RATIO, lambda T: T.events_ratio(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) >= 70), ("lab_profile_id",))
    c[(prof, "Mean exam score per exam (1h)", "A")] = Check(
        RATIO, lambda T: T.events_mean(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) / 100), ("lab_profile_id",))
    c[(prof, "Failure ratio per lab profile (1h, top 10)", "A")] = Check(
        RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, failed), ("lab_profile_id",))
    c[(prof, "Launches per minute per lab profile (top 10)", "A")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_PROFILE), ("lab_profile_id",), per_minute(span))

    # The lab programme row.
    run_seconds = lambda lb: float(lb.end - lb.start)  # noqa: E731
    c[(ov, "Lab-hours consumed (range)", "A")] = Check(
        COUNT, lambda T: {(): sum(run_seconds(lb) for lb in T.ended())}, (), lambda v: v * 3600)
    c[(ov, "Lab-hours consumed (range)", "B")] = Check(
        LAB_SECONDS, lambda T: {(): T.running_integral(T.at - span)}, (), lambda v: v * 3600)
    c[(ov, "Peak concurrent labs (range)", "A")] = Check(PEAK, lambda T: T.peak(span))  # type: ignore[arg-type, return-value]
    c[(ov, "Capacity headroom", "A")] = Check(EXACT, lambda T: {(): float(MAX_ACTIVE_LABS - ACTIVE_LABS)})
    c[(ov, "Capacity used", "A")] = Check(EXACT, lambda T: {(): ACTIVE_LABS / MAX_ACTIVE_LABS})
    week = 7 * 86400.0
    for ref, offset in (("A", 0.0), ("B", week)):  # B, a week earlier, read a week from now
        c[(ov, "Launches per day, this week and the week before", ref)] = Check(
            COUNT, lambda T: T.count(T.started(), ALL), offset=offset)
        c[(ov, "Failure ratio per day, this week and the week before", ref)] = Check(
            RATIO, lambda T: T.events_ratio(T.ended(), ALL, failed), offset=offset)
    c[(ov, "Active labs against the account's limit", "A")] = Check(EXACT, lambda T: {(): float(ACTIVE_LABS)})
    c[(ov, "Active labs against the account's limit", "B")] = Check(EXACT, lambda T: {(): float(MAX_ACTIVE_LABS)})
    c[(ov, "Active labs against the account's limit", "C")] = Check(EXACT, lambda T: T.running(ALL))
    for ref, status in (("J", "cancelled"), ("K", "no_show")):
        c[(prof, tbl, ref)] = Check(RATIO, lambda T, s=status: T.events_ratio(
            T.ended(), BY_PROFILE, lambda lb: lb.status_name == s), ("lab_profile_id",))
    series = "Lab series (selected range)"
    c[(prof, series, "A")] = Check(COUNT, lambda T: T.count(T.started(), BY_SERIES), ("lab_series_id",))
    c[(prof, series, "B")] = Check(RATIO, lambda T: T.events_ratio(T.ended(), BY_SERIES, failed), ("lab_series_id",))
    for ref, status in (("C", "complete"), ("D", "cancelled"), ("E", "no_show")):
        c[(prof, series, ref)] = Check(RATIO, lambda T, s=status: T.events_ratio(
            T.ended(), BY_SERIES, lambda lb: lb.status_name == s), ("lab_series_id",))

    # Launch performance: start-up quantiles in their bucket, means and shares of the live
    # phase's facts, errors and launches counted.
    launch = "skillable-launch"
    for ref, q in (("A", 0.5), ("B", 0.9), ("C", 0.99)):
        c[(launch, "Time to ready percentiles", ref)] = Check(PEAK, lambda T, q=q: T.quantile_bounds(q, ALL))  # type: ignore[arg-type, return-value]
    c[(launch, "Time to ready p90 by delivery region", "A")] = Check(
        PEAK, lambda T: T.quantile_bounds(0.9, BY_REGION), ("delivery_region_id",))  # type: ignore[arg-type, return-value]
    c[(launch, "Time to ready p90 by datacenter", "A")] = Check(
        PEAK, lambda T: T.quantile_bounds(0.9, BY_DC), ("datacenter_id",))  # type: ignore[arg-type, return-value]
    startup_seconds = lambda lb: float(lb.startup or 0)  # noqa: E731
    c[(launch, "Mean time to ready by datacenter (range)", "A")] = Check(
        RATIO, lambda T: T.events_mean(T.readied(), BY_DC, startup_seconds), ("datacenter_id",))
    c[(launch, "Slowest lab profiles (mean time to ready, range)", "A")] = Check(
        RATIO, lambda T: T.events_mean(T.readied(), BY_PROFILE, startup_seconds), ("lab_profile_id",))
    never = lambda lb: lb.ready_at() is None  # noqa: E731
    c[(launch, "Labs never ready by lab profile (share, range, top 10)", "A")] = Check(
        RATIO, lambda T: T.events_ratio(T.settled(), BY_PROFILE, never), ("lab_profile_id",))
    c[(launch, "Labs never ready by datacenter (share, 1h)", "A")] = Check(
        RATIO, lambda T: T.events_ratio(T.settled(), BY_DC, never), ("datacenter_id",))
    c[(launch, "Lab errors per hour by kind", "A")] = Check(
        COUNT, lambda T: T.launch_errors(ALL), ("kind",), lambda v: v * span / 3600)
    c[(launch, "Lab errors by lab profile and kind (range, top 20)", "A")] = Check(
        COUNT, lambda T: T.launch_errors(BY_PROFILE), ("lab_profile_id", "kind"))
    c[(launch, "Lab errors by lab host and kind (range, top 20)", "A")] = Check(
        COUNT, lambda T: T.launch_errors(BY_HOST), ("lab_host_id", "kind"))
    c[(launch, "Launches per hour by integration", "A")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_CONSUMER), ("api_consumer",), lambda v: v * span / 3600)
    c[(launch, "Launches by integration (range)", "A")] = Check(
        COUNT, lambda T: T.count(T.started(), BY_CONSUMER), ("api_consumer",))

    # Exporter health: the one failure ratio (the fake failed two /stats requests).
    c[(exp, "API failure ratio by endpoint (10m)", "A")] = Check(
        RATIO, lambda T: {(e,): ratio(T.api_failures.get(e, 0), n) for e, n in T.api_requests.items()}, ("endpoint",))
    return c


# Targets not compared with the fake's truth, and why.
PANEL_EXCLUDED: dict[tuple[str, str, str], str] = {
    ("skillable-overview", "Failure ratio per status and datacenter (alert input)", "B"): "the threshold, a constant",
    ("skillable-launch", "Time to ready p90 by delivery region", "B"): "the threshold, a constant",
    ("skillable-overview", "Lab run time percentiles", "A"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Lab run time percentiles", "B"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Lab run time percentiles", "C"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Task completion percentiles", "A"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Task completion percentiles", "B"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Task completion percentiles", "C"): "a quantile interpolated within histogram buckets",
    ("skillable-overview", "Exam score distribution", "A"): "a heatmap of bucket counts, no single value",
    ("skillable-exporter", "Skillable API (last poll)", "A"): "exporter health (test_polling, test_faults)",
    ("skillable-exporter", "Exporter scrape", "A"): "Prometheus' own up",
    ("skillable-exporter", "Last successful poll", "A"): "exporter health: an age in seconds",
    ("skillable-exporter", "Lookback window", "A"): "a setting",
    ("skillable-exporter", "Version", "A"): "build information",
    ("skillable-exporter", "Poll and scrape duration", "A"): "durations of this run",
    ("skillable-exporter", "Poll and scrape duration", "B"): "durations of this run",
    ("skillable-exporter", "API requests per minute by endpoint", "A"):
        "exporter health (request counts: test_polling)",
    ("skillable-exporter", "API failures per minute by reason", "A"): "exporter health (reasons: test_faults)",
    ("skillable-exporter", "API failure ratio by endpoint (10m)", "B"): "the threshold, a constant",
    ("skillable-exporter", "Tracked lab instances", "A"): "the exporter's memory, not a lab quantity",
    ("skillable-exporter", "Invalid results and host overflow per minute", "A"): "none here (test_faults, test_state)",
    ("skillable-exporter", "Invalid results and host overflow per minute", "B"): "none here (test_faults, test_state)",
    ("skillable-exporter", "Series scraped", "A"): "Prometheus' scrape meta-data",
    ("skillable-exporter", "Series scraped", "B"): "Prometheus' scrape meta-data",
    ("skillable-exporter", "Series per metric", "A"): "series counts (test_exposition)",
    ("skillable-exporter", "Account-wide labs (/stats)", "A"): "checked as 'Active labs (account)'",
    ("skillable-exporter", "Account-wide labs (/stats)", "B"): "the /stats value, passed through (test_polling)",
    ("skillable-exporter", "Exporter memory", "A"): "the exporter process",
    ("skillable-exporter", "Exporter CPU", "A"): "the exporter process",
}


def rule_checks() -> dict[str, Check]:
    per_status = ("datacenter_id", "delivery_region_id", "lab_host_id", "completion_status")
    host = ("datacenter_id", "delivery_region_id", "lab_host_id")
    c: dict[str, Check] = {
        "lab_host:skillable_lab_instances_ended:window": Check(
            EXACT, lambda T: T.window_count(BY_PLACE), host, counts=True),
        "datacenter:skillable_lab_instances_ended:window": Check(
            EXACT, lambda T: T.window_count(BY_DC), ("datacenter_id",), counts=True),
        "lab_host:skillable_lab_instances_failed:window": Check(
            EXACT, lambda T: T.window_count(lambda lb: BY_PLACE(lb) + (lb.status_name,), IS_FAILED), per_status,
            counts=True),
        "lab_host:skillable_lab_instances_failed:ratio_window": Check(
            EXACT, lambda T: T.window_ratio(BY_PLACE, per_status=True), per_status),
        "datacenter:skillable_lab_instances_failed:ratio_window": Check(
            EXACT, lambda T: T.window_ratio(BY_DC, per_status=True), ("datacenter_id", "completion_status")),
        "instance:skillable_lab_instances_started:rate30m": Check(
            COUNT, lambda T: T.count(T.started(), ALL), (), per_second(1800)),
        "instance:skillable_exams:rate1h": Check(COUNT, lambda T: T.count(T.exams(), ALL), (), per_second(3600)),
        "instance:skillable_exams_passed:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.exams(), ALL, lambda lb: (lb.score or 0) >= 70)),
        "instance:skillable_exams_passed:ratio_rate1d": Check(
            RATIO, lambda T: T.events_ratio(T.exams(), ALL, lambda lb: (lb.score or 0) >= 70)),
        "lab_profile:skillable_lab_profile_instances_ended:rate1h": Check(
            COUNT, lambda T: T.count(T.ended(), BY_PROFILE), ("lab_profile_id",), per_second(3600)),
        "lab_profile:skillable_lab_profile_instances_failed:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, IS_FAILED), ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_instances_completed:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.ended(), BY_PROFILE, lambda lb: lb.status == 4), ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_run_time_seconds:mean_rate1h": Check(
            RATIO, lambda T: T.events_mean(T.ended(), BY_PROFILE, lambda lb: lb.end - lb.start), ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_exams:rate1h": Check(
            COUNT, lambda T: T.count(T.exams(), BY_PROFILE), ("lab_profile_id",), per_second(3600)),
        "lab_profile:skillable_lab_profile_exams_passed:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) >= 70),
            ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_exams_passed:ratio_rate1d": Check(
            RATIO, lambda T: T.events_ratio(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) >= 70),
            ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_exam_score_ratio:mean_rate1h": Check(
            RATIO, lambda T: T.events_mean(T.exams(), BY_PROFILE, lambda lb: (lb.score or 0) / 100),
            ("lab_profile_id",)),
        "instance:skillable_account_active_labs:ratio_limit": Check(
            EXACT, lambda T: {(): ACTIVE_LABS / MAX_ACTIVE_LABS}),
        "endpoint:skillable_api_request_failures:ratio_rate10m": Check(
            RATIO, lambda T: {(e,): ratio(T.api_failures.get(e, 0), n) for e, n in T.api_requests.items()},
            ("endpoint",)),
    }
    never = lambda lb: lb.ready_at() is None  # noqa: E731
    c.update({
        "delivery_region:skillable_lab_startup_duration_seconds:p90_rate30m": Check(
            PEAK, lambda T: T.quantile_bounds(0.9, BY_REGION), ("delivery_region_id",)),  # type: ignore[arg-type, return-value]
        "delivery_region:skillable_lab_startup_duration_seconds:rate30m": Check(
            COUNT, lambda T: T.count(T.readied(), BY_REGION), ("delivery_region_id",), per_second(1800)),
        "datacenter:skillable_lab_instances_not_ready:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.settled(), BY_DC, never), ("datacenter_id",)),
        "lab_profile:skillable_lab_profile_instances_not_ready:ratio_rate1h": Check(
            RATIO, lambda T: T.events_ratio(T.settled(), BY_PROFILE, never), ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_startup_duration_seconds:mean_rate1h": Check(
            RATIO, lambda T: T.events_mean(T.readied(), BY_PROFILE, lambda lb: float(lb.startup or 0)),
            ("lab_profile_id",)),
        "lab_profile:skillable_lab_profile_errors:rate1h": Check(
            COUNT, lambda T: T.launch_errors(BY_PROFILE), ("lab_profile_id", "kind"), per_second(3600)),
        "instance:skillable_lab_errors:rate30m": Check(
            COUNT, lambda T: T.launch_errors(ALL), ("kind",), per_second(1800)),
    })
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        c[f"instance:skillable_lab_delivery_errors:ratio_rate{window}"] = Check(
            RATIO, lambda T: T.events_ratio(T.ended(), ALL, IS_FAILED))
    return c


RULE_EXCLUDED = {"skillable-thresholds.yml": "constants", "skillable-links.yml": "the links' base URLs (test_rules)"}
# Recording rules that read history older than this Prometheus, by name: their values are checked by
# prometheus/tests (promtool test rules).
RULE_OLDER_THAN_THIS_PROMETHEUS = {
    "instance:skillable_lab_errors:rate6h_offset30m": "reads the six hours before the last 30 minutes"}


def recorded_rules() -> dict[str, str]:
    """record name -> file name, of every shipped recording rule."""
    out = {}
    for path in sorted((ROOT / "prometheus/rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    out[rule["record"]] = path.name
    return out


def every_target() -> list[Query]:
    return [q for path in dashboard_paths() for q in panel_queries(load(path))]


# -- the stack and the run -------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    work = tmp_path_factory.mktemp("panel-values")
    rng = random.Random(18)
    fake = FakeSkillable(live=True)
    now = int(time.time())
    labs = history(now, rng)
    add_to_fake(fake, labs, now)
    fake.state.stats = {"NumActive": ACTIVE_LABS, "NumSaved": SAVED_LABS}
    fake.state.search_nameless = {kind: set(ids) for kind, ids in SEARCH_NAMELESS.items()}
    fake.state.regions = [{"Id": int(k), "Name": v, "Description": None} for k, v in REGION_NAMES.items()]
    fake.state.catalog_series = [catalog_series(int(k), v) for k, v in SERIES.items()]
    fake.state.catalog_profiles = [
        catalog_profile(p, name, int(series), DurationMinutes=minutes, IsExam=p == 8003)
        for p, (series, name, minutes) in PROFILES.items()] + [
        catalog_profile(UNUSED_PROFILE, "Nobody launches this", 1),
        catalog_profile(DISABLED_PROFILE, "Retired", 2, Enabled=False)]
    ports = {name: free_port() for name in ("exporter", "prometheus")}
    stack = Stack(work, f"http://127.0.0.1:{ports['exporter']}", f"http://127.0.0.1:{ports['prometheus']}")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted((ROOT / "prometheus/rules").glob("*.yml"))],
        "scrape_configs": [{"job_name": "skillable", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{ports['exporter']}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (work / "exporter.yml").write_text(yaml.safe_dump({"names": {"datacenters": NAMES["datacenter"],
                                                                 "lab_hosts": NAMES["lab_host"]}}))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SKILLABLE_")}
    env.update(SKILLABLE_API_URL=fake.url, SKILLABLE_API_KEY=fake.state.api_key)
    try:
        stack.start("exporter", [sys.executable, "-m", "exporter", f"--config.file={work / 'exporter.yml'}",
                                 f"--web.listen-address=127.0.0.1:{ports['exporter']}",
                                 "--skillable.min-poll-interval=0", f"--skillable.max-active-labs={MAX_ACTIVE_LABS}",
                                 f"--skillable.launch-interval={LAUNCH_INTERVAL}"],
                    cwd=ROOT, env=env)
        stack.start("prometheus", prometheus_args(stack, ports["prometheus"], work / "prometheus.yml"))
        stack.ready("exporter", f"{stack.exporter_url}/healthz")
        stack.ready("prometheus", f"{stack.prometheus_url}/-/ready")
        first = eventually(lambda: stack.query('min(timestamp(skillable_up{job="skillable"} == 1))'),
                           STARTUP_DEADLINE, "the first scrape with skillable_up 1")
        first_sample = float(first[0]["value"][1])
        new, last_event = live(first_sample, labs, rng)
        labs += new
        # Ends of the history's running labs move into the live phase: the fake's records say so.
        for lb in labs:
            if 2000 <= lb.id < 3000 and lb.end is not None:
                fake.update(lb.id, _ends=(lb.end, lb.status, {}), _errors=list(lb.errors))
        add_to_fake(fake, new, time.time())
        fake.fault(http_status(500), http_status(500), endpoint="stats")
        yield Run(stack, labs, first_sample, last_event, fake=fake)
    finally:
        stack.stop()
        fake.stop()


@pytest.fixture(scope="module")
def checked(run: Run) -> Run:
    """Wait for the quiet seconds after the last event and a rule evaluation after them; then fix
    the time, the span and the tolerance of every check."""
    ready_at = run.last_event + QUIET
    while time.time() < ready_at:
        time.sleep(0.2)
    # The second launch poll (a launch interval after the first, at the first scrape) counted the live
    # phase's launch facts: wait for a scrape that shows it; the rule evaluation below comes after it.
    assert run.last_event < run.first_sample + LAUNCH_INTERVAL - 2, "live events must precede the second launch poll"
    second = run.first_sample + LAUNCH_INTERVAL / 2
    polled = f'skillable_launch_last_success_timestamp_seconds{{job="skillable"}} > {second}'
    eventually(lambda: run.stack.query(polled), LAUNCH_INTERVAL + 20, "the second launch poll")
    launch_seen = time.time()
    eventually(lambda: run.stack.query(f"timestamp(instance:skillable_lab_errors:rate30m) > {launch_seen}"),
               10, "an evaluation of the launch rules after it (a group of their own)")
    eventually(lambda: run.stack.query(f"timestamp(instance:skillable_lab_delivery_errors:ratio_rate1h) > {ready_at}"),
               10, "a rule evaluation after the last event")
    at = time.time()
    # The samples of one counter give the scrape interval and the spans the ranges cover.
    raw = run.stack.query('skillable_lab_instances_started_total{job="skillable",lab_host_id="301"}[1h]', at)
    times = [float(t) for t, _ in raw[0]["values"]]
    interval = (times[-1] - times[0]) / (len(times) - 1)
    span = int(at - run.first_sample - 1.5)  # starts after the first sample, before the first event
    in_span = [t for t in times if t > at - span]
    shortest = min(in_span[-1] - in_span[0], times[-1] - times[0]) - interval  # one sample less, to be safe
    run.at, run.span = at, span
    requests = {}
    failures = {}
    since = run.first_sample + 0.5  # a poll runs within half a second of its scrape: its requests belong to it
    fake = run.fake
    assert fake is not None
    with fake.lock:
        seen = list(fake.state.seen)
    for s in seen:
        endpoint = {"latestresults": "LatestResults", "stats": "stats", "deliveryregions": "deliveryregions",
                    "catalog": "catalog", "search": "labinstance_search"}.get(s.path.rsplit("/", 1)[-1].lower())
        if endpoint and since < s.at <= at:
            requests[endpoint] = requests.get(endpoint, 0) + 1
    failures["stats"] = 2
    run.truth = Truth(run.labs, at, run.first_sample, requests, failures)
    events = len(run.truth.started()) + len(run.truth.ended())
    run.tol = Tolerance(f=1 + 2.2 * interval / shortest, interval=interval, events=events)
    return run


def substituted(q: Query, span: int) -> str:
    return substitute(q.expr, {"__range": f"{span}s", "__rate_interval": f"{span}s", "__range_s": str(span),
                               "__interval": "1s", "__interval_ms": "1000"})


def check_target(run: Run, key: tuple[str, str, str], expr: str, check: Check) -> list[str]:
    assert run.truth is not None and run.tol is not None
    return compare(check, run.stack.query(expr, run.at + check.offset), run.truth, run.tol)


# -- the tests ---------------------------------------------------------------------------------


def test_every_panel_and_rule_is_checked_or_excluded() -> None:
    checks = panel_checks(60)
    targets = {(q.dashboard, q.panel, q.ref) for q in every_target()}
    unaccounted = targets - set(checks) - set(PANEL_EXCLUDED)
    assert not unaccounted, f"panel targets neither checked nor excluded: {sorted(unaccounted)}"
    assert not (set(checks) | set(PANEL_EXCLUDED)) - targets, "checks of targets that no longer exist"
    assert not set(checks) & set(PANEL_EXCLUDED)
    rules = recorded_rules()
    unchecked = {r for r, f in rules.items() if f not in RULE_EXCLUDED} - set(rule_checks()) - set(
        RULE_OLDER_THAN_THIS_PROMETHEUS)
    assert not unchecked, f"recording rules without a value check: {sorted(unchecked)}"
    assert not set(rule_checks()) - set(rules)


def test_every_dashboard_panel_equals_the_truth(checked: Run) -> None:
    problems = []
    for (key, check) in panel_checks(checked.span).items():
        [q] = [q for q in every_target() if (q.dashboard, q.panel, q.ref) == key]
        for problem in check_target(checked, key, substituted(q, checked.span), check):
            problems.append(f"{key}: {problem}")
    assert not problems, "\n".join(problems)


def test_every_recording_rule_equals_the_truth(checked: Run) -> None:
    problems = []
    for record, check in rule_checks().items():
        expr = f'{record}{{job="skillable"}}'
        for problem in check_target(checked, ("rule", record, ""), expr, check):
            problems.append(f"{record}: {problem}")
    assert not problems, "\n".join(problems)


def test_the_old_headline_formula_fails_the_check(checked: Run) -> None:
    """The headline "Failure ratio (window)" before it read the window rules: failed labs in the window over
    (labs in the window - running labs). skillable_lab_instances holds ended labs only, so the
    running labs are subtracted from a count that never held them."""
    f = 'job=~".*",instance=~".*",account=~".*",datacenter_id=~".*",delivery_region_id=~".*",lab_host_id=~".*"'
    old = (f'sum(skillable_lab_instances{{{f},completion_status=~"{"|".join(sorted(FAILED))}"}})\n/\n'
           f'(sum(skillable_lab_instances{{{f}}}) - sum(skillable_lab_instances_running{{{f}}}))')
    check = panel_checks(checked.span)[("skillable-overview", "Failure ratio (window)", "A")]
    problems = check_target(checked, ("old", "headline", ""), old, check)
    assert problems, "the old formula passed the check: the check cannot tell"
    value = float(checked.stack.query(old, checked.at)[0]["value"][1])
    assert not 0 <= value <= 1, f"with more labs running than ended in the window it leaves 0..1: {value}"


def test_a_profiles_first_save_failed_end_counts_in_increase(checked: Run) -> None:
    """The profile's save_failed series existed at 0 before its first such end."""
    got = checked.stack.query(
        f'increase(skillable_lab_profile_instances_ended_total{{job="skillable",lab_profile_id="8001",'
        f'completion_status="save_failed"}}[{checked.span}s])', checked.at)
    assert got and 1 <= float(got[0]["value"][1]) <= checked.tol.f  # type: ignore[union-attr]


def _percentunit_targets() -> list[Query]:
    out = []
    for path in dashboard_paths():
        board = load(path)
        for panel in all_panels(board):
            config = panel.get("fieldConfig", {})
            units = {t["refId"]: config.get("defaults", {}).get("unit") for t in panel.get("targets", [])}
            for override in config.get("overrides", []):
                matcher = override["matcher"]
                unit = next((p["value"] for p in override["properties"] if p["id"] == "unit"), None)
                ref = None
                if matcher["id"] == "byFrameRefID":
                    ref = matcher["options"]
                elif matcher["id"] == "byName" and re.fullmatch(r"Value #\w+", matcher["options"]):
                    ref = matcher["options"].split("#")[1]
                elif matcher["id"] == "byName" and matcher["options"] == "Value" and len(units) == 1:
                    ref = next(iter(units))
                if unit and ref in units:
                    units[ref] = unit
            for q in panel_queries({"uid": board["uid"], "panels": [dict(panel, panels=[])]}):
                if units.get(q.ref) == "percentunit":
                    out.append(q)
    return out


def test_every_percentunit_panel_stays_within_0_and_1(checked: Run) -> None:
    queries = _percentunit_targets()
    assert len(queries) > 20
    outside = []
    for q in queries:
        for series in checked.stack.query_range(substituted(q, checked.span), checked.first_sample, checked.at, 1):
            for _, value in series["values"]:
                v = float(value)
                if not math.isnan(v) and not 0 <= v <= 1:
                    outside.append(f"{q.dashboard} / {q.panel} / {q.ref}: {v} ({series['metric']})")
                    break
    assert not outside, "\n".join(outside)


def test_legends_name_places_and_profiles_where_their_info_metrics_do(checked: Run) -> None:
    """A *_name label beside an id is the configured or fetched name (the config's, then /deliveryregions',
    then the one /labinstance/search carries), else the id (the search leaves SEARCH_NAMELESS out)."""
    searched = {kind: {str(i): f"{prefix}{i}" for i in ids if i not in SEARCH_NAMELESS[kind]}
                for kind, prefix, ids in (("datacenter", "DC-", (1, 2)), ("lab_host", "HV-", HOSTS),
                                          ("delivery_region", "Region ", (1, 2, 3)))}
    names = {"datacenter": searched["datacenter"] | NAMES["datacenter"],
             "lab_host": searched["lab_host"] | NAMES["lab_host"],
             "delivery_region": searched["delivery_region"] | REGION_NAMES,
             "lab_profile": {str(p): n for p, (_, n, _) in PROFILES.items()}
             | {str(UNUSED_PROFILE): "Nobody launches this"},
             "lab_series": SERIES}
    seen = set()
    for q in every_target():
        for sample in checked.stack.query(substituted(q, checked.span), checked.at):
            labels = sample["metric"]
            for kind, known in names.items():
                if f"{kind}_name" in labels and labels.get(f"{kind}_id"):
                    ident = labels[f"{kind}_id"]
                    assert labels[f"{kind}_name"] == known.get(ident, ident), (q.panel, labels)
                    seen.add((kind, ident in known))
    assert {("datacenter", True), ("datacenter", False), ("lab_host", True), ("lab_host", False),
            ("delivery_region", True), ("delivery_region", False), ("lab_profile", True)} <= seen


def test_the_fake_history_has_more_labs_running_than_ended_in_the_window(checked: Run) -> None:
    """The case the old headline formula got wrong (the check above relies on it)."""
    assert checked.truth is not None
    assert checked.truth.running(ALL)[()] > len(checked.truth.in_window()) > 20
    assert any(lb.profile == 8001 and lb.status == 40 for lb in checked.truth.ended())
    assert len(checked.truth.exams()) == 4 and len(checked.truth.started()) != len(checked.truth.ended())
