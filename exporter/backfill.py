"""`skillable-exporter backfill`: history from /Results, replayed through the exporter's own state model,
written as OpenMetrics (one file per UTC day) and turned into TSDB blocks by promtool.

The replay, and the rules it counts by (docs/backfill.md explains the procedure around it):

- Each result gives at most two events: its start, at Start, and its end, at End (at Start if End is
  earlier, as FleetState dates it). A start event is the result as it looked while running: End, run
  time and exam fields cleared. /Results is read in windows of one UTC day (the API allows 7 days),
  and a window [a, b) contributes only the events whose time lies in [a, b), so an instance that
  started in one window and ended in another gives each event exactly once.
- Time moves in steps of --step seconds on a grid aligned to the epoch. The sample at grid time t
  shows the state after every event before t: the step applies the events of [t - step, t) with
  horizon t - step, then evicts what is older than the window, exactly as a poll at time t would
  (Poller._poll). So every event is counted once, and an instance forgotten earlier is never
  counted as started again.
- A series that first appears at t also gets a 0 sample at t - step, so increase() over any range
  counts it from zero (a series born mid-range would otherwise lose its first count).
- The file of day D holds the samples at times in [D, D + 1 day) and [--from, --to). The state
  after the step at --to (every event before --to) is what --storage.state-file receives: the live
  exporter restored from it continues every counter, asks only for the minutes since --to, and its
  per-instance memory keeps it from counting the last window again.

A day is complete when its file is renamed from `.tmp` and its blocks are made; only then is the
checkpoint (the state as of the day's end, in the state-file format) written, so a failed run
leaves no complete-looking file for an incomplete day, and a rerun resumes after the last
complete day. Memory holds one day of /Results and the current state, never the whole range.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Sequence, TextIO

import msgspec
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from .app import ExporterApp
from .client import TOO_LARGE, ApiError, SkillableClient
from .collector import PLACE
from .config import Account, Config, ConfigError, load_config
from .model import LabResult, decode_latest_results
from .persistence import (
    StateFileError,
    StateStore,
    check_state_path,
    read_state_file,
    restore_account,
)
from .poller import UNAUTHORIZED, failure_reason
from .render import Rows

DAY = 86400
API_MAX_SECONDS = 7 * DAY  # /Results refuses a longer range ("Timeframe cannot exceed 7 days")
FETCH_SECONDS = DAY  # one request per day: bounded memory, and well inside the API's limit
MIN_SPLIT_SECONDS = 60  # a window too large for --skillable.max-response-bytes is halved down to this
# Prometheus: "it is not safe to backfill data from the last 3 hours (the current head block)".
SAFETY_MARGIN_SECONDS = 3 * 3600
MAX_STEP_SECONDS = 300  # beyond Prometheus' 5-minute lookback, instant queries between samples find nothing
DEFAULT_RETENTION = "15d"  # Prometheus' default --storage.tsdb.retention.time (Debian's too)
DEFAULT_BLOCK_DURATION = "6h"  # 4 blocks a day: 4 passes of promtool over a file, none across midnight
EXIT_FAILED = 1
EXIT_CONFIG = 2
STATE_DIR = ".backfill"  # under --output: the run's settings and its checkpoint
RESERVED_LABELS = frozenset({*PLACE, "completion_status", "lab_profile_id", "account", "le", "quantile",
                             "__name__"})
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


class BackfillError(Exception):
    """The backfill cannot go on (an API failure after retries, promtool failing). One line."""


def fail(message: str) -> int:
    print(f"skillable-exporter backfill: {message}", file=sys.stderr)
    return EXIT_FAILED


# -- command line ----------------------------------------------------------------


def parse_time(setting: str, text: str) -> int:
    """RFC 3339 (2026-11-01T00:00:00Z, or with an offset) or a date (2026-11-01, midnight UTC): epoch seconds."""
    value = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            when = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        else:
            when = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
            if when.tzinfo is None:
                raise ValueError("no time zone")
    except ValueError:
        raise ConfigError(setting, f"{text!r} is not an RFC 3339 time (2026-11-01T00:00:00Z) or a date "
                                   "(2026-11-01)") from None
    return int(when.timestamp())


_DURATION = re.compile(r"^(\d+)(s|m|h|d|w)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY, "w": 7 * DAY, None: 1}


def parse_duration(setting: str, text: str) -> int:
    """A Prometheus-style duration with one unit (30s, 1m, 6h, 15d, 2w) or plain seconds."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(setting, f"{text!r} is not a duration such as 30s, 1m, 6h or 15d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_label(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _LABEL_NAME.match(name) or name.startswith("__"):
        raise ConfigError("label", f"{text!r} is not NAME=VALUE with a Prometheus label name")
    if name in RESERVED_LABELS:
        raise ConfigError("label", f"{name!r} is a label of the exporter's own series")
    return name, value


def rfc3339(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Options:
    start: int  # --from, on the step grid
    end: int  # --to, on the step grid
    step: int
    output: Path
    labels: tuple[tuple[str, str], ...]
    promtool: str | None  # None: write the files only
    block_duration: str
    retention: int
    request_timeout: float
    retries: int


def build_parser() -> argparse.ArgumentParser:
    from .__main__ import build_parser as exporter_parser  # the exporter's settings, flags and env

    parser = exporter_parser()
    parser.prog = "skillable-exporter backfill"
    parser.description = (
        "Backfill Prometheus with the history of GET /Results: OpenMetrics files, one per UTC day, and TSDB "
        "blocks made by promtool. Takes the exporter's settings (account, key, config file, --demo). "
        "docs/backfill.md has the whole procedure."
    )
    group = parser.add_argument_group("backfill")
    group.add_argument("--from", dest="bf_from", metavar="TIME", required=True,
                       help="start of the history: RFC 3339 (2026-11-01T00:00:00Z) or a date (midnight UTC)")
    group.add_argument("--to", dest="bf_to", metavar="TIME",
                       help="end of the history (not included) [default: now minus 3 hours, the head block "
                            "Prometheus may still be writing]")
    group.add_argument("--output", dest="bf_output", metavar="DIR", required=True,
                       help="folder for the OpenMetrics files and blocks (never a Prometheus data folder)")
    group.add_argument("--label", dest="bf_labels", metavar="NAME=VALUE", action="append", default=[],
                       help="label on every series, repeatable: the live target's job and instance, so "
                            "history joins the live series")
    group.add_argument("--step", dest="bf_step", metavar="DURATION", default="1m",
                       help="time between samples, 1s..5m, dividing a day [default: 1m]")
    group.add_argument("--promtool", dest="bf_promtool", metavar="PATH",
                       help="promtool to make blocks with [default: promtool on the PATH; without one, "
                            "only the files are written]")
    group.add_argument("--max-block-duration", dest="bf_block", metavar="DURATION", default=DEFAULT_BLOCK_DURATION,
                       help=f"promtool's --max-block-duration [default: {DEFAULT_BLOCK_DURATION}]")
    group.add_argument("--prometheus.retention", dest="bf_retention", metavar="DURATION",
                       default=DEFAULT_RETENTION,
                       help="the target Prometheus' --storage.tsdb.retention.time: older history is warned "
                            f"about, since Prometheus deletes it at once [default: {DEFAULT_RETENTION}]")
    group.add_argument("--request-timeout", dest="bf_timeout", metavar="SECONDS", default="120",
                       help="total seconds one /Results request may take [default: 120]")
    group.add_argument("--retries", dest="bf_retries", metavar="N", default="3",
                       help="retries of a failed /Results request, with backoff [default: 3]")
    return parser


def parse_options(args: argparse.Namespace, now: float) -> Options:
    step = parse_duration("step", args.bf_step)
    if not 1 <= step <= MAX_STEP_SECONDS or DAY % step:
        raise ConfigError("step", f"{args.bf_step!r} must be 1s..5m and divide a day (15s, 30s, 1m, 5m)")
    start = parse_time("from", args.bf_from)
    end = parse_time("to", args.bf_to) if args.bf_to else int(now) - SAFETY_MARGIN_SECONDS
    start -= start % step
    end -= end % step
    if start >= end:
        raise ConfigError("from", f"{rfc3339(start)} is not before --to {rfc3339(end)}")
    if end > now:
        raise ConfigError("to", f"{rfc3339(end)} is in the future")
    labels = tuple(parse_label(text) for text in args.bf_labels)
    names = [name for name, _ in labels]
    if len(set(names)) != len(names):
        raise ConfigError("label", "a label name is given twice")
    promtool = args.bf_promtool or shutil.which("promtool")
    if args.bf_promtool and not shutil.which(args.bf_promtool):
        raise ConfigError("promtool", f"{args.bf_promtool} is not an executable")
    block = parse_duration("max-block-duration", args.bf_block)
    if block < 7200:
        raise ConfigError("max-block-duration", f"{args.bf_block!r} is below promtool's smallest block, 2h")
    try:
        timeout, retries = float(args.bf_timeout), int(args.bf_retries)
    except ValueError:
        raise ConfigError("request-timeout", "expected seconds and a whole number of retries") from None
    if not 1 <= timeout <= 3600 or not 0 <= retries <= 20:
        raise ConfigError("request-timeout", "expected 1..3600 seconds and 0..20 retries")
    output = Path(args.bf_output)
    if any((output / marker).exists() for marker in ("wal", "chunks_head", "lock")):
        raise ConfigError("output", f"{output} looks like a Prometheus data folder; backfill never writes "
                                    "into one (give an empty folder, then move the blocks)")
    return Options(start, end, step, output, labels, promtool, f"{block}s",
                   parse_duration("prometheus.retention", args.bf_retention), timeout, retries)


# -- reading /Results ------------------------------------------------------------


def fetch_results(client: SkillableClient, start: int, end: int, opts: Options,
                  sleep: Callable[[float], None] = time.sleep) -> list[LabResult]:
    """Every result /Results gives for [start, end) (asked with a second to spare on each side, since the
    API does not say whether its bounds are included), retried with backoff; a window too large for
    --skillable.max-response-bytes is split in halves."""
    attempt = 0
    while True:
        try:
            body = client.get("Results", {"start": start - 1, "end": end}, opts.request_timeout)
            batch = decode_latest_results(body)
            return batch.results
        except Exception as exc:  # noqa: BLE001 - every failure has a reason, as in polling
            reason = failure_reason(exc)
            if reason == TOO_LARGE and end - start > MIN_SPLIT_SECONDS:
                middle = start + (end - start) // 2
                return fetch_results(client, start, middle, opts, sleep) + fetch_results(client, middle, end, opts, sleep)
            attempt += 1
            message = client.redact(str(exc))
            if reason == UNAUTHORIZED or attempt > opts.retries:
                raise BackfillError(f"/Results for {rfc3339(start)}..{rfc3339(end)} failed (reason={reason}"
                                    f", after {attempt} attempts): {message}") from None
            delay = min(60.0, 2.0 ** attempt)
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(exc, ApiError) and retry_after is not None:
                delay = max(delay, min(retry_after, 300.0))
            print(f"skillable-exporter backfill: /Results for {rfc3339(start)}: {reason}, retrying in "
                  f"{delay:.0f}s: {message}", file=sys.stderr)
            sleep(delay)


_RUNNING_FORM = {"end": None, "total_run_time_seconds": None, "task_complete_percent": None,
                 "exam_passed": None, "exam_score": None, "exam_max_possible_score": None}


def events_in(results: Iterable[LabResult], start: int, end: int) -> list[tuple[int, int, LabResult]]:
    """(time, kind, result) of the events in [start, end), sorted: kind 0 a start (the result as while
    running), kind 1 an end. Results with neither Start nor End have no time and give none."""
    events: list[tuple[int, int, LabResult]] = []
    for r in results:
        if r.start is not None and start <= r.start < end:
            running = r if r.end is None else msgspec.structs.replace(r, **_RUNNING_FORM)
            events.append((r.start, 0, running))
        if r.end is not None:
            at = r.end if r.start is None or r.end >= r.start else r.start
            if start <= at < end:
                events.append((at, 1, r))
    events.sort(key=lambda e: (e[0], e[1]))
    return events


class Feed:
    """One account's events in time order, read from /Results a day at a time as the replay needs them."""

    def __init__(self, fetch: Callable[[int, int], list[LabResult]], start: int, end: int) -> None:
        self._fetch = fetch
        self._loaded_to = start  # every event before this is in _events (or was taken)
        self._end = end
        self._events: list[tuple[int, int, LabResult]] = []
        self._next = 0
        self.results = 0  # results read so far

    def take(self, before: int) -> list[LabResult]:
        """The events before `before` not taken yet, one result per instance (the later event wins: an
        end carries the start too, so a lab that starts and ends in one step is applied once, whole)."""
        out: dict[int, LabResult] = {}
        while True:
            events = self._events
            while self._next < len(events) and events[self._next][0] < before:
                result = events[self._next][2]
                out[result.lab_instance_id] = result
                self._next += 1
            if self._loaded_to >= min(before, self._end):
                return list(out.values())
            self._load()

    def _load(self) -> None:
        start = self._loaded_to
        end = min(start - start % FETCH_SECONDS + FETCH_SECONDS, self._end)
        results = self._fetch(start, end)
        self.results += len(results)
        self._events = events_in(results, start, end)  # the previous window is used up: drop it
        self._next = 0
        self._loaded_to = end


# -- OpenMetrics ------------------------------------------------------------------


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def family_header(family: Metric) -> str:
    return f"# HELP {family.name} {_escape(family.documentation)}\n# TYPE {family.name} {family.type}\n"


class SampleLines:
    """The collector's lab families (Rows: keys, values, and how a key's sample is named) as OpenMetrics
    line prefixes (name and labels, the --label labels first) with values. A prefix is made once per
    series, so a step costs a dict lookup per sample."""

    def __init__(self, labels: Sequence[tuple[str, str]]) -> None:
        self._extra = "".join(f'{name}="{_escape(value)}",' for name, value in labels)
        self._prefixes: dict[str, dict[object, str]] = {}  # family name -> row key -> prefix

    def samples(self, parts: Iterable[Rows]) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        for part in parts:
            prefixes = self._prefixes.setdefault(part.family.name, {})
            for key, value in zip(part.keys, part.values):
                prefix = prefixes.get(key)
                if prefix is None:
                    name, labels = part.sample(key)
                    inner = self._extra + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                    prefix = prefixes[key] = f"{name}{{{inner.rstrip(',')}}} " if inner else f"{name} "
                out.append((prefix, value))
        return out


_TEXTS: dict[float, str] = {}  # float -> its text, as the exposition writes it; sums repeat step after step
MAX_TEXTS = 10_000  # as render.py keeps


def value_text(value: float) -> str:
    if type(value) is int:  # counts (2 and 2.0 are one dict key, so ints stay out of the table)
        return str(value)
    text = _TEXTS.get(value)
    if text is None or value == 0:  # 0.0 and -0.0 are one key too
        text = floatToGoString(value)
        if value == value and value != 0:  # NaN is never found again
            if len(_TEXTS) >= MAX_TEXTS:
                _TEXTS.clear()
            _TEXTS[value] = text
    return text


class DayFile:
    """One day's OpenMetrics file, written under a .tmp name and renamed once complete."""

    def __init__(self, folder: Path, start: int, families: Iterable[Rows]) -> None:
        self.start = start
        self.path = folder / f"{datetime.fromtimestamp(start, timezone.utc):%Y-%m-%dT%H%M%SZ}.om"
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._handle: TextIO = open(self._tmp, "w", encoding="utf-8", buffering=1 << 20)
        self._handle.write("".join(family_header(f.family) for f in families))
        self.samples = 0
        self.steps = 0
        self.series = 0  # the most series of a step

    def write(self, lines: list[tuple[str, float]], at: int, values: bool = True) -> None:
        stamp = f" {at}\n"
        text = value_text
        self._handle.write("".join([p + (text(v) if values else "0") + stamp for p, v in lines]))
        self.samples += len(lines)
        if values:
            self.steps += 1
            self.series = max(self.series, len(lines))

    def finish(self) -> Path:
        self._handle.write("# EOF\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        return self.path

    def discard(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)


# -- blocks ------------------------------------------------------------------------


def make_blocks(promtool: str, om_file: Path, blocks: Path, block_duration: str) -> list[str]:
    """promtool's blocks for one file, made in a folder of their own, then moved into `blocks`."""
    scratch = blocks / f".tmp-{om_file.stem}"
    shutil.rmtree(scratch, ignore_errors=True)
    done = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", f"--max-block-duration={block_duration}", "openmetrics",
         str(om_file), str(scratch)],
        capture_output=True, text=True,
    )
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise BackfillError(f"promtool failed on {om_file}: {detail[0]}")
    made = []
    for entry in sorted(scratch.iterdir()) if scratch.exists() else []:
        if (entry / "meta.json").is_file():
            os.replace(entry, blocks / entry.name)
            made.append(entry.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return made


# -- the run -----------------------------------------------------------------------


@dataclass(frozen=True)
class RunSettings:
    """What a checkpoint is valid for: a rerun with other settings cannot continue it."""

    start: int
    step: int
    labels: list[list[str]]
    accounts: list[str]
    window_minutes: list[int]
    max_lab_hosts: int


class Run:
    """The replay of one backfill: the live exporter's own wiring (ExporterApp: a Poller per account, holding
    its FleetState and health, and the collector), driven by the replay instead of scrapes, and the files
    and checkpoints in --output."""

    def __init__(self, config: Config, opts: Options) -> None:
        self.config = config
        self.opts = opts
        self.app = ExporterApp(config)
        self.pollers = self.app.pollers
        self.collector = self.app.collector
        self.lines = SampleLines(opts.labels)
        self.om_dir = opts.output / "openmetrics"
        self.blocks_dir = opts.output / "blocks"
        self.state_dir = opts.output / STATE_DIR
        self.settings = RunSettings(
            opts.start, opts.step, [list(label) for label in opts.labels], [a.name for a in config.accounts],
            [a.window_minutes for a in config.accounts], config.max_lab_hosts,
        )

    # checkpoints: the state file format, as of a day's end

    @property
    def checkpoint(self) -> Path:
        return self.state_dir / "state.json"

    def prepare(self) -> int:
        """Create the folders, clear what an interrupted run left half-done, and return where to start:
        --from, or the end of the last complete day of an earlier run with the same settings."""
        for folder in (self.om_dir, self.blocks_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.om_dir.glob("*.tmp"):
            leftover.unlink()
        for scratch in self.blocks_dir.glob(".tmp-*"):
            shutil.rmtree(scratch, ignore_errors=True)
        settings_file = self.state_dir / "run.json"
        mine = asdict(self.settings)
        if settings_file.exists():
            theirs = json.loads(settings_file.read_text())
            if theirs != mine:
                raise ConfigError("output", f"{self.opts.output} holds a backfill with other settings "
                                            f"({theirs}); use an empty folder or the same settings")
        else:
            if any(self.om_dir.iterdir()) or any(self.blocks_dir.iterdir()):
                raise ConfigError("output", f"{self.opts.output} holds files of another run; use an empty folder")
            settings_file.write_text(json.dumps(mine))
        if not self.checkpoint.exists():
            return self.opts.start
        try:
            saved = read_state_file(str(self.checkpoint))
            as_of = set()
            for name, poller in self.pollers.items():
                restore_account(poller, saved[name])
                as_of.add(poller.health.last_success)
        except (OSError, KeyError, StateFileError) as exc:
            raise BackfillError(f"checkpoint {self.checkpoint} cannot be read ({exc}); use an empty folder") from None
        resume = int(as_of.pop()) if len(as_of) == 1 else None
        if resume is None or resume > self.opts.end:
            raise ConfigError("to", f"{self.opts.output} already holds history to "
                                    f"{rfc3339(resume) if resume else '?'}, past --to; use an empty folder")
        return resume

    def save_state(self, path: Path, as_of: int) -> None:
        """Every account's state as of `as_of` (its last success: the live exporter asks from there)."""
        for poller in self.pollers.values():
            poller.health.last_success = float(as_of)
        StateStore(str(path)).save(self.pollers)

    # the replay

    def run(self, resume: int, out: TextIO) -> None:
        opts, step = self.opts, self.opts.step
        feeds = {
            name: Feed(lambda a, b, c=poller.client: fetch_results(c, a, b, opts), resume, opts.end)
            for name, poller in self.pollers.items()
        }
        files: dict[int, DayFile] = {}
        previous: list[str] | None = None  # series of the step before: None at the start (nothing to zero)
        began = time.monotonic()
        try:
            for t in range(resume, opts.end + 1, step):
                for name, poller in self.pollers.items():
                    state = poller.state  # as Poller._poll does at time t
                    state.apply(feeds[name].take(t), t - step, seen_at=t)
                    state.evict(t - poller.window_minutes * 60, t - poller.max_running_minutes * 60)
                families = self.collector.lab_parts()
                lines = self.lines.samples(families)
                series = [prefix for prefix, _ in lines]
                if previous is not None and series != previous:  # the same prefix objects: a fast compare
                    seen = set(previous)
                    born = [line for line in lines if line[0] not in seen]
                    if born:
                        files[_day(t - step)].write(born, t - step, values=False)
                previous = series
                for day in [d for d in files if d != _day(t) or t == opts.end]:
                    self._complete(files.pop(day), t, feeds, out, began)
                    began = time.monotonic()
                if t < opts.end:
                    if _day(t) not in files:
                        files[_day(t)] = DayFile(self.om_dir, t, families)
                    files[_day(t)].write(lines, t)
        except BaseException:
            for file in files.values():
                file.discard()
            raise

    def _complete(self, file: DayFile, as_of: int, feeds: dict[str, Feed], out: TextIO, began: float) -> None:
        """A day is done: its file renamed into place, its blocks made, then the checkpoint as of its end."""
        path = file.finish()
        blocks = make_blocks(self.opts.promtool, path, self.blocks_dir, self.opts.block_duration) \
            if self.opts.promtool else None
        self.save_state(self.checkpoint, as_of)
        results = sum(f.results for f in feeds.values())
        made = f", {len(blocks)} blocks" if blocks is not None else ""
        print(f"{rfc3339(file.start)[:10]}: {file.steps} steps, {file.series} series, {file.samples} samples"
              f"{made}, {results} results read so far ({time.monotonic() - began:.1f}s) -> {path}",
              file=out, flush=True)


def _day(t: int) -> int:
    return t - t % DAY


def next_steps(opts: Options, state_file: str | None, made_blocks: bool) -> str:
    """What is left to do by hand, printed at the end (docs/backfill.md has the whole procedure)."""
    blocks = opts.output.resolve() / "blocks"
    om = opts.output.resolve() / "openmetrics"
    lines = ["", "Next steps (backfill never writes into a Prometheus data folder itself):"]
    if not made_blocks:
        lines += ["  0. make blocks of each file (promtool was not found):",
                  f"     for f in {om}/*.om; do promtool tsdb create-blocks-from openmetrics \"$f\" {blocks}; done"]
    lines += [
        "  1. move the blocks into Prometheus' data folder (Debian: /var/lib/prometheus/metrics2;",
        "     docker-compose: the prometheus volume); Prometheus 2.39+ loads them within a minute, no restart:",
        f"     sudo mv {blocks}/0* /var/lib/prometheus/metrics2/",
        "  2. give them to Prometheus' user, or its compaction fails:",
        "     sudo chown -R prometheus:prometheus /var/lib/prometheus/metrics2",
    ]
    if state_file:
        lines += [f"  3. start the exporter with --storage.state-file={state_file} (and the same account and",
                  "     --skillable.* settings): it continues every counter from --to without counting twice."]
    else:
        lines += ["  3. without --storage.state-file, --to must be where the live exporter's counting began",
                  "     (its first poll minus its window): see docs/backfill.md, \"Without a state file\"."]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    now = time.time()
    try:
        config = load_config(vars(args), os.environ, demo=args.demo)
        opts = parse_options(args, now)
        state_file = config.state_file
        if state_file and os.path.exists(state_file):
            raise ConfigError("storage.state-file", f"{state_file} exists: it may be a live exporter's; "
                                                    "backfill writes a new one only")
        if state_file:
            check_state_path(state_file)
    except ConfigError as exc:
        print(f"skillable-exporter backfill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_check:
        print("skillable-exporter backfill: configuration is valid")
        return 0
    simulator = None
    if config.demo:
        import dataclasses

        from .demo import DEMO_API_KEY, start_demo_api

        try:  # at the live demo's address, so the state file it writes restores there
            simulator = start_demo_api(config.listen_addresses, None)  # backfill is about the past: the account has one
        except OSError as exc:
            print(f"skillable-exporter backfill: {exc.strerror} (stop the demo exporter first)", file=sys.stderr)
            return EXIT_CONFIG
        config = dataclasses.replace(config, accounts=(Account("", simulator.url, DEMO_API_KEY, config.window_minutes),))
    if opts.start < now - opts.retention:
        print(f"skillable-exporter backfill: warning: history before {rfc3339(int(now - opts.retention))} is older "
              f"than the retention ({args.bf_retention}): Prometheus deletes it as soon as it loads it, unless its "
              "--storage.tsdb.retention.time is longer (set --prometheus.retention to match)", file=sys.stderr)
    if opts.end > now - SAFETY_MARGIN_SECONDS:
        print("skillable-exporter backfill: warning: --to is within the last 3 hours (Prometheus' head block): "
              "safe only if Prometheus has no samples of these series after --to", file=sys.stderr)
    if not any(name in ("job", "instance") for name, _ in opts.labels):
        print("skillable-exporter backfill: warning: no --label job=... instance=...: the history will not join "
              "the live series, which Prometheus labels with the target's job and instance", file=sys.stderr)
    run = Run(config, opts)
    try:
        try:
            resume = run.prepare()
        except ConfigError as exc:
            print(f"skillable-exporter backfill: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if resume > opts.start:
            print(f"resuming after the last complete day, from {rfc3339(resume)}", flush=True)
        print(f"backfilling {rfc3339(opts.start)} to {rfc3339(opts.end)} at {opts.step}s steps into {opts.output}"
              + ("" if opts.promtool else " (no promtool: files only)"), flush=True)
        run.run(resume, sys.stdout)
        if state_file:
            run.save_state(Path(state_file), opts.end)
            print(f"state as of {rfc3339(opts.end)} written to {state_file}")
    except BackfillError as exc:
        return fail(f"stopped: {exc}. Complete days are in {opts.output}; run the same command again to resume.")
    finally:
        run.app.close()
        if simulator is not None:
            simulator.shutdown()
            simulator.server_close()
    print(next_steps(opts, state_file, opts.promtool is not None))
    return 0
