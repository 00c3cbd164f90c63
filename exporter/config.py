"""Configuration: one table of settings, read from flags, environment, a YAML file and defaults.

Precedence is flag > environment > config file > default. Every setting is
validated here, once, into a frozen Config; anything wrong raises ConfigError
naming the setting, and the CLI turns that into exit status 2.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

import yaml

DEFAULT_API_URL = "https://labondemand.com/api/v3"
DEFAULT_LISTEN_ADDRESS = "127.0.0.1:10180"
MAX_WINDOW_MINUTES = 10080  # LatestResults refuses more than 7 days
# Seconds a poll is reused for. Not 0: whoever can reach /metrics could otherwise drive a request
# to Skillable per scrape on the customer's key. 10 s holds a scrape loop to one LatestResults
# request per 10 s, still gives a single Prometheus at the default 15 s interval a fresh poll
# every scrape, and lets an HA pair at 15 s share polls exactly (anything in 7.5..15 s does).
DEFAULT_MIN_POLL_INTERVAL = 10.0


class ConfigError(Exception):
    """A setting is wrong. str() is one line that names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"invalid setting {setting}: {problem}")
        self.setting = setting


@dataclass(frozen=True)
class Setting:
    """One setting: its dotted name (the flag is --<name>, the YAML path is the same with '_') and the
    Config field it sets (`field`; None for the settings the accounts are made of)."""

    name: str
    default: Any
    parse: Callable[[str, Any], Any]
    help: str
    env: str | None = None
    field: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def yaml_path(self) -> tuple[str, ...]:
        return tuple(part.replace("-", "_") for part in self.name.split("."))

    @property
    def dest(self) -> str:
        return "_".join(self.yaml_path)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}")
    return value


def _optional_text(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _text(name, value)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        text = _text(name, value).lower()
        if text not in choices:
            raise ConfigError(name, f"{value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _number(low: float, high: float, integer: bool = False) -> Callable[[str, Any], float]:
    def parse(name: str, value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected a number, got {value!r}") from None
        if integer and number != int(number):
            raise ConfigError(name, f"expected a whole number, got {value!r}")
        if not low <= number <= high:
            raise ConfigError(name, f"{value!r} is outside {low:g}..{high:g}")
        return int(number) if integer else number

    return parse


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected true or false, got {value!r}")


_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


def _listen_address(name: str, value: Any) -> str:
    text = _text(name, value)
    match = _LISTEN.match(text)
    if not match or not 0 <= int(match.group("port")) <= 65535:
        raise ConfigError(name, f"{value!r} is not host:port")
    return text


def _listen_addresses(name: str, value: Any) -> tuple[str, ...]:
    """One host:port or a list of them (the flag is repeatable, as exporter-toolkit's): every one serves."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(name, "expected at least one host:port")
    return tuple(dict.fromkeys(_listen_address(name, v) for v in values))


# Paths the exporter serves itself; the telemetry path may not hide one.
RESERVED_PATHS = ("/", "/healthz", "/probe", "/-/reload")


def _telemetry_path(name: str, value: Any) -> str:
    """A path a scrape can reach as written: '/' then segments of letters, digits and . _ ~ -,
    none empty (a request for '//metrics' reads as the host 'metrics' and an empty path) and none
    '.' or '..' (clients resolve those away before asking); not a path of the exporter's own."""
    text = _text(name, value)
    segments = text[1:].split("/")
    if text.endswith("/"):
        segments.pop()  # a trailing slash is a path of its own: /metrics/ is asked as written
    if (not re.match(r"^/[A-Za-z0-9._~/-]*$", text) or text in RESERVED_PATHS
            or any(segment in ("", ".", "..") for segment in segments)):
        raise ConfigError(name, f"{value!r} is not a path starting with / (no empty, '.' or '..' segment) "
                          f"other than {', '.join(RESERVED_PATHS)}")
    return text


def _url(name: str, value: Any) -> str:
    text = _text(name, value).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(name, f"{value!r} is not an http(s) URL")
    return text


def _id_names(name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, "expected a mapping of id to name")
    names: dict[str, str] = {}
    for key, label in value.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not str(key).isdigit():
            raise ConfigError(name, f"id {key!r} is not a whole number")
        if not isinstance(label, str) or not label:
            raise ConfigError(name, f"name for id {key} must be a non-empty string")
        names[str(int(key))] = label
    return names


SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen-address", DEFAULT_LISTEN_ADDRESS, _listen_addresses,
            "host:port to serve /metrics on (':10180' for all interfaces); repeat the flag to listen on several",
            "SKILLABLE_EXPORTER_LISTEN_ADDRESS", field="listen_addresses"),
    Setting("web.systemd-socket", False, _bool,
            "serve the sockets systemd passes (socket activation, LISTEN_FDS) instead of --web.listen-address",
            field="systemd_socket"),
    Setting("web.telemetry-path", "/metrics", _telemetry_path, "path under which to serve the metrics",
            field="telemetry_path"),
    Setting("web.config-file", None, _optional_text,
            "exporter-toolkit style web config file (TLS, basic auth)", "SKILLABLE_EXPORTER_WEB_CONFIG_FILE",
            field="web_config_file"),
    Setting("log.level", "info", _choice("debug", "info", "warn", "warning", "error"),
            "log level: debug, info, warn, error", "SKILLABLE_EXPORTER_LOG_LEVEL", field="log_level"),
    Setting("log.format", "logfmt", _choice("logfmt", "json"), "log format: logfmt or json",
            "SKILLABLE_EXPORTER_LOG_FORMAT", field="log_format"),
    Setting("skillable.api-url", DEFAULT_API_URL, _url, "Skillable Lab API base URL", "SKILLABLE_API_URL"),
    Setting("skillable.api-key-file", None, _optional_text,
            "file holding the API key (else SKILLABLE_API_KEY)", "SKILLABLE_API_KEY_FILE"),
    Setting("skillable.window-minutes", 60, _number(1, MAX_WINDOW_MINUTES, integer=True),
            "lookback window in minutes (1..10080)", "SKILLABLE_WINDOW_MINUTES"),
    Setting("skillable.min-poll-interval", DEFAULT_MIN_POLL_INTERVAL, _number(0, 86400),
            "seconds a poll is reused for; 0 polls on every scrape (a loop of scrapes then drives the API)",
            "SKILLABLE_MIN_POLL_INTERVAL", field="min_poll_interval"),
    Setting("skillable.overlap-minutes", 2, _number(0, 60, integer=True),
            "extra minutes asked for on incremental polls, against clock skew", "SKILLABLE_OVERLAP_MINUTES",
            field="overlap_minutes"),
    Setting("skillable.timeout", 9.0, _number(0.5, 600),
            "total seconds one poll may take; capped by Prometheus' scrape timeout", "SKILLABLE_TIMEOUT",
            field="timeout"),
    Setting("skillable.max-response-bytes", 256 * 1024 * 1024, _number(1024, 16 * 1024**3, integer=True),
            "largest response body accepted", "SKILLABLE_MAX_RESPONSE_BYTES", field="max_response_bytes"),
    Setting("skillable.max-lab-hosts", 2000, _number(1, 1_000_000, integer=True),
            "lab hosts tracked as separate label values; more go to lab_host_id=\"other\"",
            "SKILLABLE_MAX_LAB_HOSTS", field="max_lab_hosts"),
    Setting("skillable.max-running-minutes", 1440, _number(1, 1_000_000, integer=True),
            "minutes a lab started and not ended counts as running before it is dropped as expired",
            "SKILLABLE_MAX_RUNNING_MINUTES", field="max_running_minutes"),
    Setting("skillable.max-lab-profiles", 500, _number(1, 1_000_000, integer=True),
            "lab profiles tracked as separate label values; more go to lab_profile_id=\"other\"",
            "SKILLABLE_MAX_LAB_PROFILES", field="max_lab_profiles"),
    Setting("storage.state-file", None, _optional_text,
            "file keeping counters and per-instance memory across restarts", "SKILLABLE_STATE_FILE",
            field="state_file"),
    Setting("collector.stats", True, _bool, "poll /stats for account-wide active and saved labs",
            "SKILLABLE_COLLECTOR_STATS", field="collect_stats"),
    Setting("collector.delivery-regions", True, _bool, "fetch delivery region names from /deliveryregions",
            "SKILLABLE_COLLECTOR_DELIVERY_REGIONS", field="collect_delivery_regions"),
    Setting("collector.catalog", True, _bool, "fetch lab profile and lab series names from /catalog (hourly)",
            "SKILLABLE_COLLECTOR_CATALOG", field="collect_catalog"),
    Setting("skillable.max-catalog-bytes", 64 * 1024 * 1024, _number(1024, 16 * 1024**3, integer=True),
            "largest /catalog body accepted (the catalog is one unpaged answer)", "SKILLABLE_MAX_CATALOG_BYTES",
            field="max_catalog_bytes"),
    Setting("collector.launch", True, _bool,
            "poll /labinstance/search (mode 5) for start-up times, labs never ready, lab errors and launches per "
            "integration (docs/launch.md)", "SKILLABLE_COLLECTOR_LAUNCH", field="collect_launch"),
    Setting("skillable.launch-interval", 300.0, _number(60, 86400),
            "seconds between launch polls, at least (driven by scrapes; 60..86400)", "SKILLABLE_LAUNCH_INTERVAL",
            field="launch_interval"),
    Setting("skillable.launch-page-size", 100, _number(1, 1000, integer=True),
            "lab instances asked for per page of /labinstance/search", "SKILLABLE_LAUNCH_PAGE_SIZE",
            field="launch_page_size"),
    Setting("skillable.launch-grace-minutes", 15, _number(0, 1440, integer=True),
            "minutes an ended lab is still looked at for errors reported after its End",
            "SKILLABLE_LAUNCH_GRACE_MINUTES", field="launch_grace_minutes"),
    Setting("skillable.launch-timeout", 60.0, _number(1, 600),
            "total seconds one launch poll (every page of it) may take", "SKILLABLE_LAUNCH_TIMEOUT",
            field="launch_timeout"),
    Setting("skillable.max-api-consumers", 100, _number(1, 100_000, integer=True),
            "API consumers tracked as separate label values; more go to api_consumer=\"other\"",
            "SKILLABLE_MAX_API_CONSUMERS", field="max_api_consumers"),
)
_BY_DEST = {s.dest: s for s in SETTINGS}


def setting_name(field_name: str) -> str:
    """The documented name of the setting behind a Config field (listen_addresses -> web.listen-address);
    a field no single setting sets keeps its own name."""
    for setting in SETTINGS:
        if setting.field == field_name:
            return setting.name
    return field_name

# Settings that only the config file carries (structured values).
_FILE_ONLY = {
    ("names", "datacenters"), ("names", "delivery_regions"), ("names", "lab_hosts"), ("accounts",),
    ("names", "lab_profiles"), ("names", "lab_series"),
}


@dataclass(frozen=True)
class Names:
    """Human names for ids, from the config file."""

    datacenters: Mapping[str, str] = field(default_factory=dict)
    delivery_regions: Mapping[str, str] = field(default_factory=dict)
    lab_hosts: Mapping[str, str] = field(default_factory=dict)
    lab_profiles: Mapping[str, str] = field(default_factory=dict)
    lab_series: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Account:
    """One Skillable API consumer to poll."""

    name: str
    api_url: str
    api_key: str = field(repr=False)  # never printed
    window_minutes: int


@dataclass(frozen=True)
class Config:
    """The validated settings. Each field is set by the one setting whose `field` names it (SETTINGS),
    but accounts (made of skillable.api-url, api-key-file, window-minutes and the file's accounts:),
    names (the file's names:) and demo (--demo)."""

    listen_addresses: tuple[str, ...]
    systemd_socket: bool
    telemetry_path: str
    web_config_file: str | None
    log_level: str
    log_format: str
    accounts: tuple[Account, ...]
    min_poll_interval: float
    overlap_minutes: int
    timeout: float
    max_response_bytes: int
    max_lab_hosts: int
    max_running_minutes: int
    max_lab_profiles: int
    state_file: str | None
    collect_stats: bool
    collect_delivery_regions: bool
    collect_catalog: bool
    max_catalog_bytes: int
    collect_launch: bool
    launch_interval: float
    launch_page_size: int
    launch_grace_minutes: int
    launch_timeout: float
    max_api_consumers: int
    names: Names
    demo: bool

    @property
    def window_minutes(self) -> int:
        return self.accounts[0].window_minutes

    @property
    def listen_address(self) -> str:
        """The first listen address."""
        return self.listen_addresses[0]


def check_mapping(where: str, value: Any, allowed: Collection[str], expected: str) -> dict[str, Any]:
    """`value` as a mapping whose keys are all in `allowed`, else a ConfigError naming the setting."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected {expected}")
    for key in value:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}", "unknown setting")
    return value


def _walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _check_unknown_keys(tree: Mapping[str, Any]) -> None:
    known = {s.yaml_path for s in SETTINGS} | _FILE_ONLY

    def visit(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            path = (*prefix, str(key))
            if path in known:
                continue
            is_section = any(k[: len(path)] == path for k in known)
            if is_section and isinstance(value, Mapping):
                visit(value, path)
            elif not (is_section and value is None):  # an empty section is fine
                raise ConfigError(".".join(path), "unknown setting")

    visit(tree, ())


def read_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError("config.file", f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("config.file", f"{path} is not valid YAML{where}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError("config.file", f"{path} must hold a mapping of settings")
    _check_unknown_keys(tree)
    return tree


def read_key_file(setting: str, path: str) -> str:
    """Read an API key from a file, refusing files that others can read."""
    try:
        mode = os.stat(path).st_mode
        with open(path, encoding="utf-8") as handle:
            key = handle.read().strip()
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXO):
        raise ConfigError(setting, f"{path} is readable by other users; chmod o-rwx it")
    if not key:
        raise ConfigError(setting, f"{path} is empty")
    return key


def load_config(
    flags: Mapping[str, Any], environ: Mapping[str, str], demo: bool = False, read_keys: bool = True
) -> Config:
    """Build the Config from parsed flags (dest -> value or None), the environment and the file.

    With `read_keys=False` (--config.check) a missing key is no error, so a config can be linted
    where the keys are not: an unset variable or a key file that does not exist gives an empty
    key. A key that is there is checked as at start (a key file readable by others is refused)."""
    config_path = flags.get("config_file")
    tree = read_config_file(config_path) if config_path else {}

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw: Any = flags.get(setting.dest)
        if raw is None and setting.env and setting.env in environ:
            raw = environ[setting.env]
        if raw is None:
            raw = _walk(tree, setting.yaml_path)
        values[setting.dest] = setting.parse(setting.name, setting.default if raw is None else raw)

    names = Names(
        datacenters=_id_names("names.datacenters", _walk(tree, ("names", "datacenters"))),
        delivery_regions=_id_names("names.delivery_regions", _walk(tree, ("names", "delivery_regions"))),
        lab_hosts=_id_names("names.lab_hosts", _walk(tree, ("names", "lab_hosts"))),
        lab_profiles=_id_names("names.lab_profiles", _walk(tree, ("names", "lab_profiles"))),
        lab_series=_id_names("names.lab_series", _walk(tree, ("names", "lab_series"))),
    )
    accounts = _accounts(tree.get("accounts"), values, _KeySource(environ, read_keys), demo)
    fields = {s.field: values[s.dest] for s in SETTINGS if s.field is not None}
    return Config(**fields, accounts=accounts, names=names, demo=demo)


@dataclass(frozen=True)
class _KeySource:
    """Where API keys come from; with `required` False a missing one is "" instead of an error."""

    environ: Mapping[str, str]
    required: bool

    def from_file(self, setting: str, path: str) -> str:
        if not self.required and not os.path.lexists(path):
            return ""
        return read_key_file(setting, path)

    def from_env(self, setting: str, name: str, problem: str) -> str:
        key = self.environ.get(name, "").strip()
        if not key and self.required:
            raise ConfigError(setting, problem)
        return key


def _accounts(raw: Any, values: Mapping[str, Any], keys: _KeySource, demo: bool) -> tuple[Account, ...]:
    if demo:
        # Demo mode swaps in the loopback simulator; the CLI fills in its URL.
        return (Account("", "", "demo", values["skillable_window_minutes"]),)
    if raw is None:
        return (_single_account(values, keys),)
    if not isinstance(raw, list) or not raw:
        raise ConfigError("accounts", "expected a non-empty list of accounts")
    accounts = tuple(_listed_account(i, entry, values, keys) for i, entry in enumerate(raw))
    seen: set[str] = set()
    for account in accounts:
        if account.name in seen:
            raise ConfigError("accounts", f"account name {account.name!r} is used twice")
        seen.add(account.name)
    return accounts


def _single_account(values: Mapping[str, Any], keys: _KeySource) -> Account:
    key_file = values["skillable_api_key_file"]
    if key_file:
        key = keys.from_file("skillable.api-key-file", key_file)
    else:
        key = keys.from_env("skillable.api-key-file", "SKILLABLE_API_KEY",
                            "no API key: set SKILLABLE_API_KEY or skillable.api_key_file (or run with --demo)")
    return Account("", values["skillable_api_url"], key, values["skillable_window_minutes"])


_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ACCOUNT_KEYS = {"name", "api_key_env", "api_key_file", "api_url", "window_minutes"}


def _listed_account(
    index: int, entry: Any, values: Mapping[str, Any], keys: _KeySource
) -> Account:
    where = f"accounts[{index}]"
    entry = check_mapping(where, entry, _ACCOUNT_KEYS, "a mapping with name and api_key_env or api_key_file")
    name = entry.get("name")
    if not isinstance(name, str) or not _ACCOUNT_NAME.match(name):
        raise ConfigError(f"{where}.name", "expected 1-64 letters, digits, '_', '.' or '-'")
    if not entry.get("api_key_file") and not entry.get("api_key_env"):
        raise ConfigError(where, "needs api_key_env or api_key_file")
    if entry.get("api_key_file"):
        key = keys.from_file(f"{where}.api_key_file", _text(f"{where}.api_key_file", entry["api_key_file"]))
    else:
        env_name = _text(f"{where}.api_key_env", entry["api_key_env"])
        key = keys.from_env(f"{where}.api_key_env", env_name, f"environment variable {env_name} is empty or unset")
    url = _url(f"{where}.api_url", entry["api_url"]) if entry.get("api_url") else values["skillable_api_url"]
    window = values["skillable_window_minutes"]
    if entry.get("window_minutes") is not None:
        window = _number(1, MAX_WINDOW_MINUTES, integer=True)(f"{where}.window_minutes", entry["window_minutes"])
    return Account(name, url, key, int(window))
