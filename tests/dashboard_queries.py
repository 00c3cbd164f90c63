"""Reading Grafana dashboards for tests: panels, queries, variables, and variable substitution.

Shared by tests/test_dashboards.py (lint, promtool syntax check) and
tests/test_monitoring_integration.py (every query against a real Prometheus).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterator

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS_DIR = ROOT / "grafana" / "dashboards"

# What Grafana puts in for its built-in variables, in a form promtool and
# Prometheus accept. User variables default to their All value (".*").
BUILTIN_VARIABLES = {
    "__rate_interval": "5m",
    "__interval": "10s",  # what Grafana gives a panel over a short range; subqueries step by it
    "__range": "1h",
    "__range_s": "3600",
    "__interval_ms": "10000",
}
# ${name}, ${name:format}, $name, [[name]]. A name starts with a letter or "_", so
# label_replace's "$1" is left alone, as Grafana leaves it (no variable is named 1).
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]")


def dashboard_paths() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool


def panel_queries(dashboard: dict[str, Any]) -> list[Query]:
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                out.append(Query(dashboard["uid"], panel.get("title", ""), target.get("refId", ""),
                                 target["expr"], bool(target.get("instant")) and not target.get("range")))
    return out


def query_variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]


def variable_query_text(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query", "")
    return str(query)


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana variables as Grafana would for an All selection."""
    values = values or {}

    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        if name in values:
            return values[name]
        if name in BUILTIN_VARIABLES:
            return BUILTIN_VARIABLES[name]
        return ".*"

    return _VARIABLE.sub(repl, expr)


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.+)\)\s*$", re.S)


def parse_variable_query(text: str) -> tuple[str, str | None, str | None]:
    """('label_values', selector, label) or ('query_result', expr, None) or ('metrics', regex, None)."""
    m = _LABEL_VALUES.match(text)
    if m:
        return "label_values", m.group("selector"), m.group("label")
    m = _QUERY_RESULT.match(text)
    if m:
        return "query_result", m.group("expr"), None
    raise ValueError(f"unsupported variable query: {text!r}")


def variable_options(variable: dict[str, Any], result: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(text, value) of each option a query_result variable offers for `result` (an instant query's
    samples), as Grafana makes them: each sample as the line `name{label="value", ...} value time`,
    then the variable's regex, whose named groups `text` and `value` pick what is shown and what is
    put in the queries (without a regex, the whole line is both)."""
    lines = []
    for sample in result:
        metric = dict(sample["metric"])
        name = metric.pop("__name__", "")
        labels = ", ".join(f'{k}="{v}"' for k, v in metric.items())
        lines.append(f"{name}{{{labels}}} {sample['value'][1]} {int(float(sample['value'][0]) * 1000)}")
    regex = variable.get("regex") or ""
    if not regex:
        return [(line, line) for line in lines]
    body = regex[1:regex.rindex("/")] if regex.startswith("/") else regex
    pattern = re.compile(body.replace("(?<", "(?P<"))  # JavaScript's named groups in Python's spelling
    options = []
    for line in lines:
        match = pattern.search(line)
        if match:
            groups = match.groupdict()
            value = groups.get("value") or groups.get("text") or match.group(0)
            options.append((groups.get("text") or value, value))
    return options

