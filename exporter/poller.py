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
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .client import ApiError, SkillableClient
from .config import MAX_WINDOW_MINUTES
from .model import AccountStats, DecodeError, UpstreamError, decode_delivery_regions, decode_latest_results, decode_stats
from .state import FleetState, Snapshot

log = logging.getLogger(__name__)

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
REGION_NAMES_REFRESH_SECONDS = 3600.0


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
        collect_stats: bool = False,
        collect_region_names: bool = False,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.window_minutes = window_minutes
        self.overlap_minutes = overlap_minutes
        self.min_interval = min_interval
        self.collect_stats = collect_stats
        self.collect_region_names = collect_region_names
        self.state = FleetState(max_lab_hosts)
        self.health = Health()
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._in_flight = False
        self._last_attempt: float | None = None
        self._not_before = 0.0  # monotonic time before which no poll is made (backoff, Retry-After)
        self._failures_in_row = 0
        self._unauthorized_logged = False
        self._region_names_at: float | None = None

    # -- scheduling --------------------------------------------------------

    def refresh(self, timeout: float) -> None:
        """Make sure a poll happened recently enough, waiting at most `timeout` seconds."""
        with self._lock:
            if self._in_flight:
                self._done.wait_for(lambda: not self._in_flight, timeout)
                return
            if not self._due():
                return
            self._in_flight = True
            self._last_attempt = self._monotonic()
        try:
            self._poll(timeout)
        finally:
            with self._lock:
                self._in_flight = False
                self._done.notify_all()

    def _due(self) -> bool:
        now = self._monotonic()
        if now < self._not_before:
            return False
        return self._last_attempt is None or now - self._last_attempt >= self.min_interval

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
        """The whole window on the first poll, then only what changed since the last success."""
        last = self.health.last_success
        if last is None:
            return self.window_minutes
        minutes = math.ceil(max(0.0, now - last) / 60.0) + self.overlap_minutes
        return min(max(minutes, 1), MAX_WINDOW_MINUTES)

    def _horizon(self, now: float) -> float:
        window_start = now - self.window_minutes * 60
        last = self.health.last_success
        if last is None:
            return window_start
        return min(window_start, last - self.overlap_minutes * 60)

    def _poll(self, timeout: float) -> None:
        started = self._monotonic()
        deadline = started + timeout
        now = self._clock()
        minutes = self.minutes_to_ask(now)
        try:
            body = self._call("LatestResults", {"minutes": minutes}, timeout)
            batch = decode_latest_results(body)
            del body  # the raw payload is not kept past decoding
        except (ApiError, DecodeError, UpstreamError) as exc:
            self._record_failure("LatestResults", exc)
        else:
            with self._lock:
                self.state.apply(batch.results, self._horizon(now))
                self.state.invalid_total += batch.invalid
                self.state.evict(now - self.window_minutes * 60)
                self.health.up = True
                self.health.last_success = now
                self.health.last_minutes = minutes
            self._failures_in_row = 0
            self._unauthorized_logged = False
            if batch.invalid:
                log.warning("skipped invalid results count=%d", batch.invalid)
            log.debug("poll ok minutes=%d results=%d", minutes, len(batch.results))
        self._extras(deadline)
        with self._lock:
            self.health.last_duration = self._monotonic() - started

    def _extras(self, deadline: float) -> None:
        """The optional /stats and /deliveryregions calls, within what is left of the deadline."""
        if self.collect_stats and self._left(deadline) > 0.2:
            try:
                stats = decode_stats(self._call("stats", None, self._left(deadline)))
            except (ApiError, DecodeError, UpstreamError) as exc:
                self._count_failure("stats", exc)
                stats = None
            with self._lock:
                self.health.stats = stats
        if self.collect_region_names and self._region_names_due() and self._left(deadline) > 0.2:
            self._region_names_at = self._monotonic()
            try:
                names = decode_delivery_regions(self._call("deliveryregions", None, self._left(deadline)))
            except (ApiError, DecodeError, UpstreamError) as exc:
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
        with self._lock:
            self.health.failures[(endpoint, reason)] += 1
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
            delay = max(delay, retry_after)
        self._not_before = self._monotonic() + delay
        if reason == "unauthorized":
            # A bad key fails every poll; say so once until it works again.
            if not self._unauthorized_logged:
                log.error("API key refused endpoint=%s: check SKILLABLE_API_KEY / the key file", endpoint)
                self._unauthorized_logged = True
            return
        log.warning("poll failed endpoint=%s reason=%s retry_in=%.1fs error=%s", endpoint, reason, delay, exc)


def failure_reason(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return exc.reason
    if isinstance(exc, UpstreamError):
        return "api_error"
    return "invalid_response"
