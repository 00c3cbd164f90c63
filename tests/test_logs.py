"""Log lines: every field a key of its own, in logfmt and in JSON, on the failure paths; each
endpoint's failure run logged once; connect errors name the host and the cause, never the key."""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from collections.abc import Callable, Iterator

import pytest

from exporter.logs import JsonFormatter, LogfmtFormatter

from . import fakeapi as f
from .fakeapi import FakeSkillable, lab
from .harness import Harness, harness  # noqa: F401 (harness is a fixture)

_KEY = re.compile(r'[^\s="\\]+')
_BARE = re.compile(r'[^\s="\\]+')
_QUOTED = re.compile(r'"((?:[^"\\\x00-\x1f]|\\["\\nt]|\\u[0-9a-f]{4})*)"')


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt parser: key=value pairs split by one space; a value is bare (no space,
    quote, equals sign or backslash) or double-quoted with \\" \\\\ \\n \\t \\uXXXX escapes.
    Anything else (a bare word, a stray quote, a duplicate key) raises ValueError."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        key = _KEY.match(line, pos)
        if key is None or line[key.end():key.end() + 1] != "=":
            raise ValueError(f"no key=value at {pos}: {line[pos:pos + 30]!r}")
        pos = key.end() + 1
        quoted = _QUOTED.match(line, pos)
        if quoted is not None:
            value = json.loads(quoted.group(0))  # the escapes are JSON's
            pos = quoted.end()
        else:
            bare = _BARE.match(line, pos)
            if bare is None:
                raise ValueError(f"bad value at {pos}: {line[pos:pos + 30]!r}")
            value, pos = bare.group(0), bare.end()
        if key.group(0) in out:
            raise ValueError(f"duplicate key {key.group(0)}")
        out[key.group(0)] = value
        if pos < len(line):
            if line[pos] != " ":
                raise ValueError(f"no space after the value at {pos}: {line[pos:pos + 30]!r}")
            pos += 1
    return out


@pytest.mark.parametrize("line", ['a=1 b="x y"', 'msg="say \\"hi\\"\\n" k=v', 'e=""'])
def test_the_parser_reads_logfmt(line: str) -> None:
    assert parse_logfmt(line)


@pytest.mark.parametrize("line", ['msg=poll failed endpoint=x', 'a="open', 'a=1  b=2', 'a=1 a=2', 'word', 'a=x"y'])
def test_the_parser_refuses_what_is_not_logfmt(line: str) -> None:
    with pytest.raises(ValueError):
        parse_logfmt(line)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("exporter")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def both_formats(record: logging.LogRecord) -> tuple[dict[str, str], dict[str, Any]]:
    logfmt = parse_logfmt(LogfmtFormatter().format(record))
    as_json = json.loads(JsonFormatter().format(record))
    assert list(logfmt) == list(as_json), "the same keys in the same order"
    for key in ("ts", "level", "caller", "msg"):
        assert logfmt[key] and as_json[key], key
    assert "=" not in logfmt["msg"], f"a value inside msg: {logfmt['msg']!r}"
    return logfmt, as_json


@pytest.mark.integration
def test_every_failure_line_has_reason_and_endpoint_as_keys_and_each_run_is_logged_once(
    fake: FakeSkillable, harness: Callable[..., Harness], records: Records
) -> None:
    fake.add(lab(1, fake.clock() - 600, fake.clock() - 60, status=4))
    h = harness(SKILLABLE_COLLECTOR_STATS="true", SKILLABLE_COLLECTOR_DELIVERY_REGIONS="true")
    fake.fault_always(f.http_status(503))
    for _ in range(5):
        h.scrape()
        h.mono.advance(400)
    fake.fault_always(f.status_error("Invalid API key"))  # another reason: said again, as an error
    for _ in range(3):
        h.scrape()
        h.mono.advance(400)
    fake.heal()
    assert h.scrape().up == 1
    lines = [both_formats(r) for r in records.records]
    failures = [(logfmt, js) for logfmt, js in lines if "reason" in logfmt]
    assert failures
    for logfmt, js in failures:
        assert logfmt["reason"] == js["reason"] and logfmt["endpoint"] == js["endpoint"]
        assert fake.state.api_key not in json.dumps(js)
    told = [(lf["level"], lf["endpoint"], lf["reason"]) for lf, _ in lines if lf["level"] in ("warn", "error")]
    assert told == [
        ("warn", "LatestResults", "http_error"), ("warn", "stats", "http_error"),
        ("warn", "deliveryregions", "http_error"),
        ("error", "LatestResults", "unauthorized"), ("error", "stats", "unauthorized"),
        # /deliveryregions is retried 5 minutes after a failure (not the hour): its new reason is told too.
        ("error", "deliveryregions", "unauthorized"),
    ]
    first = next(lf for lf, _ in lines if lf.get("endpoint") == "LatestResults" and lf["level"] == "warn")
    assert re.fullmatch(r"\d+\.\ds", first["retry_in"]) and first["error"] == "LatestResults: HTTP 503"
    recovered = {lf["endpoint"] for lf, _ in lines if lf["msg"] == "request recovered"}
    assert recovered == {"LatestResults", "stats", "deliveryregions"}  # a failed /deliveryregions is retried soon
    assert any(lf["msg"] == "poll recovered" and lf["failed_polls"] == "8" for lf, _ in lines)


@pytest.mark.integration
def test_a_refused_connection_names_host_and_cause_in_both_formats(
    fake: FakeSkillable, harness: Callable[..., Harness], records: Records
) -> None:
    h = harness()
    with fake.refusing():
        h.scrape()
    (logfmt, js), = [both_formats(r) for r in records.records if r.levelno == logging.WARNING]
    host = fake.url.split("/")[2]
    assert logfmt["reason"] == "connect_error" == js["reason"]
    assert logfmt["error"] == f"LatestResults: cannot connect to {host}: [Errno 111] Connection refused"
    assert js["error"] == logfmt["error"]


@pytest.mark.integration
def test_a_real_process_logs_json_with_its_fields(run_exporter: Any) -> None:
    exporter = run_exporter("--log.format=json", env={"SKILLABLE_API_URL": "http://127.0.0.1:9/api/v3",
                                                      "SKILLABLE_API_KEY": "never-logged-key-77"})
    exporter.get("/metrics")
    assert exporter.stop() == 0
    entries = [json.loads(line) for line in exporter.log().splitlines()]
    assert entries[0]["msg"] == "listening" and entries[0]["address"].startswith("http://127.0.0.1:")
    failed = [e for e in entries if e.get("reason") == "connect_error"]
    # Once each.
    assert sorted(e["endpoint"] for e in failed) == ["LatestResults", "catalog", "deliveryregions", "stats"]
    assert all(e["level"] == "warn" and "cannot connect to 127.0.0.1:9: " in e["error"] for e in failed)
    assert "never-logged-key-77" not in exporter.log()
    assert entries[-1]["msg"] == "stopped"


@pytest.mark.integration
def test_a_real_process_logs_logfmt_every_line_parsed(run_exporter: Any) -> None:
    exporter = run_exporter(env={"SKILLABLE_API_URL": "http://127.0.0.1:9/api/v3", "SKILLABLE_API_KEY": "k"})
    exporter.get("/metrics")
    assert exporter.stop() == 0
    parsed = [parse_logfmt(line) for line in exporter.log().splitlines()]
    assert [p["msg"] for p in parsed][-2:] == ["shutting down", "stopped"]
    assert any(p.get("reason") == "connect_error" for p in parsed)
