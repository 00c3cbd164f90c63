"""Lint of grafana/dashboards/*.json and grafana/provisioning/ without a Grafana server.

- structure: valid JSON, unique uids, unique panel ids, gridPos on every panel
  and no two panels overlapping, the data source always through ${datasource};
- the variables every dashboard must offer (datasource, job, instance, account,
  and the place variables on lab dashboards), multi-value with an All of ".*";
- a round trip through grafana-foundation-sdk (Grafana 11.6 models) loses no key,
  which catches misspelt or misplaced keys;
- every panel query, Grafana variables substituted, parses as PromQL
  (`promtool check rules` on a generated rules file).

Every query is also run against a real Prometheus in
tests/test_monitoring_integration.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import yaml

from .dashboard_queries import (
    ROOT,
    all_panels,
    dashboard_paths,
    load,
    panel_queries,
    parse_variable_query,
    query_variables,
    substitute,
    variable_query_text,
)
from .harness import tool

PATHS = dashboard_paths()
IDS = [p.stem for p in PATHS]
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
PLACE_VARIABLES = ("datacenter_id", "delivery_region_id", "lab_host_id")
# The lab-profile families carry no place label (never crossed with hosts): that board filters by profile.
PROFILE_VARIABLES = ("lab_series_id", "lab_profile_id")
PROFILE_DASHBOARD = "skillable-lab-profiles"
MULTI_VARIABLES = ("job", "instance", "account") + PLACE_VARIABLES + PROFILE_VARIABLES
# The SLO is promised for the whole fleet of an exporter (and account).
FLEET_WIDE_PANELS = {"Error budget left"}
EXPORTER_WIDE = {"skillable_lookback_window_seconds", "skillable_exporter_build_info", "skillable_datacenter_info",
                 "skillable_delivery_region_info", "skillable_lab_host_info",
                 "skillable_lab_profile_info", "skillable_lab_series_info"}


@pytest.fixture(scope="module", params=PATHS, ids=IDS)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_the_three_dashboards_exist() -> None:
    assert {p.name for p in PATHS} >= {
        "skillable-overview.json", "skillable-lab-hosts.json", "skillable-exporter.json", "skillable-lab-profiles.json"}


def test_uids_and_titles_are_unique_across_dashboards() -> None:
    boards = [load(p) for p in PATHS]
    uids = [b["uid"] for b in boards]
    titles = [b["title"] for b in boards]
    assert all(uids) and all(titles)
    assert len(set(uids)) == len(uids), uids
    assert len(set(titles)) == len(titles), titles
    for uid in uids:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", uid), uid


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [p.get("id") for p in all_panels(dashboard)]
    assert None not in ids
    assert len(set(ids)) == len(ids), ids


def test_every_panel_has_a_grid_position_inside_24_columns(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        pos = panel.get("gridPos")
        assert pos, f"panel {panel.get('title')!r} has no gridPos"
        assert set(pos) >= {"x", "y", "w", "h"}, pos
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] >= 0 and pos["y"] >= 0, pos
        assert pos["x"] + pos["w"] <= 24, f"panel {panel.get('title')!r} is wider than the grid: {pos}"


def test_no_two_panels_overlap(dashboard: dict[str, Any]) -> None:
    boxes = [(p.get("title"), p["gridPos"]) for p in dashboard["panels"]]
    for i, (title_a, a) in enumerate(boxes):
        for title_b, b in boxes[i + 1:]:
            overlap_x = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            overlap_y = a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]
            assert not (overlap_x and overlap_y), f"{title_a!r} {a} overlaps {title_b!r} {b}"


def _datasource_refs(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield f"{path}.{key}", value
            else:
                yield from _datasource_refs(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _datasource_refs(value, f"{path}[{i}]")


def test_data_source_is_always_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert not ds.get("current"), "the datasource variable must not pin a data source"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == DATASOURCE_REF, panel.get("title")
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE_REF, (panel.get("title"), target.get("refId"))
    for path, ref in _datasource_refs(dashboard):
        if path.startswith(".annotations") and ref == {"type": "grafana", "uid": "-- Grafana --"}:
            continue  # Grafana's built-in annotation source
        assert ref == DATASOURCE_REF, f"{path}: hard-coded data source {ref!r}"


def test_variables_filter_every_query(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    wanted = ["job", "instance", "account"]
    if dashboard["uid"] == PROFILE_DASHBOARD:
        wanted += list(PROFILE_VARIABLES)
    elif dashboard["uid"] != "skillable-exporter":
        wanted += list(PLACE_VARIABLES)
    for name in wanted:
        assert name in variables, f"{dashboard['uid']}: no ${name} variable"
    for name in MULTI_VARIABLES:
        if name in variables:
            v = variables[name]
            assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", name
            assert v["datasource"] == DATASOURCE_REF
            parse_variable_query(variable_query_text(v))


_SELECTOR = re.compile(r"(?<![\w:])(skillable_\w+|[a-z_]+:skillable_\w+:\w+|up|scrape_\w+|process_\w+)\{([^}]*)\}")


def test_every_selector_honours_the_job_instance_and_account_variables(dashboard: dict[str, Any]) -> None:
    """account=~"$account" works whether the label exists (several accounts) or not."""
    for q in panel_queries(dashboard):
        selectors = _SELECTOR.findall(q.expr)
        assert selectors or "skillable:" in q.expr or "{__name__" in q.expr, \
            f"{q.panel}/{q.ref}: no selector in {q.expr!r}"
        for metric, matchers in selectors:
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, (q.panel, metric)
            # Info metrics, exporter-wide gauges and Prometheus's own series carry
            # no account label; filtering them by account would hide them.
            if (metric.startswith("skillable_") and metric not in EXPORTER_WIDE) or ":" in metric:
                assert 'account=~"$account"' in matchers, (q.panel, metric)
            if q.panel not in FLEET_WIDE_PANELS and dashboard["uid"] != "skillable-exporter" and metric in (
                    "skillable_lab_instances", "skillable_lab_instances_running",
                    "skillable_lab_instances_started_total", "skillable_lab_instances_ended_total"):
                for place in PLACE_VARIABLES:
                    assert f'{place}=~"${place}"' in matchers, (q.panel, metric, place)
            per_profile = metric.startswith("skillable_lab_profile_") and not metric.endswith("_info")
            if per_profile or ":skillable_lab_profile" in metric:
                assert 'lab_profile_id=~"$lab_profile_id"' in matchers, (q.panel, metric)
        if dashboard["uid"] == PROFILE_DASHBOARD:
            assert 'lab_series_id=~"$lab_series_id"' in q.expr, f"{q.panel}: the series variable does not filter it"
        if "{__name__" in q.expr:
            assert 'account=~"$account"' in q.expr


def test_panels_have_titles_descriptions_and_units(dashboard: dict[str, Any]) -> None:
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            assert panel.get("title")
            continue
        assert panel.get("title"), panel
        assert len(panel.get("description", "")) > 20, f"{panel['title']!r}: describe the panel"
        assert panel.get("targets"), panel["title"]
        if panel["type"] in ("timeseries", "stat", "bargauge"):
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r}: no unit"


def test_overview_links_to_the_lab_host_page() -> None:
    overview = json.dumps(load(ROOT / "grafana/dashboards/skillable-overview.json"))
    assert "/d/skillable-lab-hosts/" in overview and "var-lab_host_id=${__data.fields.lab_host_id}" in overview
    for path in PATHS:
        links = load(path)["links"]
        assert any(link["type"] == "dashboards" and "skillable" in link["tags"] and link["includeVars"]
                   for link in links), path.name


def test_overview_has_an_error_budget_panel() -> None:
    overview = load(ROOT / "grafana/dashboards/skillable-overview.json")
    exprs = " ".join(q.expr for q in panel_queries(overview))
    assert "skillable:lab_delivery_slo:objective" in exprs
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        assert f"instance:skillable_lab_delivery_errors:ratio_rate{window}" in exprs


# The bounded `reason` label of skillable_api_request_failures_total, as the
# exporter sets it. docs/failure-modes.md ("Failure reasons") is the reference.
FAILURE_REASONS = {"connect_timeout", "connect_error", "timeout", "connection_reset", "unauthorized",
                   "rate_limited", "http_error", "too_large", "not_json", "invalid_response", "api_error",
                   "internal_error"}
RETIRED_REASONS = {"connection_error"}


def _documented_reasons() -> set[str]:
    text = (ROOT / "docs/failure-modes.md").read_text()
    section = text.split("## Failure reasons", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


def test_failure_reasons_in_the_dashboard_and_docs_are_the_exporters() -> None:
    assert _documented_reasons() == FAILURE_REASONS
    exporter = load(ROOT / "grafana/dashboards/skillable-exporter.json")
    panel = next(p for p in all_panels(exporter) if p.get("title") == "API failures per minute by reason")
    listed = re.search(r"reason \(([a-z_, ]+)[;)]", panel["description"])
    assert listed, panel["description"]
    assert set(listed.group(1).split(", ")) == FAILURE_REASONS
    runbook = (ROOT / "docs/monitoring.md").read_text().split("### SkillableExporterNotPolling", 1)[1]
    runbook = runbook.split("\n### ", 1)[0]
    assert {r for r in FAILURE_REASONS if f"`{r}`" not in runbook} == set(), "NotPolling runbook misses reasons"
    # No stale reason anywhere in the monitoring pack, its docs or the generated copies.
    paths = [*dashboard_paths(), *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "prometheus").rglob("*.yml")),
             *sorted((ROOT / "deploy/kubernetes/generated").glob("*.yaml")), ROOT / "alertmanager/alertmanager.yml"]
    for path in paths:
        for retired in RETIRED_REASONS:
            assert retired not in path.read_text(), f"{path.relative_to(ROOT)} still names reason {retired}"


# -- grafana-foundation-sdk round trip ------------------------------------------

def _lost_keys(before: Any, after: Any, path: str = "") -> list[str]:
    lost: list[str] = []
    if isinstance(before, dict):
        if not isinstance(after, dict):
            return [f"{path} (became {type(after).__name__})"]
        for key, value in before.items():
            if key not in after:
                lost.append(f"{path}.{key}")
            else:
                lost += _lost_keys(value, after[key], f"{path}.{key}")
    elif isinstance(before, list):
        if not isinstance(after, list) or len(after) != len(before):
            return [f"{path} (list changed)"]
        for i, (a, b) in enumerate(zip(before, after)):
            lost += _lost_keys(a, b, f"{path}[{i}]")
    return lost


def test_foundation_sdk_round_trip_loses_no_key(dashboard: dict[str, Any]) -> None:
    try:
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
    except ImportError:  # a test dependency: fail, never skip
        pytest.fail("pip install 'grafana-foundation-sdk==1769699379!11.6.0' (the `test` extra)")
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    decoded = Dashboard.from_json(json.loads(json.dumps(dashboard)))
    out = json.loads(json.dumps(decoded, cls=JSONEncoder))
    lost = _lost_keys(dashboard, out)
    assert not lost, "keys the Grafana 11.6 models do not know (misspelt or misplaced):\n" + "\n".join(lost)


# -- PromQL syntax ---------------------------------------------------------------

@pytest.mark.integration
def test_every_panel_and_variable_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for path in PATHS:
        board = load(path)
        for i, q in enumerate(panel_queries(board)):
            rules.append({"record": f"dashboard:{board['uid'].replace('-', '_')}:q{i}", "expr": substitute(q.expr)})
        for v in query_variables(board):
            _, selector, _ = parse_variable_query(variable_query_text(v))
            if selector:
                rules.append({"record": f"dashboard:variable:{v['name']}", "expr": substitute(selector)})
    assert len(rules) > 40
    rules_file = tmp_path / "dashboard-queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_substitution_leaves_no_grafana_variable() -> None:
    for path in PATHS:
        for q in panel_queries(load(path)):
            assert "$" not in substitute(q.expr).replace('"$1"', ""), q


# -- provisioning ----------------------------------------------------------------

def test_provisioning_points_at_the_dashboards_and_a_prometheus_data_source() -> None:
    prov = ROOT / "grafana" / "provisioning"
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    providers = yaml.safe_load((prov / "dashboards" / "skillable.yml").read_text())
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    dashboards_mount = next(v for v in volumes if v.startswith("./grafana/dashboards:"))
    assert dashboards_mount.split(":")[1] == provider["options"]["path"]
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in volumes)


def test_lab_profiles_board_names_profiles_and_links_each_one() -> None:
    board = load(ROOT / "grafana/dashboards/skillable-lab-profiles.json")
    text = json.dumps(board)
    assert "var-lab_profile_id=${__data.fields.lab_profile_id}" in text
    titles = {p["title"] for p in all_panels(board)}
    assert {"Lab profiles (selected range)", "Worst lab profiles by failure ratio (last hour)",
            "Exam pass rate per exam (1h)", "Mean exam score per exam (1h)",
            "Enabled lab profiles unused in the range"} <= titles
    series_panels = {"Lab series (selected range)"}  # roll-ups per lab series: they name the series instead
    assert series_panels <= titles
    for q in panel_queries(board):  # by name, falling back to the id where no info names the profile
        if q.panel in series_panels:
            assert "group_left (lab_series_name)" in q.expr, q
            assert '"lab_series_name", "$1", "lab_series_id"' in q.expr, q
            continue
        assert "group_left (lab_profile_name" in q.expr, q
        # Exam panels keep the profiles whose info says exam="true"; every other panel shows unnamed profiles too.
        assert ('exam="true"' in q.expr) != ('"lab_profile_name", "$1", "lab_profile_id"' in q.expr), q


# -- one definition per quantity, and the docs ---------------------------------------------------

def _rules() -> list[dict[str, Any]]:
    return [r for path in sorted((ROOT / "prometheus/rules").glob("*.yml"))
            for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def test_the_failure_statuses_are_written_one_way_everywhere() -> None:
    """The four failure statuses are one matcher, the window rule's, in every rule and panel; a
    window failure ratio on a panel reads the :window rules, never skillable_lab_instances (the
    old headline divided by it minus the running labs, which it never held)."""
    [window_rule] = [r for r in _rules() if r.get("record") == "lab_host:skillable_lab_instances_failed:window"]
    canonical = re.search(r'completion_status=~"([^"]+)"', window_rule["expr"]).group(1)  # type: ignore[union-attr]
    failure = set(canonical.split("|"))
    assert failure == {"storage_provisioning_failed", "lab_creation_failed", "resume_failed", "save_failed"}
    texts = [r["expr"] for r in _rules()] + [q.expr for path in PATHS for q in panel_queries(load(path))]
    matchers = [m for text in texts for m in re.findall(r'completion_status=~"([^"]+)"', text)]
    assert matchers and all(m == canonical for m in matchers if set(m.split("|")) & failure), set(matchers)
    for path in PATHS:
        for q in panel_queries(load(path)):
            assert not ("skillable_lab_instances{" in q.expr and "/" in q.expr), \
                f"{q.panel}: a ratio over the window reads lab_host:skillable_lab_instances_*:window"


def test_docs_say_what_every_panel_shows() -> None:
    text = (ROOT / "docs/monitoring.md").read_text()
    section = text.split("## What each panel shows", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| ([^|`]+?) \|", section, re.M)) - {"Panel"}
    titles = {p["title"] for path in PATHS for p in all_panels(load(path)) if p["type"] != "row"}
    assert titles == documented, (sorted(titles - documented), sorted(documented - titles))
