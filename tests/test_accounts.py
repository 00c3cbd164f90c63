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


@pytest.mark.integration
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
    # With several accounts, /probe must be told which one: neither no account nor "default" picks one.
    # The refusal names the valid accounts (tests/test_probe.py has the bounds).
    for query, asked in (("", "missing ?account=NAME"), ("?account=", "missing ?account=NAME"),
                         ("?account=default", 'unknown account "default"')):
        refused = exporter.get("/probe" + query)
        assert refused.status_code == 400, query
        assert refused.text == f"{asked}; the accounts are: americas, emea\n", query


@pytest.mark.integration
def test_probe_with_one_account_answers_for_it_by_no_name_and_by_default(
    run_exporter, fake: FakeSkillable  # type: ignore[no-untyped-def]
) -> None:
    """The landing page calls the unnamed single account "default"; /probe agrees (hostile input 13)."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    exporter = run_exporter(env={"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    assert "default" in exporter.get("/").text
    for query in ("", "?account=", "?account=default"):
        probe = exporter.get("/probe" + query)
        assert probe.status_code == 200, query
        assert "skillable_up 1.0" in probe.text and 'account="' not in probe.text
    assert exporter.get("/probe?account=nope").status_code == 400


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
    ("accounts:\n  - name: a\n    api_key_env: K\n    max_active_labs: 0\n", "accounts[0].max_active_labs"),
    ("accounts:\n  - name: a\n    api_key_env: K\n    max_active_labs: many\n", "accounts[0].max_active_labs"),
    ("skillable:\n  max_active_labs: 2.5\n", "skillable.max-active-labs"),
])
def test_bad_account_lists_name_the_setting(tmp_path: Path, text: str, setting: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(flags("--config.file", str(path)), {"K": "key"})
    assert info.value.setting == setting


@pytest.mark.integration
def test_window_help_text_names_each_accounts_own_window(
    fake: FakeSkillable, broken: FakeSkillable, tmp_path: Path
) -> None:
    """An account with its own window_minutes: /probe's HELP names that window, and /metrics
    (accounts with different windows) names none rather than the global one."""
    from exporter.app import ExporterApp

    flags = vars(build_parser().parse_args(["--config.file", str(write_config(tmp_path, fake, broken))]))
    app = ExporterApp(load_config(flags, {"KEY_EMEA": "k", "KEY_AMERICAS": "k"}))
    try:
        both, _ = app.metrics("", None)
        americas, emea = (app.probe(name, "", None)[0] for name in ("americas", "emea"))  # type: ignore[index]
    finally:
        app.close()
    help_line = re.compile(rb"^# HELP skillable_lab_instances .*$", re.M)
    assert b"the last 120 minutes" in help_line.search(americas).group(0)  # type: ignore[union-attr]
    assert b"the last 60 minutes" in help_line.search(emea).group(0)  # type: ignore[union-attr]
    mixed = help_line.search(both).group(0)  # type: ignore[union-attr]
    assert b"minutes" not in mixed and b"skillable_lookback_window_seconds" in mixed


@pytest.mark.integration
def test_the_active_lab_limit_is_a_gauge_per_account_where_it_is_set(
    fake: FakeSkillable, broken: FakeSkillable, tmp_path: Path
) -> None:
    """Skillable's Max Active Lab Instances, which the API does not report, from the
    config: the global setting for every account, an account's own value over it."""
    from exporter.app import ExporterApp
    from exporter.render import choose_encoding

    path = tmp_path / "c.yaml"
    path.write_text("skillable:\n  max_active_labs: 250\naccounts:\n"
                    f"  - name: emea\n    api_key_env: K\n    api_url: {fake.url}\n    max_active_labs: 400\n"
                    f"  - name: americas\n    api_key_env: K\n    api_url: {broken.url}\n")
    config = load_config(flags("--config.file", str(path)), {"K": "key"})
    assert [a.max_active_labs for a in config.accounts] == [400, 250]
    app = ExporterApp(config)
    try:
        text = app.collector.exposition(choose_encoding(""))
    finally:
        app.close()
    assert b'skillable_account_max_active_labs{account="emea"} 400.0' in text
    assert b'skillable_account_max_active_labs{account="americas"} 250.0' in text
    single = load_config(flags("--skillable.max-active-labs=30"), {"SKILLABLE_API_KEY": "k"})
    assert single.accounts[0].max_active_labs == 30
    assert load_config(flags(), {"SKILLABLE_API_KEY": "k"}).accounts[0].max_active_labs is None


@pytest.mark.integration
def test_probe_refusal_names_at_most_twenty_accounts_and_echoes_the_name_asked_on_one_short_line(
    run_exporter, fake: FakeSkillable, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """A config may hold hundreds of accounts: the refusal names the first 20 (sorted) and how many more."""
    names = [f"team-{i:02d}" for i in range(25, 0, -1)]  # written in reverse: the list is sorted
    path = tmp_path / "many.yaml"
    path.write_text("accounts:\n" + "".join(f"  - name: {n}\n    api_key_env: KEY\n    api_url: {fake.url}\n"
                                            for n in names))
    exporter = run_exporter("--config.file", str(path), env={"KEY": fake.state.api_key})
    listed = ", ".join(f"team-{i:02d}" for i in range(1, 21))
    refused = exporter.get("/probe?account=team-26")
    assert refused.status_code == 400
    assert refused.text == (f'unknown account "team-26"; the accounts are: {listed} and 5 more '
                            "(the landing page lists every account)\n")
    hostile = exporter.get("/probe?account=" + "%0A%1B[31m" + "x" * 200)
    assert hostile.status_code == 400
    assert hostile.text.count("\n") == 1 and "\x1b" not in hostile.text
    assert hostile.text.startswith('unknown account "\\n\\x1b[31m' + "x" * 58 + '..."; the accounts are: team-01, ')
    assert fake.state.seen == []  # a refusal polls nothing
