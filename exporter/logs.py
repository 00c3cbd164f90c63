"""Log output in logfmt or JSON, like Prometheus' own exporters (go-kit / slog style).

Every line has `ts`, `level`, `caller` and `msg`; anything else is a field of its own,
passed with the standard library's `extra=`, so a log pipeline can pick out `reason`
or `account` without parsing the message:

    log.warning("poll failed", extra={"endpoint": "LatestResults", "reason": "timeout"})

gives, in logfmt,

    ts=2026-01-01T00:00:00.000Z level=warn caller=poller:250 msg="poll failed" endpoint=LatestResults reason=timeout

and in JSON the same keys. The message is a constant phrase; values go into fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "warning": logging.WARNING, "error": logging.ERROR}
# What every LogRecord carries; any other attribute came from `extra=` and is a field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _timestamp(record: logging.LogRecord) -> str:
    millis = int(record.msecs)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{millis:03d}Z"


def fields(record: logging.LogRecord, formatter: logging.Formatter) -> list[tuple[str, Any]]:
    """The line's key/value pairs in order: ts, level, caller, msg, the extra fields, err."""
    out: list[tuple[str, Any]] = [
        ("ts", _timestamp(record)),
        ("level", record.levelname.lower().replace("warning", "warn")),
        ("caller", f"{record.module}:{record.lineno}"),
        ("msg", record.getMessage()),
    ]
    out.extend((key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES)
    if record.exc_info:
        out.append(("err", formatter.formatException(record.exc_info)))
    return out


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{key}={_quote(_text(value))}" for key, value in fields(record, self))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({key: _json_value(value) for key, value in fields(record, self)})


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value == value else "NaN"
    return "" if value is None else str(value)


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return round(value, 3) if value == value and abs(value) != float("inf") else str(value)
    return str(value)


def _quote(value: str) -> str:
    """logfmt: bare when the value has no space, quote, equals sign or control character."""
    if value and all(c > " " and c not in '="\\' for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    escaped = "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in escaped)
    return f'"{escaped}"'


def setup_logging(level: str, fmt: str) -> None:
    """Log to stderr at `level` in `fmt` (logfmt or json). Called again on a config reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    # urllib3 logs request URLs at debug; keep it quieter than our own debug output.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
