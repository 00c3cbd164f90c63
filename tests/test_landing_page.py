"""The landing page at /, as a browser shows it: headless Chromium renders the page of a real
process, a screenshot is taken, and the text is asserted (a failing account's reason, the demo
banner). The page never calls the API."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

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


@pytest.mark.integration
def test_a_refused_reload_is_on_the_page_with_its_reason_until_a_reload_succeeds(
    run_exporter: Any, fake: FakeSkillable, tmp_path: Path
) -> None:
    """The accounts still say "up" (the old configuration keeps polling), and the page says the new
    one was refused, when and why, escaped; a good reload takes the banner away."""
    fake.state.live_offset = 0.0  # the exporter process runs on the real clock: so does the fake
    config = tmp_path / "config.yaml"
    good = "collector:\n  stats: false\n  delivery_regions: false\n  catalog: false\n"
    config.write_text(good)
    exporter = run_exporter(f"--config.file={config}",
                            env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    exporter.get("/metrics")
    page = exporter.get("/").text
    assert 'id="reload-refused"' not in page and "Configuration loaded at start, 20" in page

    config.write_text("skillable:\n  '<img src=x onerror=alert(1)>': 1\n")  # a hostile key, named in the reason
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 500
    dom = render(exporter.url + "/", tmp_path, "refused")
    text = html.unescape(text_of(dom))
    assert "<img" not in dom  # the reason is text, never markup
    assert re.search(r"Configuration reload refused at 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC: invalid setting "
                     r"skillable\.<img src=x onerror=alert\(1\)>: unknown setting on line 2 of \S+config\.yaml ?\. "
                     r"The exporter keeps running the configuration loaded at 20", text), text
    assert "default up" in text  # the running configuration still polls
    assert "a reload was refused at 20" in text

    config.write_text(good)
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 200
    page = exporter.get("/").text
    assert 'id="reload-refused"' not in page and "Configuration loaded by a reload, 20" in page
    assert "reload refused" not in page and "was refused" not in page
