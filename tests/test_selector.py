"""deploy/selector.py: the monitoring pack's one job selector. The shipped pack uses only the
default one, the default reproduces the pack byte for byte, and another selector gives a pack
that promtool checks and whose rule tests pass, with its Kubernetes objects in sync."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_selector() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_selector", ROOT / "deploy" / "selector.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: install Debian's prometheus package (.ci/run does)"
    return path


def test_the_shipped_pack_selects_the_job_only_with_the_default_selector() -> None:
    selector = load_selector()
    assert selector.stray_job_selectors() == []
    rules = (ROOT / "prometheus" / "rules" / "skillable-alerts.yml").read_text()
    assert f"up{{{selector.DEFAULT_SELECTOR}}}" in rules


def test_a_stray_job_matcher_is_found(tmp_path: Path) -> None:
    selector = load_selector()
    rules = tmp_path / "prometheus" / "rules"
    rules.mkdir(parents=True)
    (rules / "x.yml").write_text(
        'groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: up{job="other"} == 0\n')
    assert selector.stray_job_selectors(tmp_path) == ['prometheus/rules/x.yml:5: job="other"']


@pytest.mark.integration
def test_the_default_selector_reproduces_the_shipped_pack(tmp_path: Path) -> None:
    selector = load_selector()
    written = selector.write_pack(selector.DEFAULT_SELECTOR, tmp_path)
    assert len(written) > 20
    differ = [str(path.relative_to(tmp_path)) for path in written
              if path.read_bytes() != (ROOT / path.relative_to(tmp_path)).read_bytes()]
    assert differ == []


@pytest.mark.integration
def test_another_selector_gives_a_pack_promtool_accepts(tmp_path: Path) -> None:
    selector = load_selector()
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "selector.py"),
                             "--selector", 'job="lab-exporter",env="prod"', "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    prometheus = tmp_path / "prometheus"
    rules = sorted(str(p) for p in (prometheus / "rules").glob("*.yml"))
    check = subprocess.run([promtool(), "check", "rules", *rules], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    for test in sorted((prometheus / "tests").glob("*.yml")):
        run = subprocess.run([promtool(), "test", "rules", str(test.relative_to(prometheus))], cwd=prometheus,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
    alerts = (prometheus / "rules" / "skillable-alerts.yml").read_text()
    assert 'absent(up{job="lab-exporter",env="prod"})' in alerts and 'job="skillable"' not in alerts
    assert "  - job_name: lab-exporter\n" in (prometheus / "prometheus.yml").read_text()
    assert "replacement: lab-exporter\n" in (tmp_path / "deploy" / "kubernetes" / "servicemonitor.yaml").read_text()
    generated = (tmp_path / "deploy" / "kubernetes" / "generated" / "prometheusrules.yaml").read_text()
    assert 'up{job="lab-exporter",env="prod"}' in generated and 'job="skillable"' not in generated
    in_sync = subprocess.run([sys.executable, str(tmp_path / "deploy" / "generate.py"), "--check"],
                             capture_output=True, text=True, timeout=60)
    assert in_sync.returncode == 0, in_sync.stderr
    assert selector.stray_job_selectors(tmp_path) != []  # from the copy's view, its selector is not the default


@pytest.mark.integration
@pytest.mark.parametrize("bad", ['env="prod"', 'job=~"x.*"', "job=lab", 'job="a" env="b"'])
def test_a_selector_that_cannot_be_written_is_refused(bad: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "deploy" / "selector.py"), "--selector", bad,
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not job=" in result.stderr
    assert not any(tmp_path.iterdir())
