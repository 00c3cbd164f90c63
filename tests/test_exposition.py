"""The exposition: golden files linted by promtool, naming rules, and the README's metrics table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import CollectorRegistry, generate_latest

from exporter.app import ExporterApp
from exporter.collector import SkillableCollector
from exporter.config import Names, load_config
from exporter.families import all_families
from exporter.launches import LaunchSettings
from exporter.poller import Poller
from exporter.state import PLACE

from .fakeapi import LIFECYCLE_ERROR, OTHER_ERROR, WEBHOOK_ERROR, FakeSkillable, catalog_profile, catalog_series, lab
from .harness import MonotonicStub, make_poller

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
NOW = 1_800_000_000


def render(accounts: list[tuple[str, Poller]], names: Names | None = None,
           max_active_labs: dict[str, int] | None = None) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SkillableCollector(accounts, names or Names(), 60, max_active_labs=max_active_labs))
    text = generate_latest(registry).decode()
    # The two values that differ from run to run.
    text = re.sub(r"^(skillable_poll_duration_seconds(\{[^}]*\})?) .*$", r"\1 0.0", text, flags=re.M)
    text = re.sub(r'revision="[^"]+"', 'revision="unknown"', text)  # set where a package is built
    return re.sub(r'python_version="[^"]+"', 'python_version="3"', text)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def compare_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"exposition differs from {path}; UPDATE_GOLDEN=1 rewrites it after review"


def scenario(fake: FakeSkillable) -> None:
    fake.add(
        lab(1, NOW - 3000, NOW - 600, status=4, TaskCompletePercent=100, TotalRunTimeSeconds=2400),
        lab(2, NOW - 2000, NOW - 1900, status=20, TotalRunTimeSeconds=45, TaskCompletePercent=0),
        lab(3, NOW - 1000, None, host=50),
        lab(4, NOW - 900, NOW - 100, status=4, host=50, IsExam=True, ExamScore=72.5, ExamMaxPossibleScore=100,
            ExamPassed=True, TotalRunTimeSeconds=800, TaskCompletePercent=80),
        lab(5, NOW - 500, NOW - 200, status=99, datacenter=4, region=3, host=125, TotalRunTimeSeconds=300),
    )
    fake.state.stats = {"NumActive": 7, "NumSaved": 1}
    fake.state.regions = [{"Id": 2, "Name": "Europe", "Description": None}]
    fake.state.catalog_series = [catalog_series(1, "AZ-104")]
    fake.state.catalog_profiles = [catalog_profile(5522, "Configure Azure AD", IsExam=True)]


@pytest.mark.integration
def test_golden_single_account(fake: FakeSkillable) -> None:
    scenario(fake)
    poller = make_poller(fake, collect_stats=True, collect_region_names=True, collect_catalog=True)
    poller.refresh(5)
    text = render([("", poller)], Names(datacenters={"3": "US East"}, lab_hosts={"49": "host-49"}))
    promtool_check(text)
    compare_golden("single_account.prom", text)
    # Independent of the golden file: values the fake's truth dictates.
    assert 'skillable_lab_instances_ended_total{completion_status="lab_creation_failed",datacenter_id="3",' \
           'delivery_region_id="2",lab_host_id="49"} 1.0' in text
    assert 'skillable_lab_instances_ended_total{completion_status="unknown",datacenter_id="4",' \
           'delivery_region_id="3",lab_host_id="125"} 1.0' in text
    assert "skillable_up 1.0" in text
    # Lab 3 runs: it is in _running alone, never in skillable_lab_instances.
    assert 'skillable_lab_instances_running{datacenter_id="3",delivery_region_id="2",lab_host_id="50"} 1.0' in text
    assert 'skillable_lab_instances{completion_status="incomplete",datacenter_id="3",delivery_region_id="2",' \
           'lab_host_id="50"} 0.0' in text
    assert "skillable_lab_instances_expired_total 0.0" in text
    assert "skillable_account_active_labs 7.0" in text
    assert 'skillable_delivery_region_info{delivery_region_id="2",delivery_region_name="Europe"} 1.0' in text
    # Every failure reason of every endpoint polled exists at 0 before anything failed.
    assert len(re.findall(r"^skillable_api_request_failures_total\{[^}]*\} 0\.0$", text, re.M)) == 4 * 12


@pytest.mark.integration
def test_golden_failed_first_poll(fake: FakeSkillable) -> None:
    fake.fault(lambda h: h.send_raw(502, b"<html>Bad Gateway</html>", "text/html"))
    poller = make_poller(fake, monotonic=MonotonicStub())
    poller.refresh(5)
    text = render([("", poller)])
    promtool_check(text)
    compare_golden("failed_first_poll.prom", text)
    assert "skillable_up 0.0" in text
    assert 'skillable_api_request_failures_total{endpoint="LatestResults",reason="http_error"} 1.0' in text


@pytest.mark.integration
def test_two_accounts_carry_account_label(fake: FakeSkillable) -> None:
    scenario(fake)
    good = make_poller(fake)
    good.refresh(5)
    bad = make_poller(fake, monotonic=MonotonicStub())
    fake.fault(lambda h: h.send_raw(500, b"boom", "text/plain"))
    bad.refresh(5)
    text = render([("emea", good), ("americas", bad)])
    promtool_check(text)
    assert 'skillable_up{account="emea"} 1.0' in text
    assert 'skillable_up{account="americas"} 0.0' in text
    lab_lines = [line for line in text.splitlines() if line.startswith("skillable_lab_instances")]
    assert lab_lines and all('account="' in line for line in lab_lines)


@pytest.mark.integration
def test_profile_families_carry_the_profile_alone_and_the_account_with_several(fake: FakeSkillable) -> None:
    """The lab-profile families: lab_profile_id (plus account with several accounts), never crossed with the
    place labels; each account's values its own."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=20, LabProfileId=7),
             lab(2, NOW - 500, None, LabProfileId=8, host=50),
             lab(3, NOW - 400, NOW - 100, status=4, LabProfileId=None, IsExam=True, ExamScore=80,
                 ExamMaxPossibleScore=100, ExamPassed=True))
    emea, americas = make_poller(fake), make_poller(fake, max_lab_profiles=1)
    emea.refresh(5)
    americas.refresh(5)
    text = render([("emea", emea), ("americas", americas)])
    promtool_check(text)
    samples = [s for f in text_string_to_metric_families(text) if f.name.startswith("skillable_lab_profile_")
               and not f.name.startswith("skillable_lab_profile_overflow") for s in f.samples]
    assert samples
    for s in samples:
        assert set(s.labels) - {"completion_status"} == {"account", "lab_profile_id"}, s

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())
    assert value("skillable_lab_profile_instances_started_total", account="emea") == 3
    assert value("skillable_lab_profile_instances_ended_total", account="emea", lab_profile_id="7",
                 completion_status="lab_creation_failed") == 1
    assert value("skillable_lab_profile_instances_running", account="emea", lab_profile_id="8") == 1
    assert value("skillable_lab_profile_exams_passed_total", account="emea", lab_profile_id="unknown") == 1
    assert value("skillable_lab_profile_exam_score_ratio_sum", account="emea", lab_profile_id="unknown") == 0.8
    # the second account keeps one profile of its own; the rest is "other", and counted
    kept = {s.labels["lab_profile_id"] for s in samples if s.labels["account"] == "americas"}
    assert len(kept) == 2 and "other" in kept
    assert value("skillable_lab_profile_instances_started_total", account="americas") == 3
    assert re.search(r'^skillable_lab_profile_overflow_total\{account="americas"\} [1-9]', text, re.M)
    assert re.search(r'^skillable_lab_profile_overflow_total\{account="emea"\} 0\.0$', text, re.M)


@pytest.mark.integration
def test_single_account_has_no_account_label(fake: FakeSkillable) -> None:
    scenario(fake)
    poller = make_poller(fake)
    poller.refresh(5)
    assert 'account="' not in render([("", poller)])


def metric_names(text: str) -> set[str]:
    return set(re.findall(r"^# TYPE (\S+) ", text, flags=re.M))


@pytest.mark.integration
def test_names_follow_conventions(fake: FakeSkillable) -> None:
    scenario(fake)
    poller = make_poller(fake, collect_stats=True)
    poller.refresh(5)
    text = render([("", poller)])
    for name in metric_names(text):
        assert name.startswith("skillable_"), name
        assert re.fullmatch(r"[a-z_]+", name), name
    for banned in ("user", "class", "ip_address", "lab_instance_id", "instance_id"):
        assert not re.search(rf'[{{,]{banned}="', text), banned
    assert "user-secret-555" not in text and "203.0.113.9" not in text


README_ROW = re.compile(r"^\| `((?:skillable|process|python)_[a-z_]+)` \| (\w+) \|([^|]*)\|", re.M)


def readme_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The README's metrics tables: name -> (type, labels), "place" standing for the place labels."""
    documented: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, kind, cell in README_ROW.findall((ROOT / "README.md").read_text()):
        labels: list[str] = []
        for part in filter(None, (p.strip() for p in cell.split(","))):
            labels += PLACE.labels if part == "place" else [part.strip("`")]
        documented[name] = (kind, tuple(labels))
    return documented


def test_readme_metrics_table_is_the_family_table() -> None:
    """Every family of the table (exporter/families.py) is in the README, with its type and
    labels in order, and the README names no other."""
    assert readme_families() == {f.name: (f.type, f.labels) for f in all_families()}


@pytest.mark.integration
def test_every_family_served_is_the_family_table(fake: FakeSkillable) -> None:
    """What a scrape serves, every feature on, is the table: the same families, types and label names."""
    scenario(fake)
    # The launch collector's families too: labs that got ready, one that never did, errors of each kind.
    fake.launch(6, NOW - 1500, 600, startup=None, errors=((30, LIFECYCLE_ERROR), (40, WEBHOOK_ERROR)),
                consumer="LMS")
    fake.launch(7, NOW - 1400, 6000, startup=90, errors=((100, OTHER_ERROR),))
    poller = make_poller(fake, collect_stats=True, collect_region_names=True, collect_catalog=True,
                         launch=LaunchSettings())
    poller.refresh(5)
    assert poller.wait_launch(1, 10)
    text = render([("", poller)], Names(datacenters={"3": "x"}, lab_hosts={"49": "y"}), {"": 100})
    # The exporter's own metrics (process_*, python_*, reload) come from the app's runtime registry.
    runtime = generate_latest(ExporterApp(load_config({}, {"SKILLABLE_API_KEY": "k"})).runtime).decode()
    table = {f.name: f for f in all_families()}
    assert dict(re.findall(r"^# TYPE (\S+) (\w+)$", text + runtime, flags=re.M)) == \
        {name: f.type for name, f in table.items()}
    for family in text_string_to_metric_families(text + runtime):
        spec = table.get(family.name) or table[family.name + "_total"]
        assert family.samples, family.name  # every family has samples here, so every one's labels are checked
        labels = {label for s in family.samples for label in s.labels} - {"le", "quantile"}
        assert labels == set(spec.labels), family.name


@pytest.mark.integration
@pytest.mark.parametrize("name", ["single_account.prom", "failed_first_poll.prom"])
def test_golden_files_are_clean_for_promtool(name: str) -> None:
    promtool_check((GOLDEN / name).read_text())
