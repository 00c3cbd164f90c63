"""A simulated Skillable Lab API on loopback, fed by a deterministic generator of lab traffic.

`skillable-exporter --demo` starts it so a new user sees real metrics with no
account; `python3 -m exporter.demo` serves it alone. The benchmark's simulator
(bench/simulator.py) is this one with a movable clock and hooks of its own.
It speaks real HTTP, so the exporter's whole client path runs against it.

The traffic is a pure function of (seed, minute): a healthy fleet with two faults.

- The healthy fleet: every minute some labs start on 35 hosts in four datacenters and three
  delivery regions, each runs for a while and ends with a completion status from a realistic mix
  in which about 0.1% fail. With `rhythm` (the demo's), launches follow the working day and week:
  DEMO_LABS_PER_MINUTE at 14:00 UTC on weekdays, 55% of it at 02:00, 80% of that at weekends,
  so history (backfilled, or after a day of running) has shape.
- Lab host 117 (datacenter 3) is unhealthy: a steady UNHEALTHY_LABS_PER_HOUR land on it, day
  and night, and most end with Lab Creation Failed.
- Lab profile 5009 (FAILING_PROFILE, an Azure lab with a broken template) is launched
  FAILING_PROFILE_LABS_PER_HOUR, on healthy hosts, and mostly fails to create.

The faults are sized to fire exactly their own alerts with the shipped rules, at any hour: enough
labs for the host and profile alerts' minimum volumes with a wide margin, and few enough that the
fleet's error ratio stays within the lab-delivery SLO (below 1%, so no burn-rate alert) and no
datacenter's share reaches its threshold (tests/test_demo.py checks a week of traffic).

Every lab belongs to a lab profile of the demo's catalog (CATALOG_PROFILES, served at
/catalog): four series, 40 profiles, launches spread unevenly (a few popular labs, a long
tail), exams with their own pass marks, some profiles disabled and some never launched.

The demo API answers only its own key, DEMO_API_KEY (the exporter in --demo mode sends it; a
wrong one gets the answer Skillable gives, HTTP 200 with Status 0 and "Invalid API key"). It
listens on 127.0.0.1 at the exporter's port plus one (demo_api_address), so its URL, which the
state file records, is the same at every start: a state file, and backfill's, restore.

/labinstance/search (mode 5) shows the same labs with what launches add (launch_facts, a pure
function of the seed and the lab): how long each took to become ready (datacenter
SLOW_DATACENTER takes minutes where the others take about one), the API consumer that launched
it, and errors: profile LIFECYCLE_FAILING_PROFILE's life-cycle script fails in most of its labs,
and the webhook receiver of integration WEBHOOK_CONSUMER answers 404 on scoring (one error just
before the End, one just after). Labs that fail to create never become ready. Host names come with
the records but for datacenter UNNAMED_DATACENTER's hosts. The records carry
made-up credentials, names and e-mails (DEMO_SECRET_MARKERS), as real ones do, so tests can
prove none of it leaves the exporter.
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import sys
import threading
import time
from bisect import bisect, bisect_right
from dataclasses import dataclass
from itertools import accumulate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable, Sequence
from urllib.parse import parse_qs, urlsplit

import msgspec

# datacenter id -> (delivery region id, lab host ids)
DATACENTERS: dict[int, tuple[int, range]] = {
    1: (1, range(101, 110)),
    2: (1, range(110, 116)),
    3: (2, range(116, 128)),
    4: (3, range(128, 137)),
}
DELIVERY_REGIONS = {1: "North America", 2: "Europe", 3: "Asia Pacific"}
# Names the demo puts in the config, as a user would (the API has no list of datacenters or hosts).
DATACENTER_NAMES = {"1": "US West", "2": "US East", "3": "EU West", "4": "AP Southeast"}
LAB_HOST_NAMES = {
    str(host): f"{DATACENTER_NAMES[str(dc)].lower().replace(' ', '-')}-host-{host}"
    for dc, (_, hosts) in DATACENTERS.items() for host in hosts
}
UNHEALTHY_HOST = 117
UNHEALTHY_LABS_PER_HOUR = 25.0  # a steady stream on host 117, day and night
UNHEALTHY_FAILURE_SHARE = 0.6
DEMO_LABS_PER_MINUTE = 120.0  # the healthy fleet's peak launch rate (weekdays, 14:00 UTC)
# `--demo`'s account came into use this long before the demo started: the exporter's first poll
# (which asks for up to a day, for labs still running) then gets a window's worth, not a day's.
# With a state file to restore, the account has always existed (start_simulator(history_minutes=None)).
DEMO_HISTORY_MINUTES = 90
MAX_LAB_SECONDS = 8 * 3600
RUNNING_STATUS = 3  # a lab in progress reports Incomplete until it ends
DEMO_API_KEY = "demo-key-for-the-simulated-api"  # not a secret: printed at start, in docs/demo.md
DEMO_API_PORT_OFFSET = 1  # the demo API listens on the exporter's port plus this
DEMO_MAX_ACTIVE_LABS = 9000  # the demo account's active-lab limit, unless the config sets one

# (CompletionStatus, weight) for labs on healthy hosts: about 0.1% end in a failure status
# (10, 20, 30, 40). 70 is not a documented code: real APIs grow new codes, and the exporter
# must keep them as "unknown".
STATUS_MIX: tuple[tuple[int, float], ...] = (
    (4, 60.0), (3, 18.0), (1, 9.0), (2, 6.0), (10, 0.03), (20, 0.03), (30, 0.02), (40, 0.02),
    (50, 2.5), (60, 1.5), (70, 0.5),
)
STATUS_MIX_TOTAL = sum(w for _, w in STATUS_MIX)  # summed once: _weighted runs per lab
HOSTS: tuple[tuple[int, int, int], ...] = tuple(
    (host, dc, region) for dc, (region, hosts) in DATACENTERS.items() for host in hosts
)
HEALTHY_HOSTS = tuple(h for h in HOSTS if h[0] != UNHEALTHY_HOST)
_UNHEALTHY_PLACE = next(h for h in HOSTS if h[0] == UNHEALTHY_HOST)


def rhythm(minute: int) -> float:
    """The share of the peak launch rate in this minute (UTC): over the day between 0.55 (02:00)
    and 1.0 (14:00), times 0.8 on Saturdays and Sundays."""
    seconds = minute * 60
    hour = seconds % 86400 / 3600
    day = 0.775 + 0.225 * math.cos(2 * math.pi * (hour - 14) / 24)
    return day * (0.8 if time.gmtime(seconds).tm_wday >= 5 else 1.0)


@dataclass(frozen=True, slots=True)
class DemoProfile:
    id: int
    name: str
    number: str
    series: int
    platform: int  # PlatformId: 2 Hyper-V, 3 ESX, 10 Azure, 11 AWS, 20 Docker
    minutes: int  # DurationMinutes: how long a lab may run
    weight: float  # share of launches (relative); 0 = never launched
    pass_mark: int | None = None  # exams only: ExamPassingScore out of 100
    enabled: bool = True


CATALOG_SERIES = {1: "AZ-104 Microsoft Azure Administrator", 2: "Security Operations",
                  3: "Kubernetes in Practice", 4: "Certification Exams"}
_LAB_NAMES = (
    (1, 10, "Manage Azure identities"), (1, 10, "Configure virtual networks"), (1, 10, "Deploy virtual machines"),
    (1, 10, "Manage storage accounts"), (1, 10, "Monitor with Azure Monitor"), (1, 10, "Back up virtual machines"),
    (1, 10, "Configure load balancing"), (1, 10, "Implement Azure Policy"), (1, 10, "Manage app services"),
    (1, 10, "Deploy ARM templates"), (2, 2, "Investigate a phishing incident"), (2, 2, "Harden Windows Server"),
    (2, 2, "Hunt with KQL"), (2, 3, "Segment a network with firewalls"), (2, 2, "Respond to ransomware"),
    (2, 11, "Secure AWS IAM"), (2, 2, "Analyse event logs"), (2, 3, "Configure a SIEM"),
    (3, 20, "Run your first container"), (3, 20, "Deploy a Kubernetes cluster"), (3, 20, "Configure Helm charts"),
    (3, 11, "Operate EKS"), (3, 10, "Operate AKS"), (3, 20, "Debug failing pods"), (3, 20, "Kubernetes networking"),
    (3, 20, "Service mesh basics"), (1, 10, "Governance lab (retired)"), (2, 2, "Legacy SOC lab (retired)"),
    (3, 20, "Docker Swarm (retired)"), (1, 10, "Preview: Azure Arc"), (2, 2, "Preview: Zero Trust"),
    (3, 20, "Preview: GitOps"), (1, 10, "Preview: Bicep"),
)
_EXAM_NAMES = (("AZ-104 practice exam", 70), ("AZ-104 performance exam", 75), ("Security analyst exam", 70),
               ("Kubernetes administrator exam", 66), ("Cloud fundamentals exam", 60), ("Incident response exam", 80),
               ("Container developer exam", 70))
FAILING_PROFILE = 5009  # "Deploy ARM templates": a broken template, most labs fail to create
FAILING_PROFILE_LABS_PER_HOUR = 25.0  # launched steadily (a course that runs around the clock)
FAILING_PROFILE_FAILURE_SHARE = 0.85


def _demo_catalog() -> tuple[DemoProfile, ...]:
    profiles: list[DemoProfile] = []
    for i, (series, platform, name) in enumerate(_LAB_NAMES):
        pid = 5000 + i
        retired, preview = "(retired)" in name, name.startswith("Preview:")
        # Zipf-like: the first labs of a course are launched most; previews never; one retired lab still is.
        weight = 0.0 if preview or (retired and pid != 5026) else 1.0 / (1 + i % 10) ** 1.2
        profiles.append(DemoProfile(pid, name, f" Module {i % 10 + 1}", series, platform,
                                    (60, 90, 120, 180, 240)[i % 5], weight, enabled=not retired))
    for j, (name, mark) in enumerate(_EXAM_NAMES):
        profiles.append(DemoProfile(5000 + len(_LAB_NAMES) + j, name, f"EX-{j + 1:02d}", 4, (10, 2, 20)[j % 3],
                                    120, 0.6 / (1 + j), pass_mark=mark))
    return tuple(profiles)


CATALOG_PROFILES = _demo_catalog()
_PROFILES = {p.id: p for p in CATALOG_PROFILES}
_LAUNCHED = tuple(p for p in CATALOG_PROFILES if p.weight > 0 and p.id != FAILING_PROFILE)  # 5009: its own stream
_CUMULATIVE = tuple(accumulate(p.weight for p in _LAUNCHED))


def _pick_profile(rng: random.Random) -> DemoProfile:
    return _LAUNCHED[min(bisect(_CUMULATIVE, rng.random() * _CUMULATIVE[-1]), len(_LAUNCHED) - 1)]


COUNTRIES = (("US", "Washington", "Seattle"), ("GB", "England", "London"), ("DE", "Hesse", "Frankfurt"),
             ("AU", "New South Wales", "Sydney"), ("CA", "Ontario", "Toronto"))


class Lab(msgspec.Struct, frozen=True, gc=False):
    """A msgspec Struct, not a dataclass: its __init__ and __hash__ are C (a frozen dataclass's
    __init__ sets each field through object.__setattr__, and launch_facts' cache hashes every lab),
    which made generating labs a third slower. Numbers only, so the GC need not track it."""

    instance_id: int
    profile_id: int
    start: int
    end: int  # when it ends (may lie in the future: then it is still running)
    status: int
    host: int
    datacenter: int
    region: int
    task_percent: int
    exam: bool
    exam_score: int | None
    user: int


class Traffic:
    """Deterministic lab traffic: the labs that start in minute m depend only on (seed, m).

    `labs_per_minute`: the healthy fleet's launches per minute, at its peak with `rhythm` (the
    demo's), else all the time (the benchmark's, whose timings must not depend on the hour)."""

    def __init__(self, labs_per_minute: float = 12.0, seed: int = 7, rhythm: bool = False) -> None:
        self.labs_per_minute = labs_per_minute
        self.seed = seed
        self.rhythm = rhythm
        self._cache: dict[int, tuple[Lab, ...]] = {}
        self._by_end: dict[int, _EndOrder] = {}  # derived from _cache, per minute: see _end_order
        self._lock = threading.Lock()
        self.first_minute: int | None = None  # set: no lab starts before this minute (the account's history)

    def labs_starting_in(self, minute: int) -> tuple[Lab, ...]:
        if self.first_minute is not None and minute < self.first_minute:
            return ()
        with self._lock:
            labs = self._cache.get(minute)
        if labs is None:
            labs = self._generate(minute)
            with self._lock:
                self._cache[minute] = labs
        return labs

    @property
    def minutes_held(self) -> int:
        """How many minutes of generated labs are kept (bounded: see _forget_before)."""
        with self._lock:
            return len(self._cache)

    def _forget_before(self, minute: int) -> None:
        """Drop minutes no query can reach any more (older than 7 days plus the longest lab),
        so a demo that runs for weeks does not grow."""
        with self._lock:
            if len(self._cache) > 10080 + MAX_LAB_SECONDS // 60 + 60:
                for old in [m for m in self._cache if m < minute]:
                    del self._cache[old]
                    self._by_end.pop(old, None)

    def _generate(self, minute: int) -> tuple[Lab, ...]:
        """The healthy fleet's launches of the minute, then host 117's and profile 5009's."""
        rng = random.Random(f"{self.seed}:{minute}")
        rate = self.labs_per_minute * (rhythm(minute) if self.rhythm else 1.0)
        count = int(rate) + (1 if rng.random() < rate - int(rate) else 0)
        labs = [self._lab(rng, minute, i, HEALTHY_HOSTS[rng.randrange(len(HEALTHY_HOSTS))], _pick_profile(rng))
                for i in range(count)]
        if rng.random() < UNHEALTHY_LABS_PER_HOUR / 60:
            labs.append(self._lab(rng, minute, len(labs), _UNHEALTHY_PLACE, _pick_profile(rng)))
        if rng.random() < FAILING_PROFILE_LABS_PER_HOUR / 60:
            place = HEALTHY_HOSTS[rng.randrange(len(HEALTHY_HOSTS))]
            labs.append(self._lab(rng, minute, len(labs), place, _PROFILES[FAILING_PROFILE]))
        return tuple(labs)

    def _lab(self, rng: random.Random, minute: int, index: int, place: tuple[int, int, int],
             profile: DemoProfile) -> Lab:
        host, dc, region = place
        start = minute * 60 + rng.randrange(60)
        exam = profile.pass_mark is not None
        if host == UNHEALTHY_HOST and rng.random() < UNHEALTHY_FAILURE_SHARE:
            status, duration = 20, rng.randrange(20, 120)
        elif profile.id == FAILING_PROFILE and rng.random() < FAILING_PROFILE_FAILURE_SHARE:
            status, duration = 20, rng.randrange(15, 90)
        else:
            status = _weighted(rng, STATUS_MIX, STATUS_MIX_TOTAL)
            duration = min(_duration(rng, status), profile.minutes * 60)  # a lab expires at its time limit
        score = None
        if exam and status == 4 and profile.pass_mark is not None:
            # Centred above the pass mark: about four in five pass, steadily, so no exam alert fires.
            score = min(100, max(0, int(rng.gauss(profile.pass_mark + 9, 10))))
        return Lab(
            instance_id=minute * 1000 + index,
            profile_id=profile.id,
            start=start,
            end=start + duration,
            status=status,
            host=host,
            datacenter=dc,
            region=region,
            task_percent=100 if status == 4 and not exam else rng.randrange(0, 101),
            exam=exam,
            exam_score=score,
            user=rng.randrange(1, 5000),
        )

    def changed_within(self, now: float, minutes: int) -> list[tuple[Lab, bool]]:
        """(lab, ended) for every lab that started or ended in (now - minutes, now]."""
        self._forget_before(math.floor((now - 10080 * 60 - MAX_LAB_SECONDS) / 60))
        return self.changed_between(now - minutes * 60, now, now)

    def changed_between(self, since: float, until: float, now: float) -> list[tuple[Lab, bool]]:
        """(lab, ended as of `now`) for every lab that started or ended in (since, until], until <= now,
        in the order of their start minute and their place in it.

        A lab may end up to MAX_LAB_SECONDS after its start, so the labs of every minute from that long
        before `since` are looked at. In a minute that ends before `since`, no lab starts in the range, so
        only its labs that end in it count: they are found by bisecting the minute's labs ordered by their
        End (_end_order), not by reading all of them (a poll of 3 minutes read 8 hours of labs)."""
        until = min(until, now)
        first = math.floor((since - MAX_LAB_SECONDS) / 60)
        last = math.floor(until / 60)
        before = math.floor(since / 60)  # minutes before this one start at or before `since`
        # Minutes beyond LatestResults' reach (a backfill's) are made afresh, not cached: a 30-day
        # backfill of the in-process demo would otherwise keep every lab of the month.
        reach = (now - 10080 * 60 - MAX_LAB_SECONDS) / 60
        out: list[tuple[Lab, bool]] = []
        for minute in range(first, last + 1):
            cached = minute >= reach
            labs = self.labs_starting_in(minute) if cached else self._generate(minute)
            if minute < before:  # started at or before `since`: only an End in (since, until] counts
                ends, order = self._end_order(minute, labs) if cached else _end_order(labs)
                positions = sorted(order[bisect_right(ends, since):bisect_right(ends, until)])
                out += [(labs[i], True) for i in positions]  # End <= until <= now: ended
                continue
            for lab in labs:
                if lab.start > now:
                    continue
                ended = lab.end <= now
                if since < lab.start <= until or (ended and since < lab.end <= until):
                    out.append((lab, ended))
        return out

    def _end_order(self, minute: int, labs: tuple[Lab, ...]) -> _EndOrder:
        """_end_order(labs) of a cached minute, made once."""
        with self._lock:
            found = self._by_end.get(minute)
        if found is None:
            found = _end_order(labs)
            with self._lock:
                if minute in self._cache:  # not forgotten meanwhile
                    self._by_end[minute] = found
        return found


_EndOrder = tuple[list[int], list[int]]


def _end_order(labs: Sequence[Lab]) -> _EndOrder:
    """The labs' Ends in ascending order, and the place in `labs` of each."""
    order = sorted(range(len(labs)), key=lambda i: labs[i].end)
    return [labs[i].end for i in order], order


def _weighted(rng: random.Random, table: tuple[tuple[int, float], ...], total: float) -> int:
    """A value of `table` drawn by its weight; `total` is the weights' sum (the caller's, summed once)."""
    pick = rng.random() * total
    for value, weight in table:
        pick -= weight
        if pick < 0:
            return value
    return table[-1][0]


def _duration(rng: random.Random, status: int) -> int:
    if status in (10, 20):
        return rng.randrange(15, 180)
    if status == 2:
        return rng.randrange(300, 1800)
    return int(min(MAX_LAB_SECONDS, max(120, rng.lognormvariate(math.log(2700), 0.7))))


_encoder = msgspec.json.Encoder()


def result_json(lab: Lab, ended: bool, now: float) -> bytes:
    """One LabResult as the real API sends it, personal fields included."""
    country, region, city = COUNTRIES[lab.user % len(COUNTRIES)]
    scored = ended and lab.exam_score is not None
    return _encoder.encode({
        "LabInstanceId": lab.instance_id,
        "LabProfileId": lab.profile_id,
        "Start": lab.start,
        "End": lab.end if ended else None,
        "LastActivity": (lab.end if ended else int(now)) - 1,
        "UserId": f"user-{lab.user}",
        "ClassId": f"class-{lab.user % 37}" if lab.user % 3 else None,
        "CompletionStatus": lab.status if ended else RUNNING_STATUS,
        "TotalRunTimeSeconds": (lab.end if ended else int(now)) - lab.start,
        "TaskCompletePercent": lab.task_percent if ended else lab.task_percent // 2,
        "IsExam": lab.exam,
        "ExamPassed": _passed(lab) if scored else None,
        "ExamScore": lab.exam_score if scored else None,
        "ExamMaxPossibleScore": 100 if scored else None,
        "ExamPassingScore": _PASS_MARKS[lab.profile_id] if scored else None,
        "IpAddress": f"198.51.100.{lab.user % 250 + 1}",
        "Country": country,
        "Region": region,
        "City": city,
        "Latitude": 47.6,
        "Longitude": -122.3,
        "LabHostId": lab.host,
        "DatacenterId": lab.datacenter,
        "DeliveryRegionId": lab.region,
    })


_PASS_MARKS = {p.id: p.pass_mark for p in CATALOG_PROFILES}


def _passed(lab: Lab) -> bool | None:
    """Whether a scored lab passed, by its profile's pass mark; None if it has no score or no mark."""
    mark = _PASS_MARKS.get(lab.profile_id)
    return None if lab.exam_score is None or mark is None else lab.exam_score >= mark
_PLATFORM_CLOUD = {10: 10, 11: 11}  # CloudPlatformId for cloud-slice labs


def catalog_body() -> bytes:
    """/catalog?includeAll=1 as the API sends it (the fields of the OpenAPI example, HTML included)."""
    series = [{"Id": sid, "Name": name, "Description": f"<p>{name}</p>", "OrganizationId": "11",
               "OrganizationName": "Demo Learning", "NumTrainingDays": 30, "AllowAssignments": True,
               "AllowAssignmentsUntil": None, "LastModified": None, "LastModifiedBy": None,
               "Created": 1689505754000, "CreatedBy": "demo", "Price": 0.0} for sid, name in CATALOG_SERIES.items()]
    profiles = [{
        "Id": p.id, "Name": p.name, "Number": p.number, "Description": f"{p.name}.", "SeriesId": p.series,
        "OrganizationId": 11, "OrganizationName": "Demo Learning",
        "Objective": f"<p>In this lab you {p.name.lower()}.</p>",
        "Scenario": "<div>You are the new administrator at Contoso.</div>", "DurationMinutes": p.minutes,
        "ExpectedDurationMinutes": p.minutes // 2, "PlatformId": p.platform,
        "CloudPlatformId": _PLATFORM_CLOUD.get(p.platform), "Enabled": p.enabled,
        "ReasonDisabled": None if p.enabled else "Retired", "DevelopmentStatusId": 10,
        "IsExam": p.pass_mark is not None, "Tags": ["demo"],
        "Created": "/Date(1534438041470)/", "LastModified": "/Date(1623367490010)/",
        "Ram": 4096, "UsesRdp": p.platform in (2, 3), "InstructionSets": [], "Skills": [],
    } for p in CATALOG_PROFILES]
    regions = [{"Id": k, "Name": v, "Description": None} for k, v in DELIVERY_REGIONS.items()]
    return _encoder.encode({"LabSeries": series, "LabProfiles": profiles, "DeliveryRegions": regions,
                            "Status": 1, "Error": None})


# -- /labinstance/search, mode 5: how labs start, and what breaks while they run ----------------

SLOW_DATACENTER = 2  # its labs take minutes to become ready
LIFECYCLE_FAILING_PROFILE = 5004  # "Monitor with Azure Monitor": its life-cycle script fails in most labs
LIFECYCLE_FAILURE_SHARE = 0.7
WEBHOOK_CONSUMER = "Fabrikam Academy"  # its webhook receiver answers 404 on scoring
CONSUMERS: tuple[tuple[str, float], ...] = (("Contoso LMS", 60.0), ("Partner Portal", 30.0), (WEBHOOK_CONSUMER, 10.0))
_CONSUMER_WEIGHTS = tuple(w for _, w in CONSUMERS)
NEVER_READY = (10, 20)  # storage provisioning and lab creation failures never become ready
# Its hosts come without a LabHostName (a partner's datacenter): dashboards show their ids, as for any
# host neither the config nor the API names.
UNNAMED_DATACENTER = 4
# Parts of the made-up personal data and credentials in every mode-5 record (concise_record).
DEMO_SECRET_MARKERS = ("Demo-Pa55w0rd-", "demo-cloud-secret-", "learner.", "@demo-mail.invalid", "Learnerson",
                       "demo-hook-token-")
_LIFECYCLE_MESSAGE = ("Configuration error encountered when executing life cycle action {action} script. Error: "
                      "unable to find machine to score against.")
_WEBHOOK_MESSAGE = ('Error calling API Consumer webhook {event} "{event}" at URL https://hooks.fabrikam.invalid/'
                    'skillable?token=demo-hook-token-{user}. Response status code: NotFound.')
_COMPLETION_NAMES = {1: "Cancelled", 2: "No Show", 3: "Incomplete", 4: "Complete", 10: "Storage Provisioning Failed",
                     20: "Lab Creation Failed", 30: "Resume Failed", 40: "Save Failed", 50: "Submitted For Grading",
                     60: "Grading In Progress"}


@dataclass(frozen=True, slots=True)
class LaunchFacts:
    """What /labinstance/search adds to a lab: seconds from its Start until it was ready (None: never; a lab
    that ends first was never ready), who launched it, and its errors (seconds after its Start, message)."""

    startup: int | None
    consumer: str
    errors: tuple[tuple[int, str], ...]


@functools.lru_cache(maxsize=65536)
def launch_facts(lab: Lab, seed: int = 7) -> LaunchFacts:
    """The launch facts of a lab: a pure function of the seed and the lab (its own random stream, so the
    LatestResults traffic is the same with or without them)."""
    rng = random.Random(f"{seed}:launch:{lab.instance_id}")
    if lab.status in NEVER_READY:
        startup = None
    elif lab.datacenter == SLOW_DATACENTER:
        startup = int(rng.uniform(240, 900))
    else:
        startup = int(min(600, rng.lognormvariate(math.log(55), 0.45)))
    if startup is not None and lab.start + startup > lab.end:
        startup = None  # ended (cancelled, say) before it was ready
    consumer = CONSUMERS[_pick(rng, _CONSUMER_WEIGHTS)][0]
    errors: list[tuple[int, str]] = []
    if lab.profile_id == LIFECYCLE_FAILING_PROFILE and rng.random() < LIFECYCLE_FAILURE_SHARE:
        errors.append((min(lab.end - lab.start, (startup or 30) + rng.randrange(5, 60)),
                       _LIFECYCLE_MESSAGE.format(action=3466)))
    if consumer == WEBHOOK_CONSUMER and startup is not None:
        duration = lab.end - lab.start
        errors.append((max(0, duration - rng.randrange(5, 30)),
                       _WEBHOOK_MESSAGE.format(event="Scoring", user=lab.user)))
        errors.append((duration + rng.randrange(1, 30), _WEBHOOK_MESSAGE.format(event="Scored", user=lab.user)))
    return LaunchFacts(startup, consumer, tuple(errors))


def _pick(rng: random.Random, weights: Sequence[float]) -> int:
    pick = rng.random() * sum(weights)
    for i, weight in enumerate(weights):
        pick -= weight
        if pick < 0:
            return i
    return len(weights) - 1


def concise_record(lab: Lab, now: float, seed: int = 7) -> dict[str, Any]:
    """A lab as mode 5 shows it at `now`: the LabResult's facts, its launch facts as far as they have
    happened, names, and the personal data and credentials real records carry (made up)."""
    facts = launch_facts(lab, seed)
    ended = lab.end <= now
    ready = facts.startup is not None and lab.start + facts.startup <= now
    dc_name = DATACENTER_NAMES[str(lab.datacenter)]
    return {
        "Id": lab.instance_id, "LabProfileId": lab.profile_id, "LabProfileName": _PROFILE_NAMES[lab.profile_id],
        "UserId": f"user-{lab.user}", "UserFirstName": "Demo", "UserLastName": f"Learnerson{lab.user}",
        "UserEmail": f"learner.{lab.user}@demo-mail.invalid", "ClassId": None, "ClassName": None,
        "Start": lab.start, "StartTime": f"/Date({lab.start * 1000})/",
        "End": lab.end if ended else None, "EndTime": f"/Date({lab.end * 1000})/" if ended else None,
        "State": "Off" if ended else ("Running" if ready else "Starting"),
        "CompletionStatus": _COMPLETION_NAMES.get(lab.status, "Unknown") if ended else "Incomplete",
        "LabHostId": lab.host, "LabHostName": LAB_HOST_NAMES[str(lab.host)] if lab.datacenter != UNNAMED_DATACENTER
        else None, "DatacenterId": lab.datacenter,
        "DatacenterName": dc_name, "DeliveryRegionId": lab.region, "DeliveryRegionName": DELIVERY_REGIONS[lab.region],
        "StartupDuration": facts.startup if ready else None,
        "Errors": [{"Message": message, "Time": lab.start + after, "TimeValue": f"/Date({(lab.start + after) * 1000})/"}
                   for after, message in facts.errors if lab.start + after <= now],
        "ErrorCount": str(sum(1 for after, _ in facts.errors if lab.start + after <= now)),
        "ApiConsumerName": facts.consumer,
        "VirtualMachineCredentials": [{"Id": 907, "Name": "Windows Server", "Username": "Administrator",
                                       "Password": f"Demo-Pa55w0rd-{lab.user}"}],
        "CloudCredentials": [{"Name": "Azure subscription", "UserName": f"learner.{lab.user}@demo-mail.invalid",
                              "Password": f"demo-cloud-secret-{lab.user}"}],
        "Notes": [], "Sessions": [{"Start": lab.start, "End": lab.end if ended else None}],
        "DetailsUrl": f"https://labs.demo.invalid/LabInstance/{lab.instance_id}", "InstructorName": "",
        "TaskCompletePercent": lab.task_percent if ended else lab.task_percent // 2,
    }


def search_body(traffic: Traffic, query: dict[str, list[str]], now: float, seed: int = 7) -> bytes:
    """/labinstance/search?mode=5: the labs started at or after `start` (by now; at most 7 days and the longest
    lab back), sorted (start, start desc, end, end desc: running labs, with no End, sort lowest) and paged.
    Sorted by start, a page is found minute by minute (the labs of a minute are generated, and kept, at
    once), so paging through days of labs costs no sort of them all."""
    def one(name: str, default: str) -> str:
        return query.get(name, [default])[0]

    try:
        mode, start = int(one("mode", "10")), int(one("start", "0"))
        size, index = int(one("pageSize", "100")), int(one("pageIndex", "0"))
    except ValueError:
        return _encoder.encode({"Status": 0, "Error": "invalid parameter"})
    if mode != 5 or not 1 <= size <= 1000 or index < 0:
        return _encoder.encode({"Status": 0, "Error": "the demo serves mode 5, pages of 1 to 1000"})
    start = max(start, int(now) - 10080 * 60 - MAX_LAB_SECONDS)
    sort = one("sort", "start desc").strip().lower()
    minutes = range(math.floor(start / 60), math.floor(now / 60) + 1)

    def started(minute: int) -> list[Lab]:
        return sorted((lab for lab in traffic.labs_starting_in(minute) if start <= lab.start <= now),
                      key=lambda lab: (lab.start, lab.instance_id))

    page: list[Lab] = []
    if sort == "start":
        total, skip = 0, index * size
        for minute in minutes:
            generated = traffic.labs_starting_in(minute)
            if total + len(generated) > skip and len(page) < size:  # this minute may hold part of the page
                chosen = started(minute)
                page += chosen[max(0, skip - total):][:size - len(page)]
                total += len(chosen)
            else:
                total += sum(1 for lab in generated if start <= lab.start <= now)
    else:
        ordered = _sorted_labs(traffic, start, now, sort, minutes, started)
        total, page = len(ordered), ordered[index * size:(index + 1) * size]
    return _encoder.encode({"TotalResults": total, "TotalPages": -(-total // size),
                            "Results": [concise_record(lab, now, seed) for lab in page], "Status": 1, "Error": None})


_SORTED: dict[tuple[int, int, str, int], list[Lab]] = {}  # the last sort, reused by the next pages (see below)
_SORTED_LOCK = threading.Lock()


def _sorted_labs(traffic: Traffic, start: int, now: float, sort: str, minutes: range,
                 started: Callable[[int], list[Lab]]) -> list[Lab]:
    """The labs of a search sorted otherwise than by start: sorted once, and the same list given to the pages
    asked within 10 s with the same start (a poll asks them one after the other), as an API a little behind."""
    key = (id(traffic), start, sort, int(now) // 10)
    with _SORTED_LOCK:
        cached = _SORTED.get(key)
    if cached is not None:
        return cached
    labs = [lab for minute in minutes for lab in started(minute)]
    if sort.startswith("end"):
        labs.sort(key=lambda lab: (lab.end if lab.end <= now else -1, lab.instance_id), reverse=sort.endswith("desc"))
    elif sort.endswith("desc"):
        labs.reverse()
    with _SORTED_LOCK:
        _SORTED.clear()
        _SORTED[key] = labs
    return labs


_PROFILE_NAMES = {p.id: p.name for p in CATALOG_PROFILES}


def latest_results_body(traffic: Traffic, now: float, minutes: int) -> bytes:
    parts = [result_json(lab, ended, now) for lab, ended in traffic.changed_within(now, minutes)]
    return b'{"Results":[' + b",".join(parts) + b'],"Status":1,"Error":null}'


class SimulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], traffic: Traffic, clock: Callable[[], float] = time.time,
        handler: type[BaseHTTPRequestHandler] | None = None, history_minutes: int | None = None,
        api_key: str | None = None,
    ) -> None:
        """`api_key`: the only key answered (None: any non-empty key, as the benchmark needs)."""
        self.traffic = traffic
        self.clock = clock
        self.api_key = api_key
        if history_minutes is not None:  # no lab started longer ago than that before the start
            traffic.first_minute = math.floor(clock() / 60) - history_minutes
        super().__init__(address, handler or SimulatorHandler)

    def latest_results(self, now: float, minutes: int) -> bytes:
        return latest_results_body(self.traffic, now, minutes)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{port}"


class SimulatorHandler(BaseHTTPRequestHandler):
    server: SimulatorServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no delayed-ACK stall between headers and body (see server.py)

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        endpoint = url.path.rstrip("/").rsplit("/", 1)[-1].lower()
        key = self.headers.get("api_key")
        if not key:
            self._json({"Status": 0, "Error": "Missing api_key header"})
            return
        if self.server.api_key is not None and key != self.server.api_key:
            self._json({"Status": 0, "Error": "Invalid API key"})  # as Skillable answers: HTTP 200, Status 0
            return
        now = self.server.clock()
        if endpoint == "latestresults":
            try:
                minutes = int(parse_qs(url.query).get("minutes", [""])[0])
            except ValueError:
                minutes = -1
            if not 0 < minutes <= 10080:
                self._json({"Results": None, "Status": 0, "Error": "minutes must be between 1 and 10080"})
                return
            self._send(self.server.latest_results(now, minutes), endpoint)
        elif endpoint == "results":
            self._send(self._results(parse_qs(url.query), now), endpoint)
        elif endpoint == "deliveryregions":
            regions = [{"Id": k, "Name": v, "Description": None} for k, v in DELIVERY_REGIONS.items()]
            self._json({"DeliveryRegions": regions, "Status": 1, "Error": None}, endpoint)
        elif endpoint == "catalog":
            self._send(catalog_body(), endpoint)
        elif endpoint == "search" and url.path.rstrip("/").lower().endswith("labinstance/search"):
            self._send(search_body(self.server.traffic, parse_qs(url.query), now, self.server.traffic.seed), endpoint)
        elif endpoint == "stats":
            # Every lab started and not ended (the longest runs MAX_LAB_SECONDS), as the exporter's
            # sum(skillable_lab_instances_running) counts them from its first poll.
            minutes = MAX_LAB_SECONDS // 60 + 1
            running = sum(1 for _, ended in self.server.traffic.changed_within(now, minutes) if not ended)
            self._json({"NumActive": running, "NumSaved": running // 7, "Status": 1, "Error": None}, endpoint)
        else:
            self.send_error(404)

    def _results(self, query: dict[str, list[str]], now: float) -> bytes:
        """/Results?start=&end= (epoch seconds, both included, at most 7 days apart), as the API documents it."""
        try:
            start, end = int(query.get("start", [""])[0]), int(query.get("end", [""])[0])
        except ValueError:
            return _encoder.encode({"Results": None, "Status": 0, "Error": "start and end are required"})
        if not 0 <= end - start <= 7 * 86400:
            return _encoder.encode({"Results": None, "Status": 0, "Error": "Timeframe cannot exceed 7 days"})
        labs = self.server.traffic.changed_between(start - 1, end, now)
        return b'{"Results":[' + b",".join(result_json(lab, ended, now) for lab, ended in labs) \
            + b'],"Status":1,"Error":null}'

    def _json(self, payload: dict[str, Any], endpoint: str = "error") -> None:
        self._send(_encoder.encode(payload), endpoint)

    def _send(self, body: bytes, endpoint: str) -> None:
        """Answer `body` (JSON) for `endpoint`, the API endpoint it answers ("error" for a refusal)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def start_simulator(
    host: str = "127.0.0.1", port: int = 0, labs_per_minute: float = DEMO_LABS_PER_MINUTE, seed: int = 7,
    clock: Callable[[], float] = time.time, history_minutes: int | None = DEMO_HISTORY_MINUTES,
    api_key: str | None = DEMO_API_KEY, rhythm: bool = True,
) -> SimulatorServer:
    """Start the simulator in a background thread; stop it with .shutdown() and .server_close().
    `history_minutes`: how long before now the simulated account came into use (None: always).
    Raises OSError when the address is taken."""
    traffic = Traffic(labs_per_minute, seed, rhythm=rhythm)
    server = SimulatorServer((host, port), traffic, clock, history_minutes=history_minutes, api_key=api_key)
    threading.Thread(target=server.serve_forever, name="skillable-simulator", daemon=True).start()
    return server


def demo_api_address(listen_addresses: Sequence[str]) -> tuple[str, int]:
    """Where the demo API listens: 127.0.0.1 at the exporter's (first) port plus one, 10181 by
    default, so its URL, which the state file records, is the same at every start."""
    port = 10180
    if listen_addresses:
        port = int(listen_addresses[0].rpartition(":")[2]) or port
    return "127.0.0.1", port + DEMO_API_PORT_OFFSET


def start_demo_api(listen_addresses: Sequence[str], history_minutes: int | None = DEMO_HISTORY_MINUTES
                   ) -> SimulatorServer:
    """The demo's simulated API at demo_api_address(), answering DEMO_API_KEY only. Raises
    OSError (with the address in its message) when the address is taken."""
    host, port = demo_api_address(listen_addresses)
    try:
        return start_simulator(host, port, history_minutes=history_minutes)
    except OSError as exc:
        raise OSError(exc.errno, f"the demo API's address {host}:{port} (the exporter's port plus one) "
                                 f"cannot be used: {exc.strerror}") from exc


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The simulator's command line (the benchmark's simulator adds its own flags to it)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks a free one)")
    parser.add_argument("--labs-per-minute", type=float, default=DEMO_LABS_PER_MINUTE)
    parser.add_argument("--seed", type=int, default=7)
    return parser


def listen_address(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host, int(port)


def serve(server: SimulatorServer) -> int:
    """Print the address (whoever started the process reads it from there), then serve until interrupted."""
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argument_parser("Simulated Skillable Lab API (LatestResults, Results, stats, deliveryregions, catalog, "
                           f"labinstance/search) answering the key {DEMO_API_KEY} only").parse_args(argv)
    server = SimulatorServer(listen_address(args.listen), Traffic(args.labs_per_minute, args.seed, rhythm=True),
                             api_key=DEMO_API_KEY)
    print(f"api_key: {DEMO_API_KEY}", file=sys.stderr, flush=True)
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
