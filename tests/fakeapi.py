"""An independent fake of Skillable's Lab API for the tests: real HTTP on loopback.

It shares no code with exporter/ (not even the simulator), so counts the
exporter reports can be checked against the fake's own truth. Tests add lab
records as plain dicts, move the fake's clock, and queue faults that the next
requests play instead of a normal answer.

The fault helpers at the end of this file (http_status, retry_after, hang,
trickle, reset, truncated_json, html_page, ...) build such faults; `blackhole()`
makes the whole server stop answering TCP connects, for connect timeouts.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
import socket
import ssl
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

Fault = Callable[["_Handler"], None]


def lab(
    instance_id: int,
    start: int,
    end: int | None = None,
    status: int = 3,
    host: int | None = 49,
    datacenter: int | None = 3,
    region: int | None = 2,
    **extra: Any,
) -> dict[str, Any]:
    """A LabResult as the vendor documents it, with personal fields filled in."""
    record: dict[str, Any] = {
        "LabInstanceId": instance_id,
        "LabProfileId": 5522,
        "Start": start,
        "End": end,
        "LastActivity": end if end is not None else start,
        "UserId": "user-secret-555",
        "ClassId": "class-77",
        "CompletionStatus": status,
        "TotalRunTimeSeconds": (end - start) if end is not None else 0,
        "TaskCompletePercent": 50,
        "IsExam": False,
        "ExamPassed": None,
        "ExamScore": None,
        "ExamMaxPossibleScore": None,
        "ExamPassingScore": None,
        "IpAddress": "203.0.113.9",
        "Country": "US",
        "Region": "Washington",
        "City": "Seattle",
        "Latitude": 47.6,
        "Longitude": -122.3,
        "LabHostId": host,
        "DatacenterId": datacenter,
        "DeliveryRegionId": region,
    }
    record.update(extra)
    return record


# What the fake puts in its /labinstance/search records that must never leave the exporter: a VM
# password, cloud credentials, user names, an e-mail, a webhook token (in an error's URL), a note.
SECRETS: tuple[str, ...] = (
    "Fake-Pa55w0rd-7731", "AKIAFAKEACCESSKEY0001", "fake-cloud-secret-9f8e7d", "Grace-Fakename", "Hopper-Fakeson",
    "grace.fakename@example.invalid", "hook-token-fake-4412", "instructor-fake-name", "student-note-fake-text",
    "user-secret-555",
)
# The three kinds of error messages, as the UAT records word them (the first two) and one other.
LIFECYCLE_ERROR = ("Configuration error encountered when executing life cycle action 3466 script. "
                   "Error: unable to find machine to score against.")
WEBHOOK_ERROR = ('Error calling API Consumer webhook Scoring "Scoring" at URL https://hooks.example.invalid/'
                 'receive?token=hook-token-fake-4412. Response status code: NotFound.')
OTHER_ERROR = "The lab could not connect to the remote console (student-note-fake-text)."
COMPLETION_NAMES = {1: "Cancelled", 2: "No Show", 3: "Incomplete", 4: "Complete", 10: "Storage Provisioning Failed",
                    20: "Lab Creation Failed", 30: "Resume Failed", 40: "Save Failed", 50: "Submitted For Grading",
                    60: "Grading In Progress"}


def catalog_profile(profile_id: int, name: str, series_id: int | None = 1, **extra: Any) -> dict[str, Any]:
    """A /catalog LabProfiles[] entry as the OpenAPI example shows it: all 42 fields, string
    timestamps in .NET /Date()/ form, a Number with a leading space, HTML objective and scenario."""
    record: dict[str, Any] = {
        "Id": profile_id, "Name": name, "Number": f" Module {profile_id % 10}", "Description": "A lab",
        "Products": [{"Id": 3, "Name": "Azure"}], "SeriesId": series_id, "OrganizationId": 11,
        "OrganizationName": "Contoso", "Objective": "<p>Learn <b>things</b></p>",
        "Scenario": "<div>You are an admin</div>", "DurationMinutes": 120, "ExpectedDurationMinutes": 60,
        "ResourceUnits": 1, "PlatformId": 2, "SharedClassEnvironmentRoleId": 0,
        "SharedClassEnvironmentLabProfileId": None, "UsesRdp": True, "Ram": 4096, "Enabled": True,
        "ReasonDisabled": None, "HasIntegratedContent": True, "DevelopmentStatusId": 10,
        "RequiresBrowserPlugin": False, "RequiresNestedVirtualization": False, "NumPublicIpAddresses": 0,
        "IsExam": False, "PremiumPrice": 0.0, "BasicPrice": 0.0, "PricePerHour": 1.5, "ExpectedCloudCost": None,
        "ParticipantLabPrice": None, "ExamPages": None, "Tags": ["azure", "<script>x</script>"],
        "CloudPlatformId": None, "ContentVersion": 2, "Created": "/Date(1534438041470)/", "CreatedBy": "someone",
        "LastModified": "/Date(1623367490010)", "LastModifiedBy": "someone", "SCORMLastDownloaded": 1656366326607,
        "InstructionSets": [{"UId": "abc", "Id": 1, "Language": "en", "Description": None, "LabTitle": name,
                             "DurationMinutes": 60, "OrganizationId": 11}],
        "Skills": [{"Id": 1, "ExternalId": "x", "Name": "Networking", "FrameworkId": 1, "FrameworkName": "F"}],
    }
    record.update(extra)
    return record


def catalog_series(series_id: int, name: str) -> dict[str, Any]:
    """A /catalog LabSeries[] entry (13 fields; Created in int milliseconds)."""
    return {"Id": series_id, "Name": name, "Description": None, "OrganizationId": "11",
            "OrganizationName": "Contoso", "NumTrainingDays": 30, "AllowAssignments": True,
            "AllowAssignmentsUntil": "/Date(1893456000000)/", "LastModified": None, "LastModifiedBy": None,
            "Created": 1689505754000, "CreatedBy": "someone", "Price": 0.0}


@dataclass
class Seen:
    """One request the fake received."""

    path: str
    minutes: int | None
    api_key: str | None
    at: float
    query: str = ""


@dataclass
class FakeState:
    now: float
    records: list[dict[str, Any]] = field(default_factory=list)
    faults: list[tuple[str | None, Fault]] = field(default_factory=list)
    sticky_fault: Fault | None = None  # played by every request until heal()
    seen: list[Seen] = field(default_factory=list)
    api_key: str = "test-key-0123456789"
    stats: dict[str, Any] = field(default_factory=lambda: {"NumActive": 4, "NumSaved": 2})
    regions: list[dict[str, Any]] = field(default_factory=list)
    catalog_series: list[dict[str, Any]] = field(default_factory=list)
    catalog_profiles: list[dict[str, Any]] = field(default_factory=list)
    extra_top_level: dict[str, Any] = field(default_factory=dict)
    live_offset: float | None = None  # set: the clock is the wall clock plus this offset
    # /labinstance/search: how `start` selects ("start": Start >= start, as the spec reads; "active": the labs
    # running or ended at or after start), and how many records of the next page each page repeats.
    search_reading: str = "start"
    search_overlap: int = 0
    search_fault: Fault | None = None  # played by every /labinstance/search request while set
    # Ids whose name the search leaves out (null), by kind: "lab_host", "datacenter", "delivery_region".
    search_nameless: dict[str, set[int]] = field(default_factory=dict)


class FakeSkillable(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 4

    def __init__(self, now: float | None = None, live: bool = False, tls: ssl.SSLContext | None = None) -> None:
        """`live`: the fake's clock follows the wall clock (for an exporter in another process).
        `tls`: serve HTTPS with this server context, as the real API does."""
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tls = tls
        self._wrap()
        self.state = FakeState(now=float(now if now is not None else int(time.time())))
        if live:
            self.state.live_offset = 0.0 if now is None else now - time.time()
        self.lock = threading.Lock()
        self.released = threading.Event()  # set on stop: slow faults end at once
        self._connections: set[socket.socket] = set()
        self._start_serving()

    def _wrap(self) -> None:
        if self.tls is not None:
            self.socket = self.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def _start_serving(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server_address[1]}/api/v3"

    def clock(self) -> float:
        """The fake's clock; give it to the exporter's poller so both agree on 'now'."""
        offset = self.state.live_offset
        return self.state.now if offset is None else time.time() + offset

    def advance(self, seconds: float) -> None:
        with self.lock:
            if self.state.live_offset is None:
                self.state.now += seconds
            else:
                self.state.live_offset += seconds

    def add(self, *records: dict[str, Any]) -> None:
        with self.lock:
            self.state.records.extend(records)

    def update(self, instance_id: int, **fields: Any) -> None:
        with self.lock:
            for record in self.state.records:
                if record["LabInstanceId"] == instance_id:
                    record.update(fields)

    def fault(self, *faults: Fault, endpoint: str | None = None) -> None:
        """Queue faults; each of the next requests (to `endpoint`, if given) plays one instead of answering."""
        with self.lock:
            self.state.faults.extend((endpoint.lower() if endpoint else None, f) for f in faults)

    def fault_always(self, fault: Fault) -> None:
        """Every request plays `fault` until heal()."""
        with self.lock:
            self.state.sticky_fault = fault

    def heal(self) -> None:
        with self.lock:
            self.state.sticky_fault = None
            self.state.faults.clear()

    def run(self, instance_id: int, start: int, seconds: int, status: int = 4,
            at_end: dict[str, Any] | None = None, **extra: Any) -> None:
        """A lab that starts at `start` and ends `seconds` later, as the real API shows it: with no
        End (and CompletionStatus 3, Incomplete) until the fake's clock reaches its end. `at_end`:
        fields that appear only once it has ended (an exam's score)."""
        record = lab(instance_id, start, None, status=3, **extra)
        record["_ends"] = (start + seconds, status, dict(at_end or {}))
        self.add(record)

    def launch(self, instance_id: int, start: int, seconds: int, status: int = 4, startup: int | None = 60,
               errors: tuple[tuple[int, str], ...] = (), consumer: str | None = None, **extra: Any) -> None:
        """A lab as run() makes it, with what /labinstance/search adds: it is ready `startup` seconds after
        its Start (None: never; a lab that ends first was never ready), reports `errors` (seconds after its
        Start, message) as its clock reaches them, and was launched by the API consumer `consumer`."""
        self.run(instance_id, start, seconds, status, _startup=startup, _errors=list(errors), _consumer=consumer,
                 **extra)

    def records_now(self) -> list[dict[str, Any]]:
        """Every record as the API would show it at the fake's current time (see run())."""
        now = self.clock()
        out = []
        for record in self.state.records:
            ends = record.get("_ends")
            record = {k: v for k, v in record.items() if not k.startswith("_")}
            if ends is not None and ends[0] <= now:
                record.update(End=ends[0], LastActivity=ends[0], CompletionStatus=ends[1],
                              TotalRunTimeSeconds=ends[0] - record["Start"], **ends[2])
            out.append(record)
        return out

    def running(self) -> list[dict[str, Any]]:
        """The fake's truth: labs started (by now) and not ended."""
        now = self.clock()
        return [r for r in self.records_now()
                if isinstance(r.get("Start"), (int, float)) and r["Start"] <= now and r.get("End") is None]

    def changed_within(self, minutes: float) -> list[dict[str, Any]]:
        """The fake's truth: records that started or ended within the last `minutes`.

        A record with neither Start nor End is returned by every call (the worst
        case for an exporter that must count it once).
        """
        now = self.clock()
        since = now - minutes * 60
        return [
            r for r in self.records_now()
            if (r.get("Start") is None and r.get("End") is None)
            or (isinstance(r.get("Start"), (int, float)) and since < r["Start"] <= now)
            or (isinstance(r.get("End"), (int, float)) and since < r["End"] <= now)
        ]

    def changed_between(self, start: int, end: int) -> list[dict[str, Any]]:
        """/Results' truth: records that started or ended in [start, end] (epoch seconds, both included),
        as they look at the fake's current time (see run())."""
        return [
            r for r in self.records_now()
            if any(isinstance(r.get(k), (int, float)) and start <= r[k] <= end for k in ("Start", "End"))
        ]

    # -- /labinstance/search, mode 5 ------------------------------------------------

    def concise_now(self) -> list[dict[str, Any]]:
        """Every lab as /labinstance/search shows it in mode 5 at the fake's current time: what LatestResults
        shows of it (records_now), the start-up duration once it is ready, the errors reported so far, and
        the credentials, names and e-mails real records carry (SECRETS)."""
        now = self.clock()
        out = []
        for raw, r in zip(self.state.records, self.records_now()):  # the same records, in the same order
            start = r.get("Start")
            if not isinstance(start, (int, float)) or start > now:
                continue
            record = concise(r, raw, now)
            for kind, field_prefix in (("lab_host", "LabHost"), ("datacenter", "Datacenter"),
                                       ("delivery_region", "DeliveryRegion")):
                if record[f"{field_prefix}Id"] in self.state.search_nameless.get(kind, ()):
                    record[f"{field_prefix}Name"] = None
            out.append(record)
        return out

    def search(self, query: dict[str, list[str]]) -> dict[str, Any]:
        """The answer to /labinstance/search?mode=5 (paged, sorted, `start` read as search_reading says)."""
        def one(name: str, default: str) -> str:
            return query.get(name, [default])[0]

        if one("mode", "10") != "5":
            return {"Status": 0, "Error": "the fake serves mode 5 only"}
        try:
            start = int(one("start", "0"))
            size, index = int(one("pageSize", "100")), int(one("pageIndex", "0"))
        except ValueError:
            return {"Status": 0, "Error": "bad parameter"}
        records = self.concise_now()
        if self.state.search_reading == "start":
            records = [r for r in records if r["Start"] >= start]
        else:
            records = [r for r in records if r["End"] is None or r["End"] >= start]
        sort = one("sort", "start desc").strip().lower()
        if sort.startswith("end"):
            # SQL Server's order: nulls (running labs) sort lowest, so last in a descending order.
            descending = sort.endswith("desc")
            ended = sorted((r for r in records if r["End"] is not None), key=lambda r: (r["End"], r["Id"] or 0),
                           reverse=descending)
            running = [r for r in records if r["End"] is None]
            records = ended + running if descending else running + ended
        else:
            records.sort(key=lambda r: (r["Start"], r["Id"] or 0), reverse=sort.endswith("desc"))
        pages = -(-len(records) // size) if size > 0 else 0
        page = records[index * size:(index + 1) * size + self.state.search_overlap] if size > 0 else []
        return {"TotalResults": len(records), "TotalPages": pages, "Results": page, "Status": 1, "Error": None}

    def search_requests(self) -> list[Seen]:
        return [s for s in self.state.seen if s.path.lower().endswith("/labinstance/search")]

    def launch_truth(self) -> dict[str, Any]:
        """The fake's truth of what the launch collector counts, from every lab started by now: start-up
        times per region and per profile (count, sum), not-ready labs and errors per place, profile and kind,
        launches per API consumer."""
        startup: Counter[tuple[str, str]] = Counter()
        startup_sum: Counter[tuple[str, str]] = Counter()
        profile_startup: Counter[str] = Counter()
        profile_startup_sum: Counter[str] = Counter()
        not_ready: Counter[tuple[str, str, str]] = Counter()
        profile_not_ready: Counter[str] = Counter()
        errors: Counter[tuple[str, str, str, str]] = Counter()
        profile_errors: Counter[tuple[str, str]] = Counter()
        launches: Counter[str] = Counter()
        for r in self.concise_now():
            place = tuple(str(r[k]) if r[k] is not None else "unknown"
                          for k in ("DatacenterId", "DeliveryRegionId", "LabHostId"))
            profile = str(r["LabProfileId"])
            launches[r.get("ApiConsumerName") or "unknown"] += 1
            if r["StartupDuration"] is not None:
                startup[place[:2]] += 1
                startup_sum[place[:2]] += r["StartupDuration"]
                profile_startup[profile] += 1
                profile_startup_sum[profile] += r["StartupDuration"]
            elif r["End"] is not None:
                not_ready[place] += 1  # type: ignore[index]
                profile_not_ready[profile] += 1
            for entry in {(e["Time"], e["Message"]) for e in r["Errors"]}:
                kind = error_kind_truth(entry[1])
                errors[(*place, kind)] += 1  # type: ignore[index]
                profile_errors[(profile, kind)] += 1
        return {"startup_count": startup, "startup_sum": startup_sum, "profile_startup_count": profile_startup,
                "profile_startup_sum": profile_startup_sum, "not_ready": not_ready,
                "profile_not_ready": profile_not_ready, "errors": errors, "profile_errors": profile_errors,
                "launches": launches}

    def results_requests(self) -> list[Seen]:
        return [s for s in self.state.seen if s.path.lower().endswith("/results")]

    def latest_requests(self) -> list[Seen]:
        return [s for s in self.state.seen if s.path.lower().endswith("/latestresults")]

    @contextmanager
    def blackhole(self) -> Iterator[None]:
        """While inside, TCP connects to the fake hang (SYNs are dropped): a connect timeout.

        The accept loop stops, open keep-alive connections are closed, and the
        listen queue is filled with connections nobody accepts; Linux then drops
        further SYNs. Loopback only.
        """
        self.shutdown()
        self._close_connections()
        fillers: list[socket.socket] = []
        try:
            for _ in range(self.request_queue_size + 4):
                filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                filler.setblocking(False)
                try:
                    filler.connect(self.server_address)
                except (BlockingIOError, InterruptedError):
                    pass
                fillers.append(filler)
            time.sleep(0.05)
            yield
        finally:
            for filler in fillers:
                filler.close()
            self._start_serving()

    @contextmanager
    def refusing(self) -> Iterator[None]:
        """While inside, nothing listens on the fake's port: connects are refused."""
        self.shutdown()
        self._close_connections()
        self.socket.close()
        try:
            yield
        finally:
            self.socket = socket.socket(self.address_family, self.socket_type)
            self.server_bind()  # the same port again (SO_REUSEADDR)
            self.server_activate()
            self._wrap()
            self._start_serving()

    def _close_connections(self) -> None:
        with self.lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.released.set()
        self.shutdown()
        self._close_connections()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is what fault tests are about


class _Handler(BaseHTTPRequestHandler):
    server: FakeSkillable
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall per keep-alive request

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.lock:
            self.server._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    @property
    def endpoint(self) -> str:
        return urlsplit(self.path).path.rsplit("/", 1)[-1].lower()

    @property
    def minutes(self) -> int | None:
        value = parse_qs(urlsplit(self.path).query).get("minutes", [""])[0]
        return int(value) if value.isdigit() else None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        endpoint = self.endpoint
        with self.server.lock:
            state = self.server.state
            state.seen.append(Seen(url.path, self.minutes, self.headers.get("api_key"), self.server.clock(), url.query))
            fault = state.sticky_fault
            if fault is None and endpoint == "search":
                fault = state.search_fault
            if fault is None:
                for i, (target, queued) in enumerate(state.faults):
                    if target is None or target == endpoint:
                        fault = queued
                        del state.faults[i]
                        break
        if fault is not None:
            fault(self)
            return
        self.answer()

    def answer(self) -> None:
        """The normal answer to this request."""
        if self.headers.get("api_key") != self.server.state.api_key:
            self.send_json({"Status": 0, "Error": "Invalid API key"})
            return
        payload = self.payload()
        if not payload:
            self.send_raw(404, b"not found", "text/plain")
        else:
            self.send_json(payload)

    def payload(self) -> dict[str, Any]:
        endpoint, minutes = self.endpoint, self.minutes
        with self.server.lock:
            state = self.server.state
            if endpoint == "latestresults":
                if minutes is None or not 1 <= minutes <= 10080:
                    return {"Results": None, "Status": 0, "Error": "Timeframe cannot exceed 7 days"}
                payload = {"Results": self.server.changed_within(minutes), "Status": 1, "Error": None}
                payload.update(state.extra_top_level)
                return payload
            if endpoint == "results":
                query = parse_qs(urlsplit(self.path).query)
                try:
                    start, end = int(query["start"][0]), int(query["end"][0])
                except (KeyError, ValueError):
                    return {"Results": None, "Status": 0, "Error": "start and end are required"}
                if not 0 <= end - start <= 7 * 86400:
                    return {"Results": None, "Status": 0, "Error": "Timeframe cannot exceed 7 days"}
                return {"Results": self.server.changed_between(start, end), "Status": 1, "Error": None}
            if endpoint == "stats":
                return {**state.stats, "Status": 1, "Error": None}
            if endpoint == "deliveryregions":
                return {"DeliveryRegions": state.regions, "Status": 1, "Error": None}
            if endpoint == "search":
                return self.server.search(parse_qs(urlsplit(self.path).query))
            if endpoint == "catalog":
                query = parse_qs(urlsplit(self.path).query)
                profiles = state.catalog_profiles
                if query.get("includeAll") != ["1"]:  # as documented: only enabled, complete profiles
                    profiles = [p for p in profiles if p.get("Enabled") and p.get("DevelopmentStatusId") == 10]
                return {"LabSeries": state.catalog_series, "LabProfiles": profiles,
                        "DeliveryRegions": state.regions, "Status": 1, "Error": None}
            return {}

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.send_raw(status, json.dumps(payload).encode(), "application/json")

    def send_raw(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def wait(self, seconds: float) -> bool:
        """Sleep, but end early when the fake stops. True if the full time passed."""
        return not self.server.released.wait(seconds)

    def reset_connection(self) -> None:
        """Close with an RST instead of a FIN."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def error_kind_truth(message: str) -> str:
    """The fake's own reading of an error message's kind (the fake shares no code with the exporter)."""
    lowered = message.lower()
    if "life cycle action" in lowered:
        return "lifecycle_action"
    if "webhook" in lowered:
        return "webhook"
    return "other"


def concise(r: dict[str, Any], raw: dict[str, Any], now: float) -> dict[str, Any]:
    """One lab as a mode-5 record (the UAT records' fields), from what LatestResults shows of it (`r`) and the
    fake's hidden launch facts of it (`raw`: _startup, _errors, _consumer) as of `now`."""
    start, end = r["Start"], r.get("End")
    startup = raw["_startup"] if "_startup" in raw else 60  # a lab added without launch facts: ready after a minute
    ready = startup is not None and start + startup <= now and (end is None or start + startup <= end)
    errors = [{"Message": message, "Time": start + after, "TimeValue": f"/Date({(start + after) * 1000})/"}
              for after, message in raw.get("_errors", ()) if start + after <= now]
    host, dc, region = r.get("LabHostId"), r.get("DatacenterId"), r.get("DeliveryRegionId")
    return {
        "Id": r.get("LabInstanceId"), "LabProfileId": r.get("LabProfileId"), "LabProfileName": "Fake lab",
        "Products": [{"Id": 39, "Name": "Azure"}], "SeriesId": 226, "SeriesName": "Fake series",
        "UserId": "user-secret-555", "UserFirstName": "Grace-Fakename", "UserLastName": "Hopper-Fakeson",
        "UserEmail": "grace.fakename@example.invalid", "ClassId": None, "ClassName": None,
        "Start": start, "StartTime": f"/Date({start * 1000})/", "Expires": start + 7200,
        "End": end, "EndTime": f"/Date({end * 1000})/" if end is not None else None,
        "LastActivity": r.get("LastActivity"), "State": "Off" if end is not None else "Running",
        "CompletionStatus": COMPLETION_NAMES.get(r.get("CompletionStatus"), "Unknown"),
        "LabHostId": host, "LabHostName": f"HV-{host}" if host is not None else None,
        "DatacenterId": dc, "DatacenterName": f"DC-{dc}" if dc is not None else None,
        "DeliveryRegionId": region, "DeliveryRegionName": f"Region {region}" if region is not None else None,
        "PlatformId": 2, "TimeInSession": 10, "TotalRunTime": r.get("TotalRunTimeSeconds"), "TimeRemaining": 0,
        "InstructorName": "instructor-fake-name",
        "StartupDuration": startup if ready else None,
        "Errors": errors, "ErrorCount": str(len(errors)),
        "ApiConsumerName": raw.get("_consumer"),
        "Notes": [{"Time": start, "Title": "Note", "Text": "student-note-fake-text"}],
        "Sessions": [{"Start": start, "End": end}],
        "DetailsUrl": f"https://uat.example.invalid/LabInstance/{r.get('LabInstanceId')}",
        "VirtualMachineCredentials": [{"Id": 907, "Name": "VM 907", "Username": "Grace-Fakename",
                                       "Password": "Fake-Pa55w0rd-7731"}],
        "CloudCredentials": [{"Name": "AWS", "Key": "AKIAFAKEACCESSKEY0001", "Secret": "fake-cloud-secret-9f8e7d"}],
        "CloudPortalCredentials": [], "PublicIpAddresses": ["203.0.113.9"], "IpAddress": "203.0.113.9",
        "TaskCompletePercent": r.get("TaskCompletePercent"), "ExamPassed": None, "ExamScore": None,
    }


# -- faults ------------------------------------------------------------------
# Each returns a Fault: a function that answers (or fails to answer) one request.


def http_status(
    status: int, body: bytes = b"", ctype: str = "text/plain", headers: dict[str, str] | None = None
) -> Fault:
    """An HTTP error status, e.g. 500, 502, 401, 403, 404."""
    return lambda h: h.send_raw(status, body or f"error {status}".encode(), ctype, headers)


def retry_after(status: int, value: str) -> Fault:
    """429 or 503 with a Retry-After header (seconds or an HTTP date)."""
    return http_status(status, b"slow down", "text/plain", {"Retry-After": value})


def hang(seconds: float = 30.0) -> Fault:
    """Read the request, then send nothing for `seconds` (a read timeout)."""

    def play(h: _Handler) -> None:
        h.wait(seconds)
        h.close_connection = True

    return play


def trickle(every: float = 0.2, total: float = 30.0, headers_too: bool = False) -> Fault:
    """Answer one byte every `every` seconds, so no single read ever times out.

    With `headers_too` even the status line and headers trickle; otherwise the
    headers come at once and the body trickles.
    """

    def play(h: _Handler) -> None:
        body = json.dumps(h.payload()).encode()
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 20_000}\r\n\r\n"
        ).encode()
        data = (head if headers_too else b"") + body + b" " * 20_000
        h.close_connection = True
        try:
            if not headers_too:
                h.wfile.write(head)
                h.wfile.flush()
            deadline = time.monotonic() + total
            for i in range(len(data)):
                if time.monotonic() > deadline or not h.wait(every):
                    return
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
        except OSError:
            return

    return play


def reset(after_body_bytes: int | None = None) -> Fault:
    """Reset the connection: at once (None), or after the headers and this many body bytes."""

    def play(h: _Handler) -> None:
        if after_body_bytes is not None:
            body = json.dumps(h.payload()).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:after_body_bytes])
        h.reset_connection()

    return play


def short_body(fraction: float = 0.5) -> Fault:
    """Content-Length of the full answer, but only part of it before a clean close."""

    def play(h: _Handler) -> None:
        body = json.dumps(h.payload()).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: int(len(body) * fraction)])
        h.close_connection = True

    return play


def truncated_json(fraction: float = 0.5) -> Fault:
    """The normal JSON cut short, sent as if it were complete (a proxy that cut it)."""

    def play(h: _Handler) -> None:
        body = json.dumps(h.payload()).encode()
        h.send_raw(200, body[: int(len(body) * fraction)], "application/json")

    return play


def html_page(status: int = 200) -> Fault:
    """An HTML page (a proxy's error or login page) with status 200."""
    page = b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head><body>Maintenance</body></html>"
    return http_status(status, page, "text/html; charset=utf-8")


def status_error(message: str = "Something broke") -> Fault:
    """HTTP 200 with Status 0 and an Error, as Skillable documents its errors."""
    return lambda h: h.send_json({"Results": None, "Status": 0, "Error": message})


def json_body(payload: Any) -> Fault:
    """Any JSON with status 200 (wrong types, wrong shape)."""
    return lambda h: h.send_json(payload)


def with_records(*records: Any) -> Fault:
    """A successful LatestResults answer with these records added to the normal ones (raw, any shape)."""

    def play(h: _Handler) -> None:
        payload = h.payload()
        payload["Results"] = list(payload.get("Results") or []) + list(records)
        h.send_json(payload)

    return play


def oversized(size: int, content_length: bool = True, gzipped: bool = False) -> Fault:
    """A 200 body of `size` bytes of valid JSON: announced by Content-Length, or chunked, or gzipped."""

    def play(h: _Handler) -> None:
        filler = b'{"Status": 1, "Error": null, "Pad": "' + b"x" * size + b'", "Results": []}'
        h.close_connection = True
        try:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            if gzipped:
                body = gzip.compress(filler, compresslevel=9)
                h.send_header("Content-Encoding", "gzip")
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
            elif content_length:
                h.send_header("Content-Length", str(len(filler)))
                h.end_headers()
                h.wfile.write(filler)
            else:
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                for i in range(0, len(filler), 65536):
                    part = filler[i:i + 65536]
                    h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                h.wfile.write(b"0\r\n\r\n")
        except OSError:
            return

    return play
