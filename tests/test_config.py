"""Configuration: precedence, and every bad case exits 2 with one line naming the setting."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from collections.abc import Callable

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter import statefile
from exporter.cli import build_parser, load
from exporter.config import SETTINGS, ConfigError, Setting, load_config, read_key_file
from exporter.webconfig import load_web_config

from .harness import examples

ROOT = Path(__file__).resolve().parent.parent


def flags(*argv: str) -> dict[str, object]:
    return vars(build_parser().parse_args(list(argv)))


def run_check(*argv: str, env: dict[str, str] | None = None, check: bool = True,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """The exporter with `--config.check`, or (check=False) started for real: a bad config exits
    2 before it listens."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    base.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "exporter", *(["--config.check"] if check else []), *argv],
        env=base, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def write(tmp_path: Path, name: str, text: str, mode: int = 0o600) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_defaults() -> None:
    config = load_config(flags(), {"SKILLABLE_API_KEY": "k"})
    assert config.window_minutes == 60
    assert config.min_poll_interval == 10  # not 0: a scrape loop must not drive the API (hostile input 3)
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
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
    # A key file the config names but that is not there: a start would fail, and the check says so
    # (it used to say "none set", as for a key nobody named).
    assert with_accounts.stdout.rstrip().endswith("API key file missing (a start would fail) for: us (/nonexistent/k)")


KEY_CASES = [
    ("missing key", []),
    ("unreadable key file", ["--skillable.api-key-file=/nonexistent/key"]),
]


@pytest.mark.integration
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


# -- whatever a file holds, a load failure is one line that names the setting -------------------------------

# (case, file name -> bytes, arguments, environment, what the one line must name). "{d}" is the folder.
UNREADABLE = [
    ("config not UTF-8", {"c.yaml": b"names:\n  datacenters:\n    3: caf\xe9\n"}, ["--config.file={d}/c.yaml"], {},
     "invalid setting config.file: {d}/c.yaml is not UTF-8 text (byte 0xe9 on line 3)"),
    ("config in UTF-16", {"c.yaml": "skillable:\n  window_minutes: 5\n".encode("utf-16")},
     ["--config.file={d}/c.yaml"], {}, "invalid setting config.file: {d}/c.yaml is UTF-16 text"),
    ("window NaN", {"c.yaml": b"skillable:\n  window_minutes: .nan\n"}, ["--config.file={d}/c.yaml"], {},
     "invalid setting skillable.window-minutes: expected a finite number"),
    ("window infinite", {"c.yaml": b"skillable:\n  window_minutes: .inf\n"}, ["--config.file={d}/c.yaml"], {},
     "invalid setting skillable.window-minutes: expected a finite number"),
    ("timeout NaN in env", {}, [], {"SKILLABLE_TIMEOUT": "nan"},
     "invalid setting skillable.timeout: expected a finite number"),
    ("account window NaN", {"c.yaml": b"accounts:\n  - {name: a, api_key_env: K, window_minutes: .nan}\n"},
     ["--config.file={d}/c.yaml"], {"K": "k"}, "invalid setting accounts[0].window_minutes: expected a finite"),
    ("a date where a number goes", {"c.yaml": b"skillable:\n  window_minutes: 2026-02-30\n"},
     ["--config.file={d}/c.yaml"], {}, "invalid setting skillable.window-minutes: expected a number"),
    ("an impossible timestamp tag", {"c.yaml": b"skillable:\n  window_minutes: !!timestamp 2026-02-30\n"},
     ["--config.file={d}/c.yaml"], {}, "invalid setting config.file: {d}/c.yaml holds a value that cannot be read"),
    ("a list where a number goes", {"c.yaml": b"skillable:\n  timeout: [1]\n"}, ["--config.file={d}/c.yaml"], {},
     "invalid setting skillable.timeout: expected a number"),
    ("a superscript digit as an id", {"c.yaml": "names:\n  lab_hosts:\n    '\u00b2': x\n".encode()},
     ["--config.file={d}/c.yaml"], {}, "invalid setting names.lab_hosts: id"),
    ("one id named twice", {"c.yaml": b"names:\n  lab_hosts:\n    3: x\n    '03': y\n"}, ["--config.file={d}/c.yaml"],
     {}, "invalid setting names.lab_hosts: id 3 is named twice"),
    ("NUL in the state file path", {"c.yaml": b'storage:\n  state_file: "a\\0b"\n'}, ["--config.file={d}/c.yaml"],
     {}, "invalid setting storage.state-file: holds a NUL character"),
    ("a port that is none", {}, [], {"SKILLABLE_API_URL": "http://127.0.0.1:99999/api/v3"},
     "invalid setting skillable.api-url: "),
    ("nested too deeply", {"c.yaml": b"names: " + b"[" * 5000 + b"]" * 5000 + b"\n"}, ["--config.file={d}/c.yaml"],
     {}, "invalid setting config.file: {d}/c.yaml is nested too deeply"),
    ("the config a folder", {}, ["--config.file={d}"], {}, "invalid setting config.file: {d} is a directory"),
    ("the config a device", {}, ["--config.file=/dev/zero"], {}, "invalid setting config.file: /dev/zero is a device"),
    ("web config not UTF-8", {"web.yml": b"basic_auth_users:\n  \xff: x\n"}, ["--web.config-file={d}/web.yml"], {},
     "invalid setting web.config-file: {d}/web.yml is not UTF-8 text (byte 0xff on line 2)"),
    ("web config a device", {}, ["--web.config-file=/dev/zero"], {},
     "invalid setting web.config-file: /dev/zero is a device"),
    ("key file in UTF-16", {"key": "secret-key".encode("utf-16")}, ["--skillable.api-key-file={d}/key"], {},
     "invalid setting skillable.api-key-file: {d}/key is UTF-16 text"),
    ("key file not UTF-8", {"key": b"secret\xff"}, ["--skillable.api-key-file={d}/key"], {},
     "invalid setting skillable.api-key-file: {d}/key is not UTF-8 text"),
    ("non-ASCII key in a file", {"key": "s\u00e9cret".encode()}, ["--skillable.api-key-file={d}/key"], {},
     "invalid setting skillable.api-key-file: {d}/key holds a character an API key cannot have"),
    ("a key with a space inside", {"key": b"two words\n"}, ["--skillable.api-key-file={d}/key"], {},
     "invalid setting skillable.api-key-file: {d}/key holds a character an API key cannot have"),
    ("non-ASCII key in the environment", {}, [], {"SKILLABLE_API_KEY": "s\u00e9cret"},
     "invalid setting SKILLABLE_API_KEY: environment variable SKILLABLE_API_KEY holds a character"),
    ("non-ASCII key of an account", {"c.yaml": b"accounts:\n  - {name: a, api_key_env: K}\n"},
     ["--config.file={d}/c.yaml"], {"K": "s\u00e9cret"},
     "invalid setting accounts[0].api_key_env: environment variable K holds a character"),
]


@pytest.fixture
def key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """For cli.load(), which reads this process's environment as main() does: a key, no other setting."""
    for name in [n for n in os.environ if n.startswith("SKILLABLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SKILLABLE_API_KEY", "k")


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)


@pytest.mark.integration
@pytest.mark.parametrize(("case", "files", "argv", "env", "line"), UNREADABLE, ids=[c[0] for c in UNREADABLE])
@pytest.mark.parametrize("how", ["check", "start"])
def test_a_file_that_cannot_be_read_or_a_value_that_is_no_number_exits_2_with_one_line(
    tmp_path: Path, case: str, files: dict[str, bytes], argv: list[str], env: dict[str, str], line: str, how: str,
) -> None:
    """Not UTF-8, UTF-16, NaN, a date, a NUL, a FIFO-like path: exit 2 and one line naming the setting,
    from --config.check and at start alike (these were tracebacks with exit 1)."""
    write_files(tmp_path, files)
    args = [a.format(d=tmp_path) for a in argv]
    env = {"SKILLABLE_API_KEY": "k"} | env if "SKILLABLE_API_KEY" not in env else env
    if how == "start":
        args.append("--web.listen-address=127.0.0.1:0")
    result = run_check(*args, env=env, check=how == "check")
    assert result.returncode == 2, (case, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("skillable-exporter: " + line.format(d=tmp_path)), lines[0]
    assert "cret" not in result.stderr  # the key itself is never printed


def test_a_key_file_with_a_byte_order_mark_is_read_without_it(tmp_path: Path) -> None:
    """Notepad writes UTF-8 with a BOM; it used to become part of the key and fail every poll."""
    path = write(tmp_path, "key", "")
    Path(path).write_bytes(b"\xef\xbb\xbfsecret-key-42\r\n")
    assert load_config(flags("--skillable.api-key-file", path), {}).accounts[0].api_key == "secret-key-42"


@pytest.mark.integration
def test_a_fifo_as_a_file_is_refused_at_once_never_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: a reload would hang the process for ever (and a
    start, or --config.check, until killed)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for argv, setting in (([f"--config.file={fifo}"], "config.file"),
                          ([f"--web.config-file={fifo}"], "web.config-file"),
                          ([f"--skillable.api-key-file={fifo}"], "skillable.api-key-file")):
        result = run_check(*argv, env={"SKILLABLE_API_KEY": "k"}, timeout=10)
        assert result.returncode == 2
        assert result.stderr == f"skillable-exporter: invalid setting {setting}: {fifo} is a FIFO, not a regular file\n"


@pytest.mark.integration
@pytest.mark.usefixtures("key_in_env")
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path: Path) -> None:
    """YAML keys are unique; PyYAML kept the last one silently, so a second window_minutes lower in a
    long file overrode the first without a word."""
    config = write(tmp_path, "c.yaml", "skillable:\n  window_minutes: 30\n  timeout: 4\n  window_minutes: 60\n")
    result = run_check("--config.file", config, env={"SKILLABLE_API_KEY": "k"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"skillable-exporter: invalid setting config.file: {config}: skillable.window-minutes is set twice, "
        "on line 2 and line 4"]
    accounts = write(tmp_path, "a.yaml", "accounts:\n  - {name: a, api_key_env: K}\n  - name: b\n    api_key_env: K\n"
                                         "    name: c\n")
    with pytest.raises(ConfigError, match=r"accounts\[1\]\.name is set twice, on line 3 and line 5$"):
        load_config(flags("--config.file", accounts), {"K": "k"})
    web = write(tmp_path, "web.yml", "basic_auth_users:\n  alice: x\n  bob: y\n  alice: z\n")
    with pytest.raises(ConfigError, match=r"^invalid setting web.config-file: .*web.yml: basic_auth_users.alice is "
                                          r"set twice, on line 2 and line 4$"):
        load(flags(f"--web.config-file={web}"), demo=False)
    # A merge key (<<) is YAML's own way to override, not a duplicate.
    merged = write(tmp_path, "m.yaml", "accounts:\n  - &a {name: a, api_key_env: K, window_minutes: 30}\n"
                                       "  - <<: *a\n    name: b\n")
    loaded = load_config(flags("--config.file", merged), {"K": "k"}).accounts
    assert [(a.name, a.window_minutes) for a in loaded] == [("a", 30), ("b", 30)]


@pytest.mark.usefixtures("key_in_env")
def test_an_unknown_setting_is_answered_with_the_closest_known_one(tmp_path: Path) -> None:
    cases = [
        ("skillable:\n  windows_minutes: 5\n", "skillable.windows_minutes: unknown setting on line 2 of {p}; "
         "did you mean skillable.window-minutes (skillable.window_minutes in the file)?"),
        ("skillable:\n  window-minutes: 5\n", "skillable.window-minutes: unknown setting on line 2 of {p}; "
         "did you mean skillable.window-minutes (skillable.window_minutes in the file)?"),
        ("window_minutes: 5\n", "window_minutes: unknown setting on line 1 of {p}; "
         "did you mean skillable.window-minutes (skillable.window_minutes in the file)?"),
        ("skilable:\n  timeout: 5\n", "skilable: unknown setting on line 1 of {p}; did you mean skillable?"),
        ("accounts:\n  - {name: a, api_key_env: K}\n  - name: b\n    api_key_fil: k\n",
         "accounts[1].api_key_fil: unknown setting on line 4 of {p}; did you mean accounts[1].api_key_file?"),
        ("scrape:\n  x: 1\n", "scrape: unknown setting on line 1 of {p}"),  # nothing close: no guess
    ]
    for text, expected in cases:
        path = write(tmp_path, "c.yaml", text)
        with pytest.raises(ConfigError) as caught:
            load_config(flags("--config.file", path), {"SKILLABLE_API_KEY": "k", "K": "k"})
        assert str(caught.value) == "invalid setting " + expected.format(p=path)
    web = write(tmp_path, "web.yml", "basic_auth_user:\n  alice: x\n")
    with pytest.raises(ConfigError, match=r"basic_auth_user: unknown setting; did you mean web.config-file."
                                          r"basic_auth_users\?$"):
        load(flags(f"--web.config-file={web}"), demo=False)


@pytest.mark.integration
def test_an_unknown_flag_is_answered_with_the_closest_known_one() -> None:
    result = run_check("--skillable.windows-minutes=5", env={"SKILLABLE_API_KEY": "k"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "skillable-exporter: invalid command line: unrecognized arguments: --skillable.windows-minutes=5; "
        "did you mean --skillable.window-minutes?"]


@pytest.mark.parametrize("setting", list(SETTINGS), ids=[s.name for s in SETTINGS])
@pytest.mark.usefixtures("key_in_env")
def test_every_error_names_the_setting_as_documented(
    tmp_path: Path, setting: Setting, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By its flag's name, as --help and the README's Flags table write it, whether the bad value came
    from the file (written with underscores), the environment or a flag; and a misspelt key in the file
    is answered with that same name. The file-only settings keep their path in the file (accounts[0]...)."""
    documented = f"invalid setting {setting.name}: "
    assert f"--{setting.name}" in build_parser().format_help()
    section, key = setting.yaml_path
    path = write(tmp_path, "c.yaml", f"{section}:\n  {key}: {{not: valid}}\n")
    with pytest.raises(ConfigError) as caught:
        load(flags("--config.file", path), demo=False)
    assert str(caught.value).startswith(documented), caught.value
    misspelt = write(tmp_path, "m.yaml", f"{section}:\n  {key[:-1]}: 1\n")
    in_file = f"{section}.{key}"
    spelt = "" if in_file == setting.name else f" ({in_file} in the file)"
    with pytest.raises(ConfigError, match=re.escape(f"; did you mean {setting.name}{spelt}?") + "$"):
        load(flags("--config.file", misspelt), demo=False)
    if setting.env:  # as main() loads: the config, the web config, the state file's path
        monkeypatch.setenv(setting.env, "/nonexistent/file" if setting.name.endswith("-file") else "\x01 no")
        with pytest.raises(ConfigError) as caught:
            config, _ = load(flags(), demo=False)
            statefile.check_path(config.state_file or "")
        assert str(caught.value).startswith(documented), caught.value


def test_file_only_settings_are_named_by_their_path_in_the_file(tmp_path: Path) -> None:
    for text, name in (("accounts:\n  - {name: a, api_key_env: K, window_minutes: x}\n", "accounts[0].window_minutes"),
                       ("accounts:\n  - {name: a, api_key_env: K, api_url: ftp://x}\n", "accounts[0].api_url"),
                       ("names:\n  datacenters: [1]\n", "names.datacenters")):
        with pytest.raises(ConfigError, match=re.escape(f"invalid setting {name}: ")):
            load_config(flags("--config.file", write(tmp_path, "c.yaml", text)), {"K": "k", "SKILLABLE_API_KEY": "k"})
    with pytest.raises(ConfigError) as caught:
        load_config(flags(), {})
    assert "skillable.api-key-file" in str(caught.value) and "api_key_file" not in str(caught.value)


# -- properties: whatever the files hold, a Config or one ConfigError ------------------------------------------

KNOWN_PATHS = [s.yaml_path for s in SETTINGS] + [("names", n) for n in ("datacenters", "delivery_regions",
                                                                         "lab_hosts", "lab_profiles", "lab_series")]
ACCOUNT_KEYS = ["name", "api_key_env", "api_key_file", "api_url", "window_minutes"]
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, 2**70, "60", "1e999", "-0", "NaN",
                              "http://127.0.0.1:9/x", "http://h:99999/", ":1", "K", "/dev/null", "a\nb", "a\0b",
                              "\u00b2", datetime.date(2026, 2, 28)]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3), max_leaves=6)


@st.composite
def config_trees(draw: st.DrawFn) -> dict[object, object]:
    tree: dict[object, object] = {}
    for path in draw(st.lists(st.sampled_from(KNOWN_PATHS), max_size=6)):
        section = tree.setdefault(path[0], {})
        if isinstance(section, dict):
            section[path[1]] = draw(values)
    if draw(st.booleans()):
        keys = st.sampled_from(ACCOUNT_KEYS) | st.text(max_size=6)
        tree["accounts"] = draw(st.lists(st.dictionaries(keys, values, max_size=5) | values, max_size=3))
    if draw(st.booleans()):
        tree[draw(st.text(max_size=8))] = draw(values)
    return tree


def assert_loads_or_one_line(load_it: Callable[[], object]) -> None:
    try:
        load_it()
    except ConfigError as exc:
        assert str(exc).startswith("invalid setting ") and "\n" not in str(exc) and "\r" not in str(exc), str(exc)


PROPERTY = settings(max_examples=examples(300), deadline=None, database=None)


@PROPERTY
@given(tree=config_trees(), env=st.dictionaries(st.sampled_from(["SKILLABLE_API_KEY", "K", "SKILLABLE_TIMEOUT"]),
                                                st.text(alphabet=st.characters(blacklist_characters="\0",
                                                                               blacklist_categories=["Cs"]),
                                                        max_size=8)))
def test_any_tree_of_values_loads_or_is_refused_with_one_line(tree: dict[object, object], env: dict[str, str]) -> None:
    """NaN, infinities, lists and mappings where a number goes, NULs, any key: never anything but a
    Config or a ConfigError (a reload turns that into a refusal; anything else killed the process)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(yaml.safe_dump(tree, allow_unicode=True).encode("utf-8", "surrogatepass"))
        assert_loads_or_one_line(lambda: load_config(flags("--config.file", str(path)), env))
        assert_loads_or_one_line(lambda: load_config(flags("--config.file", str(path)), env, read_keys=False))


@PROPERTY
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_as_a_config_web_config_or_key_file_load_or_are_refused_with_one_line(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "file"
        path.write_bytes(data)
        path.chmod(0o600)
        assert_loads_or_one_line(lambda: load_config(flags("--config.file", str(path)), {"SKILLABLE_API_KEY": "k"}))
        assert_loads_or_one_line(lambda: load_web_config(str(path)))
        try:
            key = read_key_file("skillable.api-key-file", str(path))
        except ConfigError as exc:
            assert "\n" not in str(exc)
        else:  # what reaches the api_key header is visible ASCII, however the file was written
            assert key and all("!" <= ch <= "~" for ch in key)
