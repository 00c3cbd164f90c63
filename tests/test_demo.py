"""The demo: a healthy fleet with two faults, its own key, and an address a state file restores at.

- Four days of the demo's traffic (a weekend among them) against the shipped thresholds, in
  Python: host 117 and profile 5009 meet their alerts' conditions every hour; no datacenter,
  other host or profile, exam or capacity condition is met, and the fleet's error ratio stays
  below every burn rate's threshold (test_four_days_of_demo_traffic_...).
- The demo API answers its own key only, as Skillable answers a wrong one.
- A restart with a state file keeps every counter (the demo API's address is the same).
- A real Prometheus and Alertmanager with the shipped rules, after `backfill --demo` has written
  six hours of history and its state file, and the demo exporter has continued from it: exactly
  the host-117 and profile-5009 alerts and the launch collector's slow-region and life-cycle alerts
  fire (test_the_demo_fires_exactly_its_alerts, about a minute; see its docstring).
"""

from __future__ import annotations

import functools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import requests
import yaml

from exporter.demo import (
    CATALOG_PROFILES, DATACENTERS, DEMO_API_KEY, DEMO_LABS_PER_MINUTE, DEMO_MAX_ACTIVE_LABS, FAILING_PROFILE,
    LIFECYCLE_FAILING_PROFILE, SLOW_DATACENTER, UNHEALTHY_HOST, WEBHOOK_CONSUMER, Traffic, demo_api_address,
    launch_facts, start_simulator,
)

from .harness import ROOT, free_demo_port, free_port, stop_process
from .monitoring_stack import STARTUP_DEADLINE, Stack, alertmanager_args, eventually, prometheus_args

FAILED = {10, 20, 30, 40}  # the vendor's failure codes (skillable-api.md)

@functools.cache  # the four-day test asks thousands of times: the file is read once
def threshold(name: str, status: str | None = None) -> float:
    for rule in [r for g in yaml.safe_load((ROOT / "prometheus/rules/skillable-thresholds.yml").read_text())["groups"]
                 for r in g["rules"] if r["record"] == name]:
        if status is None or rule.get("labels", {}).get("completion_status") == status:
            return float(re.fullmatch(r"vector\(([\d.]+)\)", rule["expr"]).group(1))  # type: ignore[union-attr]
    raise KeyError(name)


# -- four days of traffic against the thresholds ------------------------------------------------


@pytest.fixture(scope="module")
def demo_traffic() -> Traffic:
    """The demo's traffic, as its exporter makes it. One for the module: a lab is a pure function of the
    seed and its minute, and the launch test's two days lie inside the four days, so they are made once."""
    return Traffic(DEMO_LABS_PER_MINUTE, 7, rhythm=True)


def test_four_days_of_demo_traffic_meet_only_the_two_faults_alert_conditions(demo_traffic: Traffic) -> None:
    """Friday 00:00 to Tuesday 00:00 UTC, a weekend between (the quietest three days), by the hour
    labs end in: the host and profile alerts' conditions hold every hour, nothing else's does, and
    no burn rate's long window (1h, 6h, 1d, 3d, where four days hold it) reaches its threshold.
    The windows are clock hours, the alerts' are sliding: the margins cover the difference.
    About 4 s (half a million labs generated)."""
    traffic = demo_traffic
    friday = (int(time.time()) // 604800) * 604800 + 86400  # the epoch began on a Thursday
    first, last = friday // 3600, friday // 3600 + 96
    ended: dict[int, Counter[Any]] = defaultdict(Counter)
    starts: Counter[int] = Counter()
    changes: list[tuple[int, int]] = []
    marks = {p.id: p.pass_mark for p in CATALOG_PROFILES}
    for minute in range(friday // 60 - 8 * 60, friday // 60 + 96 * 60):
        for lab in traffic.labs_starting_in(minute):
            starts[lab.start // 3600] += 1
            changes += [(lab.start, 1), (lab.end, -1)]
            h, failed = lab.end // 3600, lab.status in FAILED
            bin_ = ended[h]
            bin_["all"] += 1
            bin_["failed"] += failed
            bin_[("dc", lab.datacenter)] += 1
            bin_[("host", lab.host)] += 1
            bin_[("profile", lab.profile_id)] += 1
            if failed:
                bin_[("dc", lab.datacenter, lab.status)] += 1
                bin_[("host", lab.host, lab.status)] += 1
                bin_[("profile failed", lab.profile_id)] += 1
            if lab.exam_score is not None:
                bin_[("exams", lab.profile_id)] += 1
                bin_[("passed", lab.profile_id)] += lab.exam_score >= (marks[lab.profile_id] or 0)
    budget = 1 - threshold("skillable:lab_delivery_slo:objective")

    def over(h: int, span: int, key: Any) -> int:
        return sum(ended[x][key] for x in range(h - span + 1, h + 1))

    for h in range(first, last):
        when = time.strftime("%a %H:00", time.gmtime(h * 3600))
        for span, burn in ((1, 14.4), (6, 6), (24, 3), (72, 1)):  # each burn rate's long window, where it fits
            if h - span + 1 >= first:
                ratio = over(h, span, "failed") / over(h, span, "all")
                assert ratio < burn * budget, (when, span, ratio)
        # Host 117 and profile 5009: their alerts' conditions, every hour.
        host = ended[h][("host", UNHEALTHY_HOST)]
        assert host >= threshold("skillable:lab_host_min_ended:threshold"), (when, host)
        assert ended[h][("host", UNHEALTHY_HOST, 20)] / host > threshold(
            "skillable:lab_host_failure_ratio:threshold", "lab_creation_failed"), when
        profile = ended[h][("profile", FAILING_PROFILE)]
        assert profile >= threshold("skillable:lab_profile_min_ended_per_hour:threshold"), (when, profile)
        assert ended[h][("profile failed", FAILING_PROFILE)] / profile > threshold(
            "skillable:lab_profile_failure_ratio:threshold"), when
        # Nothing else: datacenters, the other hosts and profiles stay at half their thresholds or below.
        for key, count in ended[h].items():
            if key[0] == "dc" and len(key) == 3:
                share = count / ended[h][("dc", key[1])]
                assert share < threshold("skillable:datacenter_failure_ratio:threshold", "lab_creation_failed") / 2, \
                    (when, key, share)
            if key[0] == "host" and len(key) == 3 and key[1] != UNHEALTHY_HOST:
                assert count / ended[h][("host", key[1])] < threshold(
                    "skillable:lab_host_failure_ratio:threshold", "lab_creation_failed") / 2, (when, key)
            if key[0] == "profile failed" and key[1] != FAILING_PROFILE and ended[h][("profile", key[1])] >= 10:
                assert count / ended[h][("profile", key[1])] < threshold(
                    "skillable:lab_profile_failure_ratio:threshold") / 2, (when, key)
            if key[0] == "exams" and h >= first + 23 \
                    and count >= threshold("skillable:lab_profile_exam_min_per_hour:threshold"):
                day = over(h, 24, ("passed", key[1])) / over(h, 24, key)
                assert ended[h][("passed", key[1])] / count > day * threshold(
                    "skillable:lab_profile_exam_pass_ratio_drop:threshold") * 1.2, (when, key)
    # Capacity: never near the demo account's limit.
    changes.sort()
    running = peak = 0
    for moment, step in changes:
        running += step
        if first * 3600 <= moment < last * 3600:
            peak = max(peak, running)
    assert peak < threshold("skillable:lab_capacity_ratio:threshold") * DEMO_MAX_ACTIVE_LABS * 0.85, peak
    # The rhythm: weekday afternoons busier than nights, weekends quieter than weekdays.
    monday, saturday = friday // 3600 + 72, friday // 3600 + 24
    assert starts[monday + 14] > 1.6 * starts[monday + 2]
    assert starts[saturday + 14] < 0.9 * starts[monday + 14]


STARTUP_BUCKETS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, math.inf)  # the exporter's, as served


def _bucket(value: float) -> tuple[float, float]:
    """The bounds of the histogram bucket holding `value`: where histogram_quantile's answer lies."""
    lower = 0.0
    for upper in STARTUP_BUCKETS:
        if value <= upper:
            return lower, upper
        lower = upper
    raise AssertionError(value)


def test_two_days_of_demo_launches_meet_only_the_launch_faults_alert_conditions(demo_traffic: Traffic) -> None:
    """Saturday 00:00 to Monday 00:00 UTC (the quietest days), by half hour, from the demo's launch facts
    (what /labinstance/search shows): region 1's 90th percentile of time to ready lies in a bucket above
    SkillableLabStartupSlow's threshold, with its volume, every half hour; the other regions' below it;
    profile 5004 reports life-cycle action errors well above its alert's threshold every hour and no
    other profile any; the webhook errors (of WEBHOOK_CONSUMER's labs only) never rise to the rising
    alert's factor over the six hours before, though there are many. About 2 s with the four days' labs made."""
    traffic = demo_traffic
    saturday = (int(time.time()) // 604800) * 604800 + 2 * 86400  # the epoch began on a Thursday
    ready: dict[tuple[int, int], list[int]] = defaultdict(list)  # (half hour, region) -> start-up seconds
    lifecycle: Counter[tuple[int, int]] = Counter()  # (hour, profile)
    webhook: Counter[int] = Counter()  # half hour
    consumers: set[str] = set()
    for minute in range(saturday // 60 - 8 * 60, saturday // 60 + 48 * 60):
        for lab in traffic.labs_starting_in(minute):
            facts = launch_facts(lab)
            if facts.startup is not None:
                ready[((lab.start + facts.startup) // 1800, lab.region)].append(facts.startup)
            for after, message in facts.errors:
                if "life cycle action" in message:
                    lifecycle[((lab.start + after) // 3600, lab.profile_id)] += 1
                if "webhook" in message:
                    webhook[(lab.start + after) // 1800] += 1
                    consumers.add(facts.consumer)
    assert consumers == {WEBHOOK_CONSUMER}
    slow_region = DATACENTERS[SLOW_DATACENTER][0]
    slow = threshold("skillable:lab_startup_slow_seconds:threshold")
    for half in range(saturday // 1800, saturday // 1800 + 96):
        when = time.strftime("%a %H:%M", time.gmtime(half * 1800))
        for region in (1, 2, 3):
            values = sorted(ready[(half, region)])
            p90 = values[math.ceil(0.9 * len(values)) - 1]
            low, high = _bucket(p90)
            if region == slow_region:
                assert len(values) >= 2 * threshold("skillable:lab_startup_min_ready:threshold"), (when, len(values))
                assert low >= slow, (when, region, p90)
            else:
                assert high < slow, (when, region, p90)
        before = sum(webhook[h] for h in range(half - 12, half)) / 12
        assert webhook[half] * 2 > 2 * threshold("skillable:webhook_errors_per_hour:threshold"), when  # many errors
        rise = threshold("skillable:webhook_errors_rise:threshold")
        assert webhook[half] < before * rise / 1.3, (when, webhook[half], before)
    for hour in range(saturday // 3600, saturday // 3600 + 48):
        assert lifecycle[(hour, LIFECYCLE_FAILING_PROFILE)] >= 2 * threshold(
            "skillable:lab_profile_lifecycle_errors_per_hour:threshold"), hour
    assert {profile for (_, profile), n in lifecycle.items() if n} == {LIFECYCLE_FAILING_PROFILE}


# -- the demo API's key ---------------------------------------------------------------------------


@pytest.mark.integration
def test_the_demo_api_answers_its_own_key_only() -> None:
    server = start_simulator(port=free_port())
    try:
        url = f"{server.url}/LatestResults?minutes=5"
        wrong = requests.get(url, headers={"api_key": "not-the-demo-key"}, timeout=10).json()
        assert wrong == {"Status": 0, "Error": "Invalid API key"}  # what Skillable answers (HTTP 200)
        right = requests.get(url, headers={"api_key": DEMO_API_KEY}, timeout=10).json()
        assert right["Status"] == 1 and right["Results"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_an_exporter_with_a_wrong_key_shows_it(run_exporter) -> None:  # type: ignore[no-untyped-def]
    """What docs/demo.md has a newcomer try: the demo's address with another key."""
    server = start_simulator(port=free_port())
    try:
        exporter = run_exporter(env={"SKILLABLE_API_URL": server.url, "SKILLABLE_API_KEY": "wrong"})
        text = exporter.get("/metrics").text
        assert re.search(r"^skillable_up 0\.0$", text, re.M)
        assert 'skillable_api_request_failures_total{endpoint="LatestResults",reason="unauthorized"} 1.0' in text
        assert "API key refused" in exporter.log() and "wrong" not in exporter.log()
    finally:
        server.shutdown()
        server.server_close()


def test_the_demo_api_listens_at_the_exporters_port_plus_one() -> None:
    assert demo_api_address(["127.0.0.1:10180"]) == ("127.0.0.1", 10181)
    assert demo_api_address([":9999", "127.0.0.1:8000"]) == ("127.0.0.1", 10000)
    assert demo_api_address([]) == ("127.0.0.1", 10181)  # systemd sockets: the default port's


# -- a restart with a state file -------------------------------------------------------------------


def _demo(port: int, state: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "exporter", "--demo", f"--web.listen-address=127.0.0.1:{port}",
                                 f"--storage.state-file={state}"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _counters(port: int) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": "text/plain"}, timeout=15).text
    counter = re.compile(r"^(skillable_\w+_total(?:\{[^}]*\})?) (\S+)$", re.M)
    return {m.group(1): float(m.group(2)) for m in counter.finditer(text)}


@pytest.mark.integration
def test_a_demo_restart_with_a_state_file_keeps_every_counter(tmp_path: Path) -> None:
    port, state, log = free_demo_port(), tmp_path / "state.json", tmp_path / "demo.log"
    proc = _demo(port, state, log)
    try:
        before = eventually(lambda: _counters(port) or None, 20, "the demo's first scrape")
        assert sum(v for k, v in before.items() if k.startswith("skillable_lab_instances_started_total")) > 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # the state file is written at SIGTERM
        proc = _demo(port, state, log)
        after = eventually(lambda: _counters(port) or None, 20, "the first scrape after the restart")
    finally:
        stop_process(proc)
    text = log.read_text()
    assert "not restored" not in text and "cannot be used" not in text, text
    lab_counters = {k: v for k, v in before.items() if "lab" in k or "exam" in k}
    dropped = {k: (v, after.get(k)) for k, v in lab_counters.items() if after.get(k, -1) < v}
    assert not dropped, f"counters lower after the restart: {list(dropped.items())[:5]}"


# -- the demo's alerts, with the shipped rules -------------------------------------------------------


HISTORY_HOURS = 6
EXPECTED = {("SkillableLabHostFailureRatioHigh", "117", "lab_creation_failed"),
            ("SkillableLabProfileFailureRatioHigh", "5009", ""),
            # The launch collector's faults: datacenter 2's slow start-ups make its region,
            # North America (1), slow; profile 5004's life-cycle script fails.
            ("SkillableLabStartupSlow", "1", ""),
            ("SkillableLabProfileLifecycleErrors", str(LIFECYCLE_FAILING_PROFILE), "")}


def _rules_with_for_0s(tmp: Path) -> list[str]:
    """The shipped rule files; those with alerts as copies whose `for:` is 0s, every expression,
    label and annotation as shipped (checked here)."""
    files = []
    for path in sorted((ROOT / "prometheus/rules").glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        alerts = [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
        if not alerts:
            files.append(str(path))
            continue
        shipped = [dict(r) for r in alerts]
        for rule in alerts:
            rule["for"] = "0s"
        assert [{k: v for k, v in r.items() if k != "for"} for r in alerts] == \
            [{k: v for k, v in r.items() if k != "for"} for r in shipped]
        copy = tmp / f"for-0s-{path.name}"
        copy.write_text(yaml.safe_dump(doc, sort_keys=False))
        files.append(str(copy))
    return files


def _firing(stack: Stack) -> set[tuple[str, str, str]]:
    body = requests.get(f"{stack.prometheus_url}/api/v1/alerts", timeout=10).json()
    return {(a["labels"]["alertname"], a["labels"].get("lab_host_id") or a["labels"].get("lab_profile_id")
             or a["labels"].get("delivery_region_id", ""), a["labels"].get("completion_status", ""))
            for a in body["data"]["alerts"] if a["state"] == "firing"}


@dataclass
class DemoRun:
    stack: Stack
    history_to: int  # backfill's --to, where the live exporter's counting continues
    first_scrape: float = 0.0


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    work = tmp_path_factory.mktemp("demo-alerts")
    port = free_demo_port()
    ports = {"prometheus": free_port(), "alertmanager": free_port()}
    stack = Stack(work, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ports['prometheus']}",
                  f"http://127.0.0.1:{ports['alertmanager']}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    to = int(time.time()) // 60 * 60 - 60
    iso = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    # backfill takes the exporter's listen address (for the demo API's) from the environment or the file.
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "backfill", "--demo", f"--from={iso(to - HISTORY_HOURS * 3600)}",
         f"--to={iso(to)}", f"--output={work / 'backfill'}", "--label=job=skillable",
         f"--label=instance=127.0.0.1:{port}", f"--storage.state-file={work / 'state.json'}"],
        cwd=ROOT, env=dict(env, SKILLABLE_EXPORTER_LISTEN_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True,
        timeout=240)
    assert done.returncode == 0, done.stderr
    data = work / "prom"
    data.mkdir()
    for block in (work / "backfill" / "blocks").iterdir():
        block.rename(data / block.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": _rules_with_for_0s(work),
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]}]},
        "scrape_configs": [{"job_name": "skillable", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        stack.start("exporter", [sys.executable, "-m", "exporter", "--demo", f"--web.listen-address=127.0.0.1:{port}",
                                 f"--storage.state-file={work / 'state.json'}"], cwd=ROOT, env=env)
        stack.start("alertmanager",
                    alertmanager_args(stack, ports["alertmanager"], ROOT / "alertmanager/alertmanager.yml"))
        # Alerts that fire before Prometheus has found Alertmanager are sent again after the resend delay (1m).
        stack.start("prometheus", prometheus_args(stack, ports["prometheus"], work / "prometheus.yml", data)
                    + ["--rules.alert.resend-delay=1s"])
        stack.ready("exporter", f"{stack.exporter_url}/healthz")
        stack.ready("alertmanager", f"{stack.alertmanager_url}/-/ready")
        stack.ready("prometheus", f"{stack.prometheus_url}/-/ready")
        first = eventually(lambda: stack.query('min(timestamp(skillable_up{job="skillable"} == 1))'),
                           STARTUP_DEADLINE, "the first scrape of the demo with skillable_up 1")
        yield DemoRun(stack, to, float(first[0]["value"][1]))
    finally:
        stack.stop()


@pytest.mark.integration
def test_the_demo_fires_exactly_its_alerts(demo_stack: DemoRun) -> None:
    """Six hours of demo history backfilled (`backfill --demo`, its blocks in Prometheus' data
    folder, its state file restored by the demo exporter at the same API address), then a real
    Prometheus with every shipped rule and a real Alertmanager with the shipped configuration.
    The alerts are copies whose `for:` is 0s, expressions as shipped, so an alert fires at the
    first evaluation its condition holds (stricter than the shipped `for:`; docs/demo.md says how
    long a new demo takes with those). After a few evaluations on live data, and for ten seconds
    of evaluations after that, the firing alerts are exactly host 117's lab-creation alert,
    profile 5009's failure alert, region 1's slow start-ups and profile 5004's life-cycle errors
    (the launch history is backfilled too), by name in Alertmanager. The SLO's 1d and 3d ratios here cover
    the six hours; test_four_days_of_demo_traffic_... covers their full windows.

    Time: about 10 s of backfill, 6 s to the first scrape, 15 s of evaluations (about 35 s)."""
    stack = demo_stack.stack

    def settled() -> bool:  # a few rule evaluations after the first scrape
        return bool(stack.query(f"timestamp(instance:skillable_lab_delivery_errors:ratio_rate5m) > "
                                f"{demo_stack.first_scrape + 5}"))

    eventually(settled, 20, "rule evaluations on live data")
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen.append(_firing(stack))
        time.sleep(1)
    assert all(s == EXPECTED for s in seen), seen

    def delivered() -> list[dict[str, Any]] | None:
        alerts = requests.get(f"{stack.alertmanager_url}/api/v2/alerts", timeout=10).json()
        names = {a["labels"]["alertname"] for a in alerts}
        return alerts if names == {e[0] for e in EXPECTED} and len(alerts) == len(EXPECTED) else None

    alerts = eventually(delivered, 15, "the demo's alerts, and only they, in Alertmanager")
    summaries = sorted(a["annotations"]["summary"] for a in alerts)
    assert summaries[0].startswith("Lab host eu-west-host-117 (117) in datacenter EU West (3): "), summaries
    assert summaries[1].startswith("Lab profile Deploy ARM templates (5009): "), summaries
    assert summaries[2].startswith("Lab profile Monitor with Azure Monitor (5004): "), summaries
    assert summaries[3].startswith("Labs in delivery region North America (1) take "), summaries


@pytest.mark.integration
def test_the_demo_history_and_live_series_meet_without_a_reset(demo_stack: DemoRun) -> None:
    """The backfill seam in the demo: the live exporter restored backfill's state file (the demo
    API at the same address), so its counters continue the history's: no reset, and the series
    are the same ones."""
    stack = demo_stack.stack
    at = time.time()
    window = f"{int(at - demo_stack.history_to + HISTORY_HOURS * 3600)}s"
    for name in ("skillable_lab_instances_started_total", "skillable_lab_instances_ended_total",
                 "skillable_lab_profile_instances_ended_total"):
        resets = stack.query(f'max(resets({name}{{job="skillable"}}[{window}]))', at)
        assert resets and float(resets[0]["value"][1]) == 0, name
    before = {frozenset(r["metric"].items()) for r in
              stack.query('skillable_lab_instances_started_total', demo_stack.history_to - 60)}
    assert before and before <= {frozenset(r["metric"].items()) for r in
                                 stack.query('skillable_lab_instances_started_total', at)}
    assert "not restored" not in stack.log("exporter")
    # Six hours of history: an hour's rate of the failing profile is full, and its alert reads it.
    ended = stack.query('sum(increase(skillable_lab_profile_instances_ended_total{lab_profile_id="5009"}[1h]))', at)
    assert float(ended[0]["value"][1]) >= 10
    assert math.isfinite(float(stack.query("instance:skillable_lab_delivery_errors:ratio_rate3d")[0]["value"][1]))
