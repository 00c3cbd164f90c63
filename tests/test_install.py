"""The README's Quick start, run as a new user would: a fresh clone in a temporary folder, the
block's commands as written, then /metrics answers from the demo."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import requests

from .harness import free_demo_port

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "no bash block under ## Quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


def fresh_clone(into: Path) -> Path:
    """A clone of this checkout's commit (what CI checks out), else a copy of its files."""
    target = into / "skillable-exporter"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run(["git", "clone", "-q", "--no-checkout", str(ROOT), str(target)], check=True, timeout=120)
        subprocess.run(["git", "-C", str(target), "checkout", "-q", head], check=True, timeout=120)
    else:
        shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(".venv", "__pycache__", "*.egg-info", "build"))
    return target


def test_readme_states_the_python_requirement_of_pyproject() -> None:
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert required == ">=3.11"
    assert "Needs Python 3.11 or newer" in (ROOT / "README.md").read_text()
    commands = quick_start_commands()
    assert len(commands) == 2, "two commands to metrics"
    assert commands[0].startswith("python3 -m venv .venv")


@pytest.mark.integration
def test_quick_start_runs_verbatim_in_a_fresh_clone(tmp_path: Path) -> None:
    *setup, serve = quick_start_commands()
    clone = fresh_clone(tmp_path)
    # A new user's shell: no virtual environment active, nothing of ours on the PATH.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")
           and not k.startswith("SKILLABLE_")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not p.startswith(str(Path(sys.executable).parent)))
    for command in setup:
        result = subprocess.run(["bash", "-ec", command], cwd=clone, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    port = free_demo_port()  # the only change: a free port (and the next, the demo API's), set as a user would
    env["SKILLABLE_EXPORTER_LISTEN_ADDRESS"] = f"127.0.0.1:{port}"
    log = open(tmp_path / "exporter.log", "wb")
    proc = subprocess.Popen(["bash", "-c", f"exec {serve}"], cwd=clone, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert re.search(r"^skillable_up 1\.0$", text, re.M), (tmp_path / "exporter.log").read_text()
        assert re.search(r"^skillable_lab_instances\{", text, re.M)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        log.close()
