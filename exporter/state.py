"""Memory of the lab fleet: one record per lab instance, and the tallies metrics are built from.

The counting rules (the spec this module is checked against; tests/test_state.py
has them again, written plainly, as ReferenceState):

1. A start is counted once: at an instance's first sighting, if it has no Start or
   its Start is not older than the horizon.
2. An end is counted once, under the completion status the instance first ended
   with: at the first sighting that carries an End not older than the horizon.
   Later status changes (grading) move the gauges, never the counter.
3. An exam is counted once, when its score (or pass flag) first appears, if the
   sighting's event (its End, else its Start) is not older than the horizon.
4. Run time and task completion are observed once per end, with rule 2; the exam
   score once per exam, with rule 3.
5. Running: an instance with no End is running until its End arrives, however
   long that takes: `running` counts it, `closed` (the skillable_lab_instances
   gauge) does not. `closed` counts ended instances by current status.
6. Expiry: an instance still running `max_running` after it opened (its Start;
   the poll that first saw it if it has none or its Start lies after that poll)
   is dropped and counted in expired_total, so a lost End never leaves a lab
   running for ever.
   The API cannot tell a lab saved for later from one still running: neither
   has an End, so saved labs count as running until they end or expire.
7. Eviction: an ended instance is forgotten once its last change is older than
   the eviction horizon (the window).
8. The horizon: the poller never asks for changes older than the horizon it
   hands to `apply`, and `evict` only forgets what is older than a later
   horizon. So an event older than the horizon is either counted already or
   happened before the exporter was watching, and is never counted again.
9. Bounded life: a record whose Start or End lies more than MAX_FUTURE_SECONDS
   after the poll that returned it is invalid (counted, skipped), so every
   instance leaves memory by rule 6 or 7 whatever its timestamps say.

Every rule counts into *tallies*, one per label value of each dimension (a
place: datacenter, region and host; a lab profile). An instance belongs to one
Group, the tallies it counts into, one per dimension; the rules above are
written once, in apply(), against the group: what they count is written in a
Ledger, which hands it to each tally of the group at the end (Ledger.fold).
A new dimension is a Dimension subclass
listed in FleetState.dimensions, not another copy of the rules. Gauges are kept
as running totals, so a scrape costs O(series), not O(instances).
"""

from __future__ import annotations

import heapq
import math
import sys
from bisect import bisect_left, bisect_right
from collections import Counter
from itertools import repeat
from operator import add, sub
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

import msgspec

from .model import ALL_STATUSES, STATUS_NAMES, UNKNOWN_STATUS, Count, Finite, Int64, LabResult

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
GROUP_CACHE_SIZE = 65536  # raw id tuples remembered by FleetState._group_of; cleared when full

# Per-profile ended series that exist at 0 from a profile's first activity: every status, so
# rate() and increase() count a profile's first end in any status (a counter that appears at 1
# shows Prometheus no increase), through restarts and the backfill seam.
# Series per profile: 11 + started + running + exams + passed + 3 summaries x 2 = 21.
PROFILE_ZERO_STATUSES: tuple[str, ...] = (
    "complete", "incomplete", "cancelled", "no_show", "storage_provisioning_failed", "lab_creation_failed",
    "submitted_for_grading", "resume_failed", "save_failed", "grading_in_progress", "unknown",
)
UNKNOWN_PROFILE = "unknown"
OVERFLOW_PROFILE = "other"

DEFAULT_MAX_RUNNING_SECONDS = 1440 * 60
DEFAULT_MAX_LAB_PROFILES = 500
# A Start or End further than this after the poll that returned it is not a clock skew but a
# bad value (an End in the year 3000): the record is invalid (rule 9).
MAX_FUTURE_SECONDS = 86400


# -- observations ------------------------------------------------------------------


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
        self.counts[bucket_of(self.bounds, value)] += 1
        self.total += value

    def add(self, counts: Sequence[int], total: float) -> None:
        """Observations already bucketed by these bounds (bucket_of): counts per bucket, and their sum."""
        self.counts = list(map(add, self.counts, counts))
        self.total += total

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

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass(slots=True)
class Summary:
    """Count and sum of observations (a summary without quantiles)."""

    count: int = 0
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.add((1,), value)

    def add(self, counts: Sequence[int], total: float) -> None:
        """Observations bucketed by some histogram's bounds: only their number and sum matter here."""
        self.count += sum(counts)
        self.total += total

    def copy(self) -> Summary:
        return Summary(self.count, self.total)


class Observer(Protocol):
    total: float

    def add(self, counts: Sequence[int], total: float) -> None: ...

    def copy(self) -> Observer: ...


def bucket_of(bounds: Sequence[float], value: float) -> int:
    """The first bucket whose bound is >= the value; NaN (which compares false with every bound)
    in +Inf, the last."""
    return bisect_left(bounds, value) if value == value else len(bounds)


def _bound_text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and bound >= 1 else repr(float(bound))


OBSERVED = ("run_time", "task_completion", "exam_score")
# Each observed table's histogram buckets: the places' histograms have them, and every value is
# bucketed by them once, whichever observers (histograms, summaries) it then goes to.
BOUNDS: dict[str, tuple[float, ...]] = {
    "run_time": RUN_TIME_BUCKETS, "task_completion": RATIO_BUCKETS, "exam_score": RATIO_BUCKETS}


@dataclass(slots=True, eq=False)
class Tally:
    """What the rules count for one label value of one dimension (one place, one lab profile).

    The observers may be shared: every place of a region observes into the region's histograms.
    """

    started: int = 0
    running: int = 0  # gauge: instances with no End
    closed: Counter[str] = field(default_factory=Counter)  # gauge: ended instances in memory, by status
    ended: Counter[str] = field(default_factory=Counter)  # by the status each first ended with
    exams: int = 0
    exams_passed: int = 0
    run_time: Observer = field(default_factory=Summary)
    task_completion: Observer = field(default_factory=Summary)
    exam_score: Observer = field(default_factory=Summary)


# -- dimensions: the only place that knows what a label value is -------------------------


class Dimension:
    """One way of labelling instances: how a result maps to a key, and a tally per key.

    `key_of` gives a result's key and may fold it into an overflow key (the cap);
    `observers_for` makes (or shares) a new key's run time, task and score observers.
    """

    name: str
    width: int  # parts of a key

    def __init__(self) -> None:
        self.tallies: dict[tuple[str, ...], Tally] = {}
        self.overflow_total = 0

    def saved_observers(self) -> list[SavedObserver]:
        """Each key's own observers (a dimension that shares them overrides this)."""
        return [SavedObserver(list(k), table, [s.count], s.total)
                for k, t in self.tallies.items() for table in OBSERVED for s in (getattr(t, table),)]

    def restore_observer(self, saved: SavedObserver) -> None:
        s = getattr(self.tally(self.check_key(saved.key)), _observed(saved.table))
        if len(saved.counts) != 1:
            raise RestoreError("a summary has one count")
        s.count, s.total = saved.counts[0], saved.total

    def check_key(self, key: list[str]) -> tuple[str, ...]:
        if len(key) != self.width:
            raise RestoreError(f"a {self.name} key has {len(key)} parts, not {self.width}")
        return tuple(key)

    def key_of(self, r: LabResult) -> tuple[str, ...]:
        raise NotImplementedError

    def observers_for(self, key: tuple[str, ...]) -> tuple[Observer, Observer, Observer]:
        raise NotImplementedError

    def tally(self, key: tuple[str, ...]) -> Tally:
        tally = self.tallies.get(key)
        if tally is None:
            run_time, task, score = self.observers_for(key)
            tally = self.tallies[key] = Tally(run_time=run_time, task_completion=task, exam_score=score)
        return tally


class Places(Dimension):
    """datacenter, delivery region, lab host: at most max_lab_hosts hosts (+ EXTRA_PLACES label
    combinations), the rest under "other"; histograms per region."""

    name = "place"
    width = 3

    def __init__(self, max_lab_hosts: int) -> None:
        super().__init__()
        self.max_lab_hosts = max_lab_hosts
        self.hosts: set[str] = set()
        self.regions: dict[Region, tuple[Histogram, Histogram, Histogram]] = {}

    def key_of(self, r: LabResult) -> tuple[str, ...]:
        host = _label(r.lab_host_id)
        overflow = host not in self.hosts and len(self.hosts) >= self.max_lab_hosts
        place = (_label(r.datacenter_id), _label(r.delivery_region_id), OVERFLOW_HOST if overflow else host)
        if place not in self.tallies and len(self.tallies) >= self.max_lab_hosts + EXTRA_PLACES:
            # The total-series guard: hosts are capped above, but their datacenter and region ids are
            # not, so the label combinations (26 series each) are capped too; the rest share one.
            overflow, place = True, OVERFLOW_PLACE
        if overflow:
            self.overflow_total += 1
        else:
            self.hosts.add(host)
        return place

    def observers_for(self, key: tuple[str, ...]) -> tuple[Observer, Observer, Observer]:
        region = (key[0], key[1])
        shared = self.regions.get(region)
        if shared is None:
            shared = self.regions[region] = tuple(Histogram(BOUNDS[table]) for table in OBSERVED)  # type: ignore[assignment]
        return shared

    def saved_observers(self) -> list[SavedObserver]:
        return [SavedObserver(list(region), table, list(h.counts), h.total)
                for region, hists in self.regions.items() for table, h in zip(OBSERVED, hists)]

    def restore_observer(self, saved: SavedObserver) -> None:
        if len(saved.key) != 2:
            raise RestoreError("a region key has two parts")
        h = self.observers_for((saved.key[0], saved.key[1], OVERFLOW_HOST))[OBSERVED.index(_observed(saved.table))]
        assert isinstance(h, Histogram)
        if len(saved.counts) != len(h.bounds) + 1:
            raise RestoreError("histogram buckets differ from this version's")
        h.counts, h.total = list(saved.counts), saved.total


class Profiles(Dimension):
    """lab_profile_id: the first max_lab_profiles profiles seen active get their own key, the rest
    share "other"; a null LabProfileId is "unknown" (a profile like any, for the cap)."""

    name = "profile"
    width = 1

    def __init__(self, max_lab_profiles: int) -> None:
        super().__init__()
        self.max_lab_profiles = max_lab_profiles

    def key_of(self, r: LabResult) -> tuple[str, ...]:
        key = (UNKNOWN_PROFILE if r.lab_profile_id is None else str(r.lab_profile_id),)
        if key not in self.tallies and len(self.tallies) - ((OVERFLOW_PROFILE,) in self.tallies) >= self.max_lab_profiles:
            self.overflow_total += 1
            return (OVERFLOW_PROFILE,)
        return key

    def observers_for(self, key: tuple[str, ...]) -> tuple[Observer, Observer, Observer]:
        return Summary(), Summary(), Summary()


# -- groups, and the ledger one apply() or evict() writes --------------------------------

STATUS_INDEX: dict[str, int] = {s: i for i, s in enumerate(ALL_STATUSES)}
CODE_INDEX: dict[int | None, int] = {code: STATUS_INDEX[name] for code, name in STATUS_NAMES.items()}
UNKNOWN_INDEX = STATUS_INDEX[UNKNOWN_STATUS]
RUNNING_SLOT = len(ALL_STATUSES)  # a group's gauge slots: one per status (`closed`), then `running`
SLOTS = RUNNING_SLOT + 1
ZERO_SLOTS = [0] * SLOTS


@dataclass(slots=True, eq=False)
class Group:
    """The tallies an instance counts into, one per dimension (its keys say which)."""

    keys: tuple[tuple[str, ...], ...]
    tallies: tuple[Tally, ...]


def gauge_slot(inst: Instance) -> int:
    """Rule 5's gauges, the one place they are decided: an instance is in its group's `running`
    with no End, else in `closed` under its status. apply() inlines it (it runs per result)."""
    return inst.group * SLOTS + (RUNNING_SLOT if inst.end is None else inst.status)


class Ledger:
    """What one apply() or evict() has counted and not yet handed to the tallies: flat arrays
    indexed by group (g) or by a group's slot (g * SLOTS + a status index, or RUNNING_SLOT),
    and the groups touched. fold() hands each touched group's entries to each of its tallies
    once, at the end, and zeroes them.

    A fast path, and why: a cold poll counts 100,000 instances into about 1,200 groups (place x
    lab profile). Adding to each group's own objects (a dict of cells, value lists) touched their
    memory at random, and the same poll into 36 groups took half the time; these arrays are
    small and contiguous. FleetState keeps one, grown by a slot set per new group (add_group),
    so a poll that touches a few groups costs a few groups, not all of them.
    """

    def __init__(self) -> None:
        self.touched: list[int] = []
        self.marked = bytearray()  # 1 for a group in `touched`
        self.started: list[int] = []  # per group: starts counted (rule 1)
        self.gauges: list[int] = []  # per slot: change of `closed` under that status, or of `running` (rule 5)
        self.ended: list[int] = []  # per status slot: ends counted (rule 2)
        self.exams: list[int] = []  # per group: exams counted (rule 3)
        self.passed: list[int] = []  # per group: of which passed
        self.observed: tuple[Observed, ...] = tuple(Observed(table, table != "run_time") for table in OBSERVED)  # rule 4

    def add_group(self) -> None:
        """Room for one more group."""
        self.marked.append(0)
        self.started.append(0)
        self.gauges.extend(ZERO_SLOTS)
        self.ended.extend(ZERO_SLOTS)
        self.exams.append(0)
        self.passed.append(0)
        for observed in self.observed:
            observed.add_group()

    def touch(self, g: int) -> None:
        """Note group g for the fold. apply() inlines it (it runs once per result)."""
        if not self.marked[g]:
            self.marked[g] = 1
            self.touched.append(g)

    def fold(self, groups: list[Group]) -> None:
        """Add each touched group's entries to each of its tallies, and zero them."""
        for g in self.touched:
            tallies = groups[g].tallies
            base = g * SLOTS
            gauges, ended = self.gauges[base:base + SLOTS], self.ended[base:base + SLOTS]
            started, running, exams, passed = self.started[g], gauges[RUNNING_SLOT], self.exams[g], self.passed[g]
            # zip stops before RUNNING_SLOT
            cells = [cell for cell in zip(ALL_STATUSES, gauges, ended) if cell[1] or cell[2]]
            for t in tallies:
                t.started += started
                t.running += running
                for status, closed, n in cells:
                    t.closed[status] += closed
                    t.ended[status] += n
                t.exams += exams
                t.exams_passed += passed
            self.gauges[base:base + SLOTS] = self.ended[base:base + SLOTS] = ZERO_SLOTS
            self.started[g] = self.exams[g] = self.passed[g] = self.marked[g] = 0
            for observed in self.observed:
                observed.fold(g, tallies)
        self.touched.clear()


@dataclass(slots=True, eq=False)
class Observed:
    """One table's observations (rule 4) waiting for the fold: the values of each group.

    The fold sorts a group's values once, which makes its bucket counts one bisect per bound
    (the buckets bucket_of gives), whichever observers then take them (a region's histogram, a
    profile's summary). Bucketing each value as it came (a bisect and two adds in Python) cost
    about a fifth more instructions per result of a cold poll (cachegrind).
    """

    table: str
    clamp: bool = False  # ratios: clamped to 0..1 (_ratio) when folded
    values: list[list[float]] = field(default_factory=list)  # per group

    def add_group(self) -> None:
        self.values.append([])  # apply() appends a group's values here

    def fold(self, g: int, tallies: Sequence[Tally]) -> None:
        values = self.values[g]
        if values:
            counts, total = _bucketed(BOUNDS[self.table], values, self.clamp)
            for t in tallies:
                getattr(t, self.table).add(counts, total)
            values.clear()


def _bucketed(bounds: Sequence[float], values: list[float], clamp: bool) -> tuple[list[int], float]:
    """The count in each bucket (bucket_of) of `values`, and their sum; each value first clamped to
    0..1 (as _ratio) if `clamp`. Sorts `values` in place."""
    total = sum(values)
    if total != total:  # a NaN has no place in a sorted list: one value at a time
        clamped = [_ratio(v) for v in values] if clamp else values
        counts = [0] * (len(bounds) + 1)
        for value in clamped:
            counts[bucket_of(bounds, value)] += 1
        return counts, sum(clamped)
    values.sort()
    if clamp:  # the values below 0 lead a sorted list and those above 1 end it
        low, high = bisect_left(values, 0.0), bisect_right(values, 1.0)
        if low or high < len(values):
            values[:low] = [0.0] * low
            values[high:] = [1.0] * (len(values) - high)
            total = sum(values)
    # bucket_of puts a value in the first bucket whose bound is >= it, so the values up to a bound
    # are those in its bucket and the buckets before it.
    upto = [*map(bisect_right, repeat(values), bounds), len(values)]
    return list(map(sub, upto, [0, *upto[:-1]])), float(total)


class Instance(msgspec.Struct, gc=False):
    """One tracked lab instance.

    gc=False: it holds only numbers, so it can never be part of a reference cycle and the
    cyclic garbage collector need not track it. With 100,000 instances as dataclasses, each
    full collection took ~85 ms and landed in a scrape (the steady-state p99); untracked, they
    cost it nothing. It names its Group by the group's index rather than holding it: a Struct
    referring to a tracked object took twice as long to create (measured), and a cold poll
    creates 100,000.
    """

    group: int  # its Group's index in FleetState._groups
    status: int  # its current completion status, as an index in ALL_STATUSES
    start: int | None
    end: int | None
    last_change: int  # the latest Start or End seen, or the poll time for a record with neither (whole seconds)
    opened: int  # Start, or the first poll that saw it if earlier or there is none: rule 6's clock
    ended_counted: bool = False
    exam_counted: bool = False


# -- what persistence saves (FleetState.export / FleetState.restore) ---------------------

# Counts, ids, times and sums are checked as the file is read (model.py's types), so a
# bad value leaves out its entry and never reaches the state (persistence.salvage).


class SavedInstance(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    id: Int64
    keys: list[list[str]]  # one key per dimension, in DIMENSIONS order
    status: str
    start: Int64 | None
    end: Int64 | None
    last_change: Finite
    opened: Finite
    ended_counted: bool
    exam_counted: bool


class SavedTally(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    key: list[str]
    started: Count
    ended: dict[str, Count]
    exams: Count
    exams_passed: Count


class SavedObserver(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    key: list[str]  # a region for places' histograms, a profile for profiles' summaries
    table: str  # one of OBSERVED
    counts: list[Count]  # bucket counts (not cumulative); a summary's [count]
    total: Finite


class SavedDimension(msgspec.Struct, forbid_unknown_fields=True):
    overflow_total: Count
    tallies: list[SavedTally]
    observers: list[SavedObserver]


class FleetExport(msgspec.Struct, forbid_unknown_fields=True):
    """Everything FleetState must keep across a restart; the gauges are derived, never saved."""

    invalid_total: Count
    expired_total: Count
    dimensions: dict[str, SavedDimension]
    instances: list[SavedInstance]


class RestoreError(ValueError):
    """A saved state this version cannot take (inconsistent, foreign layout)."""


# -- the state ------------------------------------------------------------------------


@dataclass
class Snapshot:
    """A consistent copy of everything the collector needs, taken under the poller's lock."""

    places: list[Place]
    instances: dict[tuple[Place, str], int]  # ended instances in the window, by current status
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
    # The lab-profile dimension (see INTERFACES.md): every profile in `profiles` has an entry in
    # every profile_* table; profile_ended holds every PROFILE_ZERO_STATUSES status per profile.
    profiles: list[str] = field(default_factory=list)
    profile_started: dict[str, int] = field(default_factory=dict)
    profile_ended: dict[tuple[str, str], int] = field(default_factory=dict)
    profile_running: dict[str, int] = field(default_factory=dict)
    profile_run_time: dict[str, Summary] = field(default_factory=dict)
    profile_task_completion: dict[str, Summary] = field(default_factory=dict)
    profile_exams: dict[str, int] = field(default_factory=dict)
    profile_exams_passed: dict[str, int] = field(default_factory=dict)
    profile_exam_score: dict[str, Summary] = field(default_factory=dict)
    profile_overflow_total: int = 0
    expired_total: int = 0


class FleetState:
    """Per-instance memory and tallies for one Skillable account. Not thread-safe: the poller locks.

    snapshot() returns the same (read-only) Snapshot object until the state changes,
    so the collector can cache its exposition by the snapshot's identity.
    """

    def __init__(self, max_lab_hosts: int, max_lab_profiles: int = DEFAULT_MAX_LAB_PROFILES,
                 max_running_seconds: float = DEFAULT_MAX_RUNNING_SECONDS) -> None:
        self.max_lab_hosts = max_lab_hosts
        self.max_lab_profiles = max_lab_profiles
        self.max_running_seconds = max_running_seconds
        self.places = Places(max_lab_hosts)
        self.profiles = Profiles(max_lab_profiles)
        # The dimensions, in the order a Group holds their tallies. A new one is declared here.
        self.dimensions: tuple[Dimension, ...] = (self.places, self.profiles)
        self.instances: dict[int, Instance] = {}
        self.invalid_total = 0
        self.expired_total = 0
        # Derived, not state: raw (datacenter, region, host, profile) ids -> Group, so that a new
        # instance costs one dict lookup, not one per dimension.
        self._group_of: dict[tuple[int | None, ...], int] = {}
        # The groups, by index (an Instance names its group by index), and their index by keys.
        self._groups: list[Group] = []
        self._group_index: dict[tuple[tuple[str, ...], ...], int] = {}
        self._ledger = Ledger()  # what apply() and evict() counted, until their end
        # Derived: min-heaps of entries (_entry) for (last_change, id) of ended and (opened, id) of
        # running instances, popped by evict(), so a poll costs O(changes), not O(instances). An
        # entry whose instance has changed since is stale and skipped.
        self._closed_by_age: list[int] = []
        self._open_by_age: list[int] = []
        self._version = 0
        self._snapshot: tuple[tuple[int, ...], Snapshot] | None = None

    @property
    def host_overflow_total(self) -> int:
        return self.places.overflow_total

    @property
    def profile_overflow_total(self) -> int:
        return self.profiles.overflow_total

    def changed(self) -> None:
        """Mark the state as changed, so the next snapshot() is taken afresh."""
        self._version += 1

    # -- updates -----------------------------------------------------------

    def apply(self, results: Iterable[LabResult], horizon: float, seen_at: float | None = None) -> int:
        """Fold one poll's results in by the rules above; returns how many were refused (rule 9),
        which are also added to invalid_total.

        `seen_at` is the poll's time: the last change of a record with neither Start nor End (so
        it is remembered, and counted once, as long as the API keeps returning it), the opening
        time of one with no Start, and the reference for rule 9. Without it (tests, tools), no
        record is refused and the horizon stands in.

        This loop runs once per result (100,000 times for a large cold poll), so it keeps its
        names local and writes what it counts in a Ledger, folded into the tallies at the end.
        """
        self._version += 1
        instances = self.instances
        group_of = self._group_of
        code_index = CODE_INDEX.get
        # Times are whole seconds: Start and End are (Int64), so they are compared with whole-second
        # bounds (exact: t >= horizon exactly when t >= ceil(horizon)), and the poll time is taken to
        # its second (so every time an instance holds is an int, as _entry needs).
        first = math.ceil(horizon)
        now = first if seen_at is None else math.floor(seen_at)
        ceiling = sys.maxsize if seen_at is None else now  # a later Start opens at the poll time
        latest = ceiling + MAX_FUTURE_SECONDS
        ledger = self._ledger
        touched, marked = ledger.touched, ledger.marked
        started, gauges, ended = ledger.started, ledger.gauges, ledger.ended
        run_times, task_ratios, score_ratios = (observed.values for observed in ledger.observed)
        closed_aged: list[int] = []  # new entries for the heaps
        open_aged: list[int] = []
        refused = 0
        try:
            for r in results:
                key, start, end = r.lab_instance_id, r.start, r.end
                if start is not None:
                    stamp = start if end is None or end < start else end
                elif end is not None:
                    stamp = end
                else:
                    stamp = now
                if stamp > latest:  # rule 9
                    refused += 1
                    continue
                status = code_index(r.completion_status, UNKNOWN_INDEX)  # type: ignore[arg-type]
                inst = instances.get(key)
                if inst is None:
                    # One lookup gives the new instance's group.
                    g = group_of.get((r.datacenter_id, r.delivery_region_id, r.lab_host_id, r.lab_profile_id))
                    if g is None:
                        g = self._group(r)
                    opened = now if start is None or start > ceiling else start
                    inst = instances[key] = Instance(g, status, start, end, stamp, opened)
                    if start is None or start >= first:  # rule 1
                        started[g] += 1
                    if end is None:  # _entry(), inlined
                        open_aged.append((opened << SPAN_BITS) + key)
                    else:
                        closed_aged.append((stamp << SPAN_BITS) + key)
                else:
                    g = inst.group
                    gauges[gauge_slot(inst)] -= 1  # out under its old fields, back in under the new ones below
                    was_open = inst.end is None
                    inst.status = status
                    if start is not None:
                        inst.start = start
                    if end is not None:
                        inst.end = end
                    moved = stamp > inst.last_change
                    if moved:
                        inst.last_change = stamp
                    if inst.end is not None and (was_open or moved):  # a new entry for rule 7
                        closed_aged.append(_entry(inst.last_change, key))
                if not marked[g]:  # ledger.touch(g), inlined
                    marked[g] = 1
                    touched.append(g)
                cell = g * SLOTS + status
                gauges[g * SLOTS + RUNNING_SLOT if inst.end is None else cell] += 1  # gauge_slot(inst), inlined
                if end is not None and end >= first and not inst.ended_counted:  # rules 2 and 4
                    inst.ended_counted = True
                    ended[cell] += 1
                    seconds = r.total_run_time_seconds  # rule 4: each value to its group's list
                    if seconds is not None and seconds >= 0:
                        run_times[g].append(seconds)
                    percent = r.task_complete_percent
                    if percent is not None:
                        task_ratios[g].append(percent / 100.0)  # clamped to 0..1 when folded
                if not inst.exam_counted and (r.exam_score is not None or r.exam_passed is not None):  # rule 3
                    event = end if end is not None else start
                    if event is None or event >= first:
                        inst.exam_counted = True
                        ledger.exams[g] += 1
                        if r.exam_passed:
                            ledger.passed[g] += 1
                        if r.exam_score is not None and r.exam_max_possible_score:
                            score_ratios[g].append(r.exam_score / r.exam_max_possible_score)
        finally:
            ledger.fold(self._groups)
            _push_all(self._closed_by_age, closed_aged)
            _push_all(self._open_by_age, open_aged)
            self.invalid_total += refused
        return refused

    def _group(self, r: LabResult) -> int:
        """The Group of a new instance's raw ids, made from each dimension's key. Kept for the
        next instances with the same ids unless a key overflowed (each such instance is counted)."""
        g = self._group_for(tuple(d.key_of(r) for d in self.dimensions))
        keys = self._groups[g].keys
        if keys[0][2] != OVERFLOW_HOST and keys[1][0] != OVERFLOW_PROFILE:
            if len(self._group_of) >= GROUP_CACHE_SIZE:
                self._group_of.clear()
            self._group_of[(r.datacenter_id, r.delivery_region_id, r.lab_host_id, r.lab_profile_id)] = g
        return g

    def _group_for(self, keys: tuple[tuple[str, ...], ...]) -> int:
        """The index of the Group with these keys, made the first time."""
        g = self._group_index.get(keys)
        if g is None:
            g = self._group_index[keys] = len(self._groups)
            self._groups.append(Group(keys, tuple(d.tally(k) for d, k in zip(self.dimensions, keys))))
            self._ledger.add_group()
        return g

    def evict(self, horizon: float, running_horizon: float | None = None) -> int:
        """Forget ended instances whose last change is older than `horizon` (rule 7) and drop
        running ones opened before `running_horizon` (rule 6, counted in expired_total; none
        without it). The poller passes now - window and now - max_running. Returns how many
        instances left memory."""
        instances = self.instances
        ledger = self._ledger
        gone = 0
        heap, bound = self._closed_by_age, _bound(horizon)
        while heap and heap[0] < bound:
            stamp, key = _entry_parts(heapq.heappop(heap))
            inst = instances.get(key)
            if inst is not None and inst.end is not None and inst.last_change == stamp:  # else stale
                self._forget(key, inst, ledger)
                gone += 1
        heap = self._open_by_age
        bound = _bound(running_horizon) if running_horizon is not None else None
        while bound is not None and heap and heap[0] < bound:
            stamp, key = _entry_parts(heapq.heappop(heap))
            inst = instances.get(key)
            if inst is not None and inst.end is None and inst.opened == stamp:
                self._forget(key, inst, ledger)
                self.expired_total += 1
                gone += 1
        ledger.fold(self._groups)
        for heap in (self._closed_by_age, self._open_by_age):
            if len(heap) > 2 * len(instances) + 1024:  # bounded: drop the stale entries
                self._rebuild_age_index()
                break
        if gone:
            self._version += 1
        return gone

    def _forget(self, key: int, inst: Instance, ledger: Ledger) -> None:
        del self.instances[key]
        ledger.touch(inst.group)
        ledger.gauges[gauge_slot(inst)] -= 1

    def _rebuild_age_index(self) -> None:
        self._closed_by_age = [_entry(i.last_change, k) for k, i in self.instances.items() if i.end is not None]
        self._open_by_age = [_entry(i.opened, k) for k, i in self.instances.items() if i.end is None]
        heapq.heapify(self._closed_by_age)
        heapq.heapify(self._open_by_age)

    # -- persistence -------------------------------------------------------

    def export(self) -> FleetExport:
        """Everything a restart needs, as a msgspec-encodable struct (see FleetState.restore)."""
        dimensions: dict[str, SavedDimension] = {}
        for d in self.dimensions:
            tallies = [SavedTally(list(k), t.started, {s: n for s, n in t.ended.items() if n}, t.exams, t.exams_passed)
                       for k, t in d.tallies.items()]
            dimensions[d.name] = SavedDimension(d.overflow_total, tallies, d.saved_observers())
        instances = [
            SavedInstance(key, [list(k) for k in self._groups[inst.group].keys], ALL_STATUSES[inst.status],
                          inst.start, inst.end,
                          float(inst.last_change), float(inst.opened), inst.ended_counted, inst.exam_counted)
            for key, inst in self.instances.items()
        ]
        return FleetExport(self.invalid_total, self.expired_total, dimensions, instances)

    @classmethod
    def restore(cls, saved: FleetExport, max_lab_hosts: int, max_lab_profiles: int = DEFAULT_MAX_LAB_PROFILES,
                max_running_seconds: float = DEFAULT_MAX_RUNNING_SECONDS) -> FleetState:
        """A FleetState holding what export() gave. Raises RestoreError if it does not fit this version."""
        state = cls(max_lab_hosts, max_lab_profiles, max_running_seconds)
        state.invalid_total, state.expired_total = saved.invalid_total, saved.expired_total
        if set(saved.dimensions) != {d.name for d in state.dimensions}:
            raise RestoreError(f"dimensions {sorted(saved.dimensions)} differ from this version's")
        for d in state.dimensions:
            dim = saved.dimensions[d.name]
            d.overflow_total = dim.overflow_total
            for st in dim.tallies:
                t = d.tally(d.check_key(st.key))
                t.started, t.exams, t.exams_passed = st.started, st.exams, st.exams_passed
                t.ended.update(st.ended)
            for so in dim.observers:
                d.restore_observer(so)
        state.places.hosts.update(k[2] for k in state.places.tallies if k[2] != OVERFLOW_HOST)
        ledger = state._ledger
        for item in saved.instances:
            if len(item.keys) != len(state.dimensions):
                raise RestoreError("an instance's keys do not match the dimensions")
            status = STATUS_INDEX.get(item.status)
            if status is None:  # a bad value invalidates its record, not the state
                continue
            g = state._group_for(tuple(d.check_key(k) for d, k in zip(state.dimensions, item.keys)))
            # Whole seconds, as apply() keeps them (a file from before may hold a fraction).
            inst = Instance(g, status, item.start, item.end, math.floor(item.last_change), math.floor(item.opened),
                            item.ended_counted, item.exam_counted)
            state.instances[item.id] = inst
            # The gauges are derived from the instances, by the same bookkeeping as apply().
            ledger.touch(g)
            ledger.gauges[gauge_slot(inst)] += 1
        ledger.fold(state._groups)
        state._rebuild_age_index()
        return state

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        # The plain counters are in the key too: the poller adds to invalid_total directly.
        key = (self._version, self.invalid_total, len(self.instances))
        if self._snapshot is not None and self._snapshot[0] == key:
            return self._snapshot[1]
        snapshot = self._take_snapshot()
        self._snapshot = (key, snapshot)
        return snapshot

    def _take_snapshot(self) -> Snapshot:
        tallies: dict[Place, Tally] = self.places.tallies  # type: ignore[assignment]
        places = sorted(tallies)
        regions = sorted({(p[0], p[1]) for p in places})
        shared = self.places.regions
        profile_tallies = self.profiles.tallies
        profiles = sorted(k[0] for k in profile_tallies)
        pt = {p: profile_tallies[(p,)] for p in profiles}
        return Snapshot(
            places=places,
            instances={(p, s): tallies[p].closed.get(s, 0) for p in places for s in ALL_STATUSES},
            running={p: tallies[p].running for p in places},
            started={p: tallies[p].started for p in places},
            ended={(p, s): tallies[p].ended.get(s, 0) for p in places for s in ALL_STATUSES},
            exams={p: tallies[p].exams for p in places},
            exams_passed={p: tallies[p].exams_passed for p in places},
            run_time={r: shared[r][0].copy() for r in regions},
            task_completion={r: shared[r][1].copy() for r in regions},
            exam_score={r: shared[r][2].copy() for r in regions},
            tracked=len(self.instances),
            invalid_total=self.invalid_total,
            host_overflow_total=self.places.overflow_total,
            profiles=profiles,
            profile_started={p: t.started for p, t in pt.items()},
            profile_ended={(p, s): n for p, t in pt.items() for s, n in _profile_statuses(t.ended)},
            profile_running={p: t.running for p, t in pt.items()},
            profile_run_time={p: t.run_time.copy() for p, t in pt.items()},  # type: ignore[misc]
            profile_task_completion={p: t.task_completion.copy() for p, t in pt.items()},  # type: ignore[misc]
            profile_exams={p: t.exams for p, t in pt.items()},
            profile_exams_passed={p: t.exams_passed for p, t in pt.items()},
            profile_exam_score={p: t.exam_score.copy() for p, t in pt.items()},  # type: ignore[misc]
            profile_overflow_total=self.profiles.overflow_total,
            expired_total=self.expired_total,
        )


def _profile_statuses(ended: Counter[str]) -> list[tuple[str, int]]:
    """The zero statuses always, in order, then any other status once it has occurred."""
    rows = [(s, ended.get(s, 0)) for s in PROFILE_ZERO_STATUSES]
    rows += [(s, ended[s]) for s in ALL_STATUSES if s not in PROFILE_ZERO_STATUSES and ended.get(s, 0)]
    return rows


def _label(value: int | None) -> str:
    return UNKNOWN_ID if value is None else str(value)


def _ratio(value: float) -> float:
    """Clamped to 0..1 as min(max()) would clamp it (NaN stays NaN)."""
    if value < 0.0:
        return 0.0
    if value > 1.0:
        return 1.0
    return value


# An eviction heap entry is one int: time * SPAN + instance id. Ids are Int64, so entries of one
# second lie within SPAN / 2 of time * SPAN and sort by time first. An int rather than a (time, id)
# tuple: 100,000 tuples cost a cold poll 20-50 ms of cyclic GC, which never tracks an int.
SPAN_BITS = 64
SPAN = 2**SPAN_BITS
HALF_SPAN = 2**63


def _entry(stamp: int, key: int) -> int:
    return (stamp << SPAN_BITS) + key  # stamp * SPAN + key (a shift costs less than a multiplication)


def _entry_parts(entry: int) -> tuple[int, int]:
    """(time, id) of an entry."""
    stamp = (entry + HALF_SPAN) // SPAN
    return stamp, entry - stamp * SPAN


def _bound(horizon: float) -> int:
    """Entries below this one have a time older than `horizon`."""
    return math.ceil(horizon) * SPAN - HALF_SPAN


def _push_all(heap: list[int], entries: list[int]) -> None:
    if len(entries) > len(heap) // 8:  # one heapify beats 100,000 pushes
        heap.extend(entries)
        heapq.heapify(heap)
    else:
        for entry in entries:
            heapq.heappush(heap, entry)


def _observed(table: str) -> str:
    if table not in OBSERVED:
        raise RestoreError(f"unknown observed table {table!r}")
    return table
