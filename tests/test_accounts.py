"""Several Skillable accounts in one exporter: independent polling, up and data per account."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exporter.__main__ import build_parser
from exporter.config import ConfigError, load_config

from .fakeapi import FakeSkillable, lab

NOW = 1_800_000_000


@pytest.fixture
def broken() -> FakeSkillable:
    server = FakeSkillable(now=NOW)
    yield server  # type: ignore[misc]
    server.stop()


def write_config(tmp_path: Path, healthy: FakeSkillable, broken: FakeSkillable) -> Path:
    path = tmp_path / "accounts.yaml"
    path.write_text(
        "accounts:\n"
        f"  - name: emea\n    api_key_env: KEY_EMEA\n    api_url: {healthy.url}\n"
        f"  - name: americas\n    api_key_env: KEY_AMERICAS\n    api_url: {broken.url}\n    window_minutes: 120\n"
    )
    return path


def test_one_failing_account_never_hides_the_other(
    run_exporter, fake: FakeSkillable, broken: FakeSkillable, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    # The exporter process runs on the real clock: the fake follows it, so its labs are not in the future.
    fake.state.live_offset = 0.0
    now = int(fake.clock())
    fake.add(lab(1, now - 600, now - 60, status=4), lab(2, now - 120, now - 100, status=20))
    for _ in range(10):
        broken.fault(lambda h: h.send_raw(503, b"down for maintenance", "text/plain", {"Retry-After": "120"}))
    env = {"KEY_EMEA": fake.state.api_key, "KEY_AMERICAS": broken.state.api_key}
    exporter = run_exporter("--config.file", str(write_config(tmp_path, fake, broken)), env=env)
    text = exporter.get("/metrics").text
    assert 'skillable_up{account="emea"} 1.0' in text
    assert 'skillable_up{account="americas"} 0.0' in text
    assert re.search(r'^skillable_lab_instances_ended_total\{account="emea",completion_status="lab_creation_failed"'
                     r'[^}]*\} 1\.0$', text, re.M)
    assert 'skillable_api_request_failures_total{account="americas",endpoint="LatestResults",reason="http_error"} 1.0' \
        in text
    # Each account has its own window.
    assert broken.latest_requests()[0].minutes == 1440
    assert 'skillable_lookback_window_seconds{account="americas"} 7200.0' in text
    assert 'skillable_lookback_window_seconds{account="emea"} 3600.0' in text
    assert fake.latest_requests()[0].minutes == 1440  # the first poll looks back a day for running labs

    probe = exporter.get("/probe?account=emea").text
    assert "skillable_up 1.0" in probe and 'account="' not in probe
    assert exporter.get("/probe?account=nope").status_code == 400
    assert "americas" in exporter.get("/").text


def flags(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize(("text", "setting"), [
    ("accounts: []\n", "accounts"),
    ("accounts:\n  - name: a\n", "accounts[0]"),
    ("accounts:\n  - name: 'bad name'\n    api_key_env: K\n", "accounts[0].name"),
    ("accounts:\n  - name: a\n    api_key_env: K\n  - name: a\n    api_key_env: K\n", "accounts"),
    ("accounts:\n  - name: a\n    api_key_env: MISSING\n", "accounts[0].api_key_env"),
    ("accounts:\n  - name: a\n    api_key_env: K\n    colour: red\n", "accounts[0].colour"),
    ("accounts:\n  - name: a\n    api_key_env: K\n    window_minutes: 99999\n", "accounts[0].window_minutes"),
])
def test_bad_account_lists_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(flags("--config.file", str(path)), {"K": "key"})
    assert info.value.setting == setting
