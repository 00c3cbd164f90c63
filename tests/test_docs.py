"""The documentation as a reader meets it: the README's Prometheus configuration is one Prometheus
accepts, every relative link leads somewhere, every command names python3 (Debian has no
`python`), and nothing refers to the tracker's issue numbers, which no reader has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import ROOT, tool

DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md"),
                    ROOT / "deploy/helm/skillable-exporter/README.md"])
TEXT_SUFFIXES = {".md", ".py", ".sh", ".yml", ".yaml", ".json", ".service", ".toml", ".txt", ".tpl", ""}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".hypothesis"}


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def readme_scrape_configs() -> list[dict[str, Any]]:
    text = section((ROOT / "README.md").read_text(), "Prometheus configuration")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    return [yaml.safe_load(block) for block in blocks]


@pytest.mark.integration
def test_each_readme_scrape_config_is_a_prometheus_config_promtool_accepts(tmp_path: Path) -> None:
    promtool = tool("promtool")
    configs = readme_scrape_configs()
    assert len(configs) == 2, "one job for /metrics, one for /probe"
    for i, config in enumerate(configs):
        path = tmp_path / f"prometheus-{i}.yml"
        path.write_text(yaml.safe_dump(config))
        checked = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        (job,) = config["scrape_configs"]
        assert job["job_name"] == "skillable"  # what the shipped rules and dashboards select


def test_the_readme_probe_job_is_the_recipe_scaling_md_runs_with_one_exporter() -> None:
    """tests/test_scaleout.py runs docs/scaling.md's job against real exporters and a real Prometheus;
    the README's is that job with one exporter instead of a hashmod over several."""
    _, probe = readme_scrape_configs()
    (job,) = probe["scrape_configs"]
    (scaling,) = [b for b in (yaml.safe_load(x) for x in re.findall(r"```yaml\n(.*?)```",
                                                                   (ROOT / "docs/scaling.md").read_text(), re.S))
                  if isinstance(b, dict) and "scrape_configs" in b]
    (recipe,) = scaling["scrape_configs"]
    account_rules = [r for r in recipe["relabel_configs"] if r.get("action") != "hashmod"
                     and "__tmp_shard" not in r.get("source_labels", [])]
    assert job["relabel_configs"][:-1] == account_rules
    assert job["relabel_configs"][-1] == {"target_label": "__address__", "replacement": "exporter.example.com:10180"}
    for key in ("job_name", "metrics_path", "scrape_interval", "scrape_timeout"):
        assert job[key] == recipe[key], key


# -- links ---------------------------------------------------------------------------------------

def anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation but - and _ dropped, spaces as -."""
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(document: Path) -> None:
    text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)}: {broken}"


# -- commands and references -------------------------------------------------------------------------

def repository_text_files() -> list[Path]:
    if (ROOT / ".git").exists():
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, text=True, check=True).stdout.split("\n")
        paths = [ROOT / name for name in listed if name]
    else:
        paths = [p for p in ROOT.rglob("*") if not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and not p.is_symlink() and p.suffix in TEXT_SUFFIXES
            and p.stat().st_size < 2_000_000]


ISSUE_NUMBER = re.compile(r"\bissues? ?#?\d|\(issue\b|\bissue's\b", re.I)
BARE_PYTHON = re.compile(r"(?:^|[\s`(\"'#])python (?:-m |-c |[\w./-]+\.py)")


@pytest.mark.integration
def test_no_file_refers_to_an_issue_number() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}" for p in repository_text_files() if p.name != "test_docs.py"
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if ISSUE_NUMBER.search(line)]
    assert not found, "say what the issue said instead: " + ", ".join(found)


@pytest.mark.integration
def test_every_command_runs_python3() -> None:
    found = [f"{p.relative_to(ROOT)}:{n}" for p in repository_text_files() if p.name != "test_docs.py"
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if BARE_PYTHON.search(line)]
    assert not found, "Debian 12 has python3, not python: " + ", ".join(found)
