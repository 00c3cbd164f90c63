"""Memory of the lab fleet: one record per lab instance, and the aggregates metrics are built from.

LatestResults is a windowed change feed, so the same instance comes back in
every overlapping poll. Counters advance only on the first sighting of an event
(a start, an end, a scored exam), and gauges are kept as running aggregates so a
scrape costs O(places), not O(instances).

Deduplication rests on one rule, the horizon: the poller never asks for changes
older than the horizon it hands to `apply`, and `evict` only forgets instances
whose last change is older than a later horizon. So an event older than the
horizon is either already counted or happened before the exporter was watching,
and is never counted again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from .model import ALL_STATUSES, LabResult, status_name

Place = tuple[str, str, str]  # datacenter_id, delivery_region_id, lab_host_id
Region = tuple[str, str]  # datacenter_id, delivery_region_id

UNKNOWN_ID = "unknown"
OVERFLOW_HOST = "other"

RUN_TIME_BUCKETS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
RATIO_BUCKETS: tuple[float, ...] = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)


@dataclass(slots=True)
class Instance:
    place: Place
    status: str
    start: int | None
    end: int | None
    last_change: int
    ended_counted: bool = False
    exam_counted: bool = False


@dataclass(slots=True)
class Histogram:
    """Bucket counts (not cumulative), sum and count; bounds exclude +Inf."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Buckets as prometheus_client wants them: cumulative, ending in +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(("+Inf" if bound == float("inf") else _bound_text(bound), running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


def _bound_text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and bound >= 1 else repr(float(bound))


@dataclass
class Snapshot:
    """A consistent copy of everything the collector needs, taken under the poller's lock."""

    places: list[Place]
    instances: dict[tuple[Place, str], int]
    running: dict[Place, int]
    started: dict[Place, int]
    ended: dict[tuple[Place, str], int]
    exams: dict[Place, int]
    exams_passed: dict[Place, int]
    run_time: dict[Region, Histogram]
    task_completion: dict[Region, Histogram]
    exam_score: dict[Region, Histogram]
    tracked: int
    invalid_total: int
    host_overflow_total: int


class FleetState:
    """Per-instance memory and aggregates for one Skillable account. Not thread-safe: the poller locks."""

    def __init__(self, max_lab_hosts: int) -> None:
        self.max_lab_hosts = max_lab_hosts
        self.instances: dict[int, Instance] = {}
        self.places: set[Place] = set()
        self.hosts: set[str] = set()
        self.by_status: Counter[tuple[Place, str]] = Counter()
        self.running: Counter[Place] = Counter()
        self.started: Counter[Place] = Counter()
        self.ended: Counter[tuple[Place, str]] = Counter()
        self.exams: Counter[Place] = Counter()
        self.exams_passed: Counter[Place] = Counter()
        self.run_time: dict[Region, Histogram] = {}
        self.task_completion: dict[Region, Histogram] = {}
        self.exam_score: dict[Region, Histogram] = {}
        self.invalid_total = 0
        self.host_overflow_total = 0

    # -- updates -----------------------------------------------------------

    def apply(self, results: Iterable[LabResult], horizon: float) -> None:
        """Fold one poll's results in. Events older than `horizon` are not counted (see module doc)."""
        for result in results:
            self._apply_one(result, horizon)

    def _apply_one(self, r: LabResult, horizon: float) -> None:
        status = status_name(r.completion_status)
        known = self.instances.get(r.lab_instance_id)
        if known is None:
            place = self._place(r)
            last_change = max(r.start or 0, r.end or 0)
            inst = Instance(place, status, r.start, r.end, last_change)
            self.instances[r.lab_instance_id] = inst
            self._add_to_gauges(inst)
            if r.start is None or r.start >= horizon:
                self.started[place] += 1
        else:
            inst = known
            self._remove_from_gauges(inst)
            inst.status = status
            inst.start = r.start if r.start is not None else inst.start
            inst.end = r.end if r.end is not None else inst.end
            inst.last_change = max(inst.last_change, r.start or 0, r.end or 0)
            self._add_to_gauges(inst)
        event_time = r.end if r.end is not None else r.start
        in_horizon = event_time is None or event_time >= horizon
        if r.end is not None and not inst.ended_counted and in_horizon:
            inst.ended_counted = True
            self._count_end(inst.place, status, r)
        if not inst.exam_counted and _is_scored(r) and in_horizon:
            inst.exam_counted = True
            self._count_exam(inst.place, r)

    def _place(self, r: LabResult) -> Place:
        host = _label(r.lab_host_id)
        if host not in self.hosts:
            if len(self.hosts) >= self.max_lab_hosts:
                self.host_overflow_total += 1
                host = OVERFLOW_HOST
            else:
                self.hosts.add(host)
        place = (_label(r.datacenter_id), _label(r.delivery_region_id), host)
        self.places.add(place)
        return place

    def _count_end(self, place: Place, status: str, r: LabResult) -> None:
        self.ended[(place, status)] += 1
        region = place[:2]
        if r.total_run_time_seconds is not None and r.total_run_time_seconds >= 0:
            _histogram(self.run_time, region, RUN_TIME_BUCKETS).observe(float(r.total_run_time_seconds))
        if r.task_complete_percent is not None:
            ratio = min(max(r.task_complete_percent / 100.0, 0.0), 1.0)
            _histogram(self.task_completion, region, RATIO_BUCKETS).observe(ratio)

    def _count_exam(self, place: Place, r: LabResult) -> None:
        self.exams[place] += 1
        if r.exam_passed:
            self.exams_passed[place] += 1
        if r.exam_score is not None and r.exam_max_possible_score:
            ratio = min(max(r.exam_score / r.exam_max_possible_score, 0.0), 1.0)
            _histogram(self.exam_score, place[:2], RATIO_BUCKETS).observe(ratio)

    def _add_to_gauges(self, inst: Instance) -> None:
        self.by_status[(inst.place, inst.status)] += 1
        if inst.end is None:
            self.running[inst.place] += 1

    def _remove_from_gauges(self, inst: Instance) -> None:
        self.by_status[(inst.place, inst.status)] -= 1
        if inst.end is None:
            self.running[inst.place] -= 1

    def evict(self, horizon: float) -> int:
        """Forget instances whose last change is older than `horizon`; returns how many."""
        stale = [key for key, inst in self.instances.items() if inst.last_change < horizon]
        for key in stale:
            self._remove_from_gauges(self.instances.pop(key))
        return len(stale)

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        places = sorted(self.places)
        return Snapshot(
            places=places,
            instances={(p, s): self.by_status.get((p, s), 0) for p in places for s in ALL_STATUSES},
            running={p: self.running.get(p, 0) for p in places},
            started={p: self.started.get(p, 0) for p in places},
            ended={(p, s): self.ended.get((p, s), 0) for p in places for s in ALL_STATUSES},
            exams={p: self.exams.get(p, 0) for p in places},
            exams_passed={p: self.exams_passed.get(p, 0) for p in places},
            run_time=_copy_histograms(self.run_time, places, RUN_TIME_BUCKETS),
            task_completion=_copy_histograms(self.task_completion, places, RATIO_BUCKETS),
            exam_score=_copy_histograms(self.exam_score, places, RATIO_BUCKETS),
            tracked=len(self.instances),
            invalid_total=self.invalid_total,
            host_overflow_total=self.host_overflow_total,
        )


def _label(value: int | None) -> str:
    return UNKNOWN_ID if value is None else str(value)


def _is_scored(r: LabResult) -> bool:
    return r.exam_score is not None or r.exam_passed is not None


def _histogram(table: dict[Region, Histogram], region: Region, bounds: tuple[float, ...]) -> Histogram:
    hist = table.get(region)
    if hist is None:
        hist = table[region] = Histogram(bounds)
    return hist


def _copy_histograms(
    table: dict[Region, Histogram], places: list[Place], bounds: tuple[float, ...]
) -> dict[Region, Histogram]:
    """Every region seen gets a histogram, empty ones at zero, so the series exist from the start."""
    regions = sorted({p[:2] for p in places})
    out: dict[Region, Histogram] = {}
    for region in regions:
        hist = table.get(region)
        out[region] = Histogram(bounds, list(hist.counts), hist.total) if hist else Histogram(bounds)
    return out
