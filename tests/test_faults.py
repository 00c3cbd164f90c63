"""Every upstream fault of docs/failure-modes.md, played by the fake over real HTTP, scraped over real HTTP.

For each fault: the scrape answers within the scrape timeout, skillable_up is 0,
skillable_api_request_failures_total moves under the fault's own reason, no lab
counter moves, and the first good poll afterwards asks for the minutes since
the last success and counts every missed event exactly once. Then Retry-After,
backoff and the log discipline, and finally a real exporter process that rides
out a run of faults and recovers alone.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

from . import fakeapi as f
from .fakeapi import FakeSkillable, lab
from .harness import MAX_BODY, POLL_TIMEOUT, SCRAPE_TIMEOUT, Harness, Samples, Scrape, lab_counters, parse, total
from .harness import harness  # noqa: F401 (the fixture)
from .tlsutil import certs, server_context  # noqa: F401 (certs: the fixture)

pytestmark = pytest.mark.integration  # every test here polls the fake API over loopback (TLS ones run openssl)

NOW = 1_800_000_000


def ended_truth(fake: FakeSkillable) -> dict[int, int]:
    """The fake's own truth: ended instances by CompletionStatus code."""
    out: dict[int, int] = {}
    for r in fake.state.records:
        if r["End"] is not None:
            out[r["CompletionStatus"]] = out.get(r["CompletionStatus"], 0) + 1
    return out


STATUS_LABEL = {3: "incomplete", 4: "complete", 20: "lab_creation_failed", 1: "cancelled"}


def assert_counts_match_truth(fake: FakeSkillable, samples: Samples) -> None:
    assert total(samples, "skillable_lab_instances_started_total") == len(fake.state.records)
    truth = ended_truth(fake)
    for code, count in truth.items():
        assert total(samples, "skillable_lab_instances_ended_total", completion_status=STATUS_LABEL[code]) == count
    assert total(samples, "skillable_lab_instances_ended_total") == sum(truth.values())
    exams = [r for r in fake.state.records if r.get("ExamScore") is not None]
    assert total(samples, "skillable_exams_total") == len(exams)
    assert total(samples, "skillable_exams_passed_total") == sum(1 for r in exams if r["ExamPassed"])


# -- the faults ----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    reason: str
    arm: Callable[[FakeSkillable], contextlib.AbstractContextManager[Any]]  # makes the next LatestResults request fail
    slow: bool = False  # the fault lasts until the deadline


def queued(fault: f.Fault) -> Callable[[FakeSkillable], contextlib.AbstractContextManager[Any]]:
    def arm(fake: FakeSkillable) -> contextlib.AbstractContextManager[Any]:
        fake.fault(fault, endpoint="LatestResults")
        return contextlib.nullcontext()

    return arm


CASES: dict[str, Case] = {
    "http_500": Case("http_error", queued(f.http_status(500))),
    "http_502_html": Case("http_error", queued(f.html_page(502))),
    "http_503_retry_after": Case("http_error", queued(f.retry_after(503, "30"))),
    "http_404": Case("http_error", queued(f.http_status(404))),
    "http_401": Case("unauthorized", queued(f.http_status(401))),
    "http_403": Case("unauthorized", queued(f.http_status(403))),
    "status0_invalid_key": Case("unauthorized", queued(f.status_error("Invalid API key"))),
    "http_429_retry_after": Case("rate_limited", queued(f.retry_after(429, "30"))),
    "connect_timeout": Case("connect_timeout", lambda fake: fake.blackhole(), slow=True),
    "connection_refused": Case("connect_error", lambda fake: fake.refusing()),
    "read_timeout": Case("timeout", queued(f.hang(30)), slow=True),
    "trickling_body": Case("timeout", queued(f.trickle(every=0.05)), slow=True),
    "trickling_headers": Case("timeout", queued(f.trickle(every=0.05, headers_too=True)), slow=True),
    "reset_before_answer": Case("connection_reset", queued(f.reset())),
    "reset_mid_body": Case("connection_reset", queued(f.reset(after_body_bytes=40))),
    "body_shorter_than_content_length": Case("connection_reset", queued(f.short_body())),
    "truncated_json": Case("invalid_response", queued(f.truncated_json())),
    "html_page_200": Case("not_json", queued(f.html_page(200))),
    "empty_body_200": Case("not_json", queued(lambda h: h.send_raw(200, b"", "application/json"))),
    "status0_error": Case("api_error", queued(f.status_error("Internal error, please retry"))),
    "status_missing": Case("api_error", queued(f.json_body({"Results": []}))),
    "wrong_type_results": Case("invalid_response", queued(f.json_body({"Results": {"LabInstanceId": 1}, "Status": 1}))),
    "wrong_type_status": Case("invalid_response", queued(f.json_body({"Results": [], "Status": "yes"}))),
    "json_array": Case("invalid_response", queued(f.json_body([{"Status": 1}]))),
    # 1,000 levels deep in an unknown field of one record: bad input, never a bug (hostile input 10).
    "deeply_nested": Case("invalid_response", queued(lambda h: h.send_raw(
        200, b'{"Status": 1, "Results": [{"LabInstanceId": 1, "Extra": ' + b"[" * 1000 + b"]" * 1000 + b"}]}",
        "application/json"))),
    "oversized_content_length": Case("too_large", queued(f.oversized(2 * MAX_BODY))),
    "oversized_chunked": Case("too_large", queued(f.oversized(2 * MAX_BODY, content_length=False))),
    "oversized_gzip_bomb": Case("too_large", queued(f.oversized(64 * MAX_BODY, gzipped=True))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fault_keeps_counters_and_first_good_poll_recovers_the_gap(
    name: str, fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    check_fault(CASES[name], fake, harness())


# The real API speaks HTTPS: the faults where TLS changes what the client sees, again over TLS.
HTTPS_CASES = ["http_500", "connect_timeout", "connection_refused", "read_timeout", "trickling_body",
               "trickling_headers", "reset_before_answer", "reset_mid_body", "body_shorter_than_content_length",
               "html_page_200", "oversized_gzip_bomb"]


@pytest.fixture
def tls_fake(certs: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSkillable]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs / "ca.crt"))  # the client trusts the test CA
    server = FakeSkillable(now=NOW, tls=server_context(certs))
    yield server
    server.stop()


@pytest.mark.parametrize("name", HTTPS_CASES)
def test_fault_over_https(name: str, tls_fake: FakeSkillable) -> None:
    h = Harness(tls_fake)
    try:
        assert h.app.config.accounts[0].api_url.startswith("https://")
        check_fault(CASES[name], tls_fake, h)
    finally:
        h.close()


def check_fault(case: Case, fake: FakeSkillable, h: Harness) -> None:
    fake.add(
        lab(1, NOW - 40 * 60, NOW - 30 * 60, status=4),
        lab(2, NOW - 20 * 60),  # running; ends during the fault
        lab(3, NOW - 10 * 60, NOW - 5 * 60, status=20),
    )
    first = h.scrape()
    assert first.status == 200 and first.up == 1
    assert_counts_match_truth(fake, first.samples)
    before = lab_counters(first.samples)

    # Events happen while the API is broken.
    fake.advance(5 * 60)
    fake.update(2, End=NOW + 60, CompletionStatus=4, TotalRunTimeSeconds=1260)
    fake.add(lab(4, NOW + 30, NOW + 200, status=20), lab(5, NOW + 100, NOW + 250, status=4, IsExam=True,
                                                         ExamScore=90, ExamMaxPossibleScore=100, ExamPassed=True))
    h.mono.advance(60)
    with case.arm(fake):
        broken = h.scrape()
    assert broken.status == 200
    assert broken.elapsed < SCRAPE_TIMEOUT < 10
    assert broken.up == 0
    assert broken.failures(case.reason) == 1, broken.failures()
    assert broken.failures() == 1  # under that reason only
    assert lab_counters(broken.samples) == before  # nothing lost, nothing counted from a broken answer
    assert total(broken.samples, "skillable_last_success_timestamp_seconds") == NOW

    # More events, then the API heals; the first good poll covers the whole gap.
    fake.advance(5 * 60)
    fake.add(lab(6, NOW + 400, NOW + 500, status=1), lab(7, NOW + 550))
    h.mono.advance(120)  # past the backoff and the 30 s Retry-After
    healed = h.scrape()
    assert healed.up == 1, healed.text
    assert fake.latest_requests()[-1].minutes == math.ceil(600 / 60) + 2  # since the last success, plus overlap
    assert_counts_match_truth(fake, healed.samples)
    assert healed.failures() == 1  # the failure counter kept its value

    # Overlapping polls later return the same records again: nothing is counted twice.
    for _ in range(2):
        fake.advance(60)
        h.mono.advance(60)
        again = h.scrape()
        assert again.up == 1
        assert lab_counters(again.samples) == lab_counters(healed.samples)


def test_default_deadline_answers_within_prometheus_default_scrape_timeout(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    """With the default --skillable.timeout (9 s) and Prometheus' default 10 s scrape timeout."""
    h = harness(SKILLABLE_TIMEOUT="9")
    fake.fault(f.trickle(every=0.05, total=60), endpoint="LatestResults")
    scrape = h.scrape(scrape_timeout=10)
    assert scrape.status == 200
    assert 8.5 < scrape.elapsed < 10
    assert scrape.failures("timeout") == 1


def test_scrapes_during_a_hung_poll_all_answer_in_time(fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    h = harness()
    fake.fault(f.hang(30), endpoint="LatestResults")
    results: list[Scrape] = []
    threads = [threading.Thread(target=lambda: results.append(h.scrape())) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(results) == 10
    assert all(r.status == 200 and r.elapsed < SCRAPE_TIMEOUT for r in results)
    assert len(fake.latest_requests()) == 1  # they shared the one poll


# -- record-level trouble: the batch survives ---------------------------------------


def test_records_with_wrong_types_are_skipped_and_counted_not_a_failure(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4), lab(2, NOW - 300, NOW - 30, status=20))
    bad = [
        lab(10, NOW - 100, NOW - 50, status=4, DatacenterId="three"),
        lab(11, NOW - 100, NOW - 50, status=4, ExamScore=[1]),
        {**lab(12, NOW - 100), "LabInstanceId": None},
        "not a record",
        None,
    ]
    fake.fault(f.with_records(*bad), endpoint="LatestResults")
    h = harness()
    scrape = h.scrape()
    assert scrape.up == 1
    assert scrape.failures() == 0
    assert total(scrape.samples, "skillable_results_invalid_total") == len(bad)
    assert total(scrape.samples, "skillable_lab_instances_started_total") == 2
    assert total(scrape.samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 1


def test_record_with_every_nullable_field_null_is_counted_once(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    nulls = dict.fromkeys(lab(0, 0))
    fake.add({**nulls, "LabInstanceId": 77}, lab(1, NOW - 600, NOW - 60, status=4))
    h = harness()
    for _ in range(4):  # the fake returns the timestamp-less record to every poll
        scrape = h.scrape()
        assert scrape.up == 1
        fake.advance(20 * 60)
        h.mono.advance(20 * 60)
    unknown = {"datacenter_id": "unknown", "delivery_region_id": "unknown", "lab_host_id": "unknown"}
    assert total(scrape.samples, "skillable_lab_instances_started_total", **unknown) == 1
    # No End: it counts as running (until it expires), never in skillable_lab_instances.
    assert total(scrape.samples, "skillable_lab_instances", completion_status="unknown", **unknown) == 0
    assert total(scrape.samples, "skillable_lab_instances_running", **unknown) == 1
    assert total(scrape.samples, "skillable_results_invalid_total") == 0


def raw_body(body: bytes) -> f.Fault:
    """A 200 answer with exactly these bytes: what no JSON library would write."""
    return lambda h: h.send_raw(200, body, "application/json")


def test_a_lone_surrogate_in_a_field_never_read_is_read_past_not_a_failed_poll(
    fake: FakeSkillable, harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    """One "\\ud800" in a user's name once failed the whole poll as invalid_response, and as a
    failed poll asks again for everything since the last success, polling stayed down for up to 7 days."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4, UserId="Jos\ud800"), lab(2, NOW - 300, NOW - 30, status=20),
             lab(3, NOW - 200, City="\udc00\x01 Zu\u0308rich"))
    h = harness()
    caplog.set_level(logging.WARNING, logger="exporter")
    scrape = h.scrape()
    assert (scrape.up, scrape.failures()) == (1, 0)
    assert total(scrape.samples, "skillable_lab_instances_started_total") == 3
    assert total(scrape.samples, "skillable_results_invalid_total") == 0  # nothing it reads was touched
    assert any("was not valid JSON" in r.getMessage() for r in caplog.records)


def test_bytes_no_json_library_writes_spoil_only_their_own_record(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    """Bytes that are not UTF-8, a raw NUL, an unknown escape in strings never read; a stray byte between two
    values of one record: that record is skipped and counted invalid, the others counted; up stays 1."""
    good = [lab(1, NOW - 600, NOW - 60, status=4), lab(2, NOW - 300, NOW - 30, status=20), lab(3, NOW - 200)]
    records = [json.dumps(r).encode() for r in good]
    records[0] = records[0].replace(b'"user-secret-555"', b'"us\xe9r \x00 \\q"')  # repaired: still valid
    records[1] = records[1].replace(b'"Country": "US"', b'"Country": "US" \xff')  # between values: cut out
    body = b'{"Results": [' + b", ".join(records) + b'], "Status": 1, "Error": null}'
    fake.fault(raw_body(body), endpoint="LatestResults")
    scrape = harness().scrape()
    assert (scrape.up, scrape.failures()) == (1, 0)
    assert total(scrape.samples, "skillable_results_invalid_total") == 1
    assert total(scrape.samples, "skillable_lab_instances_started_total") == 2
    assert total(scrape.samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 0


def test_a_body_cut_short_is_still_a_failed_poll_never_salvaged(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    """Salvage reads a whole body past bad bytes; a body that ends too soon lost records, so it stays
    invalid_response and the next poll asks again from the last success."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4, UserId="\ud800"), lab(2, NOW - 300, NOW - 30, status=20))
    body = json.dumps({"Status": 1, "Results": fake.records_now()}).encode()
    fake.fault(raw_body(body[: body.index(b'"LabInstanceId": 2') + 30]), endpoint="LatestResults")
    scrape = harness().scrape()
    assert (scrape.up, scrape.failures("invalid_response")) == (0, 1)
    assert total(scrape.samples, "skillable_lab_instances_started_total") == 0


def test_a_hostile_delivery_region_name_becomes_a_short_clean_label(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    """A 1 MiB region name with HTML, CR, NUL and an RTL override made every scrape 1 MiB and put them in a
    label; it is cleaned and cut as catalog names are."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    fake.state.regions = [{"Id": 2, "Name": "<img src=x onerror=alert(1)>West\r\n\u0000\u202e" + "x" * (1 << 20)}]
    scrape = harness(SKILLABLE_COLLECTOR_DELIVERY_REGIONS="true", SKILLABLE_MAX_RESPONSE_BYTES=str(4 << 20)
                     ).scrape()
    assert scrape.up == 1 and len(scrape.text) < 64 * 1024
    [name] = [dict(labels)["delivery_region_name"] for (metric, labels) in scrape.samples
              if metric == "skillable_delivery_region_info"]
    assert name == "West " + "x" * 115 and len(name) == 120


# -- Retry-After and backoff ----------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("form", ["seconds", "http_date"])
def test_retry_after_is_honoured(status: int, form: str, fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    h = harness()
    value = "120" if form == "seconds" else email.utils.formatdate(time.time() + 120, usegmt=True)
    fake.fault(f.retry_after(status, value), endpoint="LatestResults")
    assert h.scrape().up == 0
    assert len(fake.latest_requests()) == 1
    for _ in range(11):  # 110 s of scrapes every 10 s: no request reaches the API
        h.mono.advance(10)
        scrape = h.scrape()
        assert scrape.status == 200 and scrape.up == 0
    assert len(fake.latest_requests()) == 1
    h.mono.advance(12)
    assert h.scrape().up == 1  # after it expires, the exporter recovers alone
    assert len(fake.latest_requests()) == 2


def test_absurd_retry_after_is_capped_at_an_hour(fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    h = harness()
    fake.fault(f.retry_after(429, str(10**9)), endpoint="LatestResults")
    h.scrape()
    h.mono.advance(3500)
    h.scrape()
    assert len(fake.latest_requests()) == 1
    h.mono.advance(101)
    assert h.scrape().up == 1


def test_backoff_grows_exponentially_with_jitter_and_never_storms(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    h = harness()
    calls: list[float] = []

    def failing(handler: Any) -> None:
        calls.append(h.mono.now)
        handler.send_raw(500, b"boom", "text/plain")

    fake.fault_always(failing)
    step = 1.0
    for _ in range(300):  # a scrape every second for 5 minutes, all during the outage
        assert h.scrape().up == 0
        h.mono.advance(step)
    gaps = [b - a for a, b in pairwise(calls)]
    # The i-th wait is 2**i s times a jitter in [0.5, 1], seen through 1 s scrape steps.
    for i, gap in enumerate(gaps):
        assert 0.5 * 2**i - step <= gap <= 2**i + step, (i, gaps)
    assert 6 <= len(calls) <= 10  # not 300
    # Concurrent scrapes during the outage add no requests of their own.
    h.mono.advance(400)
    before = len(calls)
    threads = [threading.Thread(target=h.scrape) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == before + 1
    fake.heal()
    h.mono.advance(400)  # the backoff is capped at 300 s
    assert h.scrape().up == 1


def test_backoff_is_capped(fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    h = harness()
    fake.fault_always(f.http_status(500))
    for _ in range(20):
        h.mono.advance(301)
        h.scrape()
    assert len(fake.latest_requests()) == 20  # every poll after 301 s goes out: the wait never exceeds 300 s


# -- logs ----------------------------------------------------------------------------


def test_bad_key_is_logged_once_not_per_poll(
    fake: FakeSkillable, harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    h = harness()
    fake.fault_always(f.http_status(401))
    for _ in range(10):
        h.scrape()
        h.mono.advance(400)
    assert len(fake.latest_requests()) == 10
    refused = [r for r in caplog.records if "API key refused" in r.getMessage()]
    assert len(refused) == 1 and refused[0].levelno == logging.ERROR
    assert "check SKILLABLE_API_KEY" in refused[0].getMessage()
    # Skillable's own way to say it (HTTP 200, Status 0) is the same failure, not a second line.
    fake.fault_always(f.status_error("Invalid API key"))
    for _ in range(5):
        h.scrape()
        h.mono.advance(400)
    assert len([r for r in caplog.records if "API key refused" in r.getMessage()]) == 1
    fake.heal()
    assert h.scrape().up == 1
    assert any(r.getMessage() == "poll recovered" and getattr(r, "failed_polls", None) == 15 for r in caplog.records)
    fake.fault_always(f.http_status(403))  # broken again later: said again, once
    for _ in range(3):
        h.mono.advance(400)
        h.scrape()
    assert len([r for r in caplog.records if "API key refused" in r.getMessage()]) == 2


def test_a_long_outage_logs_one_warning_per_reason(
    fake: FakeSkillable, harness: Callable[..., Harness], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    h = harness()
    fake.fault_always(f.http_status(503))
    for _ in range(8):
        h.scrape()
        h.mono.advance(400)
    fake.fault_always(f.html_page(200))
    for _ in range(8):
        h.scrape()
        h.mono.advance(400)
    warnings = [getattr(r, "reason", None) for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["http_error", "not_json"]


# -- a real process rides out a run of faults ------------------------------------------


def test_exporter_process_survives_faults_and_recovers_alone(run_exporter) -> None:  # type: ignore[no-untyped-def]
    live = FakeSkillable(live=True)
    try:
        now = int(time.time())
        live.add(lab(1, now - 600, now - 60, status=4), lab(2, now - 300))
        # Every scrape may poll, and a poll has 1.5 s (the header no longer shortens the poll itself).
        exporter = run_exporter("--skillable.min-poll-interval=0", "--skillable.timeout=1.5",
                                env={"SKILLABLE_API_URL": live.url, "SKILLABLE_API_KEY": live.state.api_key,
                                     "SKILLABLE_COLLECTOR_STATS": "false"})
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": "2"}
        assert "skillable_up 1.0" in exporter.get("/metrics", headers=headers).text
        live.fault(f.hang(30), f.reset(), f.html_page(), endpoint="LatestResults")
        live.add(lab(3, now - 30, now - 10, status=20))
        deadline = time.monotonic() + 30
        reasons: set[str] = set()
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = exporter.get("/metrics", headers=headers)
            assert response.status_code == 200 and time.monotonic() - started < 2
            samples = parse(response.text)
            reasons = {dict(labels)["reason"] for (n, labels), value in samples.items()
                       if n == "skillable_api_request_failures_total" and value > 0}
            if total(samples, "skillable_up") == 1 and len(reasons) == 3:
                break
            assert exporter.proc.poll() is None
            time.sleep(0.5)
        assert reasons == {"timeout", "connection_reset", "not_json"}
        assert total(samples, "skillable_up") == 1
        assert total(samples, "skillable_lab_instances_started_total") == 3
        assert total(samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 1
        assert exporter.stop() == 0
    finally:
        live.stop()


def test_a_hanging_dns_lookup_never_holds_a_scrape(
    fake: FakeSkillable, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """getaddrinfo cannot be interrupted: the poll runs in its own thread, and the scrape answers on time."""
    import socket

    real = socket.getaddrinfo
    release = threading.Event()

    def slow(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "api.slow-dns.test":
            release.wait(8)  # a resolver that does not answer
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness(SKILLABLE_API_URL=fake.url.replace("127.0.0.1", "api.slow-dns.test"))
    try:
        first = h.scrape()
        assert first.status == 200 and first.elapsed < SCRAPE_TIMEOUT
        assert first.up == 0 and first.failures() == 0  # the poll has not ended yet
        second = h.scrape()  # the same poll is still in flight: no second lookup, an answer on time
        assert second.status == 200 and second.elapsed < SCRAPE_TIMEOUT
    finally:
        release.set()
    deadline = time.monotonic() + 5
    while h.poller.view().health.failures[("LatestResults", "connect_error")] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert h.scrape().failures("connect_error") == 1


def test_up_is_not_claimed_while_a_poll_is_stuck_past_its_deadline(
    fake: FakeSkillable, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup that hangs past --skillable.timeout: the last success no longer speaks for now (hostile input 1)."""
    import socket

    real = socket.getaddrinfo
    hanging, release = threading.Event(), threading.Event()

    def lookup(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "api.stuck-dns.test":
            if hanging.is_set():
                release.wait(10)
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness(SKILLABLE_API_URL=fake.url.replace("127.0.0.1", "api.stuck-dns.test"))
    try:
        assert h.scrape().up == 1
        hanging.set()
        h.app.pollers[""].client.close()  # no kept-alive connection: the next poll looks the name up
        h.mono.advance(60)
        assert h.scrape().up == 1  # the poll is late, not yet past its deadline: the last one stands
        h.mono.advance(POLL_TIMEOUT + 1.5)  # now it is stuck past its deadline
        stuck = h.scrape()
        assert stuck.status == 200 and stuck.elapsed < SCRAPE_TIMEOUT
        assert stuck.up == 0
        assert len(fake.latest_requests()) == 1  # no second poll was started beside the stuck one
    finally:
        release.set()


def test_retry_after_from_stats_holds_every_poll(fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    h = harness(SKILLABLE_COLLECTOR_STATS="true")
    fake.fault(f.retry_after(429, "300"), endpoint="stats")
    assert h.scrape().up == 1  # LatestResults worked; /stats was rate limited
    assert h.scrape().failures() == 0
    seen = len(fake.state.seen)
    for _ in range(5):
        h.mono.advance(59)
        h.scrape()
    assert len(fake.state.seen) == seen  # no endpoint is asked before Retry-After expires
    h.mono.advance(10)
    assert h.scrape().up == 1
    assert [s.path.rsplit("/", 1)[-1] for s in fake.state.seen[seen:]] == ["LatestResults", "stats"]


def test_an_untrusted_api_certificate_is_a_connect_error(certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    server = FakeSkillable(now=NOW, tls=server_context(certs))
    h = Harness(server)
    try:
        scrape = h.scrape()
        assert scrape.up == 0 and scrape.failures("connect_error") == 1
        assert server.latest_requests() == []  # the key never went to a server it could not verify
    finally:
        h.close()
        server.stop()


def test_an_outage_longer_than_seven_days_asks_for_the_seven_days_the_api_allows(
    fake: FakeSkillable, harness: Callable[..., Harness]
) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness()
    assert h.scrape().up == 1
    fake.fault_always(f.http_status(503))
    for _ in range(3):
        fake.advance(3 * 86400)  # nine days of outage
        h.mono.advance(3 * 86400)
        assert h.scrape().up == 0
    fake.add(lab(2, int(fake.clock()) - 8 * 86400, int(fake.clock()) - 8 * 86400 + 60, status=4),  # lost: too old
             lab(3, int(fake.clock()) - 6 * 86400, int(fake.clock()) - 6 * 86400 + 60, status=20))
    fake.heal()
    h.mono.advance(400)
    healed = h.scrape()
    assert healed.up == 1
    assert fake.latest_requests()[-1].minutes == 10080  # the API's limit, not 9 days
    assert total(healed.samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 1
    assert total(healed.samples, "skillable_lab_instances_ended_total", completion_status="complete") == 1


def test_a_bug_handling_an_answer_is_internal_error_not_a_failed_scrape(
    fake: FakeSkillable, harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from exporter.state import FleetState

    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness()
    real = FleetState.apply

    def broken(self: FleetState, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(FleetState, "apply", broken)
    scrape = h.scrape()
    assert scrape.status == 200 and scrape.up == 0 and scrape.failures("internal_error") == 1
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    monkeypatch.setattr(FleetState, "apply", real)
    h.mono.advance(5)
    healed = h.scrape()
    assert healed.up == 1 and total(healed.samples, "skillable_lab_instances_ended_total") == 1
