"""The backfill subcommand against the independent fake API (its /Results), run as a user runs it.

The end-to-end test loads the blocks into a real Prometheus 2.42 (Debian's, on loopback, with a
temporary data folder), checks each backfilled day's increase() against the fake's truth, then
starts the live exporter with the backfill's state file under the same job and instance labels and
checks the seam: no counter resets, and the increase over a range spanning it equals the truth.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import requests
import yaml

from exporter.cli import BACKFILL_SETTINGS, build_parser
from exporter.persistence import read_state_file

from .fakeapi import FakeSkillable, _Handler, lab
from .harness import ROOT, eventually, free_demo_port, free_port, stop_process, tool

pytestmark = pytest.mark.integration  # every test here runs the fake API on loopback, most the backfill command too

DAY = 86400
# The vendor's CompletionStatus table (skillable-api.md), written here, not taken from exporter/.
STATUS = {1: "cancelled", 2: "no_show", 3: "incomplete", 4: "complete", 10: "storage_provisioning_failed",
          20: "lab_creation_failed", 30: "resume_failed", 40: "save_failed", 50: "submitted_for_grading",
          60: "grading_in_progress"}
PLACES = ((101, 1, 1), (102, 1, 1), (201, 2, 3))  # (host, datacenter, delivery region)
PROFILES = (7001, 7002, 7003)
COUNTERS = ("skillable_lab_instances_started_total", "skillable_lab_instances_ended_total",
            "skillable_exams_total", "skillable_exams_passed_total", "skillable_lab_run_time_seconds_count",
            "skillable_lab_run_time_seconds_sum", "skillable_lab_run_time_seconds_bucket",
            "skillable_lab_task_completion_ratio_count", "skillable_exam_score_ratio_count",
            "skillable_lab_profile_instances_started_total", "skillable_lab_profile_instances_ended_total",
            "skillable_lab_profile_exams_total", "skillable_lab_profile_run_time_seconds_count",
            "skillable_lab_profile_run_time_seconds_sum", "skillable_lab_profile_exam_score_ratio_count")


def backfill(fake: FakeSkillable, *args: str, env: dict[str, str] | None = None,
             full_disk: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`skillable-exporter backfill ARGS` against the fake; with `full_disk`, every file written under
    that folder fails as on a full disk (ENOSPC when it is synced to disk)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    environ.update({"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                    "SKILLABLE_MAX_RESPONSE_BYTES": str(64 * 1024 * 1024)}, **(env or {}))
    command = ["-m", "exporter"] if full_disk is None else ["-c", _FULL_DISK, str(full_disk)]
    return subprocess.run([sys.executable, *command, "backfill", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


# The exporter's own entry point, with the disk under one folder full: a file written there gets
# ENOSPC when it is synced (as with delayed allocation, where a full disk shows first at fsync).
_FULL_DISK = """
import errno, os, sys
full = os.path.realpath(sys.argv[1]) + os.sep
synced = os.fsync
def fsync(fd):
    if os.readlink(f"/proc/self/fd/{fd}").startswith(full):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return synced(fd)
os.fsync = fsync
from exporter.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def traffic(fake: FakeSkillable, start: int, end: int, seed: int = 13, per_hour: int = 6) -> list[dict[str, Any]]:
    """Labs starting in [start, end) (some running across midnight, some exams), all ended by `end`
    except none: every record is in the past, as the API reports it."""
    rng = random.Random(seed)
    records = []
    ident = start
    for hour in range(start, end, 3600):
        for _ in range(rng.randrange(per_hour)):
            ident += 1
            begin = hour + rng.randrange(3600)
            finish = min(begin + rng.choice((60, 600, 2700, 5400, 9000)), end - 1)
            host, dc, region = rng.choice(PLACES)
            status = rng.choice((4, 4, 4, 3, 1, 2, 10, 20, 50))
            exam = status == 4 and rng.random() < 0.3
            score = rng.randrange(101) if exam else None
            records.append(lab(ident, begin, finish, status=status, host=host, datacenter=dc, region=region,
                               LabProfileId=rng.choice(PROFILES),
                               IsExam=exam, ExamScore=score, ExamMaxPossibleScore=100 if exam else None,
                               ExamPassed=(score >= 70) if exam else None))
    fake.add(*records)
    return records


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+) (\d+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float, int]]:
    """(labels, value, timestamp) of every sample of `name` in an OpenMetrics text, whatever the label order."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match.group(1) == name:
            yield dict(_LABEL.findall(match.group(2) or "")), float(match.group(3)), int(match.group(4))


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def ended_by_status(records: list[dict[str, Any]], start: float, end: float,
                    by_profile: bool = False) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for r in records:
        if start <= r["End"] < end:
            key = (str(r["LabProfileId"]),) * by_profile + (STATUS[r["CompletionStatus"]],)
            out[key] = out.get(key, 0) + 1
    return out


def first_end_counted(prom: Prometheus, profile: int, status: str, window: str, at: float) -> float:
    """increase() over `window` of one profile's ended counter in `status`, at `at`; 0 if the series is absent."""
    got = prom.query(f'sum(increase(skillable_lab_profile_instances_ended_total{{job="skillable",'
                     f'lab_profile_id="{profile}",completion_status="{status}"}}[{window}]))', at)
    return float(got[0]["value"][1]) if got else 0.0


@pytest.fixture
def live_fake() -> Iterator[FakeSkillable]:
    server = FakeSkillable(live=True)  # the fake's clock is the wall clock, which Prometheus stamps by
    yield server
    server.stop()


# -- the CLI's handling of bad input and failures ---------------------------------


def test_from_after_to_exits_2_with_one_line(fake: FakeSkillable, tmp_path: Path) -> None:
    done = backfill(fake, "--from=2026-11-02", "--to=2026-11-01T00:00:00Z", f"--output={tmp_path / 'out'}")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--to" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_prometheus_data_folder_is_refused(fake: FakeSkillable, tmp_path: Path) -> None:
    (tmp_path / "wal").mkdir()
    done = backfill(fake, "--from=2026-11-01", "--to=2026-11-02", f"--output={tmp_path}")
    assert done.returncode == 2 and "Prometheus data folder" in done.stderr


def test_a_long_range_is_read_in_windows_the_api_allows_and_old_history_is_warned(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = int(fake.clock()) // DAY * DAY
    start = end - 9 * DAY  # more than the 7 days /Results allows at once
    traffic(fake, start, end, per_hour=1)
    done = backfill(fake, f"--from={iso(start)}", f"--to={iso(end)}", f"--output={tmp_path}", "--label=job=skillable",
                    "--label=instance=x:1", "--prometheus.retention=5d", "--step=5m", "--keep-openmetrics")
    assert done.returncode == 0, done.stderr
    assert "older than the retention (5d)" in done.stderr
    asked = [dict(p.split("=") for p in s.query.split("&")) for s in fake.results_requests()]
    spans = [(int(q["start"]), int(q["end"])) for q in asked]
    assert all(0 < e - s <= 7 * DAY for s, e in spans)
    assert spans[0][0] <= start and spans[-1][1] >= end
    assert all(later[0] <= earlier[1] for earlier, later in pairwise(spans))  # no gap between windows
    files = sorted(p.name for p in (tmp_path / "openmetrics").iterdir())
    assert len(files) == 9 and all(f.endswith(".om") for f in files)


def test_an_api_failure_mid_way_keeps_only_complete_days_and_a_rerun_resumes(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = int(fake.clock()) // DAY * DAY
    start = end - 3 * DAY
    traffic(fake, start, end)
    failing_from = start + DAY

    def fail_second_day(h: _Handler) -> None:
        query = dict(p.split("=") for p in h.path.partition("?")[2].split("&") if "=" in p)
        if h.endpoint == "results" and int(query.get("start", 0)) >= failing_from - 1:
            h.send_json({"Results": None, "Status": 0, "Error": "Service temporarily unavailable"})
        else:
            h.answer()

    fake.fault_always(fail_second_day)
    out = tmp_path / "out"
    args = (f"--from={iso(start)}", f"--to={iso(end)}", "--label=job=skillable", "--label=instance=x:1", "--retries=1",
            "--keep-openmetrics", "--step=5m")
    first = backfill(fake, *args, f"--output={out}")
    assert first.returncode == 1
    assert "stopped" in first.stderr and "reason=api_error" in first.stderr and "resume" in first.stderr
    names = [p.name for p in (out / "openmetrics").iterdir()]
    assert names == [time.strftime("%Y-%m-%dT%H%M%SZ.om", time.gmtime(start))]  # day one only, no .tmp
    assert not list((out / "blocks").glob(".tmp-*"))
    fake.heal()
    second = backfill(fake, *args, f"--output={out}")
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout
    clean = backfill(fake, *args, f"--output={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr
    resumed = {p.name: p.read_bytes() for p in (out / "openmetrics").iterdir()}
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "clean" / "openmetrics").iterdir()}
    assert len(fresh) == 3 and resumed == fresh  # the resumed run wrote exactly what a clean run writes
    other = backfill(fake, *args[:-1], "--step=1m", f"--output={out}")
    assert other.returncode == 2 and "other settings" in other.stderr


def test_a_day_too_large_for_the_response_limit_is_read_in_smaller_windows(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = int(fake.clock()) // DAY * DAY
    records = traffic(fake, end - DAY, end)
    done = backfill(fake, f"--from={iso(end - DAY)}", f"--to={iso(end)}", f"--output={tmp_path}", "--step=5m",
                    "--label=job=skillable", "--label=instance=x:1", "--keep-openmetrics",
                    env={"SKILLABLE_MAX_RESPONSE_BYTES": "8192"})
    assert done.returncode == 0, done.stderr
    spans = [dict(p.split("=") for p in s.query.split("&")) for s in fake.results_requests()]
    assert len(spans) > 2 and min(int(q["end"]) - int(q["start"]) for q in spans) < DAY / 4
    text = next((tmp_path / "openmetrics").glob("*.om")).read_text()
    last = {}
    for line in text.splitlines():
        if line.startswith("skillable_lab_instances_ended_total{"):
            series, value, _ = line.rsplit(" ", 2)
            last[series] = float(value)
    # Every end of the day but those of its last step (which the next day's first sample shows).
    assert sum(last.values()) == sum(1 for r in records if end - DAY <= r["End"] < end - 300)


def test_several_accounts_are_backfilled_side_by_side_with_their_account_label(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = int(fake.clock()) // 3600 * 3600
    records = traffic(fake, end - 7200, end, per_hour=20)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"accounts": [{"name": "east", "api_key_env": "KEY_EAST", "api_url": fake.url},
                                                   {"name": "west", "api_key_env": "KEY_WEST", "api_url": fake.url}]}))
    key = fake.state.api_key
    done = backfill(fake, f"--config.file={config}", f"--from={iso(end - 7200)}", f"--to={iso(end)}", "--step=5m",
                    f"--output={tmp_path / 'out'}", "--label=job=skillable", "--keep-openmetrics",
                    env={"KEY_EAST": key, "KEY_WEST": key})
    assert done.returncode == 0, done.stderr
    text = next((tmp_path / "out" / "openmetrics").glob("*.om")).read_text()
    for account in ("east", "west"):
        last: dict[frozenset[tuple[str, str]], float] = {}
        for labels, value, _ in samples(text, "skillable_lab_instances_started_total"):
            if labels["job"] == "skillable" and labels["account"] == account:
                last[frozenset(labels.items())] = value
        assert sum(last.values()) == sum(1 for r in records if end - 7200 <= r["Start"] < end - 300), account


def test_backfill_help_lists_only_what_backfill_reads() -> None:
    done = subprocess.run([sys.executable, "-m", "exporter", "backfill", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9.-]*)", done.stdout, flags=re.M))
    settings = {f"--{name}" for name in BACKFILL_SETTINGS}
    own = {"--from", "--to", "--output", "--label", "--step", "--promtool", "--max-block-duration",
           "--prometheus.retention", "--request-timeout", "--retries", "--keep-openmetrics", "--no-disk-check"}
    assert flags == {"--help", "--config.file", "--config.check", "--demo"} | settings | own
    served = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9.-]*)", build_parser().format_help(), flags=re.M))
    assert {"--web.listen-address", "--log.level", "--skillable.timeout", "--collector.stats"} <= served - flags


def hours_ago(fake: FakeSkillable, hours: int) -> int:
    """A whole hour at least `hours` before the fake's (wall) clock: past Prometheus' head block."""
    return (int(fake.clock()) - hours * 3600) // 3600 * 3600


def test_a_record_without_lab_instance_id_is_counted_invalid_as_the_live_exporter_counts_it(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = hours_ago(fake, 4)
    broken = lab(2, end - 2500, end - 1500, status=4)
    del broken["LabInstanceId"]  # the schema has no required fields: the exporter must skip and count it
    fake.add(lab(1, end - 3000, end - 2000, status=4), broken)
    state = tmp_path / "state.json"
    done = backfill(fake, f"--from={iso(end - 3600)}", f"--to={iso(end)}", f"--output={tmp_path / 'out'}",
                    "--step=5m", "--label=job=skillable", "--label=instance=x:1", f"--storage.state-file={state}",
                    "--keep-openmetrics")
    assert done.returncode == 0, done.stderr
    assert "1 invalid records skipped" in done.stdout
    saved = read_state_file(str(state))[""]
    assert saved.fleet.invalid_total == 1  # the live exporter continues skillable_results_invalid_total from it
    text = next((tmp_path / "out" / "openmetrics").glob("*.om")).read_text()
    assert max(v for _, v, _ in samples(text, "skillable_lab_instances_started_total")) == 1  # lab 1 counted


def test_a_state_file_that_cannot_be_written_is_an_error_never_written_to(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = hours_ago(fake, 4)
    traffic(fake, end - 7200, end)
    full = tmp_path / "full"
    full.mkdir()
    state = full / "state.json"
    done = backfill(fake, f"--from={iso(end - 7200)}", f"--to={iso(end)}", f"--output={tmp_path / 'out'}",
                    "--step=5m", "--label=job=skillable", "--label=instance=x:1", f"--storage.state-file={state}",
                    full_disk=full)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "written to" not in done.stdout and "Next steps" not in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"state file {state} could not be written (No space left on device)" in lines[0]
    assert sorted(os.listdir(full)) == ["state.json.lock"]  # no state file, no temporary file
    again = backfill(fake, f"--from={iso(end - 7200)}", f"--to={iso(end)}", f"--output={tmp_path / 'out'}",
                     "--step=5m", "--label=job=skillable", "--label=instance=x:1", f"--storage.state-file={state}")
    assert again.returncode == 0, again.stderr
    assert f"written to {state}" in again.stdout and read_state_file(str(state))[""].last_success == end


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_a_rerun_writes_the_day(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    end = hours_ago(fake, 4)
    traffic(fake, end - 7200, end)
    out = tmp_path / "out"
    args = (f"--from={iso(end - 7200)}", f"--to={iso(end)}", f"--output={out}", "--step=5m",
            "--label=job=skillable", "--label=instance=x:1", "--keep-openmetrics")
    done = backfill(fake, *args, full_disk=out / ".backfill")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "checkpoint" in lines[0] and "could not be written (No space left on device)" in lines[0]
    # The day is not left looking complete: a rerun writes it (and its blocks) again.
    assert not list((out / "openmetrics").iterdir()) and not list((out / "blocks").iterdir())
    assert not (out / ".backfill" / "state.json").exists()
    again = backfill(fake, *args)
    assert again.returncode == 0, again.stderr
    assert "resuming" not in again.stdout and len(list((out / "openmetrics").glob("*.om"))) == 1


def test_the_demo_backfills_without_an_account(tmp_path: Path) -> None:
    end = int(time.time()) // 3600 * 3600 - 3600
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    # The demo API listens at the exporter's port plus one: a free pair, as the exporter's would be.
    environ["SKILLABLE_EXPORTER_LISTEN_ADDRESS"] = f"127.0.0.1:{free_demo_port()}"
    done = subprocess.run([sys.executable, "-m", "exporter", "backfill", "--demo", f"--from={iso(end - 3600)}",
                           f"--to={iso(end)}", f"--output={tmp_path}", "--label=job=skillable",
                           "--label=instance=x:1", "--step=5m", "--keep-openmetrics"],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [om] = (tmp_path / "openmetrics").glob("*.om")
    text = om.read_text()
    assert text.endswith("# EOF\n")
    started = list(samples(text, "skillable_lab_profile_instances_started_total"))
    assert started and all(labels["job"] == "skillable" and labels["instance"] == "x:1" for labels, _, _ in started)


# -- the real thing: blocks in Prometheus 2.42, then the live exporter across the seam ------------


class Prometheus:
    def __init__(self, work: Path, exporter_port: int, blocks: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data = work / "prom"
        data.mkdir()
        for block in blocks.iterdir():  # as the docs say: move the block folders into the data folder
            block.rename(data / block.name)
        config = {"global": {"scrape_interval": "1s"},
                  "scrape_configs": [{"job_name": "skillable", "scrape_timeout": "1s",
                                      "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}]}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(work / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        eventually(self._ready, 20, "Prometheus")

    def _ready(self) -> bool:
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": expr, "time": f"{at:.3f}"}, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def by(self, expr: str, at: float, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
                for r in self.query(expr, at) if float(r["value"][1]) != 0}

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def test_backfilled_days_match_the_truth_in_prometheus_and_the_live_exporter_continues_without_a_seam(
    live_fake: FakeSkillable, tmp_path: Path
) -> None:
    fake = live_fake
    now = int(time.time())
    today = now // DAY * DAY
    start = today - 3 * DAY if now - today > 900 else today - 4 * DAY  # three whole days before --to
    to = now // 60 * 60 - 60
    records = traffic(fake, start - 6 * 3600, to + 50)  # some labs started before --from; some end after --to
    exporter_port = free_port()
    labels = ("--label=job=skillable", f"--label=instance=127.0.0.1:{exporter_port}")
    state_file = tmp_path / "state.json"
    done = backfill(fake, f"--from={iso(start)}", f"--to={iso(to)}", f"--output={tmp_path / 'out'}", *labels,
                    f"--storage.state-file={state_file}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" blocks, ") >= 3 and "chown -R prometheus:prometheus" in done.stdout
    blocks = tmp_path / "out" / "blocks"
    assert all((b / "meta.json").is_file() for b in blocks.iterdir()) and any(blocks.iterdir())

    prom = Prometheus(tmp_path, exporter_port, blocks)
    exporter = None
    try:
        # Each backfilled day, as a dashboard would ask for it.
        for day in range(start, start + 3 * DAY, DAY):
            when = time.strftime("%F", time.gmtime(day))
            got = prom.by(
                'sum by (completion_status) (increase(skillable_lab_instances_ended_total{job="skillable"}[1d]))',
                day + DAY, "completion_status")
            assert got == ended_by_status(records, day, day + DAY), when
            got = prom.by('sum by (lab_profile_id, completion_status) '
                          '(increase(skillable_lab_profile_instances_ended_total{job="skillable"}[1d]))',
                          day + DAY, "lab_profile_id", "completion_status")
            assert got == ended_by_status(records, day, day + DAY, by_profile=True), when
            truth = float(sum(day <= r["Start"] < day + DAY for r in records))
            for name in ("skillable_lab_instances_started_total", "skillable_lab_profile_instances_started_total"):
                assert prom.by(f'sum(increase({name}{{job="skillable"}}[1d]))', day + DAY) == {(): truth}, name

        # The live exporter, restored from the state file, scraped under the same job and instance.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
        environ.update({"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
        log = open(tmp_path / "exporter.log", "wb")
        exporter = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{exporter_port}",
             f"--storage.state-file={state_file}"], cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        eventually(lambda: prom.query('skillable_up{job="skillable"} == 1', time.time()), 30, "the first live scrape")
        # More labs while the exporter runs, on the places the history has; one is profile 7001's
        # first save_failed end (the history has none: see traffic()).
        later = int(time.time())
        fresh = [lab(10**9 + i, later - 5 + i, later - 4 + i, status=4 if i % 2 else 20, host=h, datacenter=d,
                     region=g, LabProfileId=PROFILES[i % 3]) for i, (h, d, g) in enumerate(PLACES * 2)]
        fresh.append(lab(10**9 + 99, later - 5, later - 3, status=40, host=PLACES[0][0], datacenter=PLACES[0][1],
                         region=PLACES[0][2], LabProfileId=7001))
        fake.add(*fresh)
        records += fresh
        seam_start = to - 3600
        want = sum(1 for r in records if r["End"] >= seam_start)

        def seam_total() -> float | None:
            # At the newest live sample's own time, so increase() extrapolates nothing.
            newest = prom.query('max(timestamp(skillable_lab_instances_ended_total{job="skillable"}))', time.time())
            at = float(newest[0]["value"][1])
            window = f"{round((at - seam_start) * 1000)}ms"
            value = prom.query(f'sum(increase(skillable_lab_instances_ended_total{{job="skillable"}}[{window}]))', at)
            return at if value and float(value[0]["value"][1]) == want else None

        at = eventually(seam_total, 30, f"the increase across the seam to reach the truth ({want})")
        window = f"{round((at - start) * 1000)}ms"
        for name in COUNTERS:
            resets = prom.query(f'max(resets({name}{{job="skillable"}}[{window}]))', at)
            assert resets and float(resets[0]["value"][1]) == 0, name
        # The live series are the backfilled ones (same labels), not new series beside them.
        before = {frozenset(r["metric"].items()) for r in prom.query('skillable_lab_instances_started_total', to - 60)}
        after = {frozenset(r["metric"].items()) for r in prom.query('skillable_lab_instances_started_total', at)}
        assert before and before == after
        starts = prom.query(f'sum(increase(skillable_lab_instances_started_total{{job="skillable"}}[{window}]))', at)
        assert float(starts[0]["value"][1]) == sum(1 for r in records if r["Start"] >= start)
        ends = prom.query(
            f'sum(increase(skillable_lab_profile_instances_ended_total{{job="skillable"}}[{window}]))', at)
        assert float(ends[0]["value"][1]) == sum(1 for r in records if r["End"] >= start)
        # The profile's first save_failed end counts: its series existed at 0 in the history.
        assert first_end_counted(prom, 7001, "save_failed", f"{round((at - to) * 1000)}ms", at) == 1

        # A restart with the state file, then profile 7002's first resume_failed end: counted too.
        exporter.terminate()
        assert exporter.wait(15) == 0
        restarted_at = time.time()
        log = open(tmp_path / "exporter-restarted.log", "wb")
        exporter = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{exporter_port}",
             f"--storage.state-file={state_file}"], cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        first_scrape = f'skillable_up{{job="skillable"}} == 1 and timestamp(skillable_up) > {restarted_at}'
        eventually(lambda: prom.query(first_scrape, time.time()), 30, "the first scrape after the restart")
        resumed = int(time.time())
        fake.add(lab(10**9 + 100, resumed - 2, resumed + 1, status=30, host=PLACES[1][0], datacenter=PLACES[1][1],
                     region=PLACES[1][2], LabProfileId=7002))

        def restart_counted() -> float | None:
            newest = prom.query('max(timestamp(skillable_lab_instances_ended_total{job="skillable"}))', time.time())
            at = float(newest[0]["value"][1])
            if at < resumed + 2:
                return None
            return at if first_end_counted(prom, 7002, "resume_failed", f"{round((at - to) * 1000)}ms", at) == 1 \
                else None

        at = eventually(restart_counted, 30, "profile 7002's first resume_failed end after the restart")
        window = f"{round((at - start) * 1000)}ms"
        resets = prom.query(
            f'max(resets(skillable_lab_profile_instances_ended_total{{job="skillable"}}[{window}]))', at)
        assert float(resets[0]["value"][1]) == 0
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(15)
        prom.stop()
