"""`skillable-exporter backfill`: history from /Results, replayed through the exporter's own state model,
written as OpenMetrics (one file per UTC day) and turned into TSDB blocks by promtool.

The replay, and the rules it counts by (docs/backfill.md explains the procedure around it):

- Each result gives at most two events: its start, at Start, and its end, at End (at Start if End is
  earlier, as FleetState dates it). A start event is the result as it looked while running: End, run
  time and exam fields cleared. /Results is read in windows of one UTC day (the API allows 7 days),
  and a window [a, b) contributes only the events whose time lies in [a, b), so an instance that
  started in one window and ended in another gives each event exactly once.
- Time moves in steps of --step seconds on a grid aligned to the epoch. The sample at grid time t
  shows the state after every event before t: the step is the live exporter's poll step
  (account.apply_poll) at time t, with the events of [t - step, t) and horizon t - step: apply,
  count invalid records, evict what is older than the window, stamp t as the last success. So
  every event is counted once, and an instance forgotten earlier is never counted as started again.
- A record /Results gives that the decoder refuses (no LabInstanceId, a value out of range) has no
  time of its own: it is counted invalid at the step that reads its window, as a poll counts the
  invalid records of its answer. The state file carries the count on to the live exporter's
  skillable_results_invalid_total.
- A series that first appears at t also gets a 0 sample at t - step, so increase() over any range
  counts it from zero (a series born mid-range would otherwise lose its first count).
- The file of day D holds the samples at times in [D, D + 1 day) and [--from, --to). The state
  after the step at --to (every event before --to) is what --storage.state-file receives: the live
  exporter restored from it continues every counter, asks only for the minutes since --to, and its
  per-instance memory keeps it from counting the last window again.

With the launch collector on (--no-collector.launch turns it off), /labinstance/search (mode 5) is read
too, by the rules of launches.py: the labs that started in each UTC day (and, for the first day, those
started in the hour before it: LAUNCH_LOOKBACK_SECONDS), sorted by Start, page by page. Each lab gives an
event at each of its facts: its Start (a launch), its start-up (Start + StartupDuration), its End, each
error's time. The step at t applies, to the account's LaunchState, the record of every lab with an event
in [t - step, t) as it stood at t (later facts cut off), through the live collector's own plan and apply:
start-up times, labs never ready, errors and launches per integration land in the history at their time.
The launch horizon is --from: nothing that happened before it is counted.

A day is complete when its checkpoint is written (the state as of the day's end, in the state-file
format), and that comes last: the file renamed from `.tmp`, its blocks made, the file deleted
(unless --keep-openmetrics), then the checkpoint. A rerun resumes from the checkpoint and first
removes what a run that died after it left of later days: their files, and their blocks, which
are known by the time of their first sample (a day's blocks hold only that day). So no day is
lost or written twice. Whatever cannot be written (a full disk, in a file, in promtool or in the
checkpoint) stops the run with one line naming the day (exit 1), the day taken away again.

Before any work, --output is refused (exit 2, one line) when it cannot hold files; before the
replay, when its filesystem has less room than the estimate (DiskEstimate, from the first day of
/Results) unless --no-disk-check. Memory holds one day of /Results and the current state, never
the whole range.

The replay builds no ExporterApp and starts no poller or thread: each account is its memory
(account.py) and a client, read by the same collector a scrape uses, and the lines are written
by the server's own encoder (render.LineEncoder, with timestamps).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, UTC
from functools import partial
from pathlib import Path
from typing import TextIO, TypeVar
from collections.abc import Callable, Iterable, Sequence

import msgspec

from . import statefile
from .account import Health, PollView, apply_poll, empty_memory
from .cli import build_backfill_parser
from .client import TOO_LARGE, SkillableClient
from .collector import SkillableCollector, shared_window
from .config import Account, Config, ConfigError, load_config
from .failures import UNAUTHORIZED, backoff_seconds, failure_reason, retry_after
from .families import LAB_LABELS
from .launches import LAUNCHES_SORT, LaunchState, Question, search_params
from .model import LabResult, LaunchRecord, SearchPage, decode_latest_results, decode_search_page
from .persistence import (StateFileError, StatePathError, encode_account, read_state_file, restore_account,
                          write_state_file)
from .render import LineEncoder, Rows, choose_encoding
from .state import FleetState

T = TypeVar("T")
DAY = 86400
API_MAX_SECONDS = 7 * DAY  # /Results refuses a longer range ("Timeframe cannot exceed 7 days")
FETCH_SECONDS = DAY  # one request per day: bounded memory, and well inside the API's limit
# Labs that started this long before --from are read too, for their facts after it (start-ups, quick
# failures, the errors of the first hour); those that started earlier are not (their later errors and
# ends are missing from the history's first hours): reading a day more for them would cost a day's pages.
LAUNCH_LOOKBACK_SECONDS = 3600
MIN_SPLIT_SECONDS = 60  # a window too large for --skillable.max-response-bytes is halved down to this
# Prometheus: "it is not safe to backfill data from the last 3 hours (the current head block)".
SAFETY_MARGIN_SECONDS = 3 * 3600
MAX_STEP_SECONDS = 300  # beyond Prometheus' 5-minute lookback, instant queries between samples find nothing
RETRY_MAX_SECONDS = 60.0  # the longest wait between retries of a /Results request
RETRY_AFTER_MAX_SECONDS = 300.0  # the longest Retry-After honoured
OPENMETRICS = "application/openmetrics-text; version=1.0.0"  # what promtool reads (--max-block-duration, 2.42)
EXIT_FAILED = 1
EXIT_CONFIG = 2
STATE_DIR = ".backfill"  # under --output: the run's settings and its checkpoint
RESERVED_LABELS = frozenset({*LAB_LABELS, "account", "le", "quantile", "__name__"})
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
            when = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
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
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Options:
    start: int  # --from, on the step grid
    end: int  # --to, on the step grid
    step: int
    output: Path
    labels: tuple[tuple[str, str], ...]
    promtool: str | None  # None: write the files only
    max_block_seconds: int  # --max-block-duration
    retention: int
    request_timeout: float
    retries: int
    keep_openmetrics: bool = False  # keep each day's file once its blocks exist
    disk_check: bool = True  # refuse to start when --output's filesystem cannot hold the estimate


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
        timeout = parse_duration("request-timeout", args.bf_timeout)  # 120 or 120s, as --help shows it
        retries = int(args.bf_retries)
    except ValueError:
        raise ConfigError("request-timeout", "expected seconds and a whole number of retries") from None
    if not 1 <= timeout <= 3600 or not 0 <= retries <= 20:
        raise ConfigError("request-timeout", "expected 1..3600 seconds and 0..20 retries")
    output = Path(args.bf_output)
    if any((output / marker).exists() for marker in ("wal", "chunks_head", "lock")):
        raise ConfigError("output", f"{output} looks like a Prometheus data folder; backfill never writes "
                                    "into one (give an empty folder, then move the blocks)")
    return Options(start, end, step, output, labels, promtool, block,
                   parse_duration("prometheus.retention", args.bf_retention), timeout, retries,
                   args.bf_keep_openmetrics, not args.bf_no_disk_check)


def check_output(output: Path) -> None:
    """Refuse, before any work, an --output that cannot hold files: a regular file, a folder under
    one, a read-only mount, a folder this user cannot write, a disk already full. Creates the folder,
    then writes, syncs and removes a byte in it, as the run will. Raises ConfigError (one line)."""
    if output.exists() and not output.is_dir():
        raise ConfigError("output", f"{output} is not a folder")
    probe = output / f".backfill-probe-{os.getpid()}"
    try:
        output.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError("output", f"{output} cannot be written ({exc.strerror or exc})") from None


# -- reading /Results ------------------------------------------------------------


@dataclass
class Read:
    """What /Results gave for a range: the results, and how many records were invalid (skipped)."""

    results: list[LabResult]
    invalid: int = 0

    def __add__(self, other: Read) -> Read:
        return Read(self.results + other.results, self.invalid + other.invalid)


def fetch_results(client: SkillableClient, start: int, end: int, opts: Options,
                  sleep: Callable[[float], None] = time.sleep) -> Read:
    """Every result /Results gives for [start, end) (asked with a second to spare on each side, since the
    API does not say whether its bounds are included), retried with the poller's backoff
    (failures.py); a window too large for --skillable.max-response-bytes is split in halves."""
    def read() -> Read:
        batch = decode_latest_results(client.get("Results", {"start": start - 1, "end": end}, opts.request_timeout))
        return Read(batch.results, batch.invalid)

    try:
        return _retried(read, client, f"/Results for {rfc3339(start)}..{rfc3339(end)}", opts, sleep,
                        split=end - start > MIN_SPLIT_SECONDS)
    except TooLarge:
        middle = start + (end - start) // 2
        return fetch_results(client, start, middle, opts, sleep) + fetch_results(client, middle, end, opts, sleep)


def fetch_launches(client: SkillableClient, start: int, end: int, opts: Options, page_size: int,
                   sleep: Callable[[float], None] = time.sleep) -> list[LaunchRecord]:
    """The mode-5 records of the labs that started in [start, end): /labinstance/search from `start`, sorted by
    Start, page by page, until a page reaches past `end` (while the Starts come in order; else every page).
    A failed page is retried with the poller's backoff, as /Results is; a page over
    --skillable.max-response-bytes is asked again in pages half the size."""
    records: list[LaunchRecord] = []
    question = Question(start, LAUNCHES_SORT)
    offset, previous, ordered = 0, None, True
    while True:
        def read(size: int = page_size, index: int = offset // page_size) -> SearchPage:
            params = search_params(question, size, index)
            return decode_search_page(client.get("labinstance/search", params, opts.request_timeout))

        try:
            page = _retried(read, client, f"/labinstance/search for {rfc3339(start)}", opts, sleep,
                            split=page_size > 1)
        except TooLarge:
            page_size //= 2
            continue
        offset = (offset // page_size + 1) * page_size
        for r in page.records:
            ordered = ordered and (previous is None or r.start >= previous)
            previous = r.start
            if start <= r.start < end:
                records.append(r)
        last = not page.records or (page.total_pages is not None and offset // page_size >= page.total_pages) or (
            page.total_pages is None and len(page.records) + page.invalid < page_size)
        if last or (ordered and previous is not None and previous >= end):
            return records


class TooLarge(Exception):
    """An answer over --skillable.max-response-bytes, for a caller that splits what it asks (_retried)."""


def _retried(call: Callable[[], T], client: SkillableClient, what: str, opts: Options,
             sleep: Callable[[float], None], split: bool = False) -> T:
    """`call` (a request and its decoding), retried with the poller's backoff (failures.py) up to --retries; a
    refused key is not retried, nor an answer too large (TooLarge if the caller can `split` what it asks).
    Raises BackfillError (one line) naming `what`."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - every failure has a reason, as in polling
            reason = failure_reason(exc)
            if reason == TOO_LARGE and split:
                raise TooLarge() from None
            attempt += 1
            message = client.redact(str(exc))
            if reason in (UNAUTHORIZED, TOO_LARGE) or attempt > opts.retries:
                hint = " (--no-collector.launch backfills without launch history)" if "search" in what else ""
                raise BackfillError(f"{what} failed (reason={reason}, after {attempt} attempts): {message}{hint}") \
                    from None
            delay = backoff_seconds(attempt, retry_after(exc), most=RETRY_MAX_SECONDS,
                                    most_asked=RETRY_AFTER_MAX_SECONDS)
            print(f"skillable-exporter backfill: {what}: {reason}, retrying in {delay:.0f}s: {message}",
                  file=sys.stderr)
            sleep(delay)


def fact_times(r: LaunchRecord) -> list[int]:
    """When a lab's facts happened: its Start, its start-up, its End, each error (launches.py counts them)."""
    times = [r.start, *(e.time for e in r.errors)]
    if r.startup_duration is not None:
        times.append(r.start + math.ceil(r.startup_duration))
    if r.end is not None:
        times.append(r.end)
    return times


def as_of(r: LaunchRecord, t: int) -> LaunchRecord:
    """The record as it stood at `t`: what happened at or after `t` is not in it yet."""
    ready = r.startup_duration is not None and r.start + r.startup_duration < t
    return msgspec.structs.replace(r, end=r.end if r.end is not None and r.end < t else None,
                                   startup_duration=r.startup_duration if ready else None,
                                   errors=tuple(e for e in r.errors if e.time < t))


class LaunchFeed:
    """One account's launch facts in time order: the labs read from /labinstance/search a day at a time (their
    Starts in the day), each lab's events (fact_times) waiting until a step takes them."""

    def __init__(self, fetch: Callable[[int, int], list[LaunchRecord]], start: int, end: int, lookback: int) -> None:
        self._fetch = fetch
        self._start = start
        self._loaded_to = start - lookback  # every lab started before this is read (or was taken)
        self._end = end
        self._events: list[tuple[int, int]] = []  # heap of (time, id)
        self._records: dict[int, LaunchRecord] = {}
        self._left: dict[int, int] = {}  # id -> its events not taken yet
        self.records = 0

    def take(self, before: int) -> list[LaunchRecord]:
        """Every lab with an event before `before` not taken yet, as it stood at `before` (as_of)."""
        while self._loaded_to < min(before, self._end):
            self._load()
        due: set[int] = set()
        while self._events and self._events[0][0] < before:
            _, i = heapq.heappop(self._events)
            due.add(i)
            self._left[i] -= 1
        out = [as_of(self._records[i], before) for i in sorted(due)]
        for i in due:
            if not self._left[i]:
                del self._left[i], self._records[i]
        return out

    def preview(self, before: int) -> list[LaunchRecord]:
        """What take(before) would give, without taking it (the disk estimate)."""
        while self._loaded_to < min(before, self._end):
            self._load()
        return [as_of(r, before) for i, r in self._records.items() if any(t < before for t in fact_times(r))]

    def _load(self) -> None:
        start = self._loaded_to
        end = min(start - start % FETCH_SECONDS + FETCH_SECONDS, self._end)
        for r in self._fetch(start, end):
            times = fact_times(r)
            if r.id in self._records or max(times) < self._start:  # all of it before the replay: nothing to count
                continue
            self.records += 1
            self._records[r.id] = r
            self._left[r.id] = len(times)
            for t in times:
                heapq.heappush(self._events, (t, r.id))
        self._loaded_to = end


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

    def __init__(self, fetch: Callable[[int, int], Read], start: int, end: int) -> None:
        self._fetch = fetch
        self._start = start
        self._loaded_to = start  # every event before this is in _events (or was taken)
        self._end = end
        self._events: list[tuple[int, int, LabResult]] = []
        self._next = 0
        self._invalid = 0  # invalid records read and not taken yet
        self.results = 0  # results read so far
        self.invalid = 0  # invalid records read so far

    def take(self, before: int) -> Read:
        """The events before `before` not taken yet, one result per instance (the later event wins: an
        end carries the start too, so a lab that starts and ends in one step is applied once, whole),
        and the invalid records of the windows read to get them."""
        out: dict[int, LabResult] = {}
        while True:
            events = self._events
            while self._next < len(events) and events[self._next][0] < before:
                result = events[self._next][2]
                out[result.lab_instance_id] = result
                self._next += 1
            if self._loaded_to >= min(before, self._end):
                invalid, self._invalid = self._invalid, 0
                return Read(list(out.values()), invalid)
            self._load()

    def preview(self) -> tuple[Read, int, int]:
        """The first window's events as one step would take them, without taking them, and the window
        [start, end): what the disk estimate replays. The window is read once; take() uses it."""
        if self._loaded_to == self._start < self._end:
            self._load()
        latest = {result.lab_instance_id: result for _, _, result in self._events[self._next:]}
        return Read(list(latest.values()), self._invalid), self._start, self._loaded_to

    def _load(self) -> None:
        start = self._loaded_to
        end = min(start - start % FETCH_SECONDS + FETCH_SECONDS, self._end)
        read = self._fetch(start, end)
        self.results += len(read.results)
        self.invalid += read.invalid
        self._invalid += read.invalid
        self._events = events_in(read.results, start, end)  # the previous window is used up: drop it
        self._next = 0
        self._loaded_to = end


# -- OpenMetrics ------------------------------------------------------------------


class SampleLines:
    """The collector's lab families (Rows: keys, values, and how a key's sample is named), with the --label
    labels on every series, as the server's own OpenMetrics encoder writes them with a timestamp
    (render.LineEncoder). A series' line start is learnt once, so a step costs a lookup per sample."""

    def __init__(self, labels: Sequence[tuple[str, str]]) -> None:
        self._extra = dict(labels)
        self._encoder = LineEncoder(choose_encoding(OPENMETRICS).encoder)

    def header(self, families: Iterable[Rows]) -> str:
        """HELP and TYPE of every family, written once at the top of a file."""
        return "".join(self._encoder.header(part.family) for part in families)

    def starts(self, parts: Iterable[Rows], at: int) -> tuple[list[str], list[float]]:
        """Every sample's line start (name and labels) and value, family after family."""
        starts: list[str] = []
        values: list[float] = []
        for part in parts:
            starts += self._encoder.timestamped_starts(self._labelled(part), at)
            values += part.values
        return starts, values

    def lines(self, starts: Sequence[str], values: Sequence[float], at: int) -> str:
        return self._encoder.timestamped_lines(starts, values, at)

    @property
    def trailer(self) -> str:
        """The end of a file: `# EOF`."""
        return self._encoder.trailer

    def _labelled(self, part: Rows) -> Rows:
        if not self._extra:
            return part
        extra, sample = self._extra, part.sample

        def labelled(key: object) -> tuple[str, dict[str, str]]:
            name, labels = sample(key)
            return name, {**extra, **labels}

        return Rows(part.family, part.keys, part.values, labelled)


class DayFile:
    """One day's OpenMetrics file, written under a .tmp name and renamed once complete."""

    def __init__(self, folder: Path, start: int, header: str, trailer: str) -> None:
        self.start = start
        self.path = folder / f"{datetime.fromtimestamp(start, UTC):%Y-%m-%dT%H%M%SZ}.om"
        self.temporary = self.path.with_name(self.path.name + ".tmp")
        self._handle: TextIO = open(self.temporary, "w", encoding="utf-8", buffering=1 << 20)
        self._handle.write(header)
        self._trailer = trailer
        self.opened = time.monotonic()
        self.samples = 0
        self.steps = 0
        self.series = 0  # the most series of a step

    def write(self, text: str, samples: int, step: bool = True) -> None:
        """`samples` lines of one time; `step`: a step's samples (not the zeros before new series)."""
        self._handle.write(text)
        self.samples += samples
        if step:
            self.steps += 1
            self.series = max(self.series, samples)

    def finish(self) -> Path:
        self._handle.write(self._trailer)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self.temporary, self.path)
        return self.path

    def discard(self) -> None:
        """Close and remove the unfinished file; a close that fails (its buffer on a full disk) is ignored."""
        try:
            self._handle.close()
        except OSError:
            pass
        self.temporary.unlink(missing_ok=True)


# -- blocks ------------------------------------------------------------------------


def make_blocks(promtool: str, om_file: Path, blocks: Path, block_seconds: int) -> list[str]:
    """promtool's blocks for one file, made in a folder of their own, then moved into `blocks`."""
    scratch = blocks / f".tmp-{om_file.stem}"
    shutil.rmtree(scratch, ignore_errors=True)
    done = subprocess.run(
        [promtool, "tsdb", "create-blocks-from", f"--max-block-duration={block_seconds}s", "openmetrics",
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


def remove_blocks_since(blocks: Path, since: int) -> None:
    """Remove the blocks whose first sample is at or after `since`. A day's file holds only the samples
    of that day, and promtool's blocks keep within their file's time range, so this removes the blocks
    of the days from `since` on, and only them: a block is marked with its day by its own meta.json.
    A block whose meta.json cannot be read was never complete (promtool writes it last): removed too."""
    for entry in blocks.iterdir() if blocks.exists() else []:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            first = json.loads((entry / "meta.json").read_text())["minTime"] // 1000
        except (OSError, ValueError, KeyError, TypeError):
            first = since
        if first >= since:
            shutil.rmtree(entry, ignore_errors=True)


# -- disk ------------------------------------------------------------------------

# Blocks as promtool 2.42 writes them, measured on the demo (docs/backfill.md, "Disk and time"):
# about 125 bytes a series in each block (its index entry, chunk headers) plus 0.75 bytes a sample
# (compressed chunks). A whole day at the 6h default is 4 blocks: 500 bytes a series a day, plus
# 1,080 at 1-minute steps.
BLOCK_BYTES_PER_SERIES = 125
BLOCK_BYTES_PER_SAMPLE = 0.75
# Room for what the first day cannot show: series that appear later in the range (new hosts and lab
# profiles), counters with more digits, the filesystem's rounding of small files.
DISK_MARGIN = 1.25
# promtool (2.42) preallocates each block's chunk file at the TSDB's segment size, 512 MiB, and cuts it
# to size when the block is written: without that much free beside the files, no block can be made
# ("write chunks: preallocate: no space left on device", verified on ext4 and tmpfs).
PROMTOOL_PREALLOCATED_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class DiskEstimate:
    """The disk a backfill needs on --output's filesystem at its fullest, in bytes. OpenMetrics: the
    bytes of a step (the series of the first day as the encoder writes them) times the steps of a
    day; kept for every day (--keep-openmetrics, or no promtool) or one day at a time (deleted once
    its blocks exist). Blocks: the measured bytes per series and sample above. The checkpoint: twice
    the state (written to a temporary file, then renamed), and the state is the first day's half
    again: it holds a window of the fleet's traffic, which is larger on a busier day (a weekday after
    a weekend's first day)."""

    series: int
    days: int
    openmetrics_day: int  # the largest day's file
    openmetrics: int  # what is on disk of the files at most at once
    blocks: int
    checkpoint: int
    every_day_kept: bool
    promtool: int  # promtool's room while it writes a block (PROMTOOL_PREALLOCATED_BYTES), 0 without it

    @property
    def total(self) -> int:
        return int((self.openmetrics + self.blocks + self.checkpoint) * DISK_MARGIN) + self.promtool

    def describe(self) -> str:
        files = (f"OpenMetrics {size_text(self.openmetrics)} (all {self.days} days kept)" if self.every_day_kept
                 else f"OpenMetrics {size_text(self.openmetrics)} (one day at a time, deleted once its blocks exist)")
        blocks = f", blocks {size_text(self.blocks)}" if self.blocks else ""
        promtool = f", and {size_text(self.promtool)} promtool preallocates while it writes a block" \
            if self.promtool else ""
        return (f"about {size_text(self.total)} for {self.days} days of {self.series} series: {files}{blocks}, "
                f"checkpoint {size_text(self.checkpoint)}, plus {DISK_MARGIN - 1:.0%}{promtool}")


def block_seconds(max_block_duration: int) -> int:
    """The blocks promtool makes for --max-block-duration: the longest of 2h, 6h, 18h, 54h ... (each 3
    times the last) within it, aligned to the epoch."""
    seconds = 7200
    while seconds * 3 <= max_block_duration:
        seconds *= 3
    return seconds


def estimate_disk(series: int, step_bytes: int, file_bytes: int, state_bytes: int, start: int, end: int,
                  step: int, blocks: int | None, keep: bool) -> DiskEstimate:
    """The estimate for the steps in [start, end): `step_bytes` a step, `file_bytes` a file besides (its
    header and trailer), `blocks` the seconds of promtool's blocks (None: no promtool), `keep` whether
    the files stay once their blocks exist."""
    days = [(max(day, start), min(day + DAY, end)) for day in range(_day(start), end, DAY)]
    steps = [-(-(last - first) // step) for first, last in days]
    files = [file_bytes + n * step_bytes for n in steps]
    kept = keep or not blocks
    block_bytes = 0.0
    for (first, last), n in zip(days, steps):
        count = -(-last // blocks) - first // blocks if blocks else 0  # the block windows the day touches
        block_bytes += series * (BLOCK_BYTES_PER_SERIES * count + BLOCK_BYTES_PER_SAMPLE * n)
    return DiskEstimate(series, len(steps), max(files, default=0), sum(files) if kept else max(files, default=0),
                        int(block_bytes) if blocks else 0, 3 * state_bytes, kept,
                        PROMTOOL_PREALLOCATED_BYTES if blocks else 0)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def free_bytes(folder: Path) -> int:
    """What this user may still write on the filesystem of `folder`."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def size_text(size: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def duration_text(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


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
    launch: bool = False  # history of /labinstance/search too


@dataclass
class Replayed:
    """One account in the replay: its memory (account.py) and the client that reads its /Results. The
    collector reads it as it reads a poller (view(), window_minutes)."""

    client: SkillableClient
    window_minutes: int
    max_running_minutes: int
    state: FleetState
    health: Health = field(default_factory=Health)
    launch: LaunchState | None = None  # with the launch collector on

    def view(self) -> PollView:
        return PollView(self.state.snapshot(), self.health, self.launch.snapshot() if self.launch is not None else None)

    def step(self, read: Read, t: int, step: int, launches: list[LaunchRecord] | None = None) -> None:
        """The poll step at time t, with the events of [t - step, t) (the module docstring's rules); then the
        launch poll's plan, apply and finish with the labs that had launch events in that span."""
        apply_poll(self, read.results, read.invalid, now=t, horizon=t - step, window_minutes=self.window_minutes,
                   max_running_minutes=self.max_running_minutes)
        if self.launch is not None:
            plan = self.launch.plan(t, self.window_minutes * 60, 0)
            self.launch.apply(launches or [], plan)
            self.launch.finish(plan, True, True)


def replayed(config: Config) -> dict[str, Replayed]:
    """An empty memory and a client for every configured account, by name."""
    accounts: dict[str, Replayed] = {}
    for account in config.accounts:
        memory = empty_memory(config.max_lab_hosts, config.max_lab_profiles, config.max_running_minutes)
        client = SkillableClient(account.api_url, account.api_key, config.max_response_bytes)
        accounts[account.name] = Replayed(client, account.window_minutes, config.max_running_minutes, memory.state,
                                          memory.health, empty_launch(config))
    return accounts


def empty_launch(config: Config) -> LaunchState | None:
    """The launch memory of an account not replayed yet (None with --no-collector.launch)."""
    if not config.collect_launch:
        return None
    return LaunchState(config.max_lab_hosts, config.max_lab_profiles, config.max_api_consumers,
                       config.launch_grace_minutes * 60, config.max_running_minutes * 60)


class Run:
    """The replay of one backfill: each account's memory, driven step by step by its /Results instead of
    by polls, read by the collector a scrape uses; and the files and checkpoints in --output."""

    def __init__(self, config: Config, opts: Options) -> None:
        self.config = config
        self.opts = opts
        self.accounts = replayed(config)
        self.collector = self._collector(self.accounts)
        self.lines = SampleLines(opts.labels)
        self.om_dir = opts.output / "openmetrics"
        self.blocks_dir = opts.output / "blocks"
        self.state_dir = opts.output / STATE_DIR
        self.settings = RunSettings(
            opts.start, opts.step, [list(label) for label in opts.labels], [a.name for a in config.accounts],
            [a.window_minutes for a in config.accounts], config.max_lab_hosts, config.collect_launch,
        )
        self.feeds: dict[str, Feed] = {}
        self.launch_feeds: dict[str, LaunchFeed] = {}
        self.resume = opts.start

    def _collector(self, accounts: dict[str, Replayed]) -> SkillableCollector:
        return SkillableCollector(list(accounts.items()), self.config.names, shared_window(accounts.values()),
                                  self.config.max_lab_profiles, max_active_labs=self.config.max_active_labs)

    def close(self) -> None:
        for account in self.accounts.values():
            account.client.close()

    # checkpoints: the state file format, as of a day's end

    @property
    def checkpoint(self) -> Path:
        return self.state_dir / "state.json"

    def prepare(self) -> int:
        """Create the folders, clear what an interrupted run left half-done, and return where to start:
        --from, or the end of the last complete day of an earlier run with the same settings.

        The checkpoint is what makes a day complete. A run that died after a day's blocks were made but
        before its checkpoint was written left that day's blocks (and file): they are removed here, by
        the time of their first sample, so the rerun writes the day once."""
        for folder in (self.om_dir, self.blocks_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.om_dir.glob("*.tmp"):
            leftover.unlink()
        for scratch in self.blocks_dir.glob(".tmp-*"):
            shutil.rmtree(scratch, ignore_errors=True)
        mine = asdict(self.settings)
        if self.settings_file.exists():
            theirs = json.loads(self.settings_file.read_text())
            if theirs != mine:
                raise ConfigError("output", f"{self.opts.output} holds a backfill with other settings "
                                            f"({theirs}); use an empty folder or the same settings")
        elif any(self.om_dir.iterdir()) or any(self.blocks_dir.iterdir()):
            raise ConfigError("output", f"{self.opts.output} holds files of another run; use an empty folder")
        resume = self._restore(self.accounts)
        if resume > self.opts.end:
            raise ConfigError("to", f"{self.opts.output} already holds history to {rfc3339(resume)}, past --to; "
                                    "use an empty folder")
        for kept in self.om_dir.glob("*.om"):
            if _file_start(kept) >= resume:
                kept.unlink()
        remove_blocks_since(self.blocks_dir, resume)
        self.resume = resume
        self.feeds = {
            name: Feed(partial(fetch_results, account.client, opts=self.opts), resume, self.opts.end)
            for name, account in self.accounts.items()
        }
        if self.config.collect_launch:
            lookback = LAUNCH_LOOKBACK_SECONDS
            for name, account in self.accounts.items():
                if account.launch is not None and account.launch.horizon is None:
                    account.launch.horizon = self.opts.start  # nothing before --from is counted
                self.launch_feeds[name] = LaunchFeed(
                    partial(fetch_launches, account.client, opts=self.opts, page_size=self.config.launch_page_size),
                    resume, self.opts.end, lookback)
        return resume

    @property
    def settings_file(self) -> Path:
        return self.state_dir / "run.json"

    def _restore(self, accounts: dict[str, Replayed]) -> int:
        """Every account's memory as of the checkpoint, into `accounts`; returns its time (--from without one)."""
        if not self.checkpoint.exists():
            return self.opts.start
        try:
            saved = read_state_file(str(self.checkpoint))
            as_of = set()
            for name, account in accounts.items():
                memory = restore_account(saved[name], account.state, account.launch)
                account.state, account.health = memory.state, memory.health
                if account.launch is not None:
                    account.launch = memory.launch or account.launch
                as_of.add(account.health.last_success)
        except (OSError, KeyError, StateFileError) as exc:
            raise BackfillError(f"checkpoint {self.checkpoint} cannot be read ({exc}); use an empty folder") from None
        resume = as_of.pop() if len(as_of) == 1 else None
        if resume is None:
            raise ConfigError("output", f"{self.opts.output} holds a checkpoint without one time for every account; "
                                        "use an empty folder")
        return int(resume)

    def save_state(self, path: Path, what: str) -> None:
        """Every account's memory, as of its last step (its last success: the live exporter asks from
        there), in the state-file format. Raises BackfillError naming `what` when it cannot be written."""
        try:
            write_state_file(str(path), self.accounts, {name: a.client.base_url for name, a in self.accounts.items()})
        except StatePathError as exc:
            raise BackfillError(f"the {what} {path} could not be written ({exc})") from None
        except OSError as exc:
            raise BackfillError(f"the {what} {path} could not be written ({exc.strerror or exc})") from None

    # the disk it needs

    def estimate(self) -> DiskEstimate:
        """The disk the rest of the run needs (DiskEstimate), from the first window of /Results (read
        once: the replay takes it from there) replayed as one step on a copy of the state: the series
        the collector then serves, as the encoder writes them, are the series of every step."""
        c = self.config
        probe: dict[str, Replayed] = {}
        for name, account in self.accounts.items():
            memory = empty_memory(c.max_lab_hosts, c.max_lab_profiles, c.max_running_minutes)
            probe[name] = Replayed(account.client, account.window_minutes, account.max_running_minutes,
                                   memory.state, memory.health, empty_launch(c))
        self._restore(probe)
        at = self.resume
        for name, account in probe.items():
            read, start, end = self.feeds[name].preview()
            launches = self.launch_feeds[name].preview(end) if name in self.launch_feeds else None
            if account.launch is not None and account.launch.horizon is None:
                account.launch.horizon = self.opts.start
            account.step(read, end, end - start, launches)
            if account.launch is not None:  # what the steps of a day forget as they go (launches.py, rule 7)
                account.launch.plan(end, account.window_minutes * 60, 0)
            at = max(at, end)
        families = self._collector(probe).lab_parts()
        series, values = self.lines.starts(families, at)
        step_bytes = len(self.lines.lines(series, values, at).encode())
        file_bytes = len((self.lines.header(families) + self.lines.trailer).encode())
        state_bytes = sum(len(encode_account(account)) for account in probe.values()) + 1024
        return estimate_disk(len(series), step_bytes, file_bytes, state_bytes, self.resume, self.opts.end,
                             self.opts.step, block_seconds(self.opts.max_block_seconds) if self.opts.promtool else None,
                             self.opts.keep_openmetrics)

    # the replay

    def run(self, out: TextIO) -> None:
        opts, step, feeds = self.opts, self.opts.step, self.feeds
        files: dict[int, DayFile] = {}
        previous: list[str] | None = None  # series of the step before: None at the start (nothing to zero)
        self._began = time.monotonic()
        writing = _day(self.resume)  # the day whose file is being written
        try:
            if not self.settings_file.exists():  # only now: a run refused before (the disk) binds no settings
                self.settings_file.write_text(json.dumps(asdict(self.settings)))
            for t in range(self.resume, opts.end + 1, step):
                for name, account in self.accounts.items():
                    launches = self.launch_feeds[name].take(t) if name in self.launch_feeds else None
                    account.step(feeds[name].take(t), t, step, launches)
                families = self.collector.lab_parts()
                series, values = self.lines.starts(families, t)
                if previous is not None and series != previous:  # the same interned strings: a fast compare
                    seen = set(previous)
                    born = [start for start in series if start not in seen]
                    if born:
                        writing = _day(t - step)
                        text = self.lines.lines(born, [0] * len(born), t - step)
                        files[writing].write(text, len(born), step=False)
                previous = series
                for day in [d for d in files if d != _day(t) or t == opts.end]:
                    self._complete(files.pop(day), t, out)
                if t < opts.end:
                    writing = _day(t)
                    if writing not in files:
                        files[writing] = DayFile(self.om_dir, t, self.lines.header(families), self.lines.trailer)
                    files[writing].write(self.lines.lines(series, values, t), len(series))
        except OSError as exc:  # a full disk, mostly: the day's file is removed below, complete days stay
            what = exc.filename or (files[writing].temporary if writing in files else self.om_dir)
            raise BackfillError(f"{self._day_name(writing)}: {what} could not be written "
                                f"({exc.strerror or exc})") from None
        finally:
            for file in files.values():
                file.discard()
        if opts.promtool and not opts.keep_openmetrics:
            try:
                self.om_dir.rmdir()  # empty: every day's file made way for its blocks
            except OSError:
                pass

    def _day_name(self, start: int) -> str:
        """'day N of M (YYYY-MM-DD)': N and M count the days of the whole range, resumed or not."""
        first, last = _day(self.opts.start), _day(self.opts.end - 1)
        return f"day {(_day(start) - first) // DAY + 1} of {(last - first) // DAY + 1} ({rfc3339(start)[:10]})"

    def _complete(self, file: DayFile, t: int, out: TextIO) -> None:
        """A day is done (t is the first step after it): its file renamed into place, its blocks made and
        the file deleted (unless kept), then the checkpoint as of its end (every account's last step).
        Whatever fails before the checkpoint is written takes the day's file and blocks away again, so
        the folder holds exactly the days a rerun will not write again."""
        name = self._day_name(file.start)
        path = file.path
        blocks: list[str] | None = None
        try:
            try:
                path = file.finish()
                file_bytes = path.stat().st_size
                if self.opts.promtool:
                    blocks = make_blocks(self.opts.promtool, path, self.blocks_dir, self.opts.max_block_seconds)
                    if not self.opts.keep_openmetrics:
                        path.unlink()
            except OSError as exc:
                raise BackfillError(f"{name}: {exc.filename or path} could not be written "
                                    f"({exc.strerror or exc})") from None
            except BackfillError as exc:
                raise BackfillError(f"{name}: {exc}") from None
            self.save_state(self.checkpoint, f"checkpoint of {rfc3339(file.start)[:10]}")
        except BaseException:
            file.discard()
            path.unlink(missing_ok=True)
            remove_blocks_since(self.blocks_dir, file.start)
            raise
        results = sum(f.results for f in self.feeds.values())
        invalid = sum(f.invalid for f in self.feeds.values())
        made = f", {size_text(sum(folder_bytes(self.blocks_dir / b) for b in blocks))} in {len(blocks)} blocks" \
            if blocks is not None else ""
        skipped = f", {invalid} invalid records skipped" if invalid else ""
        elapsed = time.monotonic() - self._began
        done, left = t - self.resume, self.opts.end - t
        eta = f", about {duration_text(elapsed * left / done)} left" if left > 0 and done > 0 else ""
        where = f" -> {path}" if path.exists() else ""
        print(f"{name}: {file.steps} steps, {file.series} series, {file.samples} samples, {size_text(file_bytes)} "
              f"of OpenMetrics{made}, {results} results "
              f"read so far{skipped} ({time.monotonic() - file.opened:.1f}s{eta}){where}", file=out, flush=True)


def _file_start(path: Path) -> int:
    """The first step of a day's file, from its name (DayFile.path)."""
    try:
        return int(datetime.strptime(path.name, "%Y-%m-%dT%H%M%SZ.om").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return 0


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


def check_disk(estimate: DiskEstimate, opts: Options) -> None:
    """Print the estimate; refuse (ConfigError, one line) when --output's filesystem has less room,
    unless --no-disk-check says the estimate is wrong (then warn and go on)."""
    free = free_bytes(opts.output)
    print(f"disk: {estimate.describe()}; {size_text(free)} free in {opts.output}", flush=True)
    if estimate.total <= free:
        return
    problem = (f"{opts.output} has {size_text(free)} free, the backfill needs {estimate.describe()}: "
               "free some space, backfill fewer days or into another folder")
    if opts.disk_check:
        raise ConfigError("output", problem + ", or pass --no-disk-check if the estimate is wrong")
    print(f"skillable-exporter backfill: warning: {problem} (going on: --no-disk-check)", file=sys.stderr)


def main(argv: Sequence[str]) -> int:
    args = build_backfill_parser().parse_args(list(argv))
    now = time.time()
    try:
        config = load_config(vars(args), os.environ, demo=args.demo)
        opts = parse_options(args, now)
        state_file = config.state_file
        if state_file and os.path.exists(state_file):
            raise ConfigError("storage.state-file", f"{state_file} exists: it may be a live exporter's; "
                                                    "backfill writes a new one only")
        if state_file:
            statefile.check_path(state_file)
    except ConfigError as exc:
        print(f"skillable-exporter backfill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_check:
        print("skillable-exporter backfill: configuration is valid")
        return 0
    try:
        check_output(opts.output)
    except ConfigError as exc:
        print(f"skillable-exporter backfill: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    simulator = None
    if config.demo:
        import dataclasses

        from .demo import DEMO_API_KEY, start_demo_api

        try:  # at the live demo's address, so the state file it writes restores there
            simulator = start_demo_api(config.listen_addresses, None)  # backfill is about the past: the account has one
        except OSError as exc:
            print(f"skillable-exporter backfill: {exc.strerror} (stop the demo exporter first)", file=sys.stderr)
            return EXIT_CONFIG
        demo_account = Account("", simulator.url, DEMO_API_KEY, config.window_minutes)
        config = dataclasses.replace(config, accounts=(demo_account,))
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
            if resume > opts.start:
                print(f"resuming after the last complete day, from {rfc3339(resume)}", flush=True)
            print(f"backfilling {rfc3339(opts.start)} to {rfc3339(opts.end)} at {opts.step}s steps into "
                  f"{opts.output}" + ("" if opts.promtool else " (no promtool: files only)"), flush=True)
            if resume < opts.end:
                check_disk(run.estimate(), opts)
        except ConfigError as exc:
            print(f"skillable-exporter backfill: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        run.run(sys.stdout)
        if state_file:
            run.save_state(Path(state_file), "state file")
            print(f"state as of {rfc3339(opts.end)} written to {state_file}")
    except BackfillError as exc:
        return fail(f"stopped: {exc}. Complete days are in {opts.output}; run the same command again to resume.")
    finally:
        run.close()
        if simulator is not None:
            simulator.shutdown()
            simulator.server_close()
    print(next_steps(opts, state_file, opts.promtool is not None))
    return 0
