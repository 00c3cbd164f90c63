"""The launch memory (exporter/launches.py): its rules one by one, the UAT records, and a differential test
that drives it with a simulated /labinstance/search (paged, overlapping, either reading of `start`, pages
that fail, restarts through the state file's encoding) and compares its counts with ReferenceLaunches: the
rules written plainly over the labs' whole truth."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.launches import (
    ENDINGS_SORT,
    INTEGRATION,
    LAUNCHES_SORT,
    LaunchExport,
    LaunchState,
    Plan,
    ask,
    questions,
)
from exporter.model import LabResult, decode_search_page, error_kind
from exporter.state import FleetState

from .harness import examples

UAT = Path(__file__).parent / "fixtures" / "labinstance_search__uat_mode5_redacted.json"  # the vendor's, as published
ROOT = Path(__file__).resolve().parent.parent
T0 = 1_800_000_000
WINDOW = 3600
OVERLAP = 120
GRACE = 900
MAX_RUNNING = 86400
LIFECYCLE = "Configuration error encountered when executing life cycle action 3466 script."
WEBHOOK = 'Error calling API Consumer webhook Scoring "Scoring" at URL https://h.example.invalid/?token=t0k3n.'
OTHER = "Something else went wrong."


@dataclass
class SimLab:
    id: int
    start: int
    end: int  # may lie in the future: then it runs
    startup: int | None  # ready this long after its Start (if before its end)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (seconds after Start, message)
    consumer: str | None = None
    place: tuple[int, int, int] = (1, 1, 10)  # datacenter, region, host
    profile: int = 500

    def ready_at(self) -> int | None:
        if self.startup is None or self.start + self.startup > self.end:
            return None
        return self.start + self.startup


def concise(lab: SimLab, now: int) -> dict[str, Any] | None:
    """The lab as mode 5 shows it at `now`, with the kind of fields that must never be read."""
    if lab.start > now:
        return None
    ready = lab.ready_at()
    dc, region, host = lab.place
    return {
        "Id": lab.id, "LabProfileId": lab.profile, "Start": lab.start, "End": lab.end if lab.end <= now else None,
        "StartupDuration": lab.startup if ready is not None and ready <= now else None,
        "Errors": [{"Time": lab.start + after, "Message": m, "TimeValue": "/Date(0)/"}
                   for after, m in lab.errors if lab.start + after <= now],
        "ErrorCount": "0", "ApiConsumerName": lab.consumer, "LabHostId": host, "DatacenterId": dc,
        "DeliveryRegionId": region, "LabHostName": f"H{host}", "UserEmail": "someone@example.invalid",
        "VirtualMachineCredentials": [{"Username": "u", "Password": "p4ss"}],
    }


class SimSearch:
    """/labinstance/search over the labs at a time: `reading` "start" (Start >= start) or "active" (running, or
    ended at or after start); each page repeats `overlap` records of the next; `fail` fails that share of pages."""

    def __init__(self, labs: list[SimLab], reading: str, overlap: int, fail: float, rng: random.Random) -> None:
        self.labs, self.reading, self.overlap, self.fail, self.rng = labs, reading, overlap, fail, rng
        self.now = T0
        self.requests = 0

    def __call__(self, params: dict[str, Any]) -> Any:
        self.requests += 1
        if self.rng.random() < self.fail:
            raise ConnectionError("page failed")
        records = [c for lab in self.labs if (c := concise(lab, self.now)) is not None]
        start = int(params["start"])
        records = [r for r in records if (r["Start"] >= start if self.reading == "start"
                                          else r["End"] is None or r["End"] >= start)]
        if params["sort"] == ENDINGS_SORT:
            ended = sorted((r for r in records if r["End"] is not None), key=lambda r: (r["End"], r["Id"]),
                           reverse=True)
            records = ended + [r for r in records if r["End"] is None]
        else:
            assert params["sort"] == LAUNCHES_SORT
            records.sort(key=lambda r: (r["Start"], r["Id"]))
        size, index = int(params["pageSize"]), int(params["pageIndex"])
        body = {"Results": records[index * size:(index + 1) * size + self.overlap], "TotalResults": len(records),
                "TotalPages": -(-len(records) // size), "Status": 1, "Error": None}
        return decode_search_page(json.dumps(body).encode())


def reference(labs: list[SimLab], horizon: int, now: int) -> dict[str, Counter[Any]]:
    """ReferenceLaunches: the rules over the whole truth. A lab counts a launch if it started at or after the
    horizon; its start-up time if it was ready before its end, at or after the horizon; not ready if it
    ended, never ready, at or after the horizon; each distinct (time, message) of its errors dated at or
    after the horizon, by kind."""
    out: dict[str, Counter[Any]] = {k: Counter() for k in (
        "launches", "startup", "startup_sum", "profile_startup", "not_ready", "profile_not_ready", "errors",
        "profile_errors")}
    for lab in labs:
        if lab.start > now:
            continue
        dc, region, host = (str(v) for v in lab.place)
        profile = str(lab.profile)
        if lab.start >= horizon:
            out["launches"][lab.consumer or "unknown"] += 1
        ready = lab.ready_at()
        if ready is not None and ready <= now and ready >= horizon:
            out["startup"][(dc, region)] += 1
            out["startup_sum"][(dc, region)] += lab.startup  # type: ignore[operator]
            out["profile_startup"][profile] += 1
        elif ready is None and lab.end <= now and lab.end >= horizon:
            out["not_ready"][(dc, region, host)] += 1
            out["profile_not_ready"][profile] += 1
        for t, message in {(lab.start + after, m) for after, m in lab.errors}:
            if horizon <= t <= now:
                out["errors"][(dc, region, host, error_kind(message))] += 1
                out["profile_errors"][(profile, error_kind(message))] += 1
    return out


def counted(state: LaunchState) -> dict[str, Counter[Any]]:
    """The state's counts, in the reference's shape (zeros left out)."""
    snap = state.snapshot()
    nonzero = lambda d: Counter({k: v for k, v in d.items() if v})  # noqa: E731
    return {
        "launches": nonzero({k[0]: v for k, v in snap.integration.started.items()}),
        "startup": nonzero({k: h.count for k, h in snap.startup.items()}),
        "startup_sum": nonzero({k: h.total for k, h in snap.startup.items()}),
        "profile_startup": nonzero({k[0]: s.count for k, s in snap.profile_startup.items()}),
        "not_ready": nonzero(snap.not_ready),
        "profile_not_ready": nonzero({k[0]: v for k, v in snap.profile_not_ready.items()}),
        "errors": nonzero({(*k, kind): v for (k, kind), v in snap.errors.items()}),
        "profile_errors": nonzero({(k[0], kind): v for (k, kind), v in snap.profile_errors.items()}),
    }


def lab_result(lab: SimLab, now: int) -> LabResult:
    dc, region, host = lab.place
    ended = lab.end <= now
    return LabResult(lab_instance_id=lab.id, start=lab.start, end=lab.end if ended else None,
                     completion_status=4 if ended else 3, lab_host_id=host, datacenter_id=dc,
                     delivery_region_id=region, lab_profile_id=lab.profile)


class Exporter:
    """What the poller does, in process: LatestResults into a FleetState, and launch polls (plan, both
    questions, finish) into a LaunchState, which a restart encodes and decodes as the state file does."""

    def __init__(self, labs: list[SimLab], search: SimSearch, page_size: int) -> None:
        self.labs, self.search, self.page_size = labs, search, page_size
        self.fleet = FleetState()
        self.launch = LaunchState(grace_seconds=GRACE, max_running_seconds=MAX_RUNNING)
        self.last_lr: int | None = None

    def latest_results(self, now: int) -> None:
        since = now - MAX_RUNNING if self.last_lr is None else self.last_lr - OVERLAP
        changed = [lab_result(lab, now) for lab in self.labs
                   if lab.start <= now and (since < lab.start or since < lab.end <= now)]
        horizon = now - WINDOW if self.last_lr is None else min(now - WINDOW, self.last_lr - OVERLAP)
        self.fleet.apply(changed, horizon, seen_at=now)
        self.fleet.evict(now - WINDOW, now - MAX_RUNNING)
        self.last_lr = now

    def launch_poll(self, now: int) -> None:
        self.search.now = now
        plan = self.launch.plan(now, WINDOW, OVERLAP, self.fleet)
        done = []
        try:
            for q in questions(plan):
                _, complete = ask(self.launch, plan, q, self.search, self.page_size, lambda pages: True)
                done.append(complete)
        except ConnectionError:
            return  # counted by the poller; the checkpoints stay
        self.launch.finish(plan, *done)

    def restart(self) -> None:
        saved = msgspec.json.decode(msgspec.json.encode(self.launch.export()), type=LaunchExport)
        self.launch = LaunchState.restore(saved, LaunchState(grace_seconds=GRACE, max_running_seconds=MAX_RUNNING))


def make_labs(rng: random.Random, count: int) -> list[SimLab]:
    """Labs starting from two hours before the horizon to an hour after T0, running up to two hours; some
    never ready; errors during the run and up to the grace after the End; consumers, places and profiles."""
    labs = []
    for i in range(count):
        start = T0 - WINDOW - 2 * 3600 + rng.randrange(4 * 3600)
        length = rng.choice((40, 300, 1200, 3600, 7200)) + rng.randrange(60)
        end = start + length
        if end < T0 - WINDOW:  # ended before the horizon: nothing of it may be counted; keep the test exact
            end = T0 - WINDOW + rng.randrange(600)
        startup = None if rng.random() < 0.15 else rng.randrange(10, 400)
        errors = [(rng.randrange(0, end - start + GRACE - 60), rng.choice((LIFECYCLE, WEBHOOK, OTHER, OTHER + " 2")))
                  for _ in range(rng.choice((0, 0, 1, 2, 3)))]
        if errors and rng.random() < 0.3:
            errors.append(errors[0])  # an identical entry, counted once
        labs.append(SimLab(1000 + i, start, end, startup, errors, rng.choice((None, "LMS", "Portal", "")),
                           rng.choice(((1, 1, 10), (1, 1, 11), (2, 1, 20), (3, 2, 30))), rng.choice((500, 501, 502))))
    return labs


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), reading=st.sampled_from(["start", "active"]), overlap=st.integers(0, 3),
       page_size=st.sampled_from([3, 7, 50]), fail=st.sampled_from([0.0, 0.1]),
       restarts=st.integers(0, 3))
def test_counts_equal_the_reference_whatever_the_pages_failures_and_restarts(
        seed: int, reading: str, overlap: int, page_size: int, fail: float, restarts: int) -> None:
    rng = random.Random(seed)
    labs = make_labs(rng, 80)
    search = SimSearch(labs, reading, overlap, fail, rng)
    exporter = Exporter(labs, search, page_size)
    restart_at = set(rng.sample(range(1, 60), restarts))
    now = T0
    step = 0
    last_lab = max(max(lab.end, lab.start + max((a for a, _ in lab.errors), default=0)) for lab in labs)
    while now < last_lab + GRACE + 3 * 300 or step < 3:
        exporter.latest_results(now)
        exporter.launch_poll(now)
        if step in restart_at:
            exporter.restart()
        now += rng.choice((60, 180, 300))
        step += 1
    search.fail = 0.0
    for _ in range(4):  # a few good polls after the last failure
        exporter.latest_results(now)
        exporter.launch_poll(now)
        now += 300
    assert counted(exporter.launch) == reference(labs, T0 - WINDOW, now)
    # Memory is bounded: every lab has ended long ago, so nothing is remembered but the last polls' labs.
    assert exporter.launch.watched <= len([lab for lab in labs if lab.start >= now - 3 * 300 - 4 * OVERLAP])


# -- the rules one by one -------------------------------------------------------------------------


def page(*records: dict[str, Any]) -> Any:
    return decode_search_page(json.dumps({"Results": list(records), "Status": 1}).encode())


def record(i: int, start: int, end: int | None = None, startup: float | None = None,
           errors: tuple[tuple[int, str], ...] = (), consumer: str | None = None, host: int = 10,
           profile: int = 500) -> dict[str, Any]:
    return {"Id": i, "Start": start, "End": end, "StartupDuration": startup, "ApiConsumerName": consumer,
            "Errors": [{"Time": t, "Message": m} for t, m in errors], "LabHostId": host, "DatacenterId": 1,
            "DeliveryRegionId": 2, "LabProfileId": profile}


def fresh() -> tuple[LaunchState, Plan]:
    state = LaunchState(grace_seconds=GRACE)
    return state, state.plan(T0, WINDOW, OVERLAP)


def test_an_instance_is_counted_once_however_many_pages_and_polls_return_it() -> None:
    state, plan = fresh()
    r = record(1, T0 - 600, T0 - 60, startup=75, errors=((T0 - 500, LIFECYCLE), (T0 - 61, WEBHOOK)), consumer="LMS")
    for _ in range(3):
        state.apply(page(r, r).records, plan)
    plan = state.plan(T0 + 300, WINDOW, OVERLAP)
    state.apply(page(r).records, plan)
    c = counted(state)
    assert c["launches"] == {"LMS": 1} and c["startup"] == {("1", "2"): 1} and c["startup_sum"] == {("1", "2"): 75}
    assert c["errors"] == {("1", "2", "10", "lifecycle_action"): 1, ("1", "2", "10", "webhook"): 1}
    assert not c["not_ready"]


def test_ready_or_not_ready_never_both() -> None:
    state, plan = fresh()
    state.apply(page(record(1, T0 - 600, T0 - 500)).records, plan)  # ended, never ready
    state.apply(page(record(1, T0 - 600, T0 - 500, startup=50)).records, plan)  # a late StartupDuration
    state.apply(page(record(2, T0 - 600, None, startup=40)).records, plan)  # ready, running
    state.apply(page(record(2, T0 - 600, T0 - 100, startup=40)).records, plan)  # then ended: still ready
    c = counted(state)
    assert c["not_ready"] == {("1", "2", "10"): 1} and c["profile_not_ready"] == {"500": 1}
    assert c["startup"] == {("1", "2"): 1} and c["startup_sum"] == {("1", "2"): 40}


def test_errors_count_each_entry_once_including_after_the_end() -> None:
    state, plan = fresh()
    state.apply(page(record(1, T0 - 600, None, errors=((T0 - 550, LIFECYCLE),))).records, plan)
    # Later: the same entry, an identical one, another message at the same time, one after the End.
    later = ((T0 - 550, LIFECYCLE), (T0 - 550, LIFECYCLE), (T0 - 550, LIFECYCLE + " again"), (T0 - 99, WEBHOOK))
    state.apply(page(record(1, T0 - 600, T0 - 100, errors=later)).records, plan)
    state.apply(page(record(1, T0 - 600, T0 - 100, errors=later)).records, plan)
    assert counted(state)["errors"] == {("1", "2", "10", "lifecycle_action"): 2, ("1", "2", "10", "webhook"): 1}
    assert counted(state)["profile_errors"] == {("500", "lifecycle_action"): 2, ("500", "webhook"): 1}


def test_facts_before_the_horizon_are_remembered_never_counted() -> None:
    state, plan = fresh()
    assert plan.horizon == T0 - WINDOW
    old = record(1, T0 - WINDOW - 900, T0 - WINDOW + 60, startup=30,
                 errors=((T0 - WINDOW - 800, LIFECYCLE), (T0 - WINDOW + 61, WEBHOOK)), consumer="LMS")
    state.apply(page(old).records, plan)
    c = counted(state)
    assert not c["launches"] and not c["startup"] and not c["not_ready"]
    assert c["errors"] == {("1", "2", "10", "webhook"): 1}  # the one dated after the horizon


def test_every_key_has_every_kind_at_zero_and_the_consumer_is_cleaned_and_capped() -> None:
    state = LaunchState(max_api_consumers=2, grace_seconds=GRACE)
    plan = state.plan(T0, WINDOW, OVERLAP)
    names = ("  <b>LMS</b>\x07 ", None, "", "Portal", "Third")
    state.apply(page(*(record(i, T0 - 100 + i, consumer=n) for i, n in enumerate(names))).records, plan)
    snap = state.snapshot()
    assert snap.errors == {(("1", "2", "10"), kind): 0 for kind in ("lifecycle_action", "webhook", "other")}
    assert snap.not_ready == {("1", "2", "10"): 0} and snap.profile_not_ready == {("500",): 0}
    assert snap.startup[("1", "2")].count == 0 and snap.profile_startup[("500",)].count == 0
    assert {k[0]: v for k, v in snap.integration.started.items()} == {"LMS": 1, "unknown": 2, "other": 2}
    assert snap.integration.overflow_total == 2


def test_uat_records_the_vendor_published() -> None:
    """The 14 real records: 13 start-up times (39-181 s), one cancelled while starting (not ready), and 14
    error entries on 8 instances: 6 of life-cycle actions (two distinct messages at one time count two), 8 of
    webhooks, three of them dated after the lab's End and one at it."""
    records = decode_search_page(UAT.read_bytes()).records
    state = LaunchState(grace_seconds=GRACE)
    plan = state.plan(min(r.start for r in records) + WINDOW, WINDOW, OVERLAP)
    state.apply(records, Plan(plan.now, plan.horizon, plan.launches_from, plan.ended_after, plan.watched_from, 0))
    c = counted(state)
    assert c["startup"] == {("70", "1"): 13} and c["not_ready"] == {("70", "1", "13"): 1}
    assert c["startup_sum"] == {("70", "1"): sum(r.startup_duration or 0 for r in records)}
    assert 39 * 13 <= c["startup_sum"][("70", "1")] <= 181 * 13
    assert c["errors"] == {("70", "1", "13", "lifecycle_action"): 6, ("70", "1", "13", "webhook"): 8}
    assert sum(1 for r in records for e in r.errors if r.end is not None and e.time > r.end) == 3
    assert c["launches"] == {"unknown": 14}
    assert state.snapshot().names == {"datacenter": {"70": "ASH-UAT"}, "delivery_region": {"1": "US"},
                                      "lab_host": {"13": "ASH-UAT-HV01"}}


def test_the_bounds_never_move_back_and_forgotten_labs_are_not_taken_again() -> None:
    state, plan = fresh()
    r = record(1, T0 - 300, T0 - 200, startup=20, errors=((T0 - 250, OTHER),), consumer="LMS")
    state.apply(page(r).records, plan)
    state.finish(plan, True, True)
    later = state.plan(T0 + 3 * 3600, WINDOW, OVERLAP)  # asked again long after its End and the grace ...
    assert state.watched == 1  # ... but the ends since the last poll are still to be read
    state.finish(later, True, True)
    later = state.plan(T0 + 3 * 3600 + 300, WINDOW, OVERLAP)  # read: forgotten
    assert state.watched == 0
    assert later.launches_from >= plan.launches_from and later.ended_after >= plan.ended_after
    assert state.apply(page(r).records, later) == 0  # an API that returns it again: not taken
    back = state.plan(T0 - 3600, WINDOW, OVERLAP)  # the clock stepped back: the bounds stay
    assert (back.launches_from, back.ended_after, back.watched_from) == \
        (later.launches_from, later.ended_after, later.watched_from)
    assert counted(state)["launches"] == {"LMS": 1}


def test_the_export_restores_every_counter_and_what_was_counted() -> None:
    state, plan = fresh()
    state.apply(page(record(1, T0 - 600, None, startup=30, errors=((T0 - 590, WEBHOOK),), consumer="LMS"),
                     record(2, T0 - 500, T0 - 400, host=11)).records, plan, invalid=2)
    state.finish(plan, True, True)
    saved = msgspec.json.decode(msgspec.json.encode(state.export()), type=LaunchExport)
    restored = LaunchState.restore(saved, LaunchState(grace_seconds=GRACE))
    assert counted(restored) == counted(state)
    assert restored.snapshot().invalid_total == 2 and restored.snapshot().names == state.snapshot().names
    again = restored.plan(T0 + 300, WINDOW, OVERLAP)
    restored.apply(page(record(1, T0 - 600, T0, startup=30, errors=((T0 - 590, WEBHOOK),), consumer="LMS")).records,
                   again)
    assert counted(restored) == counted(state)  # nothing counted twice after the restart


def test_questions_ask_no_end_and_b_stops_once_its_ends_pass_the_cutoff() -> None:
    state, plan = fresh()
    a, b = questions(plan)
    assert (a.sort, b.sort) == ("start", "end desc") and b.stop_before == plan.ended_after
    asked: list[dict[str, Any]] = []
    ends = [plan.ended_after + 100 - 10 * i for i in range(30)]  # descending, crossing the cutoff at the 11th

    def fetch(params: dict[str, Any]) -> Any:
        asked.append(params)
        i = int(params["pageIndex"])
        return page(*(record(100 + j, e - 50, e) for j, e in enumerate(ends[i * 5:(i + 1) * 5])))

    pages, complete = ask(state, plan, b, fetch, 5, lambda n: True)
    assert complete and pages == 3 and all("end" not in p for p in asked)
    # Out of order (the API ignored `sort`): every page is read.
    ends.reverse()
    asked.clear()
    pages, complete = ask(state, plan, b, fetch, 5, lambda n: True)
    assert complete and pages == 7  # six full pages, then an empty one (these answers have no TotalPages)


def test_integration_is_a_dimension_declared_as_the_states() -> None:
    from exporter.families import launch_families

    families = {f.name: f for f in launch_families()}
    started = families["skillable_lab_integration_instances_started_total"]
    assert started.dimension is INTEGRATION and started.labels == ("api_consumer",) and started.type == "counter"


@pytest.mark.parametrize("message,kind", [
    (LIFECYCLE, "lifecycle_action"), ("Lifecycle action 12 failed", "lifecycle_action"), (WEBHOOK, "webhook"),
    ("Error calling API Consumer WebHook", "webhook"), (OTHER, "other"), ("", "other"), (None, "other")])
def test_error_kinds(message: str | None, kind: str) -> None:
    assert error_kind(message) == kind


def test_a_lab_still_starting_holds_question_a_at_its_start_for_half_an_hour() -> None:
    state, plan = fresh()
    state.apply(page(record(1, T0 - 200), record(2, T0 - 100, startup=20)).records, plan)
    state.finish(plan, True, True)
    # Lab 1 has no StartupDuration yet: question A keeps asking from its Start, so its start-up time shows as
    # soon as it has one; lab 2 is ready and holds nothing.
    assert state.plan(T0 + 300, WINDOW, OVERLAP).launches_from == T0 - 200 - OVERLAP
    later = state.plan(T0 - 200 + 1801, WINDOW, OVERLAP)  # after half an hour: left to question B, at its end
    assert later.launches_from == T0 - OVERLAP
