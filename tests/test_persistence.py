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
from typing import Any, Callable

import pytest

from prometheus_client import generate_latest

from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.persistence import FORMAT, VERSION, AccountState, StateStore, read_state_file

from . import fakeapi as f
from .harness import ROOT
from .fakeapi import FakeSkillable, lab
from .harness import Harness, Samples, eventually, lab_counters, parse, total
from .harness import harness  # noqa: F401 (the fixture)

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
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert fake.state.api_key not in text and "user-secret-555" not in text and "203.0.113.9" not in text


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
    folder.rmdir()
    folder.write_text("a file where the folder was")  # every write now fails
    for _ in range(4):
        h.mono.advance(60)
        assert h.scrape().up == 1
        assert h.store.flush(5)
    errors = [r for r in caplog.records if "cannot write state file" in r.getMessage()]
    assert len(errors) == 1


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
            store = StateStore(state)
            store.attach(app.pollers)
            return app, store

        app, store = run()
        app.metrics("", "5")
        store.shutdown(app.pollers, 5)
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
        assert sum(app.pollers["americas"].view().snapshot.ended.values()) == 3
        assert sum(app.pollers["emea"].view().snapshot.ended.values()) == 1
        store.shutdown(app.pollers, 5)
        app.close()
    finally:
        os.environ.pop("KEY_A", None)
        os.environ.pop("KEY_B", None)
        other.stop()


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
        exporter = run_exporter(env=env)
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

        restarted = run_exporter(env=env)
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


def test_scrapes_never_wait_for_the_save(fake: FakeSkillable) -> None:
    from .harness import MonotonicStub, make_poller

    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    mono = MonotonicStub()
    poller = make_poller(fake, monotonic=mono)
    saving = threading.Event()
    poller.on_poll = lambda p: (saving.set(), time.sleep(1.5))  # a slow disk, or a huge state to encode
    started = time.monotonic()
    poller.refresh(5)
    assert time.monotonic() - started < 1.0 and poller.view().health.up  # the result, without the save
    assert saving.wait(5)
    mono.advance(60)
    started = time.monotonic()
    poller.refresh(5)  # the save still runs: no second poll starts, and no waiting for it either
    assert time.monotonic() - started < 0.5
    assert len(fake.latest_requests()) == 1
    assert poller.stop(5)  # stop() waits for the save
