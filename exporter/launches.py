"""Memory of lab launches, from /labinstance/search in mode 5: how long labs took to become ready, which
never did, the errors they reported, and which integration launched them.

What to ask. Each launch poll asks two questions, page by page, and never passes `end` (see below):

A. Launches: `start` = the launch checkpoint minus the overlap, `sort=start`, every page. The checkpoint
   is when the last complete launches question began, held back to the Start of the oldest remembered
   lab still starting (running, no StartupDuration yet, started within STARTING_WATCH_SECONDS); on the
   first poll it is the horizon. Every lab launched since: new launches, start-up times as they appear,
   labs that end before they are ready, their errors so far.
B. Endings: `start` = the Start of the oldest watched lab minus the overlap, `sort=end desc`, read until
   a page ends with a lab that ended before the cutoff (when the pages came in that order; else every
   page). Watched labs are those the exporter tracks (LatestResults' running labs, and ended ones, and
   the labs remembered here) that are running or ended within the grace period; the cutoff is when the
   last complete endings question began, minus the grace and the overlap. So every lab is looked at
   again after it ends, for as long as the grace lasts: errors dated after the End (a webhook that
   failed on scoring) and labs that ended without getting ready are counted however long they ran.

Each of the four bounds (the launches' start, the cutoff, the endings' start, the expiry floor) never
moves back, and the endings' start moves on only after a question B answered in full (labs it has not
read yet stay asked for). The expiry floor is now minus --skillable.max-running-minutes and the grace: no lab started
before it is asked about or counted (LatestResults' state drops running labs at that age too).

Why no `end`: the spec calls `start` "the earliest start time of lab instances to return" and `end`
"the latest end time", so `end` may filter on End (running labs, with no End, left out or not) or on
Start; the UAT records, all ended, cannot tell. Leaving `end` out asks for every lab started since
`start` under either reading, running ones included. A record outside what was asked (an API that
reads `start` otherwise) is taken only under rule 7's test, so it cannot be counted twice.

The counting rules (tests/test_launches.py has them again, written plainly, as ReferenceLaunches):

1. An instance is counted once: what was counted of each instance taken from an answer is remembered
   until rule 7 forgets it, and a record is applied to what is remembered of its instance.
2. Launch: at an instance's first sighting, one launch under its API consumer, if its Start is not
   older than the horizon.
3. Ready: the first sighting that carries a StartupDuration observes it (its region's histogram, its
   profile's summary) if the lab was ready (Start + StartupDuration) not before the horizon. Once.
4. Not ready: the first sighting with an End while no StartupDuration was ever seen counts the instance
   not ready if its End is not older than the horizon. An instance is ready or not ready, never both:
   a StartupDuration that appears after the End was counted not ready is not observed.
5. Errors: an entry is its time and message; its kind (lifecycle_action, webhook, other) comes from the
   message, which is never kept. Per instance and (time, kind), the largest number of distinct messages
   seen in one sighting is remembered; a sighting with more counts the difference. Entries older than
   the horizon are remembered, never counted. Entries after the End count as any other.
6. Keys: the place (datacenter, region, host) and the lab profile, capped as LatestResults' are (the
   same settings, the same "other"); the API consumer's name, cleaned, "unknown" when absent, capped by
   --skillable.max-api-consumers. An instance keeps the place and profile of its first sighting.
7. Forgetting: an instance is forgotten when it can no longer be returned as new: it ended before the
   cutoff and started before the launches' start, or it started before the expiry floor. A record of an
   instance not remembered is taken only if it cannot have been forgotten: its Start is not before the
   expiry floor, and it starts at or after the launches' start, or it has no End, or it ended at or
   after the cutoff. As the bounds never move back, a forgotten instance is never taken again.
8. The horizon: the first launch poll's time minus the lookback window, as LatestResults' first poll
   counts. Facts dated before it (starts, ready times, ends, errors) happened before the exporter
   looked and are not counted. The state file keeps it with everything above.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from collections.abc import Callable, Iterable

import msgspec

from .model import ERROR_KINDS, Count, Finite, Int64, LaunchRecord, SearchPage
from .state import (
    OVERFLOW,
    PLACE,
    PROFILE,
    STARTED,
    Dimension,
    DimensionCounts,
    FleetState,
    Histogram,
    Key,
    RestoreError,
    SavedDimension,
    Summary,
    Tallies,
    capped_key,
    raw_values,
)

ENDPOINT = "labinstance_search"  # the endpoint label of its requests and failures
PATH = "labinstance/search"
MODE = 5  # concise: details and result, names included
LAUNCHES_SORT = "start"
ENDINGS_SORT = "end desc"
STARTING_WATCH_SECONDS = 1800  # a lab not ready this long after its Start is looked at again at its end
DEFAULT_MAX_API_CONSUMERS = 100
MAX_NAMES = 10_000  # names kept per kind of id (hosts, datacenters, regions)
# Start-up time: from 10 s (a container) to half an hour (a large VM lab); beyond that is +Inf.
STARTUP_BUCKETS: tuple[float, ...] = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800)

READY = 1  # rule 3 done: observed, or passed (ready before the horizon)
NOT_READY = 2  # rule 4 done
KIND_INDEX = {kind: i for i, kind in enumerate(ERROR_KINDS)}
NOT_READY_SLOT = 0  # a place's and a profile's counts: not ready, then errors by kind (ERROR_KINDS order)
ERRORS_SLOT = 1
KEY_WIDTH = ERRORS_SLOT + len(ERROR_KINDS)

# The API consumer a lab was launched from: a third dimension, declared as the state's are. Its
# `started` table is the one exposed; LatestResults does not carry the consumer, so its tallies live
# here and count launches seen in /labinstance/search (rule 2).
INTEGRATION = Dimension(
    name="integration",
    labels=("api_consumer",),
    fields=("api_consumer",),
    cap_setting="skillable.max-api-consumers", default_cap=DEFAULT_MAX_API_CONSUMERS,
    observer_labels=(), histogram=False,
    families=(("started", "skillable_lab_integration_instances_started_total"),),
    overflow_family="skillable_lab_integration_overflow_total", noun="API consumer",
    by=", by the API consumer (integration) that launched them, from /labinstance/search",
    zero_statuses=(),
)


@dataclass(frozen=True)
class Plan:
    """What one launch poll asks (the module docstring), decided under the lock at its start."""

    now: int
    horizon: int
    launches_from: int  # question A's `start`
    ended_after: int  # question B reads down to this End: the cutoff
    watched_from: int  # question B's `start`
    expiry: int  # no lab started before this is asked about or counted

    def takes_new(self, r: LaunchRecord) -> bool:
        """Rule 7: a record of an instance not remembered is taken only if it cannot have been forgotten."""
        return r.start >= self.expiry and (r.start >= self.launches_from or r.end is None or r.end >= self.ended_after)


@dataclass(frozen=True)
class Question:
    """One of a launch poll's two questions: its `start` and `sort`, and for question B the End below
    which the reading stops."""

    start: int
    sort: str
    stop_before: int | None = None


def questions(plan: Plan) -> tuple[Question, Question]:
    """Question A (launches), then question B (endings): the module docstring."""
    return (Question(plan.launches_from, LAUNCHES_SORT),
            Question(plan.watched_from, ENDINGS_SORT, plan.ended_after))


def search_params(question: Question, page_size: int, page_index: int) -> dict[str, int | str]:
    """The query of one page of a question. No `end`: see the module docstring."""
    return {"mode": MODE, "start": question.start, "sort": question.sort, "pageSize": page_size,
            "pageIndex": page_index}


def ask(launch: LaunchState, plan: Plan, question: Question, fetch: Callable[[dict[str, int | str]], SearchPage],
        page_size: int, more: Callable[[int], bool]) -> tuple[int, bool]:
    """Ask one question page by page, each page applied as it comes (fetch: the page a query gives;
    more(pages asked): False when there is no time left). Returns (pages asked, answered in full).

    The reading ends after the last page (TotalPages; without it, a page shorter than asked), after an
    empty page, or, for question B, after a page that reaches an End before `stop_before`, as long as
    every End read so far came in descending order (else the API did not sort as asked, and every page
    is read). Raises what fetch raises.
    """
    previous_end: int | None = None
    ordered = True
    index = 0
    while True:
        if not more(index):
            return index, False
        page = fetch(search_params(question, page_size, index))
        launch.apply(page.records, plan, page.invalid)
        index += 1
        ends = [r.end for r in page.records if r.end is not None]
        for end in ends:
            ordered = ordered and (previous_end is None or end <= previous_end)
            previous_end = end
        if question.stop_before is not None and ordered and ends and ends[-1] < question.stop_before:
            return index, True
        if not (page.records or page.invalid):
            return index, True
        if page.total_pages is not None:
            if index >= page.total_pages:
                return index, True
        elif len(page.records) + page.invalid < page_size:
            return index, True


@dataclass(slots=True)
class Watched:
    """One remembered instance: when it started and ended, its keys, what was counted of it."""

    start: int
    end: int | None
    place: int  # its key's index in the place table
    profile: int
    done: int = 0  # READY | NOT_READY: rules 3 and 4 done
    errors: dict[tuple[int, int], int] | None = None  # (time, kind index) -> distinct messages counted (rule 5)


class KeyTable:
    """One dimension's keys for the launch counters: capped by the dimension's rule (state.capped_key),
    with KEY_WIDTH counts each (not ready, then errors by kind)."""

    def __init__(self, dim: Dimension, cap: int) -> None:
        self.dim = dim
        self.cap = cap
        self.keys: list[Key] = []
        self.index: dict[Key, int] = {}
        self.capped: set[str] = set()
        self.counts: list[int] = []

    def key_of(self, r: LaunchRecord) -> int:
        raw = tuple(getattr(r, f) for f in self.dim.fields)
        key, _ = capped_key(self.dim, raw_values(self.dim, raw if len(raw) > 1 else raw[0]), self.capped, self.cap,
                            self.index)
        return self.key(key)

    def key(self, key: Key) -> int:
        k = self.index.get(key)
        if k is None:
            k = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.counts.extend([0] * KEY_WIDTH)
        return k

    def restore_key(self, key: list[str]) -> int:
        if len(key) != len(self.dim.labels):
            raise RestoreError(f"a launch {self.dim.name} key has {len(key)} parts, not {len(self.dim.labels)}")
        k = self.key(tuple(key))
        if key[-1] != OVERFLOW:
            self.capped.add(key[-1])
        return k


# -- the snapshot the collector reads ---------------------------------------------------------


@dataclass
class LaunchCounts:
    """A consistent copy of the launch counters, keys sorted (the exposition's order). Every key seen
    has every kind of error and its not-ready count, at zero until counted."""

    startup: dict[Key, Histogram]  # by (datacenter, region)
    profile_startup: dict[Key, Summary]
    not_ready: dict[Key, int]  # by place
    profile_not_ready: dict[Key, int]
    errors: dict[tuple[Key, str], int]  # by place and kind
    profile_errors: dict[tuple[Key, str], int]
    integration: DimensionCounts
    invalid_total: int
    names: dict[str, dict[str, str]]  # "datacenter", "delivery_region", "lab_host" -> id -> name
    last_success: float | None  # when the last complete launch poll began

    def __getitem__(self, name: str) -> DimensionCounts:  # as Snapshot reads a dimension
        if name != INTEGRATION.name:
            raise KeyError(name)
        return self.integration


# -- what the state file keeps -----------------------------------------------------------------


class SavedWatched(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    id: Int64
    start: Int64
    end: Int64 | None
    place: list[str]
    profile: list[str]
    done: Count
    errors: list[tuple[Int64, str, Count]]  # (time, kind, distinct messages counted)


class SavedKeyCounts(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    key: list[str]
    not_ready: Count
    errors: dict[str, Count]


class SavedStartup(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    key: list[str]
    counts: list[Count]  # bucket counts (not cumulative); a summary's [count]
    total: Finite


class LaunchExport(msgspec.Struct, forbid_unknown_fields=True):
    """Everything LaunchState keeps across a restart: the plan's bounds and checkpoints, the instances
    remembered (with what was counted of them), the counters, the names."""

    horizon: Int64 | None
    launches_until: Int64 | None
    ended_until: Int64 | None
    bounds: list[Int64]  # the last plan's launches_from, ended_after, watched_from, expiry ([] before one)
    last_success: Finite | None
    invalid_total: Count
    instances: list[SavedWatched]
    places: list[SavedKeyCounts]
    profiles: list[SavedKeyCounts]
    startup: list[SavedStartup]
    profile_startup: list[SavedStartup]
    integration: SavedDimension
    names: dict[str, dict[str, str]] = {}


# -- the state ---------------------------------------------------------------------------------


def oldest_watched(fleet: FleetState, ended_after: int) -> int | None:
    """The Start of the oldest lab LatestResults' state tracks that is running or ended at or after
    `ended_after` (question B's watched labs, as the exporter tracks them). Call holding the poller's lock."""
    oldest: int | None = None
    for inst in fleet.instances.values():
        start = inst.start
        if start is not None and (inst.end is None or inst.end >= ended_after) and (oldest is None or start < oldest):
            oldest = start
    return oldest


class LaunchState:
    """The launch memory of one account, by the rules above. Thread-safe: the launch poll applies pages
    while the poll thread may save it and scrapes read its snapshot."""

    def __init__(self, max_lab_hosts: int = PLACE.default_cap, max_lab_profiles: int = PROFILE.default_cap,
                 max_api_consumers: int = DEFAULT_MAX_API_CONSUMERS, grace_seconds: int = 900,
                 max_running_seconds: int = 1440 * 60) -> None:
        self.grace_seconds = grace_seconds
        self.max_running_seconds = max_running_seconds
        self.places = KeyTable(PLACE, max_lab_hosts)
        self.profiles = KeyTable(PROFILE, max_lab_profiles)
        self.integration = Tallies(INTEGRATION, max_api_consumers, 0)
        self.startup: dict[Key, Histogram] = {}
        self.profile_startup: list[Summary] = []  # per profile key index
        self.instances: dict[int, Watched] = {}
        self.horizon: int | None = None
        self.launches_until: int | None = None  # when the last complete question A began
        self.ended_until: int | None = None  # when the last complete question B began
        self.bounds: tuple[int, int, int, int] | None = None  # the last plan's, never moved back
        self._endings_read = False  # the last plan's question B was answered in full: its start may move on
        self.last_success: float | None = None
        self.invalid_total = 0
        self.names: dict[str, dict[str, str]] = {"datacenter": {}, "delivery_region": {}, "lab_host": {}}
        self._lock = threading.Lock()
        self._version = 0
        self._snapshot: tuple[int, LaunchCounts] | None = None

    # -- what to ask --------------------------------------------------------------------------

    def plan(self, now: float, window_seconds: int, overlap_seconds: int, fleet: FleetState | None = None,
             fleet_lock: threading.Lock | None = None) -> Plan:
        """The two questions of a launch poll at `now` (the module docstring). `fleet` is LatestResults'
        state, read under `fleet_lock` for the labs it tracks."""
        t = int(now)
        with self._lock:
            if self.horizon is None:
                self.horizon = t - window_seconds
                self._version += 1
            horizon = self.horizon
            expiry = t - self.max_running_seconds - self.grace_seconds
            frontier = self.launches_until if self.launches_until is not None else horizon
            for w in self.instances.values():
                if w.end is None and not w.done and w.start >= t - STARTING_WATCH_SECONDS and w.start < frontier:
                    frontier = w.start
            launches_from = frontier - overlap_seconds
            # Ends are read since the horizon on the first poll (rule 8), then since the last complete question B.
            ended_after = min(t, self.ended_until if self.ended_until is not None else horizon) \
                - self.grace_seconds - overlap_seconds
            previous = self.bounds or (launches_from, ended_after, expiry, expiry)
            launches_from, ended_after = max(launches_from, previous[0], expiry), max(ended_after, previous[1], expiry)
            oldest = min((w.start for w in self.instances.values()
                          if w.end is None or w.end >= ended_after), default=None)
        if fleet is not None:
            if fleet_lock is not None:
                with fleet_lock:
                    tracked = oldest_watched(fleet, ended_after)
            else:
                tracked = oldest_watched(fleet, ended_after)
            if tracked is not None and (oldest is None or tracked < oldest):
                oldest = tracked
        watched_from = (oldest if oldest is not None else min(t, launches_from + overlap_seconds)) - overlap_seconds
        with self._lock:
            if self.bounds is not None and not self._endings_read:
                watched_from = previous[2]  # no question B answered in full since: labs it has not read stay asked for
            self._endings_read = False
            watched_from = max(watched_from, previous[2], expiry)
            expiry = max(expiry, previous[3])
            self.bounds = (launches_from, ended_after, watched_from, expiry)
            self._forget(launches_from, ended_after, expiry)
        return Plan(t, horizon, launches_from, ended_after, watched_from, expiry)

    def _forget(self, launches_from: int, ended_after: int, expiry: int) -> None:
        """Rule 7. Call holding the lock."""
        gone = [i for i, w in self.instances.items()
                if w.start < expiry or (w.end is not None and w.end < ended_after and w.start < launches_from)]
        for i in gone:
            del self.instances[i]
        if gone:
            self._version += 1

    def finish(self, plan: Plan, launches_done: bool, endings_done: bool) -> None:
        """A launch poll is over: a question answered in full moves its checkpoint to when the poll began."""
        with self._lock:
            if launches_done:
                self.launches_until = max(plan.now, self.launches_until or plan.now)
            if endings_done:
                self.ended_until = max(plan.now, self.ended_until or plan.now)
                self._endings_read = True
            if launches_done and endings_done:
                self.last_success = float(plan.now)
            self._version += 1

    # -- counting -------------------------------------------------------------------------------

    def apply(self, records: Iterable[LaunchRecord], plan: Plan, invalid: int = 0) -> int:
        """Fold one page in by the rules; `invalid`: records the decoder skipped. Returns how many
        records were taken (the others were outside what rule 7 lets in)."""
        taken = 0
        with self._lock:
            self._version += 1
            self.invalid_total += invalid
            horizon = plan.horizon
            for r in records:
                w = self.instances.get(r.id)
                if w is None:
                    if not plan.takes_new(r):
                        continue
                    w = self._first_sighting(r, horizon)
                taken += 1
                if r.end is not None:
                    w.end = r.end
                self._facts(w, r, horizon)
                self._name(r)
        return taken

    def _first_sighting(self, r: LaunchRecord, horizon: int) -> Watched:
        """Rule 2 and rule 6: keys, and a launch if the Start is not older than the horizon."""
        place, profile = self.places.key_of(r), self.profiles.key_of(r)
        while len(self.profile_startup) < len(self.profiles.keys):
            self.profile_startup.append(Summary())
        okey = self.places.keys[place][:len(PLACE.observer_labels)]
        if okey not in self.startup:
            self.startup[okey] = Histogram(STARTUP_BUCKETS)
        w = self.instances[r.id] = Watched(r.start, r.end, place, profile)
        if r.start >= horizon:
            k = self.integration.key_index(r)  # type: ignore[arg-type]  # reads r.api_consumer, as a LabResult's fields
            self.integration.rows[k][STARTED] += 1
        return w

    def _facts(self, w: Watched, r: LaunchRecord, horizon: int) -> None:
        """Rules 3, 4 and 5 for one sighting."""
        places, profiles = self.places.counts, self.profiles.counts
        place, profile = w.place * KEY_WIDTH, w.profile * KEY_WIDTH
        if not w.done:
            if r.startup_duration is not None:
                w.done = READY
                if w.start + r.startup_duration >= horizon:
                    self.startup[self.places.keys[w.place][:len(PLACE.observer_labels)]].observe(r.startup_duration)
                    self.profile_startup[w.profile].observe(r.startup_duration)
            elif r.end is not None:
                w.done = NOT_READY
                if r.end >= horizon:
                    places[place + NOT_READY_SLOT] += 1
                    profiles[profile + NOT_READY_SLOT] += 1
        for e in r.errors:
            kind = KIND_INDEX[e.kind]
            seen = w.errors.get((e.time, kind), 0) if w.errors is not None else 0
            if e.count <= seen:
                continue
            if w.errors is None:
                w.errors = {}
            w.errors[(e.time, kind)] = e.count
            if e.time >= horizon:
                places[place + ERRORS_SLOT + kind] += e.count - seen
                profiles[profile + ERRORS_SLOT + kind] += e.count - seen

    def _name(self, r: LaunchRecord) -> None:
        for kind, id_, name in (("datacenter", r.datacenter_id, r.datacenter_name),
                                ("delivery_region", r.delivery_region_id, r.delivery_region_name),
                                ("lab_host", r.lab_host_id, r.lab_host_name)):
            if id_ is None or not name:
                continue
            names = self.names[kind]
            key = str(id_)
            if key in names or len(names) < MAX_NAMES:
                names[key] = name

    # -- reading ----------------------------------------------------------------------------------

    def snapshot(self) -> LaunchCounts:
        """The same object until the state changes, so the collector caches its exposition by identity."""
        with self._lock:
            if self._snapshot is not None and self._snapshot[0] == self._version:
                return self._snapshot[1]
            counts = self._counts()
            self._snapshot = (self._version, counts)
            return counts

    def _counts(self) -> LaunchCounts:
        places, profiles = self.places, self.profiles
        place_order = sorted(range(len(places.keys)), key=places.keys.__getitem__)
        profile_order = sorted(range(len(profiles.keys)), key=profiles.keys.__getitem__)

        def per_kind(table: KeyTable, order: list[int]) -> dict[tuple[Key, str], int]:
            return {(table.keys[k], kind): table.counts[k * KEY_WIDTH + ERRORS_SLOT + i]
                    for k in order for i, kind in enumerate(ERROR_KINDS)}

        return LaunchCounts(
            startup={key: self.startup[key].copy() for key in sorted(self.startup)},
            profile_startup={profiles.keys[k]: self.profile_startup[k].copy() for k in profile_order},
            not_ready={places.keys[k]: places.counts[k * KEY_WIDTH + NOT_READY_SLOT] for k in place_order},
            profile_not_ready={profiles.keys[k]: profiles.counts[k * KEY_WIDTH + NOT_READY_SLOT]
                               for k in profile_order},
            errors=per_kind(places, place_order),
            profile_errors=per_kind(profiles, profile_order),
            integration=self.integration.snapshot(),
            invalid_total=self.invalid_total,
            names={kind: dict(names) for kind, names in self.names.items()},
            last_success=self.last_success,
        )

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self.instances)

    # -- persistence ------------------------------------------------------------------------------

    def export(self) -> LaunchExport:
        with self._lock:
            places, profiles = self.places, self.profiles
            instances = [
                SavedWatched(i, w.start, w.end, list(places.keys[w.place]), list(profiles.keys[w.profile]), w.done,
                             [(t, ERROR_KINDS[kind], n) for (t, kind), n in sorted((w.errors or {}).items())])
                for i, w in self.instances.items()]
            return LaunchExport(
                self.horizon, self.launches_until, self.ended_until, list(self.bounds or ()), self.last_success,
                self.invalid_total, instances, _saved_counts(places), _saved_counts(profiles),
                [SavedStartup(list(k), h.saved_counts(), h.total) for k, h in self.startup.items()],
                [SavedStartup(list(profiles.keys[k]), s.saved_counts(), s.total)
                 for k, s in enumerate(self.profile_startup)],
                self.integration.export(), {kind: dict(names) for kind, names in self.names.items()})

    @classmethod
    def restore(cls, saved: LaunchExport, empty: LaunchState) -> LaunchState:
        """A LaunchState holding what export() gave, with the limits of `empty`. Raises RestoreError if it
        does not fit this version."""
        state = cls(empty.places.cap, empty.profiles.cap, empty.integration.cap, empty.grace_seconds,
                    empty.max_running_seconds)
        state.horizon, state.launches_until, state.ended_until = saved.horizon, saved.launches_until, saved.ended_until
        if saved.bounds:
            if len(saved.bounds) != 4:
                raise RestoreError("the launch bounds are not four times")
            state.bounds = (saved.bounds[0], saved.bounds[1], saved.bounds[2], saved.bounds[3])
        state.last_success, state.invalid_total = saved.last_success, saved.invalid_total
        for table, rows in ((state.places, saved.places), (state.profiles, saved.profiles)):
            for row in rows:
                base = table.restore_key(row.key) * KEY_WIDTH
                table.counts[base + NOT_READY_SLOT] = row.not_ready
                for kind, n in row.errors.items():
                    if kind in KIND_INDEX:  # a kind this version does not know: left out, as a bad value
                        table.counts[base + ERRORS_SLOT + KIND_INDEX[kind]] = n
        for observed in saved.startup:
            if len(observed.key) != len(PLACE.observer_labels):
                raise RestoreError("a start-up histogram's key is not a datacenter and a region")
            hist = Histogram(STARTUP_BUCKETS)
            hist.restore(observed.counts, observed.total)
            state.startup[tuple(observed.key)] = hist
        profile_startup: dict[int, Summary] = {}
        for observed in saved.profile_startup:
            summary = Summary()
            summary.restore(observed.counts, observed.total)
            profile_startup[state.profiles.restore_key(observed.key)] = summary
        for item in saved.instances:
            place, profile = state.places.restore_key(item.place), state.profiles.restore_key(item.profile)
            errors = {(t, KIND_INDEX[kind]): n for t, kind, n in item.errors if kind in KIND_INDEX}
            state.instances[item.id] = Watched(item.start, item.end, place, profile, item.done & (READY | NOT_READY),
                                               errors or None)
        state.profile_startup = [profile_startup.get(k, Summary()) for k in range(len(state.profiles.keys))]
        for key in state.places.keys:
            state.startup.setdefault(key[:len(PLACE.observer_labels)], Histogram(STARTUP_BUCKETS))
        state.integration.restore(saved.integration)
        for kind in state.names:
            state.names[kind].update(list(saved.names.get(kind, {}).items())[:MAX_NAMES])
        return state


def _saved_counts(table: KeyTable) -> list[SavedKeyCounts]:
    return [SavedKeyCounts(list(key), table.counts[k * KEY_WIDTH + NOT_READY_SLOT],
                           {kind: n for i, kind in enumerate(ERROR_KINDS)
                            if (n := table.counts[k * KEY_WIDTH + ERRORS_SLOT + i])})
            for k, key in enumerate(table.keys)]


@dataclass(frozen=True)
class LaunchSettings:
    """The launch collector's settings (--skillable.launch-*), as the poller takes them."""

    interval: float = 300.0  # seconds between launch polls, at least
    page_size: int = 100
    grace_minutes: int = 15
    timeout: float = 60.0  # one launch poll's deadline, every page of both questions
    max_api_consumers: int = DEFAULT_MAX_API_CONSUMERS
