"""The monitoring pack against the real thing.

Starts `skillable-exporter --demo`, a real Prometheus (1 s scrape and rule
evaluation) loaded with the shipped rules, and a real Alertmanager with the
shipped configuration, all on 127.0.0.1 in a temporary directory. Then:

- every panel query of every dashboard (Grafana variables substituted as for an
  "All" selection) returns data;
- every template variable query resolves to values;
- the demo's unhealthy lab host (117, datacenter 3) drives the lab-creation
  alert into Alertmanager. The shipped rule waits `for: 15m`, so Prometheus also
  loads a temporary copy with `for: 0s` (the shipped files are untouched). The
  failing lab profile's alert, which needs an hour of history, is in
  tests/test_demo.py, with backfilled demo history and every shipped rule;
- skillable_lab_profile_info carries the demo catalog's names.

The binaries come from Debian's `prometheus` and `prometheus-alertmanager`
packages (.ci/run installs them); a missing binary fails the test, never skips
it. Processes are polled with deadlines and killed in teardown.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any
from collections.abc import Iterator

import pytest
import requests
import yaml

from exporter.demo import LAB_HOST_NAMES, UNNAMED_DATACENTER

from .dashboard_queries import (
    ROOT,
    dashboard_paths,
    load,
    panel_queries,
    parse_variable_query,
    query_variables,
    substitute,
    variable_options,
    variable_query_text,
)
from .harness import free_demo_port, free_port
from .monitoring_stack import STARTUP_DEADLINE, Stack, alertmanager_args, eventually, prometheus_args

pytestmark = pytest.mark.integration

DATA_DEADLINE = 30.0
DATACENTER_NAMES = {"1": "US West", "2": "US East", "3": "EU West", "4": "AP Southeast"}
HOST_NAMES = {"117": "flaky-host-117"}
DEMO_FAILING_HOST = {"lab_host_id": "117", "datacenter_id": "3"}
OVERRIDDEN_ALERTS = ("SkillableLabHostFailureRatioHigh",)
# Panel queries that read data older than this Prometheus (`offset 1w`): they have none here.
# tests/test_panel_values.py checks their values by reading them a week on.
OLDER_THAN_THIS_PROMETHEUS = re.compile(r"\boffset\s+1w\b")
OVERRIDE_LABEL = {"test_override": "for-0s"}
METRIC_NAME = re.compile(r"\b(skillable_[a-z_]+?)(?:_bucket)?\b(?=[{\[(\s])")


def _override_rules() -> dict[str, Any]:
    """Copies of the shipped lab-host and lab-profile failure alerts with `for: 0s` and a marker label."""
    shipped = yaml.safe_load((ROOT / "prometheus/rules/skillable-alerts.yml").read_text())
    rules = [dict(r) for g in shipped["groups"] for r in g["rules"] if r.get("alert") in OVERRIDDEN_ALERTS]
    assert len(rules) == len(OVERRIDDEN_ALERTS)
    for rule in rules:
        rule["for"] = "0s"
        rule["labels"] = dict(rule["labels"], **OVERRIDE_LABEL)
    return {"groups": [{"name": "integration-test-overrides", "rules": rules}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("monitoring")
    ports = {name: free_port() for name in ("prometheus", "alertmanager")}
    ports["exporter"] = free_demo_port()
    s = Stack(work, f"http://127.0.0.1:{ports['exporter']}", f"http://127.0.0.1:{ports['prometheus']}",
              f"http://127.0.0.1:{ports['alertmanager']}")
    (work / "override.yml").write_text(yaml.safe_dump(_override_rules(), sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in sorted((ROOT / "prometheus/rules").glob("*.yml"))]
        + [str(work / "override.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{ports['alertmanager']}"]}]}]},
        # Same job name and scrape settings shape as the shipped prometheus.yml.
        "scrape_configs": [{"job_name": "skillable", "scrape_timeout": "1s",
                            "static_configs": [{"targets": [f"127.0.0.1:{ports['exporter']}"]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    # Names for datacenters and for one host only, so legends show both names and the id fallback.
    (work / "exporter.yml").write_text(yaml.safe_dump({"names": {"datacenters": DATACENTER_NAMES,
                                                                  "lab_hosts": HOST_NAMES}}))
    try:
        s.start("exporter", [sys.executable, "-m", "exporter", "--demo", f"--config.file={work / 'exporter.yml'}",
                             f"--web.listen-address=127.0.0.1:{ports['exporter']}"], cwd=ROOT)
        s.start("alertmanager", alertmanager_args(s, ports["alertmanager"], ROOT / "alertmanager/alertmanager.yml"))
        s.start("prometheus", prometheus_args(s, ports["prometheus"], work / "prometheus.yml"))
        s.ready("exporter", f"{s.exporter_url}/healthz")
        s.ready("alertmanager", f"{s.alertmanager_url}/-/ready")
        s.ready("prometheus", f"{s.prometheus_url}/-/ready")
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> Stack:
    """Wait for the first sample and two rule evaluations on top of it."""
    eventually(lambda: stack.query('skillable_up{job="skillable"} == 1'), STARTUP_DEADLINE,
               "the first scrape of the demo exporter with skillable_up 1")
    eventually(lambda: stack.query("lab_host:skillable_lab_instances_ended:window"), 10,
               "the recording rules")
    return stack


def test_every_dashboard_panel_query_returns_data(scraped: Stack) -> None:
    queries = [q for path in dashboard_paths() for q in panel_queries(load(path))
               if not OLDER_THAN_THIS_PROMETHEUS.search(q.expr)]
    assert len(queries) > 40
    pending = {(q.dashboard, q.panel, q.ref): substitute(q.expr) for q in queries}
    pending_exprs = dict(pending)
    finite: dict[tuple[str, str, str], bool] = {}

    def check() -> bool:
        for key, expr in list(pending.items()):
            result = scraped.query(expr)
            if result:
                finite[key] = any(not math.isnan(float(s["value"][1])) for s in result if "value" in s)
                del pending[key]
        return not pending

    try:
        eventually(check, DATA_DEADLINE, "data from every panel query", interval=0.5)
    except AssertionError:
        lines = [f"  {d} / {p} / {r}: {e}" for (d, p, r), e in pending.items()]
        raise AssertionError("panel queries without data:\n" + "\n".join(lines)) from None
    # Queries over gauges must show numbers, not NaN. Ratios of counter rates may
    # still be 0/0 here: this Prometheus has seconds of history, and the demo ends a
    # lab every few seconds and scores an exam about once a minute.
    counter_based = re.compile(r"\b(?:rate|increase)\(|:ratio_rate|:mean_rate")  # :mean_rate: sum rate / count rate
    nan_only = [k for k, ok in finite.items() if not ok and not counter_based.search(pending_exprs[k])]
    assert not nan_only, f"panel queries over gauges that return only NaN: {nan_only}"


def test_legends_show_names_and_fall_back_to_ids(scraped: Stack) -> None:
    """Delivery regions are named by the demo's /deliveryregions; hosts by the config where it names them, else
    by the names its /labinstance/search carries (all but datacenter 4's hosts), else by their id."""
    overview = load(ROOT / "grafana/dashboards/skillable-overview.json")
    by_panel = {q.panel: q.expr for q in panel_queries(overview)}
    regions = scraped.query(substitute(by_panel["Failure ratio by delivery region (window)"]))
    assert {r["metric"]["delivery_region_id"]: r["metric"]["delivery_region_name"] for r in regions} == {
        "1": "North America", "2": "Europe", "3": "Asia Pacific"}
    hosts = scraped.query(substitute(by_panel["Worst lab hosts (failure ratio, window)"]))
    assert len(hosts) == 10
    for h in hosts:
        ident = h["metric"]["lab_host_id"]
        searched = LAB_HOST_NAMES[ident] if h["metric"]["datacenter_id"] != str(UNNAMED_DATACENTER) else ident
        assert h["metric"]["lab_host_name"] == HOST_NAMES.get(ident, searched)
    assert any(h["metric"]["lab_host_id"] not in HOST_NAMES for h in hosts)  # names from the API are exercised
    worst = max((h for h in hosts if not math.isnan(float(h["value"][1]))), key=lambda h: float(h["value"][1]))
    assert worst["metric"]["lab_host_id"] == DEMO_FAILING_HOST["lab_host_id"]


def _label_values(stack: Stack, selector: str, label: str) -> set[str]:
    r = requests.get(f"{stack.prometheus_url}/api/v1/series", params={"match[]": selector}, timeout=5)
    body = r.json()
    assert body["status"] == "success", body
    return {series[label] for series in body["data"] if label in series}


def test_every_template_variable_query_resolves(scraped: Stack) -> None:
    single_account = not _label_values(scraped, "skillable_up", "account")
    named = {"datacenter_id": DATACENTER_NAMES, "lab_host_id": HOST_NAMES,
             "delivery_region_id": {"1": "North America", "2": "Europe", "3": "Asia Pacific"}}
    for path in dashboard_paths():
        board = load(path)
        for variable in query_variables(board):
            kind, selector, label = parse_variable_query(variable_query_text(variable))
            assert selector, variable["name"]
            if kind == "query_result":
                # Places and profiles: the id is the value, the name (where an info metric knows it) the text.
                # (The loop's variables are bound as defaults, so each check reads this iteration's.)
                options = eventually(lambda v=variable, s=selector: variable_options(v, scraped.query(substitute(s))),
                                     10, f"options of ${variable['name']} in {board['uid']}")
                texts = {value: text for text, value in options}
                values = set(texts)
                for ident, name in named.get(variable["name"], {}).items():
                    assert texts.get(ident) == name, (variable["name"], ident, texts.get(ident))
                if variable["name"] == "lab_host_id":  # hosts no one names (datacenter 4's) show their id
                    assert any(texts[v] == v for v in values)
                if variable["name"] == "lab_profile_id":
                    assert texts.get("5009") == "Deploy ARM templates"
                if variable["name"] == "lab_series_id":
                    assert "AZ-104 Microsoft Azure Administrator" in texts.values()
            else:
                assert kind == "label_values" and label, variable["name"]
                if label == "account" and single_account:
                    # One account: the exporter adds no account label, so the variable
                    # offers only "All" (.*), and account=~".*" matches label-less series.
                    assert not _label_values(scraped, substitute(selector), label)
                    assert scraped.query('skillable_up{account=~".*"}')
                    continue
                values = eventually(lambda s=selector, lb=label: _label_values(scraped, substitute(s), lb), 10,
                                    f"values of ${variable['name']} in {board['uid']}")
            if variable["name"] == "lab_host_id":
                assert DEMO_FAILING_HOST["lab_host_id"] in values
            if variable["name"] == "datacenter_id":
                assert {"1", "2", "3", "4"} <= values


def _alertmanager_alerts(stack: Stack) -> list[dict[str, Any]]:
    r = requests.get(f"{stack.alertmanager_url}/api/v2/alerts", timeout=5)
    r.raise_for_status()
    return list(r.json())


def test_failing_demo_host_fires_the_lab_creation_alert_into_alertmanager(scraped: Stack) -> None:
    wanted = dict(alertname="SkillableLabHostFailureRatioHigh", completion_status="lab_creation_failed",
                  severity="ticket", **DEMO_FAILING_HOST, **OVERRIDE_LABEL)

    def fired() -> list[dict[str, Any]]:
        return [a for a in _alertmanager_alerts(scraped)
                if all(a["labels"].get(k) == v for k, v in wanted.items())]

    [alert] = eventually(fired, DATA_DEADLINE, f"{wanted} in Alertmanager")
    assert alert["status"]["state"] == "active"
    # Named from the info metrics (the config names host 117 and the datacenters), linked absolutely.
    assert alert["annotations"]["summary"].startswith("Lab host flaky-host-117 (117) in datacenter EU West (3): ")
    assert alert["annotations"]["dashboard"] == \
        "http://localhost:3000/d/skillable-lab-hosts/skillable-lab-hosts?var-lab_host_id=117"
    # Healthy hosts do not fail lab creation.
    creation = [a["labels"]["lab_host_id"] for a in _alertmanager_alerts(scraped)
                if a["labels"].get("alertname") == "SkillableLabHostFailureRatioHigh"
                and a["labels"].get("completion_status") == "lab_creation_failed"]
    assert set(creation) == {"117"}, creation

    # The shipped rule (for: 15m) sees the same condition and is pending.
    def pending() -> list[dict[str, Any]]:
        body = requests.get(f"{scraped.prometheus_url}/api/v1/alerts", timeout=5).json()
        return [a for a in body["data"]["alerts"]
                if a["labels"].get("alertname") == "SkillableLabHostFailureRatioHigh"
                and a["labels"].get("lab_host_id") == "117" and "test_override" not in a["labels"]
                and a["labels"].get("completion_status") == "lab_creation_failed"]

    [shipped] = eventually(pending, 10, "the shipped rule pending for host 117")
    assert shipped["state"] == "pending"


def test_the_demo_serves_every_metric_the_rules_and_dashboards_read(scraped: Stack) -> None:
    """Every metric the rules and dashboards read exists in the demo's exposition."""
    used: set[str] = set()
    for path in sorted((ROOT / "prometheus/rules").glob("*.yml")):
        used |= set(METRIC_NAME.findall(path.read_text()))
    for path in dashboard_paths():
        used |= set(METRIC_NAME.findall(json.dumps(load(path))))
    exposed = requests.get(f"{scraped.exporter_url}/metrics", timeout=5).text
    missing = sorted(m for m in used if m not in exposed and not m.endswith("_info"))
    assert not missing, f"metrics used by rules or dashboards that the demo does not serve: {missing}"



def test_lab_profile_info_carries_the_demo_catalogs_names(scraped: Stack) -> None:
    from exporter.demo import CATALOG_PROFILES, CATALOG_SERIES

    info = eventually(lambda: scraped.query('skillable_lab_profile_info{job="skillable"}'), 10, "profile info")
    names = {s["metric"]["lab_profile_id"]: s["metric"]["lab_profile_name"] for s in info}
    catalog = {str(p.id): p.name for p in CATALOG_PROFILES}
    assert names and all(catalog[pid] == name for pid, name in names.items())
    assert names["5009"] == "Deploy ARM templates"
    exams = {s["metric"]["lab_profile_id"] for s in info if s["metric"]["exam"] == "true"}
    assert exams == {str(p.id) for p in CATALOG_PROFILES if p.pass_mark is not None} & set(names)
    series = scraped.query('skillable_lab_series_info{job="skillable"}')
    assert {s["metric"]["lab_series_id"]: s["metric"]["lab_series_name"] for s in series} == \
        {str(k): v for k, v in CATALOG_SERIES.items()}
