"""An independent fake of Skillable's Lab API for the tests: real HTTP on loopback.

It shares no code with exporter/ (not even the simulator), so counts the
exporter reports can be checked against the fake's own truth. Tests add lab
records as plain dicts, move the fake's clock, and queue faults that the next
requests play instead of a normal answer.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

Fault = Callable[[BaseHTTPRequestHandler], None]


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


@dataclass
class Seen:
    """One request the fake received."""

    path: str
    minutes: int | None
    api_key: str | None
    at: float


@dataclass
class FakeState:
    now: float
    records: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    api_key: str = "test-key-0123456789"
    stats: dict[str, Any] = field(default_factory=lambda: {"NumActive": 4, "NumSaved": 2})
    regions: list[dict[str, Any]] = field(default_factory=list)
    extra_top_level: dict[str, Any] = field(default_factory=dict)


class FakeSkillable(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, now: float | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = FakeState(now=float(now if now is not None else int(time.time())))
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api/v3"

    def clock(self) -> float:
        """The fake's clock; give it to the exporter's poller so both agree on 'now'."""
        return self.state.now

    def advance(self, seconds: float) -> None:
        with self.lock:
            self.state.now += seconds

    def add(self, *records: dict[str, Any]) -> None:
        with self.lock:
            self.state.records.extend(records)

    def update(self, instance_id: int, **fields: Any) -> None:
        with self.lock:
            for record in self.state.records:
                if record["LabInstanceId"] == instance_id:
                    record.update(fields)

    def fault(self, *faults: Fault) -> None:
        """Queue faults; each of the next requests plays one instead of answering normally."""
        with self.lock:
            self.state.faults.extend(faults)

    def changed_within(self, minutes: float) -> list[dict[str, Any]]:
        """The fake's truth: records that started or ended within the last `minutes`."""
        since = self.state.now - minutes * 60
        return [
            r for r in self.state.records
            if since < r["Start"] <= self.state.now
            or (r["End"] is not None and since < r["End"] <= self.state.now)
        ]

    def latest_requests(self) -> list[Seen]:
        return [s for s in self.state.seen if s.path.lower().endswith("/latestresults")]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeSkillable
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        minutes = int(query["minutes"][0]) if query.get("minutes", [""])[0].isdigit() else None
        with self.server.lock:
            state = self.server.state
            state.seen.append(Seen(url.path, minutes, self.headers.get("api_key"), state.now))
            fault = state.faults.pop(0) if state.faults else None
        if fault is not None:
            fault(self)
            return
        if self.headers.get("api_key") != state.api_key:
            self.send_json({"Status": 0, "Error": "Invalid API key"})
            return
        endpoint = url.path.rsplit("/", 1)[-1].lower()
        with self.server.lock:
            if endpoint == "latestresults":
                if minutes is None or not 1 <= minutes <= 10080:
                    payload: dict[str, Any] = {"Results": None, "Status": 0, "Error": "Timeframe cannot exceed 7 days"}
                else:
                    payload = {"Results": self.server.changed_within(minutes), "Status": 1, "Error": None}
                    payload.update(state.extra_top_level)
            elif endpoint == "stats":
                payload = {**state.stats, "Status": 1, "Error": None}
            elif endpoint == "deliveryregions":
                payload = {"DeliveryRegions": state.regions, "Status": 1, "Error": None}
            else:
                payload = {}
        if not payload:
            self.send_raw(404, b"not found", "text/plain")
        else:
            self.send_json(payload)

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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass
