"""--version's block and skillable_exporter_build_info's labels, from the build details file."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter import __version__, version
from exporter.collector import SkillableCollector
from exporter.config import Names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def build_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "_build_info.json"
    monkeypatch.setattr(version, "BUILD_INFO_FILE", path)
    version.build_info.cache_clear()
    yield path
    version.build_info.cache_clear()


@pytest.mark.integration
def test_version_prints_the_go_exporters_block() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"skillable-exporter, version {re.escape(__version__)} \(branch: \S+, revision: \S+\)",
                        lines[0])
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "build user", "build date", "python version", "platform"]
    assert lines[3].split()[-1] == platform.python_version()


def test_written_build_details_reach_version_and_build_info(build_file: Path) -> None:
    assert version.build_info().revision == "unknown"  # no file: unknown, not an error
    version.build_info.cache_clear()
    assert version.main(["--write", "--revision=0123abc", "--branch=main", "--build-user=ci@builder",
                         "--build-date=20261201-20:00:00"]) == 0
    version.build_info.cache_clear()
    text = version.version_text()
    assert text.startswith(f"skillable-exporter, version {__version__} (branch: main, revision: 0123abc)\n")
    assert "  build user:       ci@builder\n  build date:       20261201-20:00:00\n" in text
    build = next(f for f in SkillableCollector([], Names(), 60).collect() if f.name == "skillable_exporter_build_info")
    assert build.samples[0].labels == {"version": __version__, "revision": "0123abc",
                                       "python_version": platform.python_version()}


def test_a_garbled_build_file_is_unknown_not_a_crash(build_file: Path) -> None:
    build_file.write_text("{not json")
    assert version.build_info() == version.BuildInfo()
