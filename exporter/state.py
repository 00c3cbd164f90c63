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

Dimensions. Instances are labelled along each *dimension* in DIMENSIONS: the place
(datacenter, delivery region, lab host) and the lab profile. A dimension is one
declaration (Dimension): its labels and the result fields they are read from, the
cap on its keys, its observers (a histogram per region, or a summary per key), the
statuses that exist at zero and its metric families. The keys, the caps, the
snapshot, the collector's families and the state file's layout derive from the
declarations, so a new dimension is one more Dimension, not another copy of the rules.

An instance counts into one tally per dimension, the one of its key there, and
nothing is kept per combination of dimensions: a lab profile that runs on every
host of a datacenter costs what one tied to four hosts costs. Memory follows the
instances plus the keys of each dimension; a poll costs its changes times the
number of dimensions, plus the keys they touch. apply() decides once per result
what rules 1-5 count (a start, an end under a status, an exam, the gauge slot the
instance leaves and the one it enters), then adds that to each of the instance's
tallies. Gauges are kept as running totals, so a scrape costs O(series), not
O(instances).
"""

from __future__ import annotations

import heapq
import math
import sys
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, attrgetter, sub
from typing import Any, Protocol
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgspec

from .model import ALL_STATUSES, STATUS_NAMES, UNKNOWN_STATUS, Count, Finite, Int64, LabResult

Key = tuple[str, ...]  # a key's label values, in its dimension's `labels` order

UNKNOWN_ID = "unknown"  # the label value of a null id
OVERFLOW = "other"  # the label value of the keys beyond a dimension's cap
# Keys allowed beyond a dimension's cap: a capped label (the host) is limited to `cap` values, but the
# labels before it (datacenter, region) are not, so the label combinations are capped at cap + EXTRA_KEYS
# (room for hosts seen under "unknown" ids and for the overflow host in each region); the rest share
# one key, every label "other". Series per place <= 26, plus 40 per region.
EXTRA_KEYS = 100
KEY_CACHE_SIZE = 65536  # raw ids remembered per dimension (Tallies.known); cleared when full

RUN_TIME_BUCKETS: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)
RATIO_BUCKETS: tuple[float, ...] = (0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1)

DEFAULT_MAX_LAB_HOSTS = 2000
DEFAULT_MAX_LAB_PROFILES = 500
DEFAULT_MAX_RUNNING_SECONDS = 1440 * 60
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

    def take(self, values: list[float], clamp: bool) -> None:
        """Observe every value (each clamped to 0..1 first if `clamp`); `values` is left sorted."""
        self.add(*_bucketed(self.bounds, values, clamp))

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

    def saved_counts(self) -> list[int]:
        return list(self.counts)

    def restore(self, counts: list[int], total: float) -> None:
        if len(counts) != len(self.bounds) + 1:
            raise RestoreError("histogram buckets differ from this version's")
        self.counts, self.total = list(counts), total


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

    def take(self, values: list[float], clamp: bool) -> None:
        """Observe every value (each clamped to 0..1 first if `clamp`), as Histogram.take would count and
        sum them; no buckets, so no sorting."""
        total = sum(values)
        if clamp and (total != total or min(values) < 0.0 or max(values) > 1.0):
            total = sum(map(_ratio, values))
        self.count += len(values)
        self.total += total

    def copy(self) -> Summary:
        return Summary(self.count, self.total)

    def saved_counts(self) -> list[int]:
        return [self.count]

    def restore(self, counts: list[int], total: float) -> None:
        if len(counts) != 1:
            raise RestoreError("a summary has one count")
        self.count, self.total = counts[0], total


class Observer(Protocol):
    total: float

    def add(self, counts: Sequence[int], total: float) -> None: ...

    def take(self, values: list[float], clamp: bool) -> None: ...

    def copy(self) -> Observer: ...

    def saved_counts(self) -> list[int]: ...

    def restore(self, counts: list[int], total: float) -> None: ...


def bucket_of(bounds: Sequence[float], value: float) -> int:
    """The first bucket whose bound is >= the value; NaN (which compares false with every bound)
    in +Inf, the last."""
    return bisect_left(bounds, value) if value == value else len(bounds)


def _bound_text(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and bound >= 1 else repr(float(bound))


# The observed tables (rule 4), in this order everywhere: each one's histogram buckets, and whether
# its values are ratios clamped to 0..1. Every value is bucketed by them once (_bucketed), whichever
# observer (a region's histogram, a profile's summary) then takes it.
OBSERVED = ("run_time", "task_completion", "exam_score")
BOUNDS: dict[str, tuple[float, ...]] = {
    "run_time": RUN_TIME_BUCKETS, "task_completion": RATIO_BUCKETS, "exam_score": RATIO_BUCKETS}
CLAMPED = {"run_time": False, "task_completion": True, "exam_score": True}

# What a dimension counts per key, as the snapshot and the collector name the tables: the gauges
# (rule 5), the counters (rules 1-3), then the observed tables (rule 4).
TABLES = ("closed", "running", "started", "ended", "exams", "exams_passed", *OBSERVED)


# -- dimensions: each declared once ------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One way of labelling lab instances, declared once; everything else derives from it.

    A key is the tuple of its `labels`' values, read from the result `fields` of the same
    position (a null id reads "unknown"). The last label is capped: at most `cap` values of it
    have keys of their own (`cap` is the setting `cap_setting`, `default_cap` unless configured);
    an instance with another one gets it as "other" and is counted in the dimension's overflow.
    The keys themselves are capped at cap + EXTRA_KEYS (module constant): beyond that, every
    label reads "other". Each key has observers for the OBSERVED tables, kept per its leading
    `observer_labels`: histograms shared by every key with the same ones (`histogram`), or
    summaries of its own. `zero_statuses`: the completion statuses whose ended series exist at 0
    for every key; the others appear once they occur.

    For the collector: `families` names each table's metric family, in exposition order (a table
    left out is counted, not exposed); `by` is put in their help texts after the subject ("Lab
    instances seen starting, by lab profile, ..."); `noun` names what overflows, and
    `overflow_family` the counter of the instances that did.
    """

    name: str  # in the snapshot and the state file
    labels: tuple[str, ...]
    fields: tuple[str, ...]  # the LabResult field each label reads
    cap_setting: str
    default_cap: int
    observer_labels: tuple[str, ...]
    histogram: bool
    families: tuple[tuple[str, str], ...]  # (table, family name)
    overflow_family: str
    noun: str
    by: str = ""
    zero_statuses: tuple[str, ...] = ALL_STATUSES

    def __post_init__(self) -> None:
        if len(self.fields) != len(self.labels) or self.labels[:len(self.observer_labels)] != self.observer_labels:
            raise ValueError(f"dimension {self.name}: one field per label, observer labels leading the labels")
        if any(table not in TABLES for table, _ in self.families):
            raise ValueError(f"dimension {self.name}: a family of an unknown table")

    def unknown_key(self) -> Key:
        """The key of a result whose ids are all null (restore gives it to instances saved before this
        dimension existed)."""
        return (UNKNOWN_ID,) * len(self.labels)

    def overflow_key(self) -> Key:
        return (OVERFLOW,) * len(self.labels)


def named_families(prefix: str) -> tuple[tuple[str, str], ...]:
    """Every table's family, named as a new dimension's would be: prefix + instances_running, ... (PLACE and
    PROFILE keep the names they were published with)."""
    stems = {"closed": "instances", "running": "instances_running", "started": "instances_started_total",
             "ended": "instances_ended_total", "run_time": "run_time_seconds",
             "task_completion": "task_completion_ratio", "exam_score": "exam_score_ratio", "exams": "exams_total",
             "exams_passed": "exams_passed_total"}
    return tuple((table, prefix + stems[table]) for table in TABLES)


PLACE = Dimension(
    name="place",
    labels=("datacenter_id", "delivery_region_id", "lab_host_id"),
    fields=("datacenter_id", "delivery_region_id", "lab_host_id"),
    cap_setting="skillable.max-lab-hosts", default_cap=DEFAULT_MAX_LAB_HOSTS,
    observer_labels=("datacenter_id", "delivery_region_id"), histogram=True,
    families=(
        ("closed", "skillable_lab_instances"),
        ("running", "skillable_lab_instances_running"),
        ("started", "skillable_lab_instances_started_total"),
        ("ended", "skillable_lab_instances_ended_total"),
        ("run_time", "skillable_lab_run_time_seconds"),
        ("task_completion", "skillable_lab_task_completion_ratio"),
        ("exam_score", "skillable_exam_score_ratio"),
        ("exams", "skillable_exams_total"),
        ("exams_passed", "skillable_exams_passed_total"),
    ),
    overflow_family="skillable_lab_host_overflow_total", noun="host",
)
# Every completion status exists at 0 per profile (as per place): increase() over a range holding a
# profile's first save_failed end then counts it. 11 ended series per profile, 21 series in all.
PROFILE = Dimension(
    name="profile",
    labels=("lab_profile_id",),
    fields=("lab_profile_id",),
    cap_setting="skillable.max-lab-profiles", default_cap=DEFAULT_MAX_LAB_PROFILES,
    observer_labels=("lab_profile_id",), histogram=False,
    families=(
        ("started", "skillable_lab_profile_instances_started_total"),
        ("ended", "skillable_lab_profile_instances_ended_total"),
        ("running", "skillable_lab_profile_instances_running"),
        ("run_time", "skillable_lab_profile_run_time_seconds"),
        ("task_completion", "skillable_lab_profile_task_completion_ratio"),
        ("exams", "skillable_lab_profile_exams_total"),
        ("exams_passed", "skillable_lab_profile_exams_passed_total"),
        ("exam_score", "skillable_lab_profile_exam_score_ratio"),
    ),
    overflow_family="skillable_lab_profile_overflow_total", noun="profile", by=", by lab profile",
)
DIMENSIONS: tuple[Dimension, ...] = (PLACE, PROFILE)

# Kept for the places' callers and tests: the overflow place, and the profile statuses at zero.
OVERFLOW_PLACE: Key = PLACE.overflow_key()
PROFILE_ZERO_STATUSES: tuple[str, ...] = PROFILE.zero_statuses

STATUS_INDEX: dict[str, int] = {s: i for i, s in enumerate(ALL_STATUSES)}
CODE_INDEX: dict[int | None, int] = {code: STATUS_INDEX[name] for code, name in STATUS_NAMES.items()}
UNKNOWN_INDEX = STATUS_INDEX[UNKNOWN_STATUS]
# A key's counts are its row in its dimension's Tallies.rows, WIDTH ints at these offsets: `closed` by
# status index, then `running` (rule 5: an instance is in one of these 12 gauge slots), `ended` by status
# index (rule 2), `started` (rule 1), `exams` and `exams_passed` (rule 3). 26 ints, one per series of a place.
RUNNING_SLOT = len(ALL_STATUSES)
ENDED = RUNNING_SLOT + 1
STARTED = ENDED + len(ALL_STATUSES)
EXAMS = STARTED + 1
PASSED = EXAMS + 1
WIDTH = PASSED + 1
# An Instance holds the index of its key in every dimension in one int, KEY_BITS each (an int, not
# a tuple: the cyclic GC tracks tuples, and a cold poll makes 100,000 instances).
#
# OWN_INTS: a new instance keeps ints of its own for its id and times (`x += 0` makes one), not the
# decoded record's. The record's other ints (host, profile, run time, ...) lie in the same 32-byte
# blocks of the allocator; if the instances held the record's, every page of them would stay in use
# when the records are freed. Measured at 100k results (2,000 hosts, 500 profiles): after the cold
# poll the process holds 91 MB instead of 104, the first render peaks at 127 MB instead of 135
# (the afternoon script: 269), for about 10 ms more in apply().
KEY_BITS = 32
KEY_MASK = 2**KEY_BITS - 1
# Tallies.Found: a key's part of an instance's packed keys (k << shift), its row of counts, its observers' index.
Found = tuple[int, list[int], int]


def raw_values(dim: Dimension, raw: Any) -> list[str]:
    """A record's raw ids for `dim` (what attrgetter(*dim.fields) read: one value, or a tuple) as label
    values: a null id reads "unknown"."""
    return [UNKNOWN_ID if v is None else str(v) for v in (raw if len(dim.fields) > 1 else (raw,))]


def capped_key(dim: Dimension, values: list[str], capped: set[str], cap: int,
               index: Mapping[Key, Any]) -> tuple[Key, bool]:
    """The key of these label values under the dimension's cap (Dimension's docstring), and whether it
    overflowed: the last label keeps its value while it is among the `capped` values or fewer than `cap`
    are (then it joins them), else it reads "other"; a key not in `index` beyond cap + EXTRA_KEYS keys
    is the overflow key, every label "other"."""
    last = values[-1]
    overflow = last not in capped and len(capped) >= cap
    if overflow:
        values[-1] = OVERFLOW
    key = tuple(values)
    if key not in index and len(index) >= cap + EXTRA_KEYS:
        overflow, key = True, dim.overflow_key()
    if not overflow:
        capped.add(last)
    return key, overflow


class Tallies:
    """One dimension's tallies: for each of its keys, what the rules counted.

    A key has an index (k, its place in `keys`), and its counts are a row of WIDTH ints (`rows[k]`), added
    to at an offset (RUNNING_SLOT, ENDED, ...). Observers are kept per observer key (the key's leading
    observer_labels), and the values of a poll wait in `waiting`, per table and observer, until fold()
    buckets them.

    Found, the fast path of apply(): what apply() needs of a new instance's key, kept by its raw ids in
    `known` so that one lookup finds it: the key's part of the instance's packed keys (k << shift), its
    row and its observers' index. Rows and this tuple exist so that apply() adds to a key's counts with
    no arithmetic on the way: with the counts in one flat list, each addition made an int object for its
    index (k * WIDTH + offset), and the shift and the observer were worked out again per result; a cold
    apply() of the fleet's 100k window took 1,888M instructions instead of 1,671M (cachegrind,
    BENCHMARKS.md). The rules it counts by are FleetState.apply()'s; tests/test_state.py checks the result
    against ReferenceState.
    """

    def __init__(self, dim: Dimension, cap: int, shift: int) -> None:
        self.dim = dim
        self.cap = cap
        self.shift = shift  # where its index lies in an Instance's `keys`
        self.read: Callable[[LabResult], Any] = attrgetter(*dim.fields)  # a result's raw ids (one, or a tuple)
        self.keys: list[Key] = []
        self.index: dict[Key, int] = {}
        # Per key and status, the (key, status) its per-status tables are keyed by in a snapshot: made once,
        # so a snapshot (one after every poll that changed something) makes none, and the renderer's cache
        # of row prefixes (render.py) shares them.
        self.status_rows: list[tuple[Key, str]] = []
        # Derived, not state: raw ids -> Found (class docstring), for ids that did not overflow, so a new
        # instance costs one lookup per dimension. Bounded (the ids are the API's): cleared when full.
        self.known: dict[Any, Found] = {}
        self.capped: set[str] = set()  # values of the capped (last) label that have keys of their own
        self.overflow_total = 0
        self.rows: list[list[int]] = []  # per key: its counts (see WIDTH)
        self.observer_of: list[int] = []  # per key: its observers' index
        self.observer_keys: list[Key] = []
        self.observer_index: dict[Key, int] = {}
        self.observers: tuple[list[Observer], ...] = tuple([] for _ in OBSERVED)  # per table, per observer
        # rule 4's values, per table and observer, until fold()
        self.waiting: tuple[list[list[float]], list[list[float]], list[list[float]]] = ([], [], [])

    def key_index(self, r: LabResult) -> int:
        """The index of a new instance's key, by the cap (class docstring); made the first time. Remembered
        for the next results with the same raw ids unless it overflowed (each such instance is counted)."""
        raw = self.read(r)
        key, overflow = capped_key(self.dim, raw_values(self.dim, raw), self.capped, self.cap, self.index)
        if overflow:
            self.overflow_total += 1
            return self.key(key)
        if len(self.known) >= KEY_CACHE_SIZE:
            self.known.clear()
        k = self.key(key)
        self.known[raw] = self.found(k)
        return k

    def found(self, k: int) -> Found:
        """What apply() needs of key k (class docstring)."""
        return k << self.shift, self.rows[k], self.observer_of[k]

    def find(self, r: LabResult) -> Found:
        """Found of a new instance's key, made by key_index() (apply() looks in `known` first)."""
        return self.found(self.key_index(r))

    def key(self, key: Key) -> int:
        """The index of `key`, made (with zero counts and its observers) the first time."""
        k = self.index.get(key)
        if k is None:
            k = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.status_rows.extend((key, status) for status in ALL_STATUSES)
            self.rows.append([0] * WIDTH)
            self.observer_of.append(self.observer(key[:len(self.dim.observer_labels)]))
        return k

    def observer(self, okey: Key) -> int:
        """The index of the observers kept for observer key `okey`, made the first time."""
        o = self.observer_index.get(okey)
        if o is None:
            o = self.observer_index[okey] = len(self.observer_keys)
            self.observer_keys.append(okey)
            for table, observers, waiting in zip(OBSERVED, self.observers, self.waiting):
                observers.append(Histogram(BOUNDS[table]) if self.dim.histogram else Summary())
                waiting.append([])
        return o

    def fold(self) -> None:
        """Hand the values waiting since the last fold (rule 4) to their observers. It looks at every
        observer's list once (a few thousand at most: the cap bounds them); a histogram sorts its values
        to bucket them, a summary only counts and sums them."""
        for table, observers, waiting in zip(OBSERVED, self.observers, self.waiting):
            clamp = CLAMPED[table]
            for o, values in enumerate(waiting):
                if values:
                    observers[o].take(values, clamp)
                    values.clear()

    def snapshot(self) -> DimensionCounts:
        """A copy of every table, keys in sorted order (the exposition's), for the snapshot."""
        order = sorted(range(len(self.keys)), key=self.keys.__getitem__)
        keys = [self.keys[k] for k in order]
        counts = [self.rows[k] for k in order]
        statuses = len(ALL_STATUSES)
        rows = [row for k in order for row in self.status_rows[k * statuses:(k + 1) * statuses]]
        closed = [n for c in counts for n in c[:statuses]]
        ended = [n for c in counts for n in c[ENDED:ENDED + statuses]]
        zero = [s in self.dim.zero_statuses for s in ALL_STATUSES] * len(keys)
        observed = {table: {self.observer_keys[o]: observers[o].copy()
                            for o in sorted(range(len(self.observer_keys)), key=self.observer_keys.__getitem__)}
                    for table, observers in zip(OBSERVED, self.observers)}

        def per_key(offset: int) -> dict[Key, int]:
            return dict(zip(keys, [c[offset] for c in counts]))

        return DimensionCounts(
            keys=keys,
            closed=dict(zip(rows, closed)),
            running=per_key(RUNNING_SLOT),
            started=per_key(STARTED),
            ended={row: n for row, n, at_zero in zip(rows, ended, zero) if at_zero or n},
            exams=per_key(EXAMS),
            exams_passed=per_key(PASSED),
            run_time=observed["run_time"],
            task_completion=observed["task_completion"],
            exam_score=observed["exam_score"],
            overflow_total=self.overflow_total,
        )

    # -- the state file's part of it --------------------------------------------------

    def export(self) -> SavedDimension:
        tallies = [SavedTally(list(key), counts[STARTED],
                              {s: n for s, n in zip(ALL_STATUSES, counts[ENDED:STARTED]) if n},
                              counts[EXAMS], counts[PASSED])
                   for key, counts in zip(self.keys, self.rows)]
        observers = [SavedObserver(list(okey), table, observers[o].saved_counts(), observers[o].total)
                     for table, observers in zip(OBSERVED, self.observers) for o, okey in enumerate(self.observer_keys)]
        return SavedDimension(self.overflow_total, tallies, observers)

    def restore(self, saved: SavedDimension) -> None:
        """The counters saved by export() (the gauges are derived from the instances, see FleetState.restore)."""
        self.overflow_total = saved.overflow_total
        for st in saved.tallies:
            counts = self.rows[self.key(self.checked(st.key, self.dim.labels))]
            counts[STARTED], counts[EXAMS], counts[PASSED] = st.started, st.exams, st.exams_passed
            for status, n in st.ended.items():
                i = STATUS_INDEX.get(status)
                if i is not None:  # a status this version does not know: left out, as a bad value
                    counts[ENDED + i] = n
        for so in saved.observers:
            if so.table not in OBSERVED:
                raise RestoreError(f"unknown observed table {so.table!r}")
            o = self.observer(self.checked(so.key, self.dim.observer_labels))
            self.observers[OBSERVED.index(so.table)][o].restore(so.counts, so.total)
        self.capped.update(key[-1] for key in self.keys if key[-1] != OVERFLOW)

    def checked(self, key: list[str], labels: tuple[str, ...]) -> Key:
        if len(key) != len(labels):
            raise RestoreError(f"a {self.dim.name} key has {len(key)} parts, not {len(labels)}")
        return tuple(key)


def _bucketed(bounds: Sequence[float], values: list[float], clamp: bool) -> tuple[list[int], float]:
    """The count in each bucket (bucket_of) of `values`, and their sum; each value first clamped to
    0..1 (as _ratio) if `clamp`. Sorts `values` in place.

    Sorting a list of values once (C) makes its bucket counts one bisect per bound; bucketing each
    value as it came (a bisect and two adds in Python) cost about a fifth more instructions per
    result of a cold poll (cachegrind). tests/test_state.py checks it against bucket_of.
    """
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
    cost it nothing. Its keys are indexes in its dimensions' Tallies, packed in one int.
    """

    keys: int  # its key's index in each dimension: (keys >> Tallies.shift) & KEY_MASK
    status: int  # its current completion status, as an index in ALL_STATUSES
    start: int | None
    end: int | None
    last_change: int  # the latest Start or End seen, or the poll time for a record with neither (whole seconds)
    opened: int  # Start, or the first poll that saw it if earlier or there is none: rule 6's clock
    ended_counted: bool = False
    exam_counted: bool = False


def gauge_slot(inst: Instance) -> int:
    """Rule 5's gauges, the one place they are decided: an instance is in its key's `running` with
    no End, else in `closed` under its status. apply() inlines it (it runs per result)."""
    return RUNNING_SLOT if inst.end is None else inst.status


# -- what persistence saves (FleetState.export / FleetState.restore) ---------------------

# Counts, ids, times and sums are checked as the file is read (model.py's types), so a
# bad value leaves out its entry and never reaches the state (persistence.salvage).


class SavedInstance(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    id: Int64
    keys: list[list[str]]  # one key per dimension, in FleetExport.order
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
    key: list[str]  # an observer key: a region for places' histograms, a profile for profiles' summaries
    table: str  # one of OBSERVED
    counts: list[Count]  # bucket counts (not cumulative); a summary's [count]
    total: Finite


class SavedDimension(msgspec.Struct, forbid_unknown_fields=True):
    overflow_total: Count
    tallies: list[SavedTally]
    observers: list[SavedObserver]


# The migration from the layout before the dimensions were declared (state file version 2, commit
# 5737f51): it had no `order`, and listed an instance's keys place first, then profile. Everything
# else of it is this layout, so a file of either restores with every counter intact.
ORDER_BEFORE_DECLARATIONS = ("place", "profile")


class FleetExport(msgspec.Struct, forbid_unknown_fields=True):
    """Everything FleetState must keep across a restart; the gauges are derived, never saved.

    `dimensions` holds each dimension's counters by its name; `order` names the dimension of each
    of an instance's keys.
    """

    invalid_total: Count
    expired_total: Count
    dimensions: dict[str, SavedDimension]
    instances: list[SavedInstance]
    order: tuple[str, ...] = ORDER_BEFORE_DECLARATIONS


class RestoreError(ValueError):
    """A saved state this version cannot take (inconsistent, foreign layout)."""


# -- the state ------------------------------------------------------------------------


@dataclass
class DimensionCounts:
    """One dimension's tables in a snapshot. Every key has an entry in every table (per key, or per key
    and status: every status in `closed`, the dimension's zero statuses and any other that occurred in
    `ended`); the observed tables are per observer key."""

    keys: list[Key]  # sorted
    closed: dict[tuple[Key, str], int]  # ended instances in the window, by current status
    running: dict[Key, int]
    started: dict[Key, int]
    ended: dict[tuple[Key, str], int]
    exams: dict[Key, int]
    exams_passed: dict[Key, int]
    run_time: dict[Key, Observer]
    task_completion: dict[Key, Observer]
    exam_score: dict[Key, Observer]
    overflow_total: int


@dataclass
class Snapshot:
    """A consistent copy of everything the collector needs, taken under the poller's lock."""

    dimensions: dict[str, DimensionCounts]  # by Dimension.name, in the state's order
    tracked: int
    invalid_total: int
    expired_total: int

    def __getitem__(self, name: str) -> DimensionCounts:
        return self.dimensions[name]


# What apply() reads of a dimension in its pass per result: shift, known.get, read, find, rows, observer_of,
# and the waiting values of the run time, task completion and exam score observers.
_Pass = tuple[int, Callable[[Any], "Found | None"], Callable[[LabResult], Any], Callable[[LabResult], "Found"],
              list[list[int]], list[int], list[list[float]], list[list[float]], list[list[float]]]


class FleetState:
    """Per-instance memory and tallies for one Skillable account. Not thread-safe: the poller locks.

    snapshot() returns the same (read-only) Snapshot object until the state changes,
    so the collector can cache its exposition by the snapshot's identity.

    `max_lab_hosts` and `max_lab_profiles` cap PLACE and PROFILE; `caps` (by dimension name) caps
    any other dimension, which otherwise gets its declaration's default_cap.
    """

    def __init__(self, max_lab_hosts: int = DEFAULT_MAX_LAB_HOSTS, max_lab_profiles: int = DEFAULT_MAX_LAB_PROFILES,
                 max_running_seconds: float = DEFAULT_MAX_RUNNING_SECONDS,
                 dimensions: Sequence[Dimension] = DIMENSIONS, caps: Mapping[str, int] | None = None) -> None:
        self.max_lab_hosts = max_lab_hosts
        self.max_lab_profiles = max_lab_profiles
        self.max_running_seconds = max_running_seconds
        self.caps = {PLACE.name: max_lab_hosts, PROFILE.name: max_lab_profiles, **(caps or {})}
        if len({d.name for d in dimensions}) != len(dimensions):
            raise ValueError("two dimensions of one name")
        self.dimensions: tuple[Dimension, ...] = tuple(dimensions)
        self.tallies: dict[str, Tallies] = {
            d.name: Tallies(d, self.caps.get(d.name, d.default_cap), i * KEY_BITS) for i, d in enumerate(dimensions)}
        self.instances: dict[int, Instance] = {}
        self.invalid_total = 0
        self.expired_total = 0
        # Derived: min-heaps of entries (_entry) for (last_change, id) of ended and (opened, id) of
        # running instances, popped by evict(), so a poll costs O(changes), not O(instances). An
        # entry whose instance has changed since is stale and skipped.
        self._closed_by_age: list[int] = []
        self._open_by_age: list[int] = []
        self._version = 0
        self._snapshot: tuple[tuple[int, ...], Snapshot] | None = None

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
        names local: first what the rules count for the result, then that, added to the instance's
        tally in each dimension.
        """
        self._version += 1
        instances = self.instances
        code_index = CODE_INDEX.get
        # Times are whole seconds: Start and End are (Int64), so they are compared with whole-second
        # bounds (exact: t >= horizon exactly when t >= ceil(horizon)), and the poll time is taken to
        # its second (so every time an instance holds is an int, as _entry needs).
        first = math.ceil(horizon)
        now = first if seen_at is None else math.floor(seen_at)
        ceiling = sys.maxsize if seen_at is None else now  # a later Start opens at the poll time
        latest = ceiling + MAX_FUTURE_SECONDS
        dims = list(self.tallies.values())
        # Per dimension: where an instance's key index lies in its `keys`, how a new instance's key is found
        # (Tallies.Found: by its raw ids if known, else made), its tallies and its observers' waiting values.
        tallies: list[_Pass] = [(t.shift, t.known.get, t.read, t.find, t.rows, t.observer_of, *t.waiting)
                                for t in dims]
        mask, running_slot = KEY_MASK, RUNNING_SLOT  # constants as locals: the loop reads them often
        closed_aged: list[int] = []  # new entries for the heaps
        open_aged: list[int] = []
        refused = 0
        try:
            for r in results:
                key, start, end = r.lab_instance_id, r.start, r.end
                inst = instances.get(key)
                if inst is None:  # it keeps ints of its own, not the record's (OWN_INTS)
                    key += 0
                    if start is not None:
                        start += 0
                    if end is not None:
                        end += 0
                if start is not None:
                    stamp = start if end is None or end < start else end
                elif end is not None:
                    stamp = end
                else:
                    stamp = now
                if stamp > latest:  # rule 9
                    refused += 1
                    continue
                status = code_index(r.completion_status, UNKNOWN_INDEX)
                # First what the rules count for this sighting, decided once ...
                if inst is None:
                    leave = -1  # in no gauge yet
                    count_start = start is None or start >= first  # rule 1
                    ended_before = examined_before = False
                    closed = end is not None
                else:
                    leave = running_slot if inst.end is None else inst.status  # gauge_slot(inst), inlined
                    count_start = False
                    ended_before, examined_before = inst.ended_counted, inst.exam_counted
                    was_open = inst.end is None
                    inst.status = status
                    if start is not None:
                        inst.start = start
                    if end is not None:
                        inst.end = end
                    moved = stamp > inst.last_change
                    if moved:
                        inst.last_change = stamp
                    closed = inst.end is not None
                    if closed and (was_open or moved):  # a new entry for rule 7
                        closed_aged.append(_entry(inst.last_change, key))
                enter = status if closed else running_slot  # rule 5: gauge_slot(inst), inlined
                count_end = end is not None and end >= first and not ended_before  # rule 2
                if count_end:
                    ended = ENDED + status
                    seconds = r.total_run_time_seconds  # rule 4
                    if seconds is not None and seconds < 0:
                        seconds = None
                    percent = r.task_complete_percent
                    task = None if percent is None else percent / 100.0  # clamped to 0..1 when folded
                count_exam = False
                if not examined_before and (r.exam_score is not None or r.exam_passed is not None):  # rule 3
                    event = end if end is not None else start
                    if event is None or event >= first:
                        count_exam = True
                        passed = bool(r.exam_passed)
                        score = r.exam_score / r.exam_max_possible_score \
                            if r.exam_score is not None and r.exam_max_possible_score else None  # rule 4
                if inst is not None:
                    if leave == enter and not count_end and not count_exam:
                        continue  # seen again, unchanged: nothing to count
                    inst.ended_counted |= count_end
                    inst.exam_counted |= count_exam
                    keys = inst.keys
                # ... then added to the instance's tally in every dimension, where a new instance's key is
                # looked up (once: it keeps the index).
                packed = 0
                for shift, known, read, find, rows, observer_of, run_times, tasks, scores in tallies:
                    if inst is None:
                        found = known(read(r))
                        if found is None:
                            found = find(r)
                        part, counts, o = found
                        packed += part
                    else:
                        k = (keys >> shift) & mask
                        counts, o = rows[k], observer_of[k]
                        counts[leave] -= 1  # a known instance is in one gauge slot (rule 5)
                    counts[enter] += 1
                    if count_start:
                        counts[STARTED] += 1
                    if count_end:
                        counts[ended] += 1
                        if seconds is not None:
                            run_times[o].append(seconds)
                        if task is not None:
                            tasks[o].append(task)
                    if count_exam:
                        counts[EXAMS] += 1
                        if passed:
                            counts[PASSED] += 1
                        if score is not None:
                            scores[o].append(score)
                if inst is None:
                    opened = now if start is None or start > ceiling else start
                    instances[key] = Instance(packed, status, start, end, stamp, opened, count_end, count_exam)
                    if closed:  # _entry(), inlined
                        closed_aged.append((stamp << SPAN_BITS) + key)
                    else:
                        open_aged.append((opened << SPAN_BITS) + key)
        finally:
            for t in dims:
                t.fold()
            _push_all(self._closed_by_age, closed_aged)
            _push_all(self._open_by_age, open_aged)
            self.invalid_total += refused
        return refused

    def evict(self, horizon: float, running_horizon: float | None = None) -> int:
        """Forget ended instances whose last change is older than `horizon` (rule 7) and drop
        running ones opened before `running_horizon` (rule 6, counted in expired_total; none
        without it). The poller passes now - window and now - max_running. Returns how many
        instances left memory."""
        instances = self.instances
        gone = 0
        heap, bound = self._closed_by_age, _bound(horizon)
        while heap and heap[0] < bound:
            stamp, key = _entry_parts(heapq.heappop(heap))
            inst = instances.get(key)
            if inst is not None and inst.end is not None and inst.last_change == stamp:  # else stale
                self._forget(key, inst)
                gone += 1
        heap = self._open_by_age
        limit = _bound(running_horizon) if running_horizon is not None else None
        while limit is not None and heap and heap[0] < limit:
            stamp, key = _entry_parts(heapq.heappop(heap))
            inst = instances.get(key)
            if inst is not None and inst.end is None and inst.opened == stamp:
                self._forget(key, inst)
                self.expired_total += 1
                gone += 1
        for heap in (self._closed_by_age, self._open_by_age):
            if len(heap) > 2 * len(instances) + 1024:  # bounded: drop the stale entries
                self._rebuild_age_index()
                break
        if gone:
            self._version += 1
        return gone

    def _forget(self, key: int, inst: Instance) -> None:
        del self.instances[key]
        self._move_gauges(inst, -1)

    def _move_gauges(self, inst: Instance, by: int) -> None:
        """Add `by` to the gauge the instance is in (gauge_slot), in every dimension."""
        slot = gauge_slot(inst)
        for t in self.tallies.values():
            t.rows[(inst.keys >> t.shift) & KEY_MASK][slot] += by

    def _rebuild_age_index(self) -> None:
        self._closed_by_age = [_entry(i.last_change, k) for k, i in self.instances.items() if i.end is not None]
        self._open_by_age = [_entry(i.opened, k) for k, i in self.instances.items() if i.end is None]
        heapq.heapify(self._closed_by_age)
        heapq.heapify(self._open_by_age)

    # -- persistence -------------------------------------------------------

    def export(self) -> FleetExport:
        """Everything a restart needs, as a msgspec-encodable struct (see FleetState.restore)."""
        dims = list(self.tallies.values())
        instances = [
            SavedInstance(key, [list(t.keys[(inst.keys >> t.shift) & KEY_MASK]) for t in dims],
                          ALL_STATUSES[inst.status], inst.start, inst.end,
                          float(inst.last_change), float(inst.opened), inst.ended_counted, inst.exam_counted)
            for key, inst in self.instances.items()
        ]
        return FleetExport(self.invalid_total, self.expired_total, {t.dim.name: t.export() for t in dims},
                           instances, tuple(self.tallies))

    @classmethod
    def restore(cls, saved: FleetExport, max_lab_hosts: int = DEFAULT_MAX_LAB_HOSTS,
                max_lab_profiles: int = DEFAULT_MAX_LAB_PROFILES,
                max_running_seconds: float = DEFAULT_MAX_RUNNING_SECONDS,
                dimensions: Sequence[Dimension] = DIMENSIONS, caps: Mapping[str, int] | None = None) -> FleetState:
        """A FleetState holding what export() gave, or what a state file of the earlier layout holds
        (ORDER_BEFORE_DECLARATIONS). Raises RestoreError if it does not fit this version.

        The counters of each dimension the file and this version both know are restored; a dimension
        the file does not know starts with zero counters, and the restored instances get its unknown
        key (every label "unknown"), so its gauges hold every instance as the other dimensions' do. A
        dimension this version does not know is left out.
        """
        state = cls(max_lab_hosts, max_lab_profiles, max_running_seconds, dimensions, caps)
        state.invalid_total, state.expired_total = saved.invalid_total, saved.expired_total
        order = list(saved.order)
        if len(set(order)) != len(order):
            raise RestoreError(f"the order of an instance's keys names a dimension twice: {order}")
        for name, t in state.tallies.items():
            if name in saved.dimensions:
                t.restore(saved.dimensions[name])
        # Per dimension of this version: where an instance's key for it is (None: the file has none).
        places = [(t, order.index(name) if name in order else None) for name, t in state.tallies.items()]
        for item in saved.instances:
            if len(item.keys) != len(order):
                raise RestoreError("an instance's keys do not match the dimensions")
            status = STATUS_INDEX.get(item.status)
            if status is None:  # a bad value invalidates its record, not the state
                continue
            keys = 0
            for t, position in places:
                key = t.dim.unknown_key() if position is None else t.checked(item.keys[position], t.dim.labels)
                keys += t.key(key) << t.shift
            # Whole seconds, as apply() keeps them (a file from before may hold a fraction).
            inst = Instance(keys, status, item.start, item.end, math.floor(item.last_change), math.floor(item.opened),
                            item.ended_counted, item.exam_counted)
            previous = state.instances.get(item.id)
            if previous is not None:  # an id twice: the last one holds, as a dict would have it
                state._move_gauges(previous, -1)
            state.instances[item.id] = inst
            state._move_gauges(inst, +1)  # the gauges are derived from the instances, by rule 5
        for t in state.tallies.values():
            t.capped.update(key[-1] for key in t.keys if key[-1] != OVERFLOW)
        state._rebuild_age_index()
        return state

    # -- reading -----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        # The plain counters are in the key too: the poller adds to invalid_total directly.
        key = (self._version, self.invalid_total, len(self.instances))
        if self._snapshot is not None and self._snapshot[0] == key:
            return self._snapshot[1]
        snapshot = Snapshot({name: t.snapshot() for name, t in self.tallies.items()},
                            tracked=len(self.instances), invalid_total=self.invalid_total,
                            expired_total=self.expired_total)
        self._snapshot = (key, snapshot)
        return snapshot


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
