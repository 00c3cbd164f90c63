"""Configuration: precedence, and every bad case exits 2 with one line naming the setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.cli import build_parser
from exporter.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def flags(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(list(argv)))


def run_check(*argv: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The exporter with `--config.check`, or (check=False) started for real: a bad config exits
    2 before it listens."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "exporter", *(["--config.check"] if check else []), *argv],
        env=base, capture_output=True, text=True, timeout=30, cwd=ROOT,
    )


def write(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_defaults() -> None:
    config = load_config(flags(), {"SKILLABLE_API_KEY": "k"})
    assert config.window_minutes == 60
    assert config.min_poll_interval == 10  # not 0: a scrape loop must not drive the API (issue 10 item 3)
    assert config.listen_address == "127.0.0.1:10180"
    assert config.accounts[0].api_url == "https://labondemand.com/api/v3"
    assert config.accounts[0].api_key == "k"


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "skillable:\n  window_minutes: 30\n  min_poll_interval: 7\n  timeout: 4\n")
    env = {"SKILLABLE_API_KEY": "k", "SKILLABLE_WINDOW_MINUTES": "45", "SKILLABLE_MIN_POLL_INTERVAL": "8"}
    config = load_config(flags("--config.file", path, "--skillable.window-minutes=90"), env)
    assert config.window_minutes == 90  # flag
    assert config.min_poll_interval == 8  # environment over file
    assert config.timeout == 4  # file over default
    assert config.overlap_minutes == 2  # default


def test_api_url_from_environment() -> None:
    config = load_config(flags(), {"SKILLABLE_API_KEY": "k", "SKILLABLE_API_URL": "http://127.0.0.1:9/api/v3/"})
    assert config.accounts[0].api_url == "http://127.0.0.1:9/api/v3"


def test_key_file(tmp_path: Path) -> None:
    path = write(tmp_path, "key", "secret-from-file\n")
    config = load_config(flags("--skillable.api-key-file", path), {})
    assert config.accounts[0].api_key == "secret-from-file"
    assert "secret-from-file" not in repr(config)


def test_there_is_no_api_key_flag() -> None:
    options = set(re.findall(r"--[\w.-]+", build_parser().format_help()))
    assert "--skillable.api-key-file" in options
    assert not any("api-key" in opt and "file" not in opt for opt in options)


def test_shipped_config_example_is_valid() -> None:
    result = run_check("--config.file", str(ROOT / "config.yaml"), env={"SKILLABLE_API_KEY": "k"})
    assert result.returncode == 0, result.stderr


BAD_CASES = [
    ("invalid yaml", "skillable: [\n", [], {"SKILLABLE_API_KEY": "k"}, "config.file"),
    ("unknown key", "skillable:\n  windw_minutes: 5\n", [], {"SKILLABLE_API_KEY": "k"}, "skillable.windw_minutes"),
    ("unknown section", "scrape:\n  x: 1\n", [], {"SKILLABLE_API_KEY": "k"}, "invalid setting scrape"),
    ("window too large", "", ["--skillable.window-minutes=10081"], {"SKILLABLE_API_KEY": "k"},
     "skillable.window-minutes"),
    ("window zero in file", "skillable:\n  window_minutes: 0\n", [], {"SKILLABLE_API_KEY": "k"},
     "skillable.window-minutes"),
    ("window not a number in env", "", [], {"SKILLABLE_API_KEY": "k", "SKILLABLE_WINDOW_MINUTES": "lots"},
     "skillable.window-minutes"),
    ("bad listen address", "", ["--web.listen-address=localhost"], {"SKILLABLE_API_KEY": "k"},
     "web.listen-address"),
    ("bad log format", "", ["--log.format=xml"], {"SKILLABLE_API_KEY": "k"}, "log.format"),
    ("bad api url", "", [], {"SKILLABLE_API_KEY": "k", "SKILLABLE_API_URL": "ftp://x"}, "skillable.api-url"),
    ("negative poll interval", "", ["--skillable.min-poll-interval=-1"], {"SKILLABLE_API_KEY": "k"},
     "skillable.min-poll-interval"),
    ("unknown flag", "", ["--skillable.window=5"], {"SKILLABLE_API_KEY": "k"}, "--skillable.window"),
    ("bad names mapping", "names:\n  datacenters:\n    three: US East\n", [], {"SKILLABLE_API_KEY": "k"},
     "names.datacenters"),
]


@pytest.mark.parametrize(("case", "text", "argv", "env", "setting"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_configuration_exits_2_with_one_line(
    tmp_path: Path, case: str, text: str, argv: list[str], env: dict[str, str], setting: str
) -> None:
    args = list(argv)
    if text:
        args += ["--config.file", write(tmp_path, "c.yaml", text)]
    result = run_check(*args, env=env)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0]
    assert "Traceback" not in result.stderr


def test_config_check_needs_no_api_key_and_names_the_file(tmp_path: Path) -> None:
    result = run_check("--config.file=config.yaml")  # the shipped file, no key anywhere
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        "skillable-exporter: configuration file config.yaml is valid: 1 account(s); "
        "API key not checked (none set) for: default"
    ]
    listed = "accounts:\n  - {name: emea, api_key_env: KEY_EMEA}\n  - {name: us, api_key_file: /nonexistent/k}\n"
    with_accounts = run_check("--config.file", write(tmp_path, "c.yaml", listed),
                              env={"KEY_EMEA": "k"})
    assert with_accounts.returncode == 0, with_accounts.stderr
    assert with_accounts.stdout.rstrip().endswith("API key not checked (none set) for: us")


KEY_CASES = [
    ("missing key", []),
    ("unreadable key file", ["--skillable.api-key-file=/nonexistent/key"]),
]


@pytest.mark.parametrize(("case", "argv"), KEY_CASES, ids=[c[0] for c in KEY_CASES])
def test_a_missing_key_stops_the_start_with_one_line(case: str, argv: list[str]) -> None:
    result = run_check("--web.listen-address=127.0.0.1:0", *argv, check=False)
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "skillable.api-key-file" in lines[0], result.stderr


def test_world_readable_key_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "key", "k", mode=0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_config(flags("--skillable.api-key-file", path), {})


def test_demo_needs_no_key() -> None:
    assert load_config(flags("--demo"), {}, demo=True).demo


def test_names_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "names:\n  datacenters:\n    3: US East\n  lab_hosts:\n    '49': host-49\n")
    config = load_config(flags("--config.file", path), {"SKILLABLE_API_KEY": "k"})
    assert config.names.datacenters == {"3": "US East"}
    assert config.names.lab_hosts == {"49": "host-49"}
