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

import heapq
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgspec

from .model import ALL_STATUSES, STATUS_NAMES, UNKNOWN_STATUS, LabResult

Place = tuple[str, str, str]  # datacenter_id, delivery_region_id, lab_host_id
Region = tuple[str, str]  # datacenter_id, delivery_region_id

UNKNOWN_ID = "unknown"
OVERFLOW_HOST = "other"
OVERFLOW_PLACE: tuple[str, str, str] = (OVERFLOW_HOST, OVERFLOW_HOST, OVERFLOW_HOST)
# Label combinations (places) allowed beyond one per tracked host: room for hosts seen under
# "unknown" ids and for the overflow host in each region. Series <= 26 per place + 40 per region.
EXTRA_PLACES = 100

RUN_TIME_BUCKETS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
RATIO_BUCKETS: tuple[float, ...] = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)
PLACE_CACHE_SIZE = 65536  # raw id triples remembered by FleetState._place; cleared when full

# The slots of a bundle (FleetState._bundle): what a new instance's raw ids and status code
# stand for, the counts of new instances seen in the current apply() until it adds them to
# the Counters, and the region's histograms once known.
_PLACE, _STATUS, _PLACE_STATUS, _NEW, _RUNNING, _STARTED, _ENDED, _RUN_TIME, _TASK = range(9)


class Instance(msgspec.Struct, gc=False):
    """One tracked lab instance.

    gc=False: it holds only a tuple of str, a str and numbers, so it can never be
    part of a reference cycle and the cyclic garbage collector need not track it.
    With 100,000 instances as dataclasses, each full collection took ~85 ms and
    landed in a scrape (the steady-state p99); untracked, they cost it nothing.
    """

    place: Place
    status: str
    start: int | None
    end: int | None
    last_change: float  # an int from the API; a float once restored from a state file
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
        # The first bound >= value; NaN compares false with every bound, so it lands in +Inf.
        self.counts[bisect_left(self.bounds, value) if value == value else -1] += 1
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
    profiles: list[str] = field(default_factory=list)  # interim until the state branch fills it


class FleetState:
    """Per-instance memory and aggregates for one Skillable account. Not thread-safe: the poller locks.

    snapshot() returns the same (read-only) Snapshot object until the state changes,
    so the collector can cache its exposition by the snapshot's identity. apply()
    and evict() mark the change; code that changes the state another way calls
    changed().
    """

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
        # Derived, not state: raw (datacenter, region, host) ids -> Place, so that a
        # result costs one dict lookup instead of three str() calls and a set check.
        self._place_of: dict[tuple[int | None, int | None, int | None], Place] = {}
        # Derived too: raw ids and status code of a new instance -> its bundle (see _PLACE). Bundles
        # hold the region's Histogram objects: code that replaces those calls changed().
        self._bundles: dict[tuple[int | None, ...], list[Any]] = {}
        # Derived, not state: (last_change, instance id) for every instance, a min-heap that
        # evict() pops from, so a poll costs O(changes), not O(instances). Entries whose
        # instance has changed since are stale and skipped; see _age_index().
        self._by_age: list[tuple[int, int]] = []
        self._by_age_of: dict[int, Instance] | None = None
        self._version = 0
        self._snapshot: tuple[tuple[int, ...], Snapshot] | None = None

    def changed(self) -> None:
        """Mark the state as changed, so the next snapshot() is taken afresh (and nothing derived is reused)."""
        self._version += 1
        self._place_of.clear()
        self._bundles.clear()
        self._by_age_of = None  # rebuilt from `instances` by the next apply() or evict()

    # -- updates -----------------------------------------------------------

    def apply(self, results: Iterable[LabResult], horizon: float, seen_at: float = 0) -> None:
        """Fold one poll's results in. Events older than `horizon` are not counted (see module doc).

        `seen_at` (the poll's time) stands in for the last change of a result with
        neither Start nor End, so it is remembered, and counted once, for as long
        as the API keeps returning it, instead of being evicted by the same poll.

        This loop runs once per result (100,000 times for a large cold poll), so it
        keeps its names local and its work inline; the profile in BENCHMARKS.md shows why.
        """
        self._version += 1
        instances = self.instances
        by_status = self.by_status
        running = self.running
        ended = self.ended
        run_time = self.run_time
        task_completion = self.task_completion
        bundles = self._bundles
        status_of = STATUS_NAMES.get
        by_age = self._age_index()
        aged: list[tuple[float, int]] = []  # into by_age at the end: one heapify beats 100,000 pushes
        touched: list[list[Any]] = []  # bundles holding counts of new instances, added up at the end
        try:
            for r in results:
                key, start, end = r.lab_instance_id, r.start, r.end
                if start is not None and end is not None:
                    stamp = end if end >= start else start
                else:
                    stamp = max(start or 0, end or 0) if start is not None or end is not None else seen_at
                inst = instances.get(key)
                if inst is None:
                    # A new instance: one lookup gives its labels and status, and its counts go
                    # into the bundle (list slots, no hashing) until the end of apply().
                    bundle = bundles.get((r.datacenter_id, r.delivery_region_id, r.lab_host_id, r.completion_status))
                    if bundle is None:
                        bundle = self._bundle(r)
                    if not bundle[_NEW]:
                        touched.append(bundle)
                    bundle[_NEW] += 1
                    place = bundle[_PLACE]
                    inst = Instance(place, bundle[_STATUS], start, end, stamp)
                    instances[key] = inst
                    aged.append((stamp, key))
                    if start is None or start >= horizon:
                        bundle[_STARTED] += 1
                    if end is None:
                        bundle[_RUNNING] += 1
                        if start is not None and start < horizon:
                            continue
                    elif end >= horizon:
                        inst.ended_counted = True
                        bundle[_ENDED] += 1
                        seconds = r.total_run_time_seconds
                        if seconds is not None and seconds >= 0:
                            hist = bundle[_RUN_TIME] or self._bundle_histogram(bundle, _RUN_TIME)
                            hist.counts[bisect_left(RUN_TIME_BUCKETS, seconds)] += 1  # an int is never NaN
                            hist.total += seconds
                        percent = r.task_complete_percent
                        if percent is not None:
                            hist = bundle[_TASK] or self._bundle_histogram(bundle, _TASK)
                            _observe_ratio(hist, percent / 100.0)
                    else:
                        continue
                else:
                    place = inst.place
                    status = status_of(r.completion_status, UNKNOWN_STATUS)  # None and unknown codes: "unknown"
                    by_status[(place, inst.status)] -= 1
                    if inst.end is None:
                        running[place] -= 1
                    inst.status = status
                    if start is not None:
                        inst.start = start
                    if end is not None:
                        inst.end = end
                    last_change = max(inst.last_change, stamp)
                    if last_change != inst.last_change:
                        inst.last_change = last_change
                        aged.append((last_change, key))
                    by_status[(place, status)] += 1
                    if inst.end is None:
                        running[place] += 1
                    if end is not None:
                        if end >= horizon and not inst.ended_counted:
                            inst.ended_counted = True
                            ended[(place, status)] += 1
                            region = place[:2]
                            seconds = r.total_run_time_seconds
                            if seconds is not None and seconds >= 0:
                                _histogram(run_time, region, RUN_TIME_BUCKETS).observe(seconds)
                            if r.task_complete_percent is not None:
                                _observe_ratio(_histogram(task_completion, region, RATIO_BUCKETS),
                                               r.task_complete_percent / 100.0)
                        if end < horizon:
                            continue
                    elif start is not None and start < horizon:
                        continue
                if not inst.exam_counted and (r.exam_score is not None or r.exam_passed is not None):
                    inst.exam_counted = True
                    self._count_exam(place, r)
        finally:
            for bundle in touched:
                place, place_status = bundle[_PLACE], bundle[_PLACE_STATUS]
                by_status[place_status] += bundle[_NEW]
                if bundle[_RUNNING]:
                    running[place] += bundle[_RUNNING]
                if bundle[_STARTED]:
                    self.started[place] += bundle[_STARTED]
                if bundle[_ENDED]:
                    ended[place_status] += bundle[_ENDED]
                bundle[_NEW] = bundle[_RUNNING] = bundle[_STARTED] = bundle[_ENDED] = 0
            if len(aged) > len(by_age) // 8:
                by_age.extend(aged)
                heapq.heapify(by_age)
            else:
                for entry in aged:
                    heapq.heappush(by_age, entry)

    def _bundle(self, r: LabResult) -> list[Any]:
        """The bundle for a new instance's raw ids and status code (see _PLACE and the slots after it).
        Kept for the next instances with the same ids, unless its host overflowed (counted each time)."""
        place = self._place(r)
        status = STATUS_NAMES.get(r.completion_status, UNKNOWN_STATUS)  # type: ignore[arg-type]
        bundle: list[Any] = [place, status, (place, status), 0, 0, 0, 0, None, None]
        if place[2] != OVERFLOW_HOST:
            if len(self._bundles) >= PLACE_CACHE_SIZE:
                self._bundles.clear()
            self._bundles[(r.datacenter_id, r.delivery_region_id, r.lab_host_id, r.completion_status)] = bundle
        return bundle

    def _bundle_histogram(self, bundle: list[Any], slot: int) -> Histogram:
        if slot == _RUN_TIME:
            table, bounds = self.run_time, RUN_TIME_BUCKETS
        else:
            table, bounds = self.task_completion, RATIO_BUCKETS
        hist = bundle[slot] = _histogram(table, bundle[_PLACE][:2], bounds)
        return hist

    def _place(self, r: LabResult) -> Place:
        key = (r.datacenter_id, r.delivery_region_id, r.lab_host_id)
        place = self._place_of.get(key)
        if place is not None:
            if place[2] == OVERFLOW_HOST:  # an overflowed host stays overflowed: the host set only grows
                self.host_overflow_total += 1
            return place
        host = _label(r.lab_host_id)
        overflow = host not in self.hosts and len(self.hosts) >= self.max_lab_hosts
        place = (_label(r.datacenter_id), _label(r.delivery_region_id), OVERFLOW_HOST if overflow else host)
        if place not in self.places and len(self.places) >= self.max_lab_hosts + EXTRA_PLACES:
            # The total-series guard: hosts are capped above, but their datacenter and region ids are
            # not, so the label combinations (26 series each) are capped too; the rest share one.
            overflow, place = True, OVERFLOW_PLACE
        if overflow:
            self.host_overflow_total += 1
        elif host not in self.hosts:
            self.hosts.add(host)
        self.places.add(place)
        if len(self._place_of) >= PLACE_CACHE_SIZE:
            self._place_of.clear()
        self._place_of[key] = place
        return place

    def _count_exam(self, place: Place, r: LabResult) -> None:
        self.exams[place] += 1
        if r.exam_passed:
            self.exams_passed[place] += 1
        if r.exam_score is not None and r.exam_max_possible_score:
            ratio = min(max(r.exam_score / r.exam_max_possible_score, 0.0), 1.0)
            _histogram(self.exam_score, place[:2], RATIO_BUCKETS).observe(ratio)

    def _remove_from_gauges(self, inst: Instance) -> None:
        self.by_status[(inst.place, inst.status)] -= 1
        if inst.end is None:
            self.running[inst.place] -= 1

    def evict(self, horizon: float) -> int:
        """Forget instances whose last change is older than `horizon`; returns how many."""
        instances = self.instances
        by_age = self._age_index()
        evicted = 0
        while by_age and by_age[0][0] < horizon:
            last_change, key = heapq.heappop(by_age)
            inst = instances.get(key)
            if inst is not None and inst.last_change == last_change:  # else a stale entry
                del instances[key]
                self._remove_from_gauges(inst)
                evicted += 1
        if len(by_age) > 2 * len(instances) + 1024:  # bounded: drop the stale entries
            self._by_age_of = None
            self._age_index()
        if evicted:
            self._version += 1
        return evicted

    def _age_index(self) -> list[tuple[int, int]]:
        """The heap behind evict(), rebuilt from `instances` when it cannot be trusted: every
        instance has an entry for its current last_change unless `instances` was replaced or
        filled from outside (restored state), and then there are fewer entries than instances."""
        if self._by_age_of is not self.instances or len(self._by_age) < len(self.instances):
            self._by_age = [(inst.last_change, key) for key, inst in self.instances.items()]
            heapq.heapify(self._by_age)
            self._by_age_of = self.instances
        return self._by_age

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        # The plain counters are in the key too: the poller adds to invalid_total directly.
        key = (self._version, self.invalid_total, self.host_overflow_total, len(self.instances), len(self.places))
        if self._snapshot is not None and self._snapshot[0] == key:
            return self._snapshot[1]
        snapshot = self._take_snapshot()
        self._snapshot = (key, snapshot)
        return snapshot

    def _take_snapshot(self) -> Snapshot:
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


def _observe_ratio(hist: Histogram, ratio: float) -> None:
    """Histogram.observe of a ratio clamped to 0..1 as min(max()) would clamp it (NaN stays NaN), inlined."""
    if ratio < 0.0:
        ratio = 0.0
    elif ratio > 1.0:
        ratio = 1.0
    hist.counts[bisect_left(RATIO_BUCKETS, ratio) if ratio == ratio else -1] += 1
    hist.total += ratio


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
