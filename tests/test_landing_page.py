"""The landing page at /, as a browser shows it: headless Chromium renders the page of a real
process, a screenshot is taken, and the text is asserted (a failing account's reason, the demo
banner). The page never calls the API."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from . import fakeapi as f
from .fakeapi import FakeSkillable

pytestmark = pytest.mark.integration  # a real exporter server and Chromium


def chromium(*args: str, cwd: Path) -> str:
    browser = shutil.which("chromium")
    assert browser, "chromium is missing: install Debian's chromium package (.ci/run does)"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,800",
         "--virtual-time-budget=3000", f"--user-data-dir={cwd / 'profile'}", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def render(url: str, tmp_path: Path, name: str) -> str:
    """The page's DOM after Chromium ran it, and a screenshot `name`.png (checked to be one)."""
    dom = chromium("--dump-dom", url, cwd=tmp_path)
    shot = tmp_path / f"{name}.png"
    chromium(f"--screenshot={shot}", url, cwd=tmp_path)
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    assert (width, height) == (1280, 800)
    return dom


def text_of(dom: str) -> str:
    import re

    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_a_failing_account_shows_its_reason_since_when_and_settings(
    run_exporter: Any, fake: FakeSkillable, tmp_path: Path
) -> None:
    fake.fault_always(f.http_status(503))
    exporter = run_exporter("--skillable.min-poll-interval=0", "--skillable.window-minutes=90",
                            env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                                 "SKILLABLE_COLLECTOR_STATS": "false"})
    for _ in range(2):
        exporter.get("/metrics")
        time.sleep(1.1)  # past the first backoff
    polls = len(fake.latest_requests())
    assert polls >= 1
    dom = render(exporter.url + "/", tmp_path, "failing")
    text = text_of(dom)
    assert "Skillable Exporter" in text and "Version: (version=0.1.0" in text
    assert 'href="metrics"' in dom and "docs.skillable.com" in dom
    row = text[text.index("default"):]
    assert "failing since 20" in row  # a date, e.g. "failing since 2026-12-01 20:30:00 UTC"
    assert "http_error (LatestResults: HTTP 503)" in row
    assert "never" in row and "90 min" in row and "every scrape" in row
    assert "Demo mode" not in text
    assert len(fake.latest_requests()) == polls  # rendering the page twice called no API
    assert fake.state.api_key not in dom


def test_demo_mode_has_a_banner(run_exporter: Any, tmp_path: Path) -> None:
    exporter = run_exporter("--demo")
    exporter.get("/metrics")
    text = text_of(render(exporter.url + "/", tmp_path, "demo"))
    assert "Demo mode: these metrics come from a built-in simulation" in text
    assert "default up" in text
