"""Configuration: one table of settings, read from flags, environment, a YAML file and defaults.

Precedence is flag > environment > config file > default. Every setting is
validated here, once, into a frozen Config; anything wrong raises ConfigError
naming the setting, and the CLI turns that into exit status 2.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Collection, Mapping
from urllib.parse import urlsplit

import yaml

DEFAULT_API_URL = "https://labondemand.com/api/v3"
DEFAULT_LISTEN_ADDRESS = "127.0.0.1:10180"
MAX_WINDOW_MINUTES = 10080  # LatestResults refuses more than 7 days
# Seconds a poll is reused for. Not 0: whoever can reach /metrics could otherwise drive a request
# to Skillable per scrape on the customer's key. 10 s holds a scrape loop to one LatestResults
# request per 10 s, still gives a single Prometheus at the default 15 s interval a fresh poll
# every scrape, and lets an HA pair at 15 s share polls exactly (anything in 7.5..15 s does).
DEFAULT_MIN_POLL_INTERVAL = 10.0


CONFIG_FILE = "config.file"  # the setting --config.file names


class ConfigError(Exception):
    """A setting is wrong. str() is one line that names the setting."""

    def __init__(self, setting: str, problem: str) -> None:
        text = f"invalid setting {setting}: {problem}"
        # One line whatever a file or a name holds: a newline or control character is shown escaped.
        super().__init__("".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text))
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
    metavar: str = "VALUE"  # what --help shows for the value: MINUTES, SECONDS, BYTES, URL, PATH, ...
    aliases: tuple[str, ...] = ()  # other spellings of the flag (exporter-toolkit's), listed by --help

    @property
    def flag(self) -> str:
        return "--" + self.name

    @property
    def shown_default(self) -> str:
        """The default as --help and the README show it ("" for none): 256MiB, 10s, on. Every
        setting accepts what is shown as a value meaning the same."""
        if self.default is None or self.default == "":
            return ""
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if self.metavar == "BYTES":
            return human_bytes(self.default)
        if self.metavar == "SECONDS":
            return human_seconds(self.default)
        return str(self.default)

    @property
    def yaml_path(self) -> tuple[str, ...]:
        return tuple(part.replace("-", "_") for part in self.name.split("."))

    @property
    def dest(self) -> str:
        return "_".join(self.yaml_path)


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(name, f"expected a string, got {value!r}")
    if "\0" in value:  # no setting holds one, and a path with one fails every system call
        raise ConfigError(name, "holds a NUL character")
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


def human_bytes(size: int) -> str:
    """Bytes as --help shows them: the largest binary unit that divides them (256MiB), else bytes (1000B)."""
    for unit, factor in reversed(list(BYTES.factors.items())):
        if factor > 1 and size >= factor and size % factor == 0:
            return f"{int(size // factor)}{unit}"
    return f"{size}B"


def human_seconds(seconds: float) -> str:
    """Seconds as --help shows them: 10s, 0.5 as 500ms."""
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


@dataclass(frozen=True)
class Units:
    """The units a number of bytes or seconds may be written with (a bare number is bytes or seconds)."""

    factors: Mapping[str, float]
    show: Callable[[Any], str]
    what: str  # how an error names the quantity


BYTES = Units({"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}, human_bytes, "bytes or a size such as 256MiB")
SECONDS = Units({"ms": 0.001, "s": 1, "m": 60, "h": 3600}, human_seconds, "seconds or a duration such as 10s")
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*$")


def _number(low: float, high: float, integer: bool = False, units: Units | None = None) -> Callable[[str, Any], float]:
    """A number in low..high; with `units`, also a number with one unit of them (256MiB, 10s)."""
    expected = f"a number of {units.what} ({', '.join(units.factors)})" if units else "a number"
    show = units.show if units else (lambda number: f"{number:g}")

    def parse(name: str, value: Any) -> float:
        if isinstance(value, bool):
            raise ConfigError(name, f"expected {expected}, got {value!r}")
        quantity = _QUANTITY.match(value) if units and isinstance(value, str) else None
        try:
            if quantity and quantity.group(2) in units.factors:  # type: ignore[union-attr]
                number = float(quantity.group(1)) * units.factors[quantity.group(2)]  # type: ignore[union-attr]
            else:
                number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(name, f"expected {expected}, got {value!r}") from None
        if not math.isfinite(number):  # YAML's .nan and .inf, "nan" in the environment
            raise ConfigError(name, f"expected a finite number, got {value!r}")
        if integer and number != int(number):
            raise ConfigError(name, f"expected a whole number, got {value!r}")
        if not low <= number <= high:
            raise ConfigError(name, f"{value!r} is outside {show(low)}..{show(high)}")
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


def _optional_count(name: str, value: Any) -> int | None:
    """A whole number of at least 1, or None (unset) for an empty value."""
    if value is None or value == "":
        return None
    return int(_number(1, 100_000_000, integer=True)(name, value))


def _url(name: str, value: Any) -> str:
    text = _text(name, value).rstrip("/")
    problem = f"{value!r} is not an http(s) URL"
    if not re.match(r"^https?://[^/\s]+", text) or any(ch.isspace() or ord(ch) < 32 or ch == "\x7f" for ch in text):
        raise ConfigError(name, problem)
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one (http://host:99999)
    except ValueError:
        raise ConfigError(name, problem) from None
    if not parts.hostname:
        raise ConfigError(name, problem)
    return text


def _id_names(name: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, "expected a mapping of id to name")
    names: dict[str, str] = {}
    for key, label in value.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or not re.fullmatch(r"[0-9]+", str(key)):
            raise ConfigError(name, f"id {key!r} is not a whole number")
        if not isinstance(label, str) or not label:
            raise ConfigError(name, f"name for id {key} must be a non-empty string")
        if str(int(key)) in names:  # 3 and "03" are one id
            raise ConfigError(name, f"id {int(key)} is named twice")
        names[str(int(key))] = label
    return names


SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen-address", DEFAULT_LISTEN_ADDRESS, _listen_addresses,
            "host:port to serve on: ':10180' for every interface (IPv6 and IPv4; '0.0.0.0:10180' for IPv4 "
            "only); repeat the flag to listen on several",
            "SKILLABLE_EXPORTER_LISTEN_ADDRESS", field="listen_addresses", metavar="ADDRESS"),
    Setting("web.systemd-socket", False, _bool,
            "serve the sockets systemd passes (socket activation, LISTEN_FDS) instead of --web.listen-address",
            field="systemd_socket"),
    Setting("web.telemetry-path", "/metrics", _telemetry_path,
            "path of the metrics (not /, /healthz, /probe or /-/reload)",
            field="telemetry_path", metavar="PATH"),
    Setting("web.config-file", None, _optional_text,
            "web config file in exporter-toolkit's format: TLS and basic auth", "SKILLABLE_EXPORTER_WEB_CONFIG_FILE",
            field="web_config_file", metavar="PATH", aliases=("--web.config.file",)),
    Setting("log.level", "info", _choice("debug", "info", "warn", "warning", "error"),
            "log level: debug, info, warn, error", "SKILLABLE_EXPORTER_LOG_LEVEL", field="log_level",
            metavar="LEVEL"),
    Setting("log.format", "logfmt", _choice("logfmt", "json"), "log format: logfmt or json",
            "SKILLABLE_EXPORTER_LOG_FORMAT", field="log_format", metavar="FORMAT"),
    Setting("skillable.api-url", DEFAULT_API_URL, _url, "Skillable Lab API base URL", "SKILLABLE_API_URL",
            metavar="URL"),
    Setting("skillable.api-key-file", None, _optional_text,
            "file holding the API key, not readable by other users; without it, SKILLABLE_API_KEY holds the key",
            "SKILLABLE_API_KEY_FILE", metavar="PATH"),
    Setting("skillable.window-minutes", 60, _number(1, MAX_WINDOW_MINUTES, integer=True),
            "lookback window, 1..10080 (7 days): the gauges of ended labs cover it", "SKILLABLE_WINDOW_MINUTES",
            metavar="MINUTES"),
    Setting("skillable.max-active-labs", None, _optional_count,
            "the account's active-lab limit (Skillable's Max Active Lab Instances; the API does not report it), "
            "exported as skillable_account_max_active_labs for the capacity panels and alert; unset: unknown",
            "SKILLABLE_MAX_ACTIVE_LABS", metavar="N"),
    Setting("skillable.min-poll-interval", DEFAULT_MIN_POLL_INTERVAL, _number(0, 86400, units=SECONDS),
            "how long a poll is reused: at most one poll per account in that time, whoever scrapes; 0 polls on "
            "every scrape (a loop of scrapes then drives the API)",
            "SKILLABLE_MIN_POLL_INTERVAL", field="min_poll_interval", metavar="SECONDS"),
    Setting("skillable.overlap-minutes", 2, _number(0, 60, integer=True),
            "extra minutes asked for on incremental polls, against clock skew", "SKILLABLE_OVERLAP_MINUTES",
            field="overlap_minutes", metavar="MINUTES"),
    Setting("skillable.timeout", 9.0, _number(0.5, 600, units=SECONDS),
            "total time one poll may take; a shorter scrape timeout shortens the scrape's wait, never the poll",
            "SKILLABLE_TIMEOUT", field="timeout", metavar="SECONDS"),
    Setting("skillable.max-response-bytes", 256 * 1024 * 1024, _number(1024, 16 * 1024**3, True, BYTES),
            "largest API answer accepted (/catalog has its own limit)", "SKILLABLE_MAX_RESPONSE_BYTES",
            field="max_response_bytes", metavar="BYTES"),
    Setting("skillable.max-lab-hosts", 2000, _number(1, 1_000_000, integer=True),
            "lab hosts tracked as separate label values; more go to lab_host_id=\"other\"",
            "SKILLABLE_MAX_LAB_HOSTS", field="max_lab_hosts", metavar="N"),
    Setting("skillable.max-running-minutes", 1440, _number(1, 1_000_000, integer=True),
            "minutes a lab started and not ended counts as running before it is dropped as expired",
            "SKILLABLE_MAX_RUNNING_MINUTES", field="max_running_minutes", metavar="MINUTES"),
    Setting("skillable.max-lab-profiles", 500, _number(1, 1_000_000, integer=True),
            "lab profiles tracked as separate label values; more go to lab_profile_id=\"other\"",
            "SKILLABLE_MAX_LAB_PROFILES", field="max_lab_profiles", metavar="N"),
    Setting("storage.state-file", None, _optional_text,
            "file keeping counters and per-instance memory across restarts", "SKILLABLE_STATE_FILE",
            field="state_file", metavar="PATH"),
    Setting("collector.stats", True, _bool, "poll /stats for account-wide active and saved labs",
            "SKILLABLE_COLLECTOR_STATS", field="collect_stats"),
    Setting("collector.delivery-regions", True, _bool, "fetch delivery region names from /deliveryregions",
            "SKILLABLE_COLLECTOR_DELIVERY_REGIONS", field="collect_delivery_regions"),
    Setting("collector.catalog", True, _bool, "fetch lab profile and lab series names from /catalog (hourly)",
            "SKILLABLE_COLLECTOR_CATALOG", field="collect_catalog"),
    Setting("skillable.max-catalog-bytes", 64 * 1024 * 1024, _number(1024, 16 * 1024**3, True, BYTES),
            "largest /catalog body accepted (the catalog is one unpaged answer)", "SKILLABLE_MAX_CATALOG_BYTES",
            field="max_catalog_bytes", metavar="BYTES"),
    Setting("collector.launch", True, _bool,
            "poll /labinstance/search (mode 5) for start-up times, labs never ready, lab errors and launches per "
            "integration (docs/launch.md)", "SKILLABLE_COLLECTOR_LAUNCH", field="collect_launch"),
    Setting("skillable.launch-interval", 300.0, _number(60, 86400, units=SECONDS),
            "time between launch polls, at least (driven by scrapes; 60s..24h)", "SKILLABLE_LAUNCH_INTERVAL",
            field="launch_interval", metavar="SECONDS"),
    Setting("skillable.launch-page-size", 100, _number(1, 1000, integer=True),
            "lab instances asked for per page of /labinstance/search", "SKILLABLE_LAUNCH_PAGE_SIZE",
            field="launch_page_size", metavar="N"),
    Setting("skillable.launch-grace-minutes", 15, _number(0, 1440, integer=True),
            "minutes an ended lab is still looked at for errors reported after its End",
            "SKILLABLE_LAUNCH_GRACE_MINUTES", field="launch_grace_minutes", metavar="MINUTES"),
    Setting("skillable.launch-timeout", 60.0, _number(1, 600, units=SECONDS),
            "total time one launch poll (every page of it) may take", "SKILLABLE_LAUNCH_TIMEOUT",
            field="launch_timeout", metavar="SECONDS"),
    Setting("skillable.max-api-consumers", 100, _number(1, 100_000, integer=True),
            "API consumers tracked as separate label values; more go to api_consumer=\"other\"",
            "SKILLABLE_MAX_API_CONSUMERS", field="max_api_consumers", metavar="N"),
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
    max_active_labs: int | None = None  # Skillable's limit of active labs for this API consumer, if known
    key_file: str | None = field(default=None, compare=False)  # where the key was read from, if a file


@dataclass(frozen=True)
class Config:
    """The validated settings. Each field is set by the one setting whose `field` names it (SETTINGS),
    but accounts (made of skillable.api-url, api-key-file, window-minutes, max-active-labs and the file's accounts:),
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

    @property
    def max_active_labs(self) -> dict[str, int]:
        """The active-lab limit of each account whose limit is configured, by account name."""
        return {a.name: a.max_active_labs for a in self.accounts if a.max_active_labs is not None}


def closest(name: str, known: Collection[str]) -> str | None:
    """The known name closest to a misspelt one (`windw_minutes`, `window-minutes`), if one is close."""
    found = difflib.get_close_matches(name.replace("-", "_"), [str(k) for k in known], n=1, cutoff=0.75)
    return found[0] if found else None


def check_mapping(where: str, value: Any, allowed: Collection[str], expected: str) -> dict[str, Any]:
    """`value` as a mapping whose keys are all in `allowed`, else a ConfigError naming the setting
    (and, for an unknown key, the closest allowed one)."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected {expected}")
    for key in value:
        if key not in allowed:
            near = closest(str(key), allowed)
            raise ConfigError(f"{where}.{key}", "unknown setting" + (f"; did you mean {where}.{near}?" if near else ""))
    return value


def _walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# -- reading the files an operator names: the config file, the web config, key files --------------

MAX_CONFIG_FILE_BYTES = 16 * 1024 * 1024  # a config naming every id of a large account is well under 1 MiB
MAX_KEY_FILE_BYTES = 64 * 1024
LIST_ITEM = "[]"  # the path part of any item of a list (of accounts:, say) in a key's path
_FILE_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def read_small_file(setting: str, path: str, limit: int) -> tuple[bytes, int]:
    """The bytes of a regular file of at most `limit` bytes, and its mode. Anything else (a FIFO, which
    would block a reload for ever; /dev/zero; a directory; a path with a NUL) is a ConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO cannot hang us
    except ValueError:
        raise ConfigError(setting, "the path holds a NUL character") from None
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        for is_type, kind in _FILE_TYPES:
            if is_type(mode):
                raise ConfigError(setting, f"{path} is {kind}, not a regular file")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ConfigError(setting, f"{path} is larger than {limit} bytes")
    return data, mode


def decode_utf8(setting: str, path: str, data: bytes) -> str:
    """A file's bytes as text: UTF-8, with or without a byte order mark; anything else is named."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(setting, f"{path} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(setting, f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


class _Loader(yaml.SafeLoader):
    """YAML as the config needs it: dates stay text (no setting is a date, and `2026-02-30` must
    be a wrong value, not a crash)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_MERGE = "tag:yaml.org,2002:merge"


def load_yaml(setting: str, path: str, text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Parse YAML text; returns the document and the line of each key by its path (list items as
    LIST_ITEM). A key given twice in one mapping is refused, naming it and both its lines (YAML
    says keys are unique; PyYAML would keep the last one silently). Merge keys (`<<`) may be overridden."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # its reader already refuses characters YAML does not allow
        node = loader.get_single_node()
        lines = _key_lines(setting, path, node) if node is not None else {}
        return (loader.construct_document(node) if node is not None else None), lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None)
        raise ConfigError(setting, f"{path} is not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    except RecursionError:
        raise ConfigError(setting, f"{path} is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # an explicit tag PyYAML cannot build (!!timestamp)
        raise ConfigError(setting, f"{path} holds a value that cannot be read: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _key_lines(setting: str, path: str, root: yaml.Node) -> dict[tuple[str, ...], int]:
    """Each key's line by its path (the first such key in the file); a key twice in one mapping is a
    ConfigError. Iterative and in the file's order, each node visited once, so neither deep nesting
    nor an alias to itself can loop or overflow."""
    lines: dict[tuple[str, ...], int] = {}
    todo: deque[tuple[yaml.Node, tuple[str, ...], str]] = deque([(root, (), "")])  # node, path, its name
    visited: set[int] = set()
    while todo:
        node, at, shown = todo.popleft()
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend((item, (*at, LIST_ITEM), f"{shown}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if key.tag == _MERGE or not isinstance(key, yaml.ScalarNode):
                    continue
                line, name = key.start_mark.line + 1, f"{shown}.{key.value}" if shown else key.value
                if (key.tag, key.value) in first:
                    named = name if LIST_ITEM in at else documented_name((*at, key.value))
                    raise ConfigError(setting, f"{path}: {named} is set twice, "
                                               f"on line {first[(key.tag, key.value)]} and line {line}")
                first[(key.tag, key.value)] = line
                lines.setdefault((*at, key.value), line)
                todo.append((value, (*at, key.value), name))
    return lines


def documented_name(path: tuple[str, ...]) -> str:
    """A config file path as the README and --help name it: a setting that has a flag by its flag's
    name (skillable.window-minutes), anything else by its path in the file (accounts[].api_key_file,
    names.datacenters)."""
    for setting in SETTINGS:
        if setting.yaml_path == path:
            return setting.name
    return ".".join(path).replace("." + LIST_ITEM, LIST_ITEM)


def _known_paths() -> set[tuple[str, ...]]:
    return ({s.yaml_path for s in SETTINGS} | _FILE_ONLY
            | {("accounts", LIST_ITEM, key) for key in _ACCOUNT_KEYS})


def _suggestion(path: tuple[str, ...], known: set[tuple[str, ...]], shown: str) -> str:
    """"; did you mean X?" for an unknown key (`shown`: how its section is named, accounts[2].): the
    closest key beside it, else the same key in another section (a setting under the wrong heading)."""
    prefix, leaf = path[:-1], path[-1]
    siblings = {k[len(prefix)] for k in known if len(k) > len(prefix) and k[: len(prefix)] == prefix}
    near = closest(leaf, siblings)
    if near is not None:
        match, in_file = (*prefix, near), shown + near
    else:
        elsewhere = [k for k in known if k[-1] == leaf.replace("-", "_") and LIST_ITEM not in k]
        if not elsewhere:
            return ""
        match = min(elsewhere)
        in_file = ".".join(match)
    name = in_file if LIST_ITEM in match else documented_name(match)
    return f"; did you mean {name}" + (f" ({in_file} in the file)" if name != in_file else "") + "?"


def _check_unknown_keys(tree: Mapping[str, Any], where: str, lines: Mapping[tuple[str, ...], int]) -> None:
    """Every key of the file is a setting or a section of them (the entries of accounts: included);
    an unknown one is named as the file has it, with its line and the closest known setting."""
    known = _known_paths()

    def visit(node: Mapping[Any, Any], prefix: tuple[str, ...], shown: str) -> None:
        for key, value in node.items():
            path = (*prefix, str(key))
            if path == ("accounts",):
                for index, entry in enumerate(value if isinstance(value, list) else []):
                    if isinstance(entry, Mapping):
                        visit(entry, ("accounts", LIST_ITEM), f"accounts[{index}].")
                continue
            if path in known:
                continue
            is_section = any(k[: len(path)] == path for k in known)
            if is_section and isinstance(value, Mapping):
                visit(value, path, f"{shown}{key}.")
            elif not (is_section and value is None):  # an empty section is fine
                line = lines.get(path)
                at = f" on line {line} of {where}" if line else ""
                raise ConfigError(f"{shown}{key}", f"unknown setting{at}{_suggestion(path, known, shown)}")

    visit(tree, (), "")


def read_config_file(path: str) -> dict[str, Any]:
    data, _ = read_small_file(CONFIG_FILE, path, MAX_CONFIG_FILE_BYTES)
    tree, lines = load_yaml(CONFIG_FILE, path, decode_utf8(CONFIG_FILE, path, data))
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(CONFIG_FILE, f"{path} must hold a mapping of settings")
    _check_unknown_keys(tree, path, lines)
    return tree


def check_api_key(setting: str, key: str, where: str) -> str:
    """An API key goes into an HTTP header: visible ASCII only. Anything else (a UTF-8 BOM left in a
    file, a non-ASCII letter, a control character) would fail every request, so it is refused here,
    without ever printing the key."""
    if not all("!" <= ch <= "~" for ch in key):
        raise ConfigError(setting, f"{where} holds a character an API key cannot have "
                                   "(only visible ASCII, no spaces or control characters)")
    return key


def read_key_file(setting: str, path: str) -> str:
    """Read an API key from a file (UTF-8, a BOM allowed), refusing files that others can read."""
    data, mode = read_small_file(setting, path, MAX_KEY_FILE_BYTES)
    if mode & (stat.S_IRWXO):
        raise ConfigError(setting, f"{path} is readable by other users; chmod o-rwx it")
    key = decode_utf8(setting, path, data).strip()
    if not key:
        raise ConfigError(setting, f"{path} is empty")
    return check_api_key(setting, key, path)


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

    def from_env(self, setting: str, name: str, problem: str, named_as: str | None = None) -> str:
        """The key in variable `name`; `setting` names a missing one, `named_as` (else `setting`) a bad one."""
        key = self.environ.get(name, "").strip()
        if not key and self.required:
            raise ConfigError(setting, problem)
        return check_api_key(named_as or setting, key, f"environment variable {name}") if key else key


def _accounts(raw: Any, values: Mapping[str, Any], keys: _KeySource, demo: bool) -> tuple[Account, ...]:
    if demo:
        # Demo mode swaps in the loopback simulator; the CLI fills in its URL.
        return (Account("", "", "demo", values["skillable_window_minutes"], values["skillable_max_active_labs"]),)
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
                            "no API key: set SKILLABLE_API_KEY or skillable.api-key-file (or run with --demo)",
                            named_as="SKILLABLE_API_KEY")
    return Account("", values["skillable_api_url"], key, values["skillable_window_minutes"],
                   values["skillable_max_active_labs"], key_file or None)


_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ACCOUNT_KEYS = {"name", "api_key_env", "api_key_file", "api_url", "window_minutes", "max_active_labs"}


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
    key_file = None
    if entry.get("api_key_file"):
        key_file = _text(f"{where}.api_key_file", entry["api_key_file"])
        key = keys.from_file(f"{where}.api_key_file", key_file)
    else:
        env_name = _text(f"{where}.api_key_env", entry["api_key_env"])
        key = keys.from_env(f"{where}.api_key_env", env_name, f"environment variable {env_name} is empty or unset")
    url = _url(f"{where}.api_url", entry["api_url"]) if entry.get("api_url") else values["skillable_api_url"]
    window = values["skillable_window_minutes"]
    if entry.get("window_minutes") is not None:
        window = _number(1, MAX_WINDOW_MINUTES, integer=True)(f"{where}.window_minutes", entry["window_minutes"])
    limit = values["skillable_max_active_labs"]
    if entry.get("max_active_labs") is not None:
        limit = _optional_count(f"{where}.max_active_labs", entry["max_active_labs"])
    return Account(name, url, key, int(window), limit, key_file)
