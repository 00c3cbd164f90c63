"""Prometheus rules, Prometheus and Alertmanager configuration, checked with the real tools.

promtool and amtool come from Debian's `prometheus` and
`prometheus-alertmanager` packages (.ci/run installs them). A missing binary
fails these tests: it never skips them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import tool

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
TEST_FILES = sorted((PROM / "tests").glob("*_test.yml"))
ALERTMANAGER = ROOT / "alertmanager" / "alertmanager.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"
DOCS = ROOT / "docs" / "monitoring.md"
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=ROOT, timeout=60)


def rules() -> list[dict[str, Any]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append(dict(rule, _file=path.name, _group=group["name"]))
    return out


def alerts() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def records() -> list[dict[str, Any]]:
    return [r for r in rules() if "record" in r]


# -- the real tools -------------------------------------------------------------

@pytest.mark.integration
def test_promtool_check_config_accepts_prometheus_yml_and_its_rule_files() -> None:
    result = run(tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout


@pytest.mark.integration
def test_promtool_check_rules_without_lint_findings() -> None:
    assert RULE_FILES
    result = run(tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("test_file", TEST_FILES, ids=[p.stem for p in TEST_FILES])
def test_promtool_test_rules(test_file: Path) -> None:
    result = run(tool("promtool"), "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
def test_amtool_check_config() -> None:
    result = run(tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.integration
@pytest.mark.parametrize("labels, receiver", [
    (["severity=page", "alertname=SkillableExporterDown"], "page"),
    (["severity=ticket", "alertname=SkillableLabHostFailureRatioHigh"], "ticket"),
    (["alertname=Watchdog"], "default"),
])
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = run(tool("amtool"), "config", "routes", "test", f"--config.file={ALERTMANAGER}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_every_alert_label_used_by_the_routes_exists() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    severities = {a["labels"]["severity"] for a in alerts()}
    assert severities == {"page", "ticket"}
    routed = {m.split("=")[1].strip('"') for r in config["route"]["routes"] for m in r["matchers"]}
    assert severities <= routed



def _regex_matcher(matcher: str) -> re.Pattern[str]:
    name, op, value = re.fullmatch(r'(\w+)(=~|=)"(.*)"', matcher).groups()
    assert name == "alertname", matcher
    return re.compile(value if op == "=~" else re.escape(value))


def test_every_exporter_health_alert_inhibits_the_alerts_it_explains() -> None:
    """Down, not polling and never polled: lab, exam and API alerts of that exporter are noise."""
    config = yaml.safe_load(ALERTMANAGER.read_text())
    [rule] = [r for r in config["inhibit_rules"] if any("SkillableExporterDown" in m for m in r["source_matchers"])]
    [source] = [_regex_matcher(m) for m in rule["source_matchers"] if m.startswith("alertname")]
    [target] = [_regex_matcher(m) for m in rule["target_matchers"] if m.startswith("alertname")]
    names = {a["alert"] for a in alerts()}
    health = {n for n in names if n.startswith("SkillableExporter")}
    assert health >= {"SkillableExporterDown", "SkillableExporterNotPolling", "SkillableExporterNeverPolled"}
    assert {n for n in health if not source.fullmatch(n)} == set()
    assert {n for n in names - health if not target.fullmatch(n)} == set()
    assert not any(target.fullmatch(n) for n in health)
    assert rule["equal"] == ["job", "instance"]

# -- conventions ----------------------------------------------------------------

def test_recording_rules_are_named_level_metric_operations() -> None:
    for rule in records():
        assert RECORD_NAME.match(rule["record"]), rule["record"]
        assert "_total" not in rule["record"], f"{rule['record']}: drop _total after rate()"


def test_alerts_are_camel_case_with_severity_summary_description_and_dashboard() -> None:
    uids = {p.stem for p in DASHBOARDS.glob("*.json")}
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"Skillable(?:[A-Z][a-z0-9]+)+", name), name
        assert alert["labels"]["severity"] in ("page", "ticket"), name
        annotations = alert["annotations"]
        assert annotations.get("summary") and annotations.get("description"), name
        # Absolute links, from the one setting in skillable-links.yml (GRAFANA_URL, DOCS_URL).
        dashboard = re.match(r"^" + re.escape(GRAFANA_URL) + r"/d/([\w-]+)/", annotations.get("dashboard", ""))
        assert dashboard, f"{name}: no dashboard link built from skillable:pack_links:info"
        assert dashboard.group(1) in uids, f"{name}: links to unknown dashboard {dashboard.group(1)}"
        assert annotations["runbook"] == f"{DOCS_URL}/monitoring.md#{name.lower()}", name
        assert "for" in alert, f"{name}: alerts need a `for:` so one bad evaluation does not page"


GRAFANA_URL = '{{ with query "skillable:pack_links:info" }}{{ . | first | label "grafana_url" }}{{ end }}'
DOCS_URL = '{{ with query "skillable:pack_links:info" }}{{ . | first | label "docs_url" }}{{ else }}docs{{ end }}'
ID_LABELS = ("datacenter_id", "delivery_region_id", "lab_host_id", "lab_profile_id")
INFO = {"datacenter_id": ("skillable_datacenter_info", "datacenter_name"),
        "delivery_region_id": ("skillable_delivery_region_info", "delivery_region_name"),
        "lab_host_id": ("skillable_lab_host_info", "lab_host_name"),
        "lab_profile_id": ("skillable_lab_profile_info", "lab_profile_name")}


def name_template(ident: str) -> str:
    """The name an info metric of the same exporter knows for an id, and the id; the id alone otherwise."""
    info, label = INFO[ident]
    return (f'{{{{ with printf "{info}{{job=%q,instance=%q,{ident}=%q}}" $labels.job $labels.instance $labels.{ident}'
            f' | query }}}}{{{{ . | first | label "{label}" }}}} ({{{{ $labels.{ident} }}}}){{{{ else }}}}'
            f'{{{{ $labels.{ident} }}}}{{{{ end }}}}')


def test_the_links_setting_is_one_series_of_absolute_urls() -> None:
    [links] = [r for r in records() if r["record"] == "skillable:pack_links:info"]
    assert links["_file"] == "skillable-links.yml" and links["expr"] == "vector(1)"
    for label in ("grafana_url", "docs_url"):
        assert re.fullmatch(r"https?://[^\s/]+(/\S*)?(?<!/)", links["labels"][label]), label
    text = DOCS.read_text()
    for alert in alerts():  # the runbook anchors exist
        assert f"### {alert['alert']}\n" in text


def test_alert_texts_name_places_and_profiles_where_info_metrics_know_them() -> None:
    """Summaries and descriptions show a datacenter, region, host or profile by the name its info
    metric carries, the id beside it, and the id alone where no name is known: never a bare id."""
    named = set()
    for alert in alerts():
        for key in ("summary", "description"):
            text = alert["annotations"][key]
            for ident in ID_LABELS:
                if name_template(ident) in text:
                    named.add(ident)
                text = text.replace(name_template(ident), "")
            bare = [i for i in ID_LABELS if f"$labels.{i}" in text]
            assert not bare, f"{alert['alert']} {key}: {bare} shown as bare ids"
    assert named == set(ID_LABELS)


def test_thresholds_live_in_one_file_and_every_reference_resolves() -> None:
    threshold_records = {r["record"] for r in records() if r["_file"] == "skillable-thresholds.yml"}
    assert all(name.startswith("skillable:") for name in threshold_records)
    referenced = set()
    for rule in rules():
        referenced |= set(re.findall(r"skillable:[a-z_]+:(?:threshold|objective)", rule["expr"]))
    assert referenced, "alerts compare against threshold rules"
    assert referenced <= threshold_records, referenced - threshold_records
    assert threshold_records <= referenced, f"unused thresholds: {threshold_records - referenced}"
    # No bare numeric threshold in an alert comparison: they belong in the thresholds file.
    for alert in alerts():
        assert not re.search(r"[<>]=?\s*[0-9]", alert["expr"]), f"{alert['alert']}: literal threshold"


def test_shipped_alerts_keep_their_for_durations() -> None:
    """The integration test shortens `for:` in a temporary copy, never here."""
    for alert in alerts():
        assert alert["for"] not in ("0s", "0m", 0), alert["alert"]


def _tests() -> list[dict[str, Any]]:
    out = []
    for path in TEST_FILES:
        out += yaml.safe_load(path.read_text())["tests"]
    return out


def test_every_alert_has_a_firing_and_a_not_firing_case() -> None:
    firing, quiet = set(), set()
    for case in _tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= firing, f"never tested firing: {names - firing}"
    assert names <= quiet, f"never tested not firing: {names - quiet}"


def test_every_recording_rule_is_exercised_by_a_promql_test() -> None:
    exprs = " ".join(check["expr"] for case in _tests() for check in case.get("promql_expr_test", []))
    missing = {r["record"] for r in records()} - set(re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", exprs))
    assert not missing, f"recording rules without a promql_expr_test: {missing}"


def test_slo_burn_rate_alerts_follow_the_sre_workbook() -> None:
    burns = {(a["labels"]["burn_rate"], a["labels"]["long_window"], a["labels"]["short_window"],
              a["labels"]["severity"]) for a in alerts() if a["alert"] == "SkillableLabDeliveryErrorBudgetBurn"}
    assert burns == {("14.4", "1h", "5m", "page"), ("6", "6h", "30m", "page"),
                     ("3", "1d", "2h", "ticket"), ("1", "3d", "6h", "ticket")}
    windows = {r["record"].rsplit("rate", 1)[1] for r in records()
               if r["record"].startswith("instance:skillable_lab_delivery_errors:ratio_rate")}
    assert windows == {"5m", "30m", "1h", "2h", "6h", "1d", "3d"}
    names = {c.get("name", "") for c in _tests()}
    for kind in ("fast burn", "slow burn", "no burn"):
        assert any(n.startswith(kind) for n in names), kind


# -- the documentation and the Compose stack ----------------------------------------

def test_docs_explain_every_alert_threshold_and_recording_rule() -> None:
    text = DOCS.read_text()
    for alert in {a["alert"] for a in alerts()}:
        assert f"### {alert}" in text, f"docs/monitoring.md has no section for {alert}"
    for rule in {r["record"] for r in records()}:
        assert re.search(f"`{re.escape(rule)}[`{{]", text), f"docs/monitoring.md does not mention {rule}"


def test_prometheus_yml_matches_the_alerts_and_the_compose_services() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "skillable" in jobs, "SkillableExporterDown matches job=\"skillable\""
    job = jobs["skillable"]
    assert job["static_configs"][0]["targets"] == ["exporter:10180"]
    assert "scrape_timeout" in job
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"exporter", "prometheus", "alertmanager", "grafana", "alert-sink"} <= set(services)
    am = yaml.safe_load(ALERTMANAGER.read_text())
    for receiver in am["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            assert hook["url"].startswith("http://alert-sink:8080/"), hook
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"publish on loopback only: {port}"
    assert "--demo" in " ".join(services["exporter"]["command"])
