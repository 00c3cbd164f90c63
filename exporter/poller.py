"""Polling one Skillable account: incremental, single-flight, rate-limited, backing off on failure.

A scrape calls `refresh(timeout)`. At most one poll runs at a time; scrapes
that arrive while it runs wait for it and share its result. A poll asks only for
the minutes since the last successful poll (plus an overlap), so its cost follows
the number of changes, not the window.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from . import client
from .client import ApiError, SkillableClient
from .config import MAX_WINDOW_MINUTES
from .model import (
    AccountStats,
    DecodeError,
    NotJsonError,
    UpstreamError,
    decode_delivery_regions,
    decode_latest_results,
    decode_stats,
)
from .state import FleetState, Snapshot

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
POLL_MARGIN_SECONDS = 0.1  # at most, between a poll's deadline and the end of the scrape's wait for it
MAX_RETRY_AFTER_SECONDS = 3600.0  # a longer Retry-After is cut to this, so one bad header never stops polling
REGION_NAMES_REFRESH_SECONDS = 3600.0

# Failure reasons the poller adds to the client's (client.py): see docs/failure-modes.md.
NOT_JSON = "not_json"
INVALID_RESPONSE = "invalid_response"
API_ERROR = "api_error"
UNAUTHORIZED = "unauthorized"
INTERNAL_ERROR = "internal_error"
# Every reason a failure can be counted under, so each series exists at 0 from the start.
FAILURE_REASONS: tuple[str, ...] = (
    client.CONNECT_TIMEOUT, client.CONNECT_ERROR, client.TIMEOUT, client.CONNECTION_RESET, UNAUTHORIZED,
    client.RATE_LIMITED, client.HTTP_ERROR, client.TOO_LARGE, NOT_JSON, INVALID_RESPONSE, API_ERROR,
    INTERNAL_ERROR,
)
# Skillable answers a bad key with HTTP 200, Status 0 and an Error about the key.
_KEY_ERROR = re.compile(r"api[ _-]?key|unauthori[sz]ed|forbidden|not authenticated", re.IGNORECASE)


@dataclass
class Health:
    """The exporter's own view of its polling, exported as skillable_* health metrics."""

    up: bool = False
    last_success: float | None = None  # wall-clock time the last good LatestResults poll was asked for
    last_duration: float | None = None
    last_minutes: int | None = None
    requests: Counter[str] = field(default_factory=Counter)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    stats: AccountStats | None = None
    region_names: dict[int, str] = field(default_factory=dict)


@dataclass
class PollView:
    """What the collector reads: a snapshot of the state plus the health, copied under the lock."""

    snapshot: Snapshot
    health: Health


class Poller:
    def __init__(
        self,
        client: SkillableClient,
        window_minutes: int,
        overlap_minutes: int,
        min_interval: float,
        max_lab_hosts: int,
        max_running_minutes: int = 1440,
        max_lab_profiles: int = 500,
        collect_stats: bool = False,
        collect_region_names: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_poll: Callable[[Poller], None] | None = None,
    ) -> None:
        self.client = client
        self.window_minutes = window_minutes
        self.overlap_minutes = overlap_minutes
        self.min_interval = min_interval
        self.collect_stats = collect_stats
        self.collect_region_names = collect_region_names
        self.max_running_minutes = max_running_minutes
        self.state = FleetState(max_lab_hosts, max_lab_profiles, max_running_minutes * 60)
        self.health = Health()
        for endpoint in self.endpoints():
            self.health.requests[endpoint] = 0
            for reason in FAILURE_REASONS:
                self.health.failures[(endpoint, reason)] = 0
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._in_flight = False
        self._last_attempt: float | None = None
        self._not_before = 0.0  # monotonic time before which no poll is made (backoff, Retry-After)
        self._failures_in_row = 0
        self._failing_reason: str | None = None  # the reason last logged, until a poll succeeds
        self._region_names_at: float | None = None
        self._closed = False
        self._time_at: tuple[float, float] | None = None  # (poll time, monotonic) of the last poll; see _now()
        self._clock_offset = 0.0  # how far the wall clock was ahead of the poll time at the last poll
        self._result_in = False  # the poll in flight has its result in; only its after-poll hook runs
        # Called by the polling thread after every poll, while it still holds the
        # single flight: no other poll changes the state meanwhile (persistence).
        self.on_poll = on_poll

    def endpoints(self) -> list[str]:
        """The API endpoints this poller calls."""
        return ["LatestResults"] + ["stats"] * self.collect_stats + ["deliveryregions"] * self.collect_region_names

    # -- scheduling --------------------------------------------------------

    def refresh(self, timeout: float) -> None:
        """Make sure a poll happened recently enough, waiting at most `timeout` seconds.

        The poll runs in a thread of its own and the caller only waits for it, so a
        scrape never waits longer than `timeout`, even for what no deadline can
        interrupt (a DNS lookup that hangs): it then answers from the last poll, and
        the late poll lands when it ends. At most one poll runs at a time.
        """
        with self._lock:
            if not self._in_flight:
                if self._closed or not self._due():
                    return
                self._in_flight = True
                self._result_in = False
                self._last_attempt = self._monotonic()
                # The poll's own deadline ends a little before the wait does, so a poll that
                # keeps its deadline (every one but a hung DNS lookup) lands in this scrape.
                poll_timeout = timeout - min(POLL_MARGIN_SECONDS, timeout / 10)
                threading.Thread(target=self._run_poll, args=(poll_timeout,), name="poll", daemon=True).start()
            # Waiting ends when the poll's result is in, not when its after-poll hook is done.
            self._done.wait_for(lambda: not self._in_flight or self._result_in, timeout)

    def _run_poll(self, timeout: float) -> None:
        try:
            try:
                self._poll(timeout)
            finally:
                with self._lock:
                    self._result_in = True
                    self._done.notify_all()
            if self.on_poll is not None:
                try:
                    self.on_poll(self)  # still in flight: no other poll changes the state meanwhile
                except Exception:  # noqa: BLE001 - saving must never fail a scrape
                    log.exception("after-poll hook failed")
        finally:
            with self._lock:
                self._in_flight = False
                self._done.notify_all()

    def stop(self, timeout: float) -> bool:
        """No more polls; wait up to `timeout` s for one in flight. True if none is left running."""
        with self._lock:
            self._closed = True
            return self._done.wait_for(lambda: not self._in_flight, timeout)

    def _due(self) -> bool:
        now = self._monotonic()
        if now < self._not_before:
            return False
        return self._last_attempt is None or now - self._last_attempt >= self.min_interval

    def restore(self, state: FleetState, last_success: float | None, requests: Counter[str],
                failures: Counter[tuple[str, str]]) -> None:
        """Take a restored state and poll health (persistence.py), before the first poll."""
        with self._lock:
            self.state = state
            self.health.last_success = last_success
            self.health.requests = requests
            self.health.failures = failures

    def view(self) -> PollView:
        with self._lock:
            h = self.health
            health = Health(
                h.up, h.last_success, h.last_duration, h.last_minutes,
                Counter(h.requests), Counter(h.failures), h.stats, dict(h.region_names),
            )
            return PollView(self.state.snapshot(), health)

    # -- one poll ----------------------------------------------------------

    def minutes_to_ask(self, now: float) -> int:
        """The first poll looks back far enough to find labs already running: the larger of the
        window and --skillable.max-running-minutes, capped at the API's 7 days. Later polls ask
        only for what changed since the last success (by the wall clock or, if that stepped
        back, the monotonic clock), plus the overlap."""
        last = self.health.last_success
        if last is None:
            return min(max(self.window_minutes, self.max_running_minutes), MAX_WINDOW_MINUTES)
        elapsed = now - last
        if self._time_at is not None:
            elapsed = max(elapsed, self._monotonic() - self._time_at[1])
        minutes = math.ceil(max(0.0, elapsed) / 60.0) + self.overlap_minutes
        return min(max(minutes, 1), MAX_WINDOW_MINUTES)

    def _horizon(self, now: float) -> float:
        """Events older than this are not counted (state.py, rule 8): the window on the first
        poll, then never later than the last success minus the overlap."""
        window_start = now - self.window_minutes * 60
        last = self.health.last_success
        if last is None:
            return window_start
        return min(window_start, last - self.overlap_minutes * 60)

    def _now(self) -> float:
        """The poll's time: the wall clock, but never further ahead of the previous poll's time
        than the monotonic clock has run (issue 10 item 4).

        A forward step of the wall clock would otherwise evict, at once, everything changed in
        the window (forgetting it), and the step back would lower the horizon below what was
        evicted (counting it again). A backward step is followed at once: it only keeps
        instances longer and asks for more. What the first poll or a restart reads is the
        wall clock; a forward correction of a slow clock is followed as the monotonic clock
        runs, not in one step (see docs/failure-modes.md).
        """
        wall, mono = self._clock(), self._monotonic()
        now = wall
        if self._time_at is not None:
            at, at_mono = self._time_at
            now = min(wall, at + max(0.0, mono - at_mono))
        offset, self._clock_offset = self._clock_offset, wall - now
        if self._clock_offset > offset + 1.0:
            log.warning("wall clock stepped ahead of the monotonic clock step_seconds=%.0f: polls are timed "
                        "by the monotonic clock while it stays ahead", self._clock_offset - offset)
        elif offset > 1.0 and self._clock_offset <= 1.0:
            log.info("wall clock back in step with the monotonic clock")
        self._time_at = (now, mono)
        return now

    def _poll(self, timeout: float) -> None:
        started = self._monotonic()
        deadline = started + timeout
        now = self._now()
        minutes = self.minutes_to_ask(now)
        try:
            body = self._call("LatestResults", {"minutes": minutes}, timeout)
            batch = decode_latest_results(body)
            del body  # the raw payload is not kept past decoding
            with self._lock:
                refused = self.state.apply(batch.results, self._horizon(now), seen_at=now)
                self.state.invalid_total += batch.invalid
                self.state.evict(now - self.window_minutes * 60, now - self.max_running_minutes * 60)
                self.health.up = True
                self.health.last_success = now
                self.health.last_minutes = minutes
        except Exception as exc:  # noqa: BLE001 - no answer, however odd, may fail the scrape
            self._record_failure("LatestResults", exc)
        else:
            self._record_success(minutes, len(batch.results), batch.invalid + refused)
        self._extras(deadline)
        with self._lock:
            self.health.last_duration = self._monotonic() - started

    def _extras(self, deadline: float) -> None:
        """The optional /stats and /deliveryregions calls, within what is left of the deadline."""
        if self.collect_stats and self._left(deadline) > 0.2:
            try:
                stats = decode_stats(self._call("stats", None, self._left(deadline)))
            except Exception as exc:  # noqa: BLE001
                self._count_failure("stats", exc)
                stats = None
            with self._lock:
                self.health.stats = stats
        if self.collect_region_names and self._region_names_due() and self._left(deadline) > 0.2:
            self._region_names_at = self._monotonic()
            try:
                names = decode_delivery_regions(self._call("deliveryregions", None, self._left(deadline)))
            except Exception as exc:  # noqa: BLE001
                self._count_failure("deliveryregions", exc)
            else:
                with self._lock:
                    self.health.region_names = names

    def _region_names_due(self) -> bool:
        at = self._region_names_at
        return at is None or self._monotonic() - at >= REGION_NAMES_REFRESH_SECONDS

    def _left(self, deadline: float) -> float:
        return deadline - self._monotonic()

    def _call(self, endpoint: str, params: dict[str, int] | None, timeout: float) -> bytes:
        with self._lock:
            self.health.requests[endpoint] += 1
        return self.client.get(endpoint, params, timeout)

    # -- failures ----------------------------------------------------------

    def _count_failure(self, endpoint: str, exc: Exception) -> str:
        reason = failure_reason(exc)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            # A Retry-After from any endpoint holds every poll of this account: the limit is the key's.
            self._not_before = max(self._not_before, self._monotonic() + min(retry_after, MAX_RETRY_AFTER_SECONDS))
        with self._lock:
            self.health.failures[(endpoint, reason)] += 1
        if reason == INTERNAL_ERROR:
            log.error("bug: unexpected error handling the %s answer", endpoint, exc_info=exc)
        return reason

    def _record_failure(self, endpoint: str, exc: Exception) -> None:
        reason = self._count_failure(endpoint, exc)
        with self._lock:
            self.health.up = False
        self._failures_in_row += 1
        delay = min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (self._failures_in_row - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter, so HA pairs do not retry in step
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
        self._not_before = self._monotonic() + delay
        message = self.client.redact(str(exc))
        if reason == self._failing_reason:
            # The same failure again: the first one was logged; a flood of them helps no one.
            log.debug("poll failed again endpoint=%s reason=%s failures_in_row=%d retry_in=%.1fs error=%s",
                      endpoint, reason, self._failures_in_row, delay, message)
            return
        self._failing_reason = reason
        if reason == UNAUTHORIZED:
            log.error("API key refused endpoint=%s: check SKILLABLE_API_KEY or the key file; "
                      "logged once until a poll succeeds error=%s", endpoint, message)
        else:
            log.warning("poll failed endpoint=%s reason=%s retry_in=%.1fs error=%s "
                        "(repeats of this reason are logged at debug level until a poll succeeds)",
                        endpoint, reason, delay, message)

    def _record_success(self, minutes: int, results: int, invalid: int) -> None:
        if self._failures_in_row:
            log.info("poll recovered failed_polls=%d minutes=%d", self._failures_in_row, minutes)
        self._failures_in_row = 0
        self._failing_reason = None
        if invalid:
            log.warning("skipped invalid results count=%d", invalid)
        log.debug("poll ok minutes=%d results=%d", minutes, results)


def failure_reason(exc: Exception) -> str:
    """The bounded `reason` label for a failed request."""
    if isinstance(exc, ApiError):
        return exc.reason
    if isinstance(exc, UpstreamError):
        return UNAUTHORIZED if _KEY_ERROR.search(str(exc)) else API_ERROR
    if isinstance(exc, NotJsonError):
        return NOT_JSON
    if isinstance(exc, DecodeError):
        return INVALID_RESPONSE
    return INTERNAL_ERROR
