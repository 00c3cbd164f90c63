"""The state file: restarts continue every counter, with no reset and no double count.

In-process tests restart an ExporterApp on the fake's clock; the process tests
SIGKILL a real exporter between polls and start it again on the same file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from exporter import statefile
from exporter.app import ExporterApp
from exporter.client import SkillableClient
from exporter.config import ConfigError, load_config
from exporter.model import decode_latest_results
from exporter.state import OBSERVED
from exporter.persistence import (
    FORMAT,
    VERSION,
    AccountState,
    StateStore,
    api_identity,
    decode_account,
    encode_account,
    load_state_file,
    read_state_file,
    restore_account,
)
from exporter.poller import Poller

from . import fakeapi as f
from .harness import ROOT
from .fakeapi import FakeSkillable, lab
from .harness import Harness, Samples, eventually, examples, lab_counters, parse, total
from .harness import harness  # noqa: F401 (the fixture)
from .test_model_properties import chaos_record, valid_record

NOW = 1_800_000_000
FIRST_POLL_MINUTES = 1440  # max(window 60, --skillable.max-running-minutes 1440): a first poll's lookback


def ended_saved(saved: AccountState) -> int:
    return sum(sum(t.ended.values()) for t in saved.fleet.dimensions["place"].tallies)

# Every counter the exporter serves: none may go down across a restart.
COUNTERS = (
    "skillable_lab_instances_started_total",
    "skillable_lab_instances_ended_total",
    "skillable_exams_total",
    "skillable_exams_passed_total",
    "skillable_lab_run_time_seconds_count",
    "skillable_lab_run_time_seconds_sum",
    "skillable_lab_run_time_seconds_bucket",
    "skillable_lab_task_completion_ratio_count",
    "skillable_lab_task_completion_ratio_bucket",
    "skillable_exam_score_ratio_count",
    "skillable_exam_score_ratio_bucket",
    "skillable_api_requests_total",
    "skillable_api_request_failures_total",
    "skillable_results_invalid_total",
    "skillable_lab_host_overflow_total",
)


def counters(samples: Samples) -> dict[Any, float]:
    return {key: value for key, value in samples.items() if key[0] in COUNTERS}


def assert_no_reset(before: Samples, after: Samples) -> None:
    old, new = counters(before), counters(after)
    missing = [key for key in old if key not in new]
    assert not missing, f"series gone after restart: {missing[:3]}"
    lower = [(key, old[key], new[key]) for key in old if new[key] < old[key]]
    assert not lower, f"counters went down (a reset): {lower[:3]}"


def started_truth(fake: FakeSkillable) -> int:
    return len(fake.state.records)


def ended_truth(fake: FakeSkillable, status: int) -> int:
    return sum(1 for r in fake.state.records if r["End"] is not None and r["CompletionStatus"] == status)


# -- in process, on the fake's clock -----------------------------------------------


@pytest.mark.integration
def test_restart_continues_counters_and_asks_only_since_saved_success(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = str(tmp_path / "state.json")
    fake.add(
        lab(1, NOW - 40 * 60, NOW - 30 * 60, status=4, TotalRunTimeSeconds=600, TaskCompletePercent=100),
        lab(2, NOW - 20 * 60),
        lab(3, NOW - 3 * 60, NOW - 60, status=20, IsExam=True, ExamScore=40, ExamMaxPossibleScore=100,
            ExamPassed=False),
        lab(4, NOW - 90, NOW - 30, status=4, DatacenterId="bad"),  # invalid: counted in results_invalid_total
    )
    first = harness(path)
    fake.fault(f.http_status(500), endpoint="LatestResults")
    assert first.scrape().up == 0
    first.mono.advance(10)
    before = first.scrape()
    assert before.up == 1
    assert total(before.samples, "skillable_lab_instances_started_total") == 3
    assert total(before.samples, "skillable_results_invalid_total") == 1
    first.close()  # as on SIGTERM: the file is written

    saved = read_state_file(path)[""]
    assert saved.last_success == NOW and len(saved.fleet.instances) == 3

    # While the exporter is down: lab 2 ends, lab 5 starts and ends, lab 6 starts.
    fake.advance(7 * 60)
    fake.update(2, End=NOW + 60, CompletionStatus=4, TotalRunTimeSeconds=1260)
    fake.add(lab(5, NOW + 100, NOW + 200, status=1), lab(6, NOW + 400))
    second = harness(path)
    # Before its first poll, the restored state is already what it serves.
    restored = parse(generate_latest(second.app.registry).decode())
    assert counters(restored) == counters(before.samples)
    assert total(restored, "skillable_last_success_timestamp_seconds") == NOW
    assert len(fake.latest_requests()) == 2
    after = second.scrape()
    assert after.up == 1
    assert fake.latest_requests()[-1].minutes == math.ceil(7) + 2  # 7 minutes since the saved success, + overlap
    assert_no_reset(before.samples, after.samples)
    assert total(after.samples, "skillable_lab_instances_started_total") == started_truth(fake) - 1  # lab 4 invalid
    assert total(after.samples, "skillable_lab_instances_ended_total", completion_status="complete") == 2
    assert total(after.samples, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 1
    assert total(after.samples, "skillable_lab_instances_ended_total", completion_status="cancelled") == 1
    assert total(after.samples, "skillable_exams_total") == 1  # lab 3's exam came back in the overlap: not again
    # Lab 4 is still in the 9-minute ask: skipped again. An invalid record has no trustworthy id,
    # so this counter counts skips per poll, not distinct records.
    assert total(after.samples, "skillable_results_invalid_total") == 2
    assert total(after.samples, "skillable_api_requests_total", endpoint="LatestResults") == 3
    assert total(after.samples, "skillable_api_request_failures_total", reason="http_error") == 1
    assert total(after.samples, "skillable_lab_instances_running") == 1  # lab 6; lab 2 has ended
    assert total(after.samples, "skillable_lab_run_time_seconds_count") == 4  # one per ended lab


@pytest.mark.integration
def test_without_a_state_file_a_restart_starts_from_zero(fake: FakeSkillable, harness: Callable[..., Harness]) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    first = harness()
    assert total(first.scrape().samples, "skillable_lab_instances_ended_total") == 1
    first.close()
    fake.advance(60)
    second = harness()
    second.scrape()
    assert fake.latest_requests()[-1].minutes == FIRST_POLL_MINUTES  # a first poll again


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "does not exist"),
        (b"", "cannot be used"),
        (b"\x00\x01garbage", "cannot be used"),
        (b'{"format": "skillable-exporter-state", "version": 1, "saved_at": 1, "accounts": {"": {"last_su',
         "cannot be used"),
        (json.dumps({"format": FORMAT, "version": VERSION + 1, "saved_at": 1, "accounts": {}}).encode(),
         "cannot be used"),
        (json.dumps({"format": "something-else", "version": 1}).encode(), "cannot be used"),
        (json.dumps({"format": FORMAT, "version": VERSION, "saved_at": 1,
                     "accounts": {"": {"last_success": "yesterday"}}}).encode(), "cannot be used"),
        (json.dumps([1, 2, 3]).encode(), "cannot be used"),
    ],
    ids=["missing", "empty", "garbage", "truncated", "newer_version", "foreign_format", "wrong_types", "not_object"],
)
@pytest.mark.integration
def test_unusable_state_file_gives_one_warning_and_a_clean_start(
    content: bytes | None, problem: str, fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="exporter")
    path = tmp_path / "state.json"
    if content is not None:
        path.write_bytes(content)
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness(str(path))
    scrape = h.scrape()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and problem in warnings[0], warnings
    assert fake.latest_requests()[-1].minutes == FIRST_POLL_MINUTES  # a clean start's first poll
    assert total(scrape.samples, "skillable_lab_instances_ended_total") == 1
    assert h.store is not None and h.store.flush(5)
    assert read_state_file(str(path))[""].last_success == NOW  # replaced by a good file


@pytest.mark.integration
def test_histogram_layout_of_another_version_is_refused_per_account(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    fake.add(lab(1, NOW - 600, NOW - 60, status=4, TotalRunTimeSeconds=540))
    first = harness(str(path))
    first.scrape()
    first.close()
    doc = json.loads(path.read_text())
    observers = doc["accounts"][""]["fleet"]["dimensions"]["place"]["observers"]
    next(o for o in observers if o[1] == "run_time")[2].append(0)  # one bucket too many
    path.write_text(json.dumps(doc))
    caplog.set_level(logging.INFO, logger="exporter")
    harness(str(path)).scrape()
    assert any("not restored" in r.getMessage() for r in caplog.records)
    assert fake.latest_requests()[-1].minutes == FIRST_POLL_MINUTES


@pytest.mark.integration
def test_saved_after_every_poll_atomically_and_privately(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = harness(str(path))
    assert h.store is not None
    for i in range(5):
        fake.advance(60)
        h.mono.advance(60)
        if i == 2:
            fake.fault(f.reset(), endpoint="LatestResults")
        h.scrape()
        assert h.store.flush(5)
        saved = read_state_file(str(path))[""]
        # Failed polls are saved too: their failure counter must survive a SIGKILL as well.
        assert saved.requests["LatestResults"] == i + 1
        assert sum(fl.count for fl in saved.failures) == (1 if i >= 2 else 0)
    # No temporary file left behind; the lock file stays (deleting one races with the next holder).
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.json.lock"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(str(path) + ".lock").st_mode) == 0o600
    text = path.read_text()
    assert fake.state.api_key not in text and "user-secret-555" not in text and "203.0.113.9" not in text


@pytest.mark.integration
def test_a_failing_disk_never_fails_a_scrape_and_is_logged_once(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    h = harness(str(folder / "state.json"))
    assert h.store is not None
    h.scrape()
    assert h.store.flush(5)
    caplog.set_level(logging.INFO, logger="exporter")
    (folder / "state.json").unlink()
    (folder / "state.json.lock").unlink()
    folder.rmdir()
    folder.write_text("a file where the folder was")  # every write now fails
    for _ in range(4):
        h.mono.advance(60)
        assert h.scrape().up == 1
        assert h.store.flush(5)
    errors = [r for r in caplog.records if "cannot write state file" in r.getMessage()]
    assert len(errors) == 1


@pytest.mark.integration
def test_accounts_are_kept_apart_by_name(fake: FakeSkillable, tmp_path: Path) -> None:
    other = FakeSkillable(now=NOW)
    try:
        fake.add(lab(1, NOW - 600, NOW - 60, status=4))
        other.add(*(lab(100 + i, NOW - 300, NOW - 100, status=20) for i in range(3)))
        os.environ["KEY_A"], os.environ["KEY_B"] = fake.state.api_key, other.state.api_key
        config = tmp_path / "config.yaml"
        config.write_text(
            "accounts:\n"
            f"  - {{name: emea, api_key_env: KEY_A, api_url: '{fake.url}'}}\n"
            f"  - {{name: americas, api_key_env: KEY_B, api_url: '{other.url}'}}\n"
        )
        state = str(tmp_path / "state.json")
        def run() -> tuple[ExporterApp, StateStore]:
            app = ExporterApp(load_config({"config_file": str(config)}, os.environ), clock=fake.clock)
            store = statefile.open_store(state)
            statefile.attach(store, app.pollers)
            return app, store

        app, store = run()
        app.metrics("", "5")
        statefile.shutdown(store, app.pollers, 5)
        app.close()
        saved = read_state_file(state)
        assert set(saved) == {"emea", "americas"}
        assert ended_saved(saved["americas"]) == 3
        assert ended_saved(saved["emea"]) == 1
        # Swap the order of the accounts: each gets its own state back, by name.
        config.write_text(
            "accounts:\n"
            f"  - {{name: americas, api_key_env: KEY_B, api_url: '{other.url}'}}\n"
            f"  - {{name: emea, api_key_env: KEY_A, api_url: '{fake.url}'}}\n"
        )
        app, store = run()
        assert sum(app.pollers["americas"].view().snapshot["place"].ended.values()) == 3
        assert sum(app.pollers["emea"].view().snapshot["place"].ended.values()) == 1
        statefile.shutdown(store, app.pollers, 5)
        app.close()
    finally:
        os.environ.pop("KEY_A", None)
        os.environ.pop("KEY_B", None)
        other.stop()


@pytest.mark.integration
def test_state_file_folder_must_exist(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", f"--storage.state-file={tmp_path}/missing/state.json", "--config.check"],
        env={**os.environ, "SKILLABLE_API_KEY": "k"}, capture_output=True, text=True, cwd=ROOT, timeout=30,
    )
    assert result.returncode == 2
    assert "storage.state-file" in result.stderr and "does not exist" in result.stderr


# -- a real process, SIGKILLed between polls -----------------------------------------


def wait_for_saved(path: Path, requests_made: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_state_file(str(path))[""].requests.get("LatestResults") == requests_made:
                return
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"state file never recorded {requests_made} polls")


@pytest.mark.integration
def test_sigkill_between_polls_then_restart_continues_every_counter(
    run_exporter: Any, tmp_path: Path
) -> None:
    live = FakeSkillable(live=True)
    try:
        now = int(time.time())
        live.add(
            lab(1, now - 600, now - 300, status=4, TotalRunTimeSeconds=300),
            lab(2, now - 120),
            lab(3, now - 60, now - 30, status=20, IsExam=True, ExamScore=70, ExamMaxPossibleScore=100,
                ExamPassed=True),
        )
        path = tmp_path / "state.json"
        env = {"SKILLABLE_API_URL": live.url, "SKILLABLE_API_KEY": live.state.api_key,
               "SKILLABLE_STATE_FILE": str(path), "SKILLABLE_COLLECTOR_STATS": "false",
               "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"}
        exporter = run_exporter("--skillable.min-poll-interval=0", env=env)  # every scrape polls
        assert "skillable_up 1.0" in exporter.get("/metrics").text
        live.fault(f.http_status(500), endpoint="LatestResults")
        assert "skillable_up 0.0" in exporter.get("/metrics").text
        live.add(lab(4, int(time.time()) - 5))
        def recovered() -> str | None:  # scrapes answer from memory until the backoff has passed
            text = exporter.get("/metrics").text
            return text if "skillable_up 1.0" in text else None

        text = eventually(recovered, 10, "a good poll after the backoff")
        before = parse(text)
        wait_for_saved(path, 3)

        exporter.proc.send_signal(signal.SIGKILL)
        exporter.proc.wait(10)
        assert exporter.proc.returncode == -signal.SIGKILL

        # While it is dead: lab 2 ends, lab 5 starts and ends, lab 6 starts.
        now = int(time.time())
        live.update(2, End=now - 2, CompletionStatus=4, TotalRunTimeSeconds=118)
        live.add(lab(5, now - 20, now - 10, status=1, TotalRunTimeSeconds=10), lab(6, now - 1))
        saved_success = read_state_file(str(path))[""].last_success
        assert saved_success is not None

        restarted = run_exporter("--skillable.min-poll-interval=0", env=env)
        after = parse(restarted.get("/metrics").text)
        asked = live.latest_requests()[-1].minutes
        assert asked is not None
        assert asked == math.ceil((live.latest_requests()[-1].at - saved_success) / 60) + 2
        assert asked < 60  # not the whole window: the minutes since the saved last success
        assert total(after, "skillable_up") == 1
        assert_no_reset(before, after)
        assert total(after, "skillable_lab_instances_started_total") == 6  # each lab once
        assert total(after, "skillable_lab_instances_ended_total", completion_status="complete") == 2
        assert total(after, "skillable_lab_instances_ended_total", completion_status="lab_creation_failed") == 1
        assert total(after, "skillable_lab_instances_ended_total", completion_status="cancelled") == 1
        assert total(after, "skillable_exams_total") == 1 and total(after, "skillable_exams_passed_total") == 1
        assert total(after, "skillable_lab_run_time_seconds_count") == 4
        assert total(after, "skillable_api_requests_total", endpoint="LatestResults") == 4
        assert total(after, "skillable_api_request_failures_total") == 1
        # Exactly the events that happened while it was down were added, nothing else.
        delta = {k: after[k] - v for k, v in lab_counters(before).items() if after[k] != v}
        assert sum(v for (n, _), v in delta.items() if n == "skillable_lab_instances_started_total") == 2
        assert sum(v for (n, _), v in delta.items() if n == "skillable_lab_instances_ended_total") == 2
        assert restarted.stop() == 0
        assert "restored state" in restarted.log()
    finally:
        live.stop()


@pytest.mark.integration
def test_scrapes_wait_for_the_save_only_when_their_answer_needs_a_poll_after_it(fake: FakeSkillable) -> None:
    """The save runs after the poll's result is in: the scrape that asked has its answer at once. A scrape
    that comes while the save runs and needs no poll (within the minimum interval) is answered from that
    result, without waiting. One that needs a poll is not answered with a result older than itself: its
    poll runs as soon as the save is done (never beside it: one poll or save at a time changes the state)."""
    from .harness import MonotonicStub, make_poller

    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    mono = MonotonicStub()
    poller = make_poller(fake, monotonic=mono, min_interval=30.0)
    events: list[str] = []
    saving = threading.Event()
    release = threading.Event()

    def slow_save(_: object) -> None:  # a slow disk, or a huge state to encode
        saving.set()
        release.wait(10)
        events.append("save done")

    def answer(handler: Any) -> None:
        events.append("request")
        handler.answer()

    fake.fault_always(answer)
    poller.on_poll = slow_save
    started = time.monotonic()
    poller.refresh(5)
    assert time.monotonic() - started < 1.0 and poller.view().health.up  # the result, without the save
    assert saving.wait(5)
    mono.advance(10)  # within the minimum interval: the result in is the answer
    started = time.monotonic()
    poller.refresh(5)
    assert time.monotonic() - started < 0.5 and events == ["request"]

    mono.advance(30)  # due: this scrape's answer is a poll made after it came
    asked = poller.request()
    assert asked is not None and poller.request() == asked  # a scrape after it joins that poll too
    threading.Timer(0.3, release.set).start()
    assert poller.wait(asked, 5)
    assert events[:3] == ["request", "save done", "request"]
    assert len(fake.latest_requests()) == 2
    assert poller.stop(5)  # stop() waits for the second save


# -- hostile input 2, 8 and 12 (docs/failure-modes.md) -------------------------------------


def exporter_env(api: FakeSkillable, path: Path) -> dict[str, str]:
    return {"SKILLABLE_API_URL": api.url, "SKILLABLE_API_KEY": api.state.api_key,
            "SKILLABLE_STATE_FILE": str(path), "SKILLABLE_COLLECTOR_STATS": "false",
            "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"}


@pytest.mark.integration
def test_a_nan_from_the_api_is_an_invalid_record_and_every_counter_survives_the_restart(
    run_exporter: Any, tmp_path: Path
) -> None:
    """The case as first seen: one "NaN" made a histogram sum NaN, the file stored null, the restore refused
    the whole file and every counter started again. Now the record is invalid and nothing else moves."""
    live = FakeSkillable(live=True)
    try:
        now = int(time.time())
        live.add(*(lab(i, now - 900 + i, now - 300 + i, status=4, TaskCompletePercent=90) for i in range(1, 52)))
        live.add(lab(99, now - 600, now - 200, status=4, TaskCompletePercent="NaN"),
                 lab(98, now - 600, now - 200, status=4, ExamScore="Infinity", ExamMaxPossibleScore=10))
        path = tmp_path / "state.json"
        exporter = run_exporter(env=exporter_env(live, path))
        before = parse(exporter.get("/metrics").text)
        assert total(before, "skillable_lab_instances_started_total") == 51
        assert total(before, "skillable_results_invalid_total") == 2
        assert math.isfinite(total(before, "skillable_lab_task_completion_ratio_sum"))
        assert exporter.stop() == 0  # SIGTERM: the file is written
        written = load_state_file(str(path))
        assert written.left_out == {} and written.refused == {}  # no null sum: the file reads back whole

        restarted = run_exporter(env=exporter_env(live, path))
        after = parse(restarted.get("/metrics").text)
        assert live.latest_requests()[-1].minutes < 60  # restored: only the minutes since the saved success
        assert_no_reset(before, after)
        assert total(after, "skillable_lab_instances_started_total") == 51
        assert total(after, "skillable_lab_task_completion_ratio_count") == 51
        assert restarted.stop() == 0
        assert "restored state" in restarted.log() and "cannot be used" not in restarted.log()
    finally:
        live.stop()


def saved_doc(fake: FakeSkillable, harness: Callable[..., Harness], path: Path) -> dict[str, Any]:
    """Run one poll over the fake's labs, stop (the file is written) and return the file as JSON."""
    h = harness(str(path))
    assert h.scrape().up == 1
    h.close()
    return json.loads(path.read_text())


def two_accounts(fake: FakeSkillable, harness: Callable[..., Harness], path: Path) -> dict[str, Any]:
    """A file with accounts "" and "second", as two exporters of one config would leave it."""
    fake.add(
        lab(1, NOW - 600, NOW - 60, status=4, TotalRunTimeSeconds=540, TaskCompletePercent=80),
        lab(2, NOW - 500, NOW - 50, status=20, TotalRunTimeSeconds=450, TaskCompletePercent=10),
        lab(3, NOW - 400, datacenter=7),
    )
    doc = saved_doc(fake, harness, path)
    doc["accounts"]["second"] = json.loads(json.dumps(doc["accounts"][""]))
    doc.setdefault("api_urls", {})["second"] = fake.url
    return doc


def observer_at(dimension: dict[str, Any], table: str) -> int:
    """Where the first saved observer (histogram or summary) of `table` is in a saved dimension."""
    return next(i for i, saved in enumerate(dimension["observers"]) if saved[1] == table)


@pytest.mark.integration
def test_one_bad_entry_is_left_out_never_the_file_nor_the_other_accounts(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    doc = two_accounts(fake, harness, path)
    bad = doc["accounts"]["second"]
    # What a NaN used to become (null), a sum that is not a number, a time that is null, a bool count.
    place = bad["fleet"]["dimensions"]["place"]
    place["observers"][observer_at(place, "task_completion")][3] = None
    place["observers"][observer_at(place, "run_time")][3] = "NaN"
    bad["fleet"]["instances"][0][5] = None  # last_change
    place["tallies"][0][1] = True  # started
    whole = read_state_file(str(path))[""]  # as written, before the damage
    path.write_text(json.dumps(doc))

    saved = read_state_file(str(path))
    assert set(saved) == {"", "second"}
    assert saved[""] == whole  # the good account is whole
    good, second = saved[""].fleet, saved["second"].fleet
    assert len(second.instances) == len(good.instances) - 1
    good_place, second_place = good.dimensions["place"], second.dimensions["place"]
    assert len(second_place.observers) == len(good_place.observers) - 2  # the task and run time histograms
    assert len(second_place.tallies) == len(good_place.tallies) - 1
    # the rest is kept
    assert second.dimensions["profile"] == good.dimensions["profile"]
    assert saved["second"].requests == saved[""].requests
    assert load_state_file(str(path)).left_out["second"][0] == 4


@pytest.mark.integration
def test_an_account_with_bad_entries_restores_the_rest_and_says_so_once(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    fake.add(
        lab(1, NOW - 600, NOW - 60, status=4, TotalRunTimeSeconds=540, TaskCompletePercent=80, datacenter=1),
        lab(2, NOW - 500, NOW - 50, status=20, TotalRunTimeSeconds=450, TaskCompletePercent=10, datacenter=2),
    )
    doc = saved_doc(fake, harness, path)
    account = doc["accounts"][""]
    place = account["fleet"]["dimensions"]["place"]
    place["observers"][observer_at(place, "task_completion")][3] = None  # a NaN sum was written as null
    path.write_text(json.dumps(doc))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="exporter")
    h = harness(str(path))
    restored = parse(generate_latest(h.app.registry).decode())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "1 bad entries left out" in warnings[0] and "observers[" in warnings[0]
    assert total(restored, "skillable_lab_instances_ended_total") == 2
    assert total(restored, "skillable_lab_run_time_seconds_count") == 2
    assert total(restored, "skillable_lab_task_completion_ratio_count") == 1  # one region's histogram left out
    assert all(math.isfinite(v) for v in restored.values())
    h.scrape()
    assert fake.latest_requests()[-1].minutes < 60  # restored: asks only since the saved success
    assert h.store is not None and h.store.flush(5)
    rewritten = load_state_file(str(path))
    assert rewritten.left_out == {} and rewritten.refused == {}  # the next write holds only what reads back


@pytest.mark.integration
@pytest.mark.parametrize("where", ["started", "ended", "exams", "requests", "failures", "run_time_bucket"])
def test_negative_counters_in_a_state_file_are_left_out_not_served(
    where: str, fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "state.json"
    fake.add(
        lab(1, NOW - 600, NOW - 60, status=4, TotalRunTimeSeconds=540, datacenter=1, IsExam=True, ExamScore=5,
            ExamMaxPossibleScore=10, ExamPassed=True),
        lab(2, NOW - 500, NOW - 50, status=4, TotalRunTimeSeconds=450, datacenter=2),
    )
    fake.fault(f.http_status(500), endpoint="LatestResults")
    first = harness(str(path))
    first.scrape()
    first.mono.advance(10)
    first.scrape()
    first.close()
    doc = json.loads(path.read_text())
    account = doc["accounts"][""]
    if where == "requests":
        account["requests"]["LatestResults"] = -1000
    elif where == "failures":
        account["failures"] = [[e, r, -5 if r == "http_error" else n] for e, r, n in account["failures"]]
    elif where == "run_time_bucket":
        place = account["fleet"]["dimensions"]["place"]
        place["observers"][observer_at(place, "run_time")][2][0] = -3
    elif where == "ended":
        tally = account["fleet"]["dimensions"]["place"]["tallies"][0]
        tally[2] = dict.fromkeys(tally[2], -7)
    else:  # a count of a saved tally: [key, started, ended, exams, exams_passed]
        account["fleet"]["dimensions"]["place"]["tallies"][0][{"started": 1, "exams": 3}[where]] = -7
    path.write_text(json.dumps(doc))
    caplog.set_level(logging.INFO, logger="exporter")
    h = harness(str(path))
    restored = parse(generate_latest(h.app.registry).decode())
    negative = [(k, v) for k, v in restored.items() if v < 0]
    assert negative == []
    assert any("bad entries left out" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # One entry left out, not the account: the other counters came back.
    assert total(restored, "skillable_lab_instances_started_total") >= 1
    assert total(restored, "skillable_lab_instances_ended_total") >= 1
    assert total(restored, "skillable_last_success_timestamp_seconds") == NOW


@pytest.mark.integration
@pytest.mark.parametrize("field, value", [("fleet.invalid_total", -1), ("fleet.expired_total", -2),
                                          ("fleet.invalid_total", 1.5), ("last_success", "NaN")])
def test_a_bad_plain_field_refuses_its_account_not_the_others(
    field: str, value: Any, fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    doc = two_accounts(fake, harness, path)
    where = doc["accounts"]["second"]
    *parents, name = field.split(".")
    for parent in parents:
        where = where[parent]
    where[name] = value
    path.write_text(json.dumps(doc))
    assert set(read_state_file(str(path))) == {""}
    assert field.split(".")[-1] in load_state_file(str(path)).refused["second"]


@pytest.mark.integration
def test_the_state_file_never_holds_a_value_its_reader_rejects(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    """Even a state that got a non-finite sum from somewhere (a bug) is written as a file that reads back:
    the bad entry is left out at the restore, and the next write no longer holds it."""
    path = tmp_path / "state.json"
    fake.add(lab(1, NOW - 600, NOW - 60, status=4, TotalRunTimeSeconds=540, TaskCompletePercent=80))
    h = harness(str(path))
    h.scrape()
    place = h.poller.state.tallies["place"]
    task_completion = place.observers[OBSERVED.index("task_completion")]
    task_completion[place.observer_index[("3", "2")]].total = float("nan")  # as "NaN" from the API made it on main
    h.close()
    assert set(read_state_file(str(path))) == {""}
    assert load_state_file(str(path)).left_out[""][0] == 1
    second = harness(str(path))
    assert total(parse(generate_latest(second.app.registry).decode()), "skillable_lab_instances_ended_total") == 1
    second.close()
    assert load_state_file(str(path)).left_out == {}


# -- whose accounts: the API URL, and one exporter per file ------------------------------------


@pytest.mark.integration
def test_a_file_is_never_restored_into_another_api_urls_account(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Exporter A's file is never restored into exporter B (A's 3 labs must not become B's), and A's
    state stays in the file until B has polled successfully once."""
    other = FakeSkillable(now=NOW)
    try:
        path = tmp_path / "state.json"
        fake.add(*(lab(i, NOW - 600, NOW - 60, status=4) for i in range(1, 4)))
        other.add(*(lab(100 + i, NOW - 300, NOW - 100, status=20) for i in range(7)))
        a = harness(str(path))
        assert total(a.scrape().samples, "skillable_lab_instances_started_total") == 3
        a.close()
        doc = json.loads(path.read_text())

        # B (another API URL) on A's file, while B's API fails: a clean start, A's state untouched.
        caplog.set_level(logging.INFO, logger="exporter")
        other.fault(f.http_status(500), endpoint="LatestResults")
        b = harness(str(path), SKILLABLE_API_URL=other.url, SKILLABLE_API_KEY=other.state.api_key)
        scrape = b.scrape()
        assert scrape.up == 0 and total(scrape.samples, "skillable_lab_instances_started_total") == 0
        b.close()
        mismatch = [r.getMessage() for r in caplog.records if "was saved for API URL" in r.getMessage()]
        assert len(mismatch) == 1 and fake.url in mismatch[0] and other.url in mismatch[0]
        kept = json.loads(path.read_text())
        assert kept.get("api_urls") == {"": fake.url} and kept["accounts"] == doc["accounts"]
        assert fake.state.api_key not in path.read_text() and other.state.api_key not in path.read_text()

        # A again: its counters come back, as if B never ran.
        a = harness(str(path))
        assert total(parse(generate_latest(a.app.registry).decode()), "skillable_lab_instances_started_total") == 3
        a.close()

        # B, healthy: its own 7 labs, never 3 + 7; once it succeeded, the file is B's.
        b = harness(str(path), SKILLABLE_API_URL=other.url, SKILLABLE_API_KEY=other.state.api_key)
        assert total(b.scrape().samples, "skillable_lab_instances_started_total") == 7
        b.close()
        assert json.loads(path.read_text())["api_urls"] == {"": other.url}
        assert sum(t.started for t in read_state_file(str(path))[""].fleet.dimensions["place"].tallies) == 7
    finally:
        other.stop()


@pytest.mark.integration
def test_files_without_api_urls_are_restored_as_before(
    fake: FakeSkillable, harness: Callable[..., Harness], tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    doc = saved_doc(fake, harness, path)
    del doc["api_urls"]  # the layout before the URLs were recorded
    path.write_text(json.dumps(doc))
    h = harness(str(path))
    assert total(parse(generate_latest(h.app.registry).decode()), "skillable_lab_instances_ended_total") == 1


@pytest.mark.integration
def test_an_unreadable_api_url_restores_nothing_into_that_account_only(
    fake: FakeSkillable, tmp_path: Path
) -> None:
    path = tmp_path / "state.json"
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    h = Harness(fake, str(path))
    h.scrape()
    h.close()
    doc = json.loads(path.read_text())
    doc["accounts"]["second"] = doc["accounts"][""]
    doc["api_urls"]["second"] = {"not": "a url"}
    path.write_text(json.dumps(doc))
    saved = load_state_file(str(path))
    assert set(saved.accounts) == {"", "second"} and saved.api_urls["second"] == "(unreadable)"
    assert saved.api_urls[""] == fake.url


def test_api_identity_keeps_no_credentials() -> None:
    assert api_identity("https://user:secret@api.example.com:8443/api/v3/?key=k#x") == \
        "https://api.example.com:8443/api/v3"
    assert api_identity("HTTPS://API.example.com/api/v3/") == api_identity("https://api.example.com/api/v3")


def test_one_process_cannot_open_a_state_file_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    first = StateStore(path)
    try:
        with pytest.raises(ConfigError, match=r"storage\.state-file.*in use by another exporter"):
            statefile.open_store(path)
    finally:
        first.close({})
    StateStore(path).close({})  # released on close


@pytest.mark.integration
def test_a_second_exporter_on_the_same_state_file_exits_2_with_one_line(
    run_exporter: Any, tmp_path: Path
) -> None:
    live = FakeSkillable(live=True)
    try:
        live.add(lab(1, int(time.time()) - 600, int(time.time()) - 60, status=4))
        path = tmp_path / "state.json"
        first = run_exporter(env=exporter_env(live, path))
        assert "skillable_up 1.0" in first.get("/metrics").text
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")} | exporter_env(live, path)
        second = subprocess.Popen(
            [sys.executable, "-m", "exporter", "--web.listen-address=127.0.0.1:0"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            _, err = second.communicate(timeout=30)
        finally:
            if second.poll() is None:
                second.kill()
                second.wait(5)
        assert second.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "storage.state-file" in lines[0] and "in use by another exporter" in lines[0]
        assert f"pid {first.proc.pid}" in lines[0]
        # The first one is not disturbed, and its file is still its own.
        assert "skillable_up 1.0" in first.get("/metrics").text
        assert first.stop() == 0
        assert json.loads(path.read_text())["api_urls"] == {"": live.url}
        # Once it is gone, the next one starts on the file and restores it.
        third = run_exporter(env=exporter_env(live, path))
        assert "restored state" in third.log()
    finally:
        live.stop()


# -- non-regular files and temporary files --------------------------------------------------


def run_to_exit(args: list[str], env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")} | env
    proc = subprocess.Popen([sys.executable, "-m", "exporter", "--web.listen-address=127.0.0.1:0", *args],
                            env=base, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise AssertionError(f"the exporter did not exit within {timeout} s: it hangs") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.integration
@pytest.mark.parametrize("at", ["state", "lock"])
@pytest.mark.parametrize("check", [False, True], ids=["serve", "config_check"])
def test_a_fifo_at_the_state_path_is_refused_at_start(at: str, check: bool, tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    os.mkfifo(path if at == "state" else tmp_path / "state.json.lock")
    result = run_to_exit(["--config.check"] if check else [],
                         {"SKILLABLE_API_KEY": "k", "SKILLABLE_STATE_FILE": str(path),
                          "SKILLABLE_API_URL": "http://127.0.0.1:9/api/v3"}, timeout=20)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.state-file" in lines[0] and "a FIFO, not a regular file" in lines[0]


@pytest.mark.integration
def test_a_device_at_the_state_path_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.symlink_to("/dev/zero")  # reading it would never end
    result = run_to_exit([], {"SKILLABLE_API_KEY": "k", "SKILLABLE_STATE_FILE": str(path)}, timeout=20)
    assert result.returncode == 2 and "a character device, not a regular file" in result.stderr


# A process writing the state file as the exporter does, on a disk whose fsync never returns:
# SIGKILLed there, it leaves a full-size temporary file behind, named by the exporter's own code.
_SLOW_DISK_WRITER = """
import os, sys, time
from exporter import persistence
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(120))
persistence.write_atomically(sys.argv[1], b"x" * int(sys.argv[2]))
"""


def killed_mid_write(path: Path, size: int) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DISK_WRITER, str(path), str(size)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.integration
def test_temporary_files_left_by_sigkill_mid_write_are_removed_at_start(run_exporter: Any, tmp_path: Path) -> None:
    live = FakeSkillable(live=True)
    try:
        live.add(lab(1, int(time.time()) - 600, int(time.time()) - 60, status=4))
        path = tmp_path / "state.json"
        for _ in range(3):
            killed_mid_write(path, 256 * 1024)
        leftovers = sorted(name for name in os.listdir(tmp_path) if name.endswith(".tmp"))
        assert len(leftovers) == 3 and all(os.path.getsize(tmp_path / n) == 256 * 1024 for n in leftovers)
        # Files that are not this state file's temporaries stay where they are.
        bystanders = [".other.json.123-0123abcd.tmp", "state.json.bak", ".state.json.notes.tmp", "keep.tmp"]
        for name in bystanders:
            (tmp_path / name).write_text("not ours")
        exporter = run_exporter(env=exporter_env(live, path))
        assert "skillable_up 1.0" in exporter.get("/metrics").text
        assert exporter.stop() == 0
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["state.json", "state.json.lock", *bystanders, *(p.name for p in tmp_path.glob("exporter-*.log"))])
        assert "removed 3 temporary files left by interrupted writes" in exporter.log()
    finally:
        live.stop()


# -- property: whatever the API sends, the file reads back whole ------------------------------

def idle_poller() -> Poller:
    """A poller that never polls (its client points nowhere): a holder for a state and a health."""
    return Poller(SkillableClient("http://127.0.0.1:9/api/v3", "k", 1024), window_minutes=60, overlap_minutes=2,
                  min_interval=0.0, max_lab_hosts=50)


# Labs that end inside the window, so every number reaches a counter or a histogram sum; each float
# field may carry what the lenient decoder would read as NaN or an infinity.
floats_or_poison = (st.none() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "inf", "12.5", 1e308, -1e308]))
ended_lab = st.builds(
    lambda i, status, seconds, percent, exam, score, maximum: lab(
        i, NOW - 1200, NOW - 60, status=status, TotalRunTimeSeconds=seconds, TaskCompletePercent=percent,
        IsExam=exam, ExamScore=score, ExamMaxPossibleScore=maximum, ExamPassed=exam,
        datacenter=i % 3, region=i % 2),
    st.integers(min_value=1, max_value=40), st.sampled_from([1, 2, 3, 4, 20, 50]),
    st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1), floats_or_poison, st.booleans(),
    floats_or_poison, floats_or_poison,
)


@settings(max_examples=examples(60), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(ended_lab | valid_record | chaos_record, max_size=12),
       st.lists(ended_lab | valid_record | chaos_record, max_size=12))
def test_whatever_the_api_sends_the_state_file_reads_back_with_nothing_left_out(
    first: list[dict[str, Any]], second: list[dict[str, Any]]
) -> None:
    poller = idle_poller()
    for records in (first, second):
        batch = decode_latest_results(json.dumps({"Status": 1, "Results": records}).encode())
        poller.state.apply(batch.results, NOW - 3600)
    fragment = encode_account(poller)
    account, left_out, problem = decode_account(fragment)
    assert left_out == 0, problem  # the strict reader takes every entry the writer wrote
    again = idle_poller()
    again.restore(restore_account(account, again.state))
    assert encode_account(again) == fragment
    poller.client.close()
    again.client.close()
