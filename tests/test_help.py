"""The command line's help: `--help` and `backfill --help` as a user reads them (metavars, human
defaults, environment variables, aliases, the HTTP endpoints), checked against what the exporter
accepts and serves; and the Flags tables of the README and docs/backfill.md, checked against --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from exporter.cli import BACKFILL, build_backfill_parser, build_parser
from exporter.config import SETTINGS, ConfigError, Setting, load_config

from .harness import ROOT

SIZES = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def run_help(*argv: str) -> str:
    """`python3 -m exporter [backfill] --help` on a terminal wide enough that no help line wraps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env["COLUMNS"] = "1000"
    done = subprocess.run([sys.executable, "-m", "exporter", *argv, "--help"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Entry:
    """One flag of --help: its spellings with their metavars, its environment variable, its default
    as shown, and its meaning (the help text without those two)."""

    options: list[str]
    env: str
    default: str
    meaning: str


def help_entries(text: str) -> dict[str, Entry]:
    """The flags of a --help text by name (--web.config-file), -h left out."""
    entries: dict[str, Entry] = {}
    for line in text.splitlines():
        match = re.match(r"^  (-\S.*?)(?: {2,}(\S.*))?$", line)
        if match:
            options, rest = match.group(1).split(", "), match.group(2) or ""
            entries[options[0].split()[0]] = entry = Entry(options, "", "", rest)
        elif line.startswith("    ") and entries and line.strip():
            entry.meaning += (" " if entry.meaning else "") + line.strip()
        else:
            entry = Entry([], "", "", "")  # a section heading or the epilog: nothing more to attach
    for entry in entries.values():
        default = re.search(r" \[default: (.*)\]$", entry.meaning)
        if default:
            entry.default, entry.meaning = default.group(1), entry.meaning[:default.start()]
        env = re.search(r" \(env (\w+)\)$", entry.meaning)
        if env:
            entry.env, entry.meaning = env.group(1), entry.meaning[:env.start()]
    entries.pop("-h", None)
    return entries


@pytest.mark.integration
def test_help_names_each_value_by_what_it_is_with_human_defaults_and_aliases() -> None:
    text = run_help()
    entries = help_entries(text)
    assert not re.search(r"[ \[]VALUE\b", text)  # no value named only "VALUE"
    assert not re.search(r"\[default: (True|False|None|\d{5,})\]", text)
    expected = {
        "--web.listen-address": (["--web.listen-address ADDRESS"], "SKILLABLE_EXPORTER_LISTEN_ADDRESS",
                                 "127.0.0.1:10180"),
        "--web.config-file": (["--web.config-file PATH", "--web.config.file PATH"],
                              "SKILLABLE_EXPORTER_WEB_CONFIG_FILE", ""),
        "--skillable.api-url": (["--skillable.api-url URL"], "SKILLABLE_API_URL", "https://labondemand.com/api/v3"),
        "--skillable.window-minutes": (["--skillable.window-minutes MINUTES"], "SKILLABLE_WINDOW_MINUTES", "60"),
        "--skillable.min-poll-interval": (["--skillable.min-poll-interval SECONDS"], "SKILLABLE_MIN_POLL_INTERVAL",
                                          "10s"),
        "--skillable.timeout": (["--skillable.timeout SECONDS"], "SKILLABLE_TIMEOUT", "9s"),
        "--skillable.max-response-bytes": (["--skillable.max-response-bytes BYTES"], "SKILLABLE_MAX_RESPONSE_BYTES",
                                           "256MiB"),
        "--skillable.max-catalog-bytes": (["--skillable.max-catalog-bytes BYTES"], "SKILLABLE_MAX_CATALOG_BYTES",
                                          "64MiB"),
        "--storage.state-file": (["--storage.state-file PATH"], "SKILLABLE_STATE_FILE", ""),
        "--web.systemd-socket": (["--web.systemd-socket", "--no-web.systemd-socket"], "", "off"),
        "--collector.catalog": (["--collector.catalog", "--no-collector.catalog"], "SKILLABLE_COLLECTOR_CATALOG", "on"),
        "--config.file": (["--config.file PATH"], "", ""),
    }
    for name, (options, env, default) in expected.items():
        entry = entries[name]
        assert (entry.options, entry.env, entry.default) == (options, env, default), name
    # Every setting is there with its variable, and each value-taking flag names its value.
    for setting in SETTINGS:
        entry = entries[setting.flag]
        assert entry.env == (setting.env or ""), setting.name
        assert all(" " in option for option in entry.options) != isinstance(setting.default, bool), setting.name
    # The alias works as the flag does.
    for spelling in ("--web.config-file", "--web.config.file"):
        assert build_parser().parse_args([f"{spelling}=web.yml"]).web_config_file == "web.yml"


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.shown_default], ids=lambda s: s.name)
def test_every_default_as_help_shows_it_is_accepted_and_means_the_default(setting: Setting) -> None:
    assert setting.parse(setting.name, setting.shown_default) == setting.parse(setting.name, setting.default)


def test_bytes_and_seconds_take_units_from_flags_environment_and_file(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("skillable:\n  max_catalog_bytes: 1.5GiB\n  timeout: 1500ms\n")
    flags = vars(build_parser().parse_args(["--config.file", str(config_file), "--skillable.max-response-bytes=512KiB",
                                            "--skillable.min-poll-interval", "2m"]))
    config = load_config(flags, {"SKILLABLE_API_KEY": "k", "SKILLABLE_MAX_RESPONSE_BYTES": "1",
                                 "SKILLABLE_MAX_CATALOG_BYTES": "2048"})
    assert config.max_response_bytes == 512 * 1024  # the flag wins over the environment
    assert config.min_poll_interval == 120.0
    assert config.max_catalog_bytes == 2048  # a bare number is bytes; the environment wins over the file
    assert config.timeout == 1.5
    for value in ("1.5GiB", "1536MiB"):
        assert load_config({"skillable_max_response_bytes": value}, {"SKILLABLE_API_KEY": "k"}).max_response_bytes \
            == 1536 * 1024**2


@pytest.mark.parametrize(("flag", "value", "problem"), [
    ("--skillable.max-response-bytes", "256MB",
     "expected a number of bytes or a size such as 256MiB (B, KiB, MiB, GiB), got '256MB'"),
    ("--skillable.max-response-bytes", "17GiB", "'17GiB' is outside 1KiB..16GiB"),
    ("--skillable.max-response-bytes", "0.3KiB", "expected a whole number, got '0.3KiB'"),
    ("--skillable.timeout", "10 minutes",
     "expected a number of seconds or a duration such as 10s (ms, s, m, h), got '10 minutes'"),
    ("--skillable.timeout", "11m", "'11m' is outside 500ms..600s"),
    ("--skillable.window-minutes", "60m", "expected a number, got '60m'"),  # MINUTES: a number, as shown
])
def test_a_value_with_a_wrong_unit_is_one_line_naming_the_setting(flag: str, value: str, problem: str) -> None:
    flags = vars(build_parser().parse_args([f"{flag}={value}"]))
    with pytest.raises(ConfigError) as caught:
        load_config(flags, {"SKILLABLE_API_KEY": "k"})
    assert str(caught.value) == f"invalid setting {flag[2:]}: {problem}"


@pytest.mark.integration
def test_help_names_every_http_endpoint_and_a_running_exporter_answers_each(
    run_exporter,  # type: ignore[no-untyped-def]
) -> None:
    text = run_help()
    section = text[text.index("HTTP endpoints:"):].split("\n\n")[0]
    endpoints = re.findall(r"^  ((?:POST )?/\S*)", section, re.M)
    assert endpoints == ["/metrics", "/probe?account=NAME", "/healthz", "POST /-/reload", "/"]
    exporter = run_exporter("--demo")
    for endpoint in endpoints:
        method, _, path = endpoint.rpartition(" ")
        path = path.replace("NAME", "default")  # the demo's one account, as the landing page names it
        answer = requests.request(method or "GET", exporter.url + path, timeout=15)
        assert answer.status_code == 200, (endpoint, answer.text)
    assert "skillable_up 1.0" in exporter.get("/probe?account=default").text
    assert exporter.get("/not-in-the-list").status_code == 404


@pytest.mark.integration
def test_backfill_help_names_each_value_with_human_defaults_and_says_what_comes_next(tmp_path: Path) -> None:
    from exporter.backfill import parse_options

    text = run_help(BACKFILL)
    entries = help_entries(text)
    assert not re.search(r"[ \[]VALUE\b", text)  # no value named only "VALUE"
    assert entries["--request-timeout"].options == ["--request-timeout SECONDS"]
    assert entries["--request-timeout"].default == "120s"
    assert entries["--skillable.max-response-bytes"].default == "256MiB"
    assert entries["--output"].options == ["--output DIR"]
    assert "--web.listen-address" not in entries
    assert "Then move DIR/blocks/* into Prometheus' data folder" in text
    # The default as shown, and a bare number of seconds, are both accepted.
    for timeout, seconds in (("120s", 120), ("90", 90), ("2m", 120)):
        args = build_backfill_parser().parse_args(["--from", "2026-11-01", "--to", "2026-11-02", "--output",
                                                   str(tmp_path), "--request-timeout", timeout])
        assert parse_options(args, now=1_900_000_000).request_timeout == seconds


# -- the Flags tables ----------------------------------------------------------------------------

FLAGS_BLOCK = re.compile(r"<!-- flags: python3 -m exporter\.cli --markdown( backfill)? -->\n(.*?)<!-- end of flags -->",
                         re.S)


def flags_block(path: Path, backfill: bool) -> str:
    blocks = {bool(which): body for which, body in FLAGS_BLOCK.findall(path.read_text())}
    assert backfill in blocks, f"{path.name} has no flags block for {'backfill' if backfill else 'the server'}"
    return blocks[backfill]


def table_rows(block: str) -> dict[str, Entry]:
    """The Flags table's rows as --help entries: `--[no-]x` is --x and --no-x, `(also ...)` the aliases."""
    rows: dict[str, Entry] = {}
    for line in block.splitlines()[2:]:
        flag, env, default, meaning = (cell.strip() for cell in line.strip("|").split(" | "))
        shown = re.match(r"^`([^`]+)`(?: \(also (.*)\))?$", flag)
        assert shown, line
        name, _, metavar = shown.group(1).partition(" ")
        if name.startswith("--[no-]"):
            options = [f"--{name[7:]}", f"--no-{name[7:]}"]
        else:
            aliases = re.findall(r"`([^`]+)`", shown.group(2) or "")
            options = [f"{option} {metavar}".strip() for option in (name, *aliases)]
        rows[options[0].split()[0]] = Entry(options, env.strip("`"), default.strip("`"), meaning)
    return rows


@pytest.mark.integration
@pytest.mark.parametrize(("document", "backfill"), [("README.md", False), ("docs/backfill.md", True)])
def test_the_flags_table_is_generated_and_matches_help(document: str, backfill: bool) -> None:
    block = flags_block(ROOT / document, backfill)
    parser = build_backfill_parser() if backfill else build_parser()
    assert block == parser.markdown(), (
        f"{document}'s Flags table is stale: replace it with the output of "
        f"`python3 -m exporter.cli --markdown{' backfill' if backfill else ''}`")
    assert table_rows(block) == help_entries(run_help(*([BACKFILL] if backfill else [])))
