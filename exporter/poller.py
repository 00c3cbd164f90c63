"""Polling one Skillable account: incremental, single-flight, rate-limited, backing off on failure.

A scrape calls `refresh(timeout)`. At most one poll runs at a time; scrapes
that arrive while it runs wait for it and share its result. A poll asks only for
the minutes since the last successful poll (plus an overlap), so its cost follows
the number of changes, not the window.

With the launch collector on, a scrape also asks for a launch poll (/labinstance/search, the
questions of launches.py) when one is due: at most one every --skillable.launch-interval, after the
first good LatestResults poll, in a worker thread of its own, so its pages never delay a
LatestResults poll or a scrape (scrapes never wait for it: its counts show from the next scrape).
It has its own deadline (--skillable.launch-timeout), the same failure reasons and backoff, and
honours Retry-After; its failures never touch skillable_up.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TypeVar
from collections.abc import Callable, Mapping

from . import catalog, launches
from .account import AccountMemory, Health, PollView, apply_poll, empty_memory
from .client import SkillableClient
from .config import MAX_WINDOW_MINUTES
from .failures import (
    FAILURE_REASONS,
    INTERNAL_ERROR,
    MAX_RETRY_AFTER_SECONDS,
    UNAUTHORIZED,
    backoff_seconds,
    failure_reason,
    retry_after,
)
from .launches import LaunchSettings, LaunchState
from .model import SearchPage, decode_delivery_regions, decode_latest_results, decode_search_page, decode_stats

log = logging.getLogger(__name__)
T = TypeVar("T")

OVERDUE_GRACE_SECONDS = 1.0  # a poll this long past its deadline is stuck (only a hung DNS lookup can be)
REGION_NAMES_REFRESH_SECONDS = 3600.0
NAMES_RETRY_SECONDS = 300.0  # after a failed /deliveryregions or /catalog call, instead of the hour
MAX_LAUNCH_PAGES = 10_000  # pages of one launch question; beyond, it is left for the next poll


@dataclass(frozen=True)
class Failure:
    """An endpoint's current run of failures: since when, why (the reason label), the error."""

    since: float
    reason: str
    error: str


class Poller:
    def __init__(
        self,
        client: SkillableClient,
        window_minutes: int,
        overlap_minutes: int,
        min_interval: float,
        max_lab_hosts: int,
        timeout: float = 9.0,
        max_running_minutes: int = 1440,
        max_lab_profiles: int = 500,
        collect_stats: bool = False,
        collect_region_names: bool = False,
        collect_catalog: bool = False,
        max_catalog_bytes: int | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_poll: Callable[[Poller], None] | None = None,
        account: str = "",
        launch: LaunchSettings | None = None,
    ) -> None:
        """`launch`: the launch collector's settings, None to leave it off."""
        self.client = client
        self.account = account  # its name in log lines ("" for the single unnamed account)
        self.window_minutes = window_minutes
        self.overlap_minutes = overlap_minutes
        self.min_interval = min_interval
        self.timeout = timeout  # every poll's own deadline (--skillable.timeout), whatever a scrape asks
        self.collect_stats = collect_stats
        self.collect_region_names = collect_region_names
        self.collect_catalog = collect_catalog
        self.max_catalog_bytes = max_catalog_bytes
        self.max_running_minutes = max_running_minutes
        memory = empty_memory(max_lab_hosts, max_lab_profiles, max_running_minutes)
        self.state = memory.state
        self.health = memory.health
        self.launch_settings = launch
        self.launch: LaunchState | None = None if launch is None else LaunchState(
            max_lab_hosts, max_lab_profiles, launch.max_api_consumers, launch.grace_minutes * 60,
            max_running_minutes * 60)
        for endpoint in self.endpoints():
            self.health.requests[endpoint] = 0
            for reason in FAILURE_REASONS:
                self.health.failures[(endpoint, reason)] = 0
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._wake = threading.Condition(self._lock)  # the worker waits here for a poll to be asked
        self._polls_asked = 0
        self._polls_done = 0
        self._in_flight = False
        self._last_attempt: float | None = None
        self._not_before = 0.0  # monotonic time before which no poll is made (backoff, Retry-After)
        self._failures_in_row = 0
        self._poll_now = False  # a reload brought a new key or URL: the next scrape polls
        self._generation = 0  # counts those reloads: a poll's failures hold only the client it was made with
        self._poll_generation = 0  # the generation the running poll began in
        # Per endpoint, the failure run it is in (the first failure's time and reason), until
        # that endpoint answers again: logged once per run, shown on the landing page.
        self.failing: dict[str, Failure] = {}
        self._names_due_at: dict[str, float] = {}  # endpoint -> monotonic time its next fetch is due
        self._closed = False
        self._time_at: tuple[float, float] | None = None  # (poll time, monotonic) of the last poll; see _now()
        self._clock_offset = 0.0  # how far the wall clock was ahead of the poll time at the last poll
        self._wall = 0.0  # the wall clock as _now() last read it
        self._mono_at_success: float | None = None  # the monotonic clock at the last success
        self._result_in = False  # the poll in flight has its result in; only its after-poll hook runs
        self._result_at: float | None = None  # the monotonic clock when the last poll's result came in
        self._queued = False  # a poll was asked while the last one's after-poll hook ran: it runs next
        # Called by the polling thread after every poll, while it still holds the
        # single flight: no other poll changes the state meanwhile (persistence).
        self.on_poll = on_poll
        # The launch poll: asked by scrapes when due (_ask_launch), run by a worker of its own.
        self._launch_wake = threading.Condition(self._lock)
        self._launch_asked = False
        self._launch_due = 0.0  # monotonic time before which no launch poll is asked
        self._launch_failures_in_row = 0
        self.launch_polls = 0  # launch polls done, whatever their outcome (tests wait on it)
        self._launch_done = threading.Condition(self._lock)
        # Started here, at start-up, so a task limit reached later can never stop polling.
        threading.Thread(target=self._worker, name="poll", daemon=True).start()
        if self.launch is not None:
            threading.Thread(target=self._launch_worker, name="launch-poll", daemon=True).start()

    def reconfigure(self, client: SkillableClient | None, window_minutes: int, overlap_minutes: int,
                    min_interval: float, timeout: float, new_key_or_url: bool = False) -> None:
        """A config reload: a new client if given, a new window, intervals and poll deadline. The state,
        the counters and the health stay; a poll in flight ends with the old client.

        With `new_key_or_url`, what the API told the old key or URL no longer holds this account: its
        Retry-After hold and its backoff are lifted, and the next scrape polls (with the new client),
        whatever the minimum interval; a poll still in flight with the old client sets no new hold."""
        with self._lock:
            if client is not None:
                self.client = client
            if new_key_or_url:
                self._not_before = 0.0
                self._failures_in_row = 0
                self._poll_now = True
                self._generation += 1
            self.window_minutes = window_minutes
            self.overlap_minutes = overlap_minutes
            self.min_interval = min_interval
            self.timeout = timeout

    def endpoints(self) -> list[str]:
        """The API endpoints this poller calls."""
        return (["LatestResults"] + ["stats"] * self.collect_stats + ["deliveryregions"] * self.collect_region_names
                + [catalog.ENDPOINT] * self.collect_catalog + [launches.ENDPOINT] * (self.launch is not None))

    # -- scheduling --------------------------------------------------------
    #
    # Every poll runs in this poller's own worker thread, started with the poller and living as
    # long as it: starting a poll never needs a new thread, so a process at its task limit (a
    # container pids limit, systemd TasksMax) still polls. A scrape only asks the worker and
    # waits, at most its own deadline; the poll keeps the configured timeout whatever the scrape
    # sends, and a poll that outlives the scrape's wait lands for later scrapes.

    def request(self, arrived: float | None = None) -> int | None:
        """Ask for a poll if one is due. The number of the poll to wait for, or None if none is needed.

        At most one poll runs at a time: a request while one runs joins it. `arrived` is when the
        scrape asking came in (this poller's monotonic clock): if a poll's result came in since,
        that poll ran while the scrape was waiting to be read (or began after it came), and its
        answer is the scrape's, as if the scrape had joined it. So a burst of scrapes is one poll
        even when the poll keeps the exporter too busy to read them all before it ends.
        """
        with self._lock:
            self._ask_launch()
            if self._in_flight and (not self._result_in or self._queued):
                return self._polls_asked  # joins the poll that runs, or the one queued to run next
            if arrived is not None and self._result_at is not None and self._result_at >= arrived:
                return None
            if self._closed or not self._due():
                return None
            if self._in_flight:
                # The last poll's result came in before this scrape did; only its after-poll hook
                # still runs. Joining it would answer with a result older than the scrape: the
                # worker runs one more poll as soon as the hook is done.
                self._queued = True
                self._begin_poll()
                return self._polls_asked
            self._in_flight = True
            self._result_in = False
            self._begin_poll()
            self._wake.notify()
            return self._polls_asked

    def _begin_poll(self) -> None:
        """Number the poll asked and start its clock (under the lock)."""
        self._poll_now = False
        self._poll_generation = self._generation
        self._last_attempt = self._monotonic()
        self._polls_asked += 1

    def wait(self, poll: int, timeout: float) -> bool:
        """Wait up to `timeout` s for the result of poll number `poll`. True if it is in."""
        with self._lock:
            # Waiting ends when the poll's result is in, not when its after-poll hook is done.
            return self._done.wait_for(lambda: self._polls_done >= poll, timeout)

    def refresh(self, timeout: float, arrived: float | None = None) -> None:
        """Make sure a poll happened recently enough, waiting at most `timeout` seconds.

        A scrape never waits longer than `timeout`, even for what no deadline can interrupt
        (a DNS lookup that hangs): it then answers from the last poll.
        """
        poll = self.request(arrived)
        if poll is not None:
            self.wait(poll, timeout)

    def _worker(self) -> None:
        while True:
            with self._lock:
                self._wake.wait_for(lambda: self._closed or (self._in_flight and not self._result_in))
                if not (self._in_flight and not self._result_in):
                    return  # closed, nothing asked
            self._run_poll()

    def _run_poll(self) -> None:
        try:
            try:
                self._poll(self.timeout)
            except Exception:
                log.exception("bug: poll failed outside its own error handling")
            finally:
                with self._lock:
                    self._result_in = True
                    self._result_at = self._monotonic()
                    self._polls_done = self._polls_asked
                    self._done.notify_all()
                    self._ask_launch()  # the first good poll need not wait for the next scrape
            if self.on_poll is not None:
                try:
                    self.on_poll(self)  # still in flight: no other poll changes the state meanwhile
                except Exception:
                    log.exception("after-poll hook failed", extra=self._fields())
        finally:
            with self._lock:
                if self._queued and not self._closed:
                    self._queued = False  # still in flight: the worker's loop runs the queued poll
                    self._result_in = False
                    # It begins now: a reload since gives it its client, and a long save no deadline.
                    self._poll_generation = self._generation
                    self._last_attempt = self._monotonic()
                else:
                    self._queued = False
                    self._in_flight = False
                self._done.notify_all()

    def stop(self, timeout: float) -> bool:
        """No more polls; wait up to `timeout` s for one in flight. True if none is left running."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            self._launch_wake.notify()
            return self._done.wait_for(lambda: not self._in_flight, timeout)

    def _overdue(self) -> bool:
        """A poll is in flight past its own deadline (a hung lookup): the last result is stale."""
        started = self._last_attempt
        return self._in_flight and not self._result_in and started is not None and (
            self._monotonic() - started > self.timeout + OVERDUE_GRACE_SECONDS)

    def _due(self) -> bool:
        if self._poll_now:
            return True
        now = self._monotonic()
        if now < self._not_before:
            return False
        return self._last_attempt is None or now - self._last_attempt >= self.min_interval

    def restore(self, saved: AccountMemory) -> None:
        """Take a restored state and the poll health a state file keeps (its last success and
        counters), before the first poll (statefile.py)."""
        with self._lock:
            self.state = saved.state
            if self.launch is not None and saved.launch is not None:
                self.launch = saved.launch
            self.health.last_success = saved.health.last_success
            self.health.requests = saved.health.requests
            self.health.failures = saved.health.failures

    def view(self) -> PollView:
        with self._lock:
            h = self.health
            # skillable_up never claims a poll that has not happened: 1 only while the last poll
            # succeeded and no poll is stuck past its deadline.
            health = Health(
                h.up and not self._overdue(), h.last_success, h.last_duration, h.last_minutes,
                Counter(h.requests), Counter(h.failures), h.stats, dict(h.region_names), h.catalog,
                h.catalog_skipped,
            )
            return PollView(self.state.snapshot(), health, self.launch.snapshot() if self.launch is not None else None)

    # -- one poll ----------------------------------------------------------

    def minutes_to_ask(self, now: float) -> int:
        """The first poll looks back far enough to find labs already running: the larger of the
        window and --skillable.max-running-minutes, capped at the API's 7 days. Later polls ask
        only for what changed since the last success (by the wall clock or, if that stepped
        back, the monotonic clock), plus the overlap."""
        last = self.health.last_success
        if last is None:
            return min(max(self.window_minutes, self.max_running_minutes), MAX_WINDOW_MINUTES)
        # Asking for more never loses or double counts: whichever clock ran further (the wall
        # clock as it reads now, even stepped ahead; the monotonic clock, if the wall stepped back).
        elapsed = max(now, self._wall) - last
        if self._mono_at_success is not None:
            elapsed = max(elapsed, self._monotonic() - self._mono_at_success)
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
        than the monotonic clock has run (docs/failure-modes.md, hostile input 4).

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
        self._wall = wall
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
                invalid = apply_poll(self, batch.results, batch.invalid, now=now, horizon=self._horizon(now),
                                     window_minutes=self.window_minutes,
                                     max_running_minutes=self.max_running_minutes)
                self._mono_at_success = self._time_at[1] if self._time_at else None
                self.health.last_minutes = minutes
        except Exception as exc:  # noqa: BLE001 - no answer, however odd, may fail the scrape
            self._record_failure("LatestResults", exc)
        else:
            if batch.salvaged:
                log.warning("the answer was not valid JSON: text that JSON does not allow was replaced, records "
                            "that could not be read were skipped (and counted invalid)", extra=self._fields(
                                endpoint="LatestResults", count=batch.invalid))
            self._record_success(minutes, len(batch.results), invalid)
        self._extras(deadline)
        with self._lock:
            self.health.last_duration = self._monotonic() - started

    def _extras(self, deadline: float) -> None:
        """The optional /stats, /deliveryregions and /catalog calls, within what is left of the deadline."""
        if self.collect_stats and self._left(deadline) > 0.2:
            try:
                stats = decode_stats(self._call("stats", None, self._left(deadline)))
            except Exception as exc:  # noqa: BLE001
                self._count_failure("stats", exc)
                stats = None
            else:
                self._endpoint_recovered("stats")
            with self._lock:
                self.health.stats = stats
        if self.collect_region_names and self._names_due("deliveryregions", deadline):
            names = self._fetch_names("deliveryregions", None, decode_delivery_regions, deadline)
            if names is not None:
                with self._lock:
                    self.health.region_names = names
        if self.collect_catalog and self._names_due(catalog.ENDPOINT, deadline):
            found = self._fetch_names(catalog.ENDPOINT, catalog.PARAMS, catalog.decode_catalog, deadline,
                                      self.max_catalog_bytes)
            if found is not None:
                self._catalog_skipped(found)
                with self._lock:
                    self.health.catalog = found
                    self.health.catalog_skipped += found.skipped

    def _catalog_skipped(self, found: catalog.Catalog) -> None:
        """Log the catalog's skipped entries once: again only when a new catalog skips another number."""
        before = self.health.catalog.skipped if self.health.catalog is not None else 0
        if found.skipped and found.skipped != before:
            log.warning("catalog entries skipped: not an object or no usable Id; counted in "
                        "skillable_catalog_entries_skipped_total, logged again when their number changes",
                        extra=self._fields(endpoint=catalog.ENDPOINT, count=found.skipped,
                                           first=found.first_skipped))

    def _names_due(self, endpoint: str, deadline: float) -> bool:
        return self._monotonic() >= self._names_due_at.get(endpoint, 0.0) and self._left(deadline) > 0.2

    def _fetch_names(self, endpoint: str, params: dict[str, int] | None, decode: Callable[[bytes], T],
                     deadline: float, max_bytes: int | None = None) -> T | None:
        """One hourly names call (/deliveryregions, /catalog): the decoded answer, or None after
        counting the failure; a failed call is tried again sooner than the hour. Names never touch
        skillable_up, and the last good names are kept."""
        try:
            decoded = decode(self._call(endpoint, params, self._left(deadline), max_bytes))
        except Exception as exc:  # noqa: BLE001
            self._count_failure(endpoint, exc)
            self._names_due_at[endpoint] = self._monotonic() + NAMES_RETRY_SECONDS
            return None
        self._endpoint_recovered(endpoint)
        self._names_due_at[endpoint] = self._monotonic() + REGION_NAMES_REFRESH_SECONDS
        return decoded

    def _left(self, deadline: float) -> float:
        return deadline - self._monotonic()

    def _call(
        self, endpoint: str, params: Mapping[str, int | str] | None, timeout: float, max_bytes: int | None = None,
        path: str | None = None,
    ) -> bytes:
        with self._lock:
            self.health.requests[endpoint] += 1
        return self.client.get(path or endpoint, params, timeout, max_bytes)

    # -- failures ----------------------------------------------------------

    def _fields(self, **values: object) -> dict[str, object]:
        """Log fields (logs.py), with the account's name first when it has one."""
        return ({"account": self.account} if self.account else {}) | values

    def _count_failure(self, endpoint: str, exc: Exception, retry_in: float | None = None) -> str:
        """Count a failed request and log it once per failure run of its endpoint.

        The first failure of a run, or a failure for another reason than the run's, is a
        warning (an error for a refused key); repeats are debug lines, so a long outage logs
        one line, not one per scrape. The endpoint's next success logs the recovery.
        """
        reason = failure_reason(exc)
        asked = retry_after(exc)
        if asked is not None and self._current():
            # A Retry-After from any endpoint holds every poll of this account: the limit is the key's.
            self._not_before = max(self._not_before, self._monotonic() + min(asked, MAX_RETRY_AFTER_SECONDS))
        with self._lock:
            self.health.failures[(endpoint, reason)] += 1
        if reason == INTERNAL_ERROR:
            log.error("bug: unexpected error handling the answer", exc_info=exc,
                      extra=self._fields(endpoint=endpoint, reason=reason))
        message = self.client.redact(str(exc))
        previous = self.failing.get(endpoint)
        since = previous.since if previous is not None else self._clock()
        self.failing[endpoint] = Failure(since, reason, message)
        extra = self._fields(endpoint=endpoint, reason=reason)
        if retry_in is not None:
            extra["retry_in"] = f"{retry_in:.1f}s"
        extra["error"] = message
        if previous is not None and previous.reason == reason:
            # The same failure again: the first one was logged; a flood of them helps no one.
            log.debug("request failed again", extra=extra | {"failures_in_row": self._failures_in_row})
        elif reason == UNAUTHORIZED and endpoint == launches.ENDPOINT:
            # The key polls LatestResults: a refusal here is about this API consumer's rights.
            log.warning("lab instance search refused: the API consumer may not be allowed to search lab "
                        "instances (--no-collector.launch turns the launch collector off); logged once until "
                        "it answers", extra=extra)
        elif reason == UNAUTHORIZED:
            log.error("API key refused: check SKILLABLE_API_KEY or the key file; "
                      "logged once until the endpoint answers", extra=extra)
        elif reason != INTERNAL_ERROR:
            log.warning("request failed; repeats are logged at debug level until the endpoint answers",
                        extra=extra)
        return reason

    def _endpoint_recovered(self, endpoint: str) -> None:
        failure = self.failing.pop(endpoint, None)
        if failure is not None:
            log.info("request recovered", extra=self._fields(
                endpoint=endpoint, reason=failure.reason, failing_for=f"{self._clock() - failure.since:.0f}s"))

    def _current(self) -> bool:
        """The running poll uses the key and URL of the config now loaded (no reload changed them since)."""
        with self._lock:
            return self._poll_generation == self._generation

    def _record_failure(self, endpoint: str, exc: Exception) -> None:
        with self._lock:
            self.health.up = False
        delay = None
        if self._current():  # an old key's failure does not hold back the new one
            self._failures_in_row += 1
            delay = backoff_seconds(self._failures_in_row, retry_after(exc), jitter=random.uniform(0.5, 1.0))
            self._not_before = self._monotonic() + delay
        self._count_failure(endpoint, exc, retry_in=delay)

    def _record_success(self, minutes: int, results: int, invalid: int) -> None:
        self._endpoint_recovered("LatestResults")
        if self._failures_in_row:
            log.info("poll recovered", extra=self._fields(failed_polls=self._failures_in_row, minutes=minutes))
        self._failures_in_row = 0
        if invalid:
            log.warning("skipped invalid results", extra=self._fields(count=invalid))
        log.debug("poll ok", extra=self._fields(minutes=minutes, results=results))


    # -- the launch poll (launches.py) ---------------------------------------

    def _ask_launch(self) -> None:
        """Wake the launch worker if a launch poll is due: the collector is on, a LatestResults poll
        has succeeded (so the labs it tracks are known), none is asked or running, the interval (or
        the backoff) has passed and no Retry-After holds the account. Call holding the lock."""
        if (self.launch is None or self._closed or self._launch_asked or self.health.last_success is None
                or self._monotonic() < max(self._launch_due, self._not_before)):
            return
        self._launch_asked = True
        self._launch_wake.notify()

    def _launch_worker(self) -> None:
        while True:
            with self._lock:
                self._launch_wake.wait_for(lambda: self._closed or self._launch_asked)
                if self._closed:
                    return
            try:
                self._launch_poll()
            except Exception:  # the worker must outlive any bug in one launch poll
                log.exception("bug: launch poll failed outside its own error handling", extra=self._fields())
            finally:
                with self._lock:
                    self._launch_asked = False
                    self.launch_polls += 1
                    self._launch_done.notify_all()

    def wait_launch(self, polls: int, timeout: float) -> bool:
        """Wait up to `timeout` s until `polls` launch polls are done (tests, tools)."""
        with self._lock:
            return self._launch_done.wait_for(lambda: self.launch_polls >= polls, timeout)

    def _launch_now(self) -> float:
        """The wall clock, but never ahead of the last poll's time by more than the monotonic clock ran
        (as _now() times polls), so a step of the clock cannot move the launch bounds (they never go back)."""
        wall, mono = self._clock(), self._monotonic()
        with self._lock:
            at = self._time_at
        return wall if at is None else min(wall, at[0] + max(0.0, mono - at[1]))

    def _launch_poll(self) -> None:
        """One launch poll: question A, then question B (launches.py), page by page within the deadline.
        A failed request ends the poll: it is counted and the next one waits for the backoff."""
        launch, settings = self.launch, self.launch_settings
        assert launch is not None and settings is not None
        started = self._monotonic()
        deadline = started + settings.timeout
        plan = launch.plan(self._launch_now(), self.window_minutes * 60, self.overlap_minutes * 60, self.state,
                           self._lock)

        def fetch(params: dict[str, int | str]) -> SearchPage:
            body = self._call(launches.ENDPOINT, params, self._left(deadline), path=launches.PATH)
            page = decode_search_page(body)  # the raw page (credentials, e-mails) is not kept past this
            if page.invalid:
                log.warning("skipped invalid lab instance search records", extra=self._fields(count=page.invalid))
            return page

        def more(pages: int) -> bool:
            return not self._closed and self._left(deadline) > 0.2 and pages < MAX_LAUNCH_PAGES

        pages, done = 0, []
        try:
            for question in launches.questions(plan):
                asked, complete = launches.ask(launch, plan, question, fetch, settings.page_size, more)
                pages += asked
                done.append(complete)
                if not complete:
                    break
        except Exception as exc:  # noqa: BLE001 - no answer, however odd, may stop the worker
            self._launch_failures_in_row += 1
            delay = max(settings.interval, backoff_seconds(self._launch_failures_in_row, retry_after(exc),
                                                           jitter=random.uniform(0.5, 1.0)))
            with self._lock:
                self._launch_due = started + delay
            self._count_failure(launches.ENDPOINT, exc, retry_in=delay)
            return
        done += [False] * (2 - len(done))
        launch.finish(plan, done[0], done[1])
        self._endpoint_recovered(launches.ENDPOINT)
        self._launch_failures_in_row = 0
        with self._lock:
            self._launch_due = started + settings.interval
        log.debug("launch poll ok", extra=self._fields(
            pages=pages, launches_from=plan.launches_from, watched_from=plan.watched_from,
            ended_after=plan.ended_after, complete=all(done), watched=launch.watched))
