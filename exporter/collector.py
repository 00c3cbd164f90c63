"""Builds fresh metric families from the pollers' state on every scrape.

collect() never calls the API: the HTTP handler refreshes the pollers first,
then renders the registry. So registering this collector, or serving /healthz,
costs no upstream request.
"""

from __future__ import annotations

import copy
import platform
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from . import __version__
from .config import Names
from .model import ALL_STATUSES
from .poller import PollView, Poller
from .render import LineEncoder, Rows
from .state import Snapshot

PLACE = ["datacenter_id", "delivery_region_id", "lab_host_id"]
REGION = ["datacenter_id", "delivery_region_id"]
PER_STATUS_TABLES = ("instances", "ended")  # families with a completion_status label
HISTOGRAM_TABLES = ("run_time", "task_completion", "exam_score")
RENDERED_KEPT = 4  # expositions cached at once, one per content type
SHARED_POLL_NOTE = (
    " Values come from the most recent poll, which concurrent scrapes share and"
    " which is reused for --skillable.min-poll-interval seconds."
)


class SkillableCollector(Collector):
    def __init__(self, accounts: Sequence[tuple[str, Poller]], names: Names, window_minutes: int) -> None:
        self._accounts = list(accounts)
        self._names = names
        self._window_minutes = window_minutes
        # The account label appears only when several accounts are configured,
        # so the single-account case keeps the simple label set.
        self._account_label = len(self._accounts) > 1
        # The last exposition per encoder, with what it was rendered from (see exposition()).
        self._render_lock = threading.Lock()
        self._rendered: dict[str, tuple[list[tuple[Snapshot, str]], bytes]] = {}
        self._line_encoders: dict[str, LineEncoder] = {}

    def describe(self) -> Iterable[Metric]:
        # Describing must not poll: an empty list keeps the registry from calling collect().
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._families([(name, poller.view()) for name, poller in self._accounts])

    def lab_metrics(self) -> Iterator[Metric]:
        """Only the lab metric families (no exporter health, no names): what `backfill` writes
        for each step of history, built by the same code a scrape uses."""
        yield from self._lab_metrics([(name, poller.view()) for name, poller in self._accounts])

    def exposition(self, encoder: Callable[[Any], bytes], content_type: str) -> bytes:
        """What `encoder(registry)` would give, rendered again only when a poll changed something.

        Rendering is most of a scrape that does not poll (min-poll-interval, scrapes
        sharing one poll). A poller's snapshot is the same object until its state
        changes, and the health is compared by value, so a cached body is reused
        exactly while every input of collect() is unchanged. One render at a time:
        concurrent scrapes after a poll wait for the first one and reuse its body.
        Bodies are kept by content type (which names the encoding), a few at most,
        and written by a LineEncoder, which gives the encoder's bytes (see render.py).
        """
        with self._render_lock:
            views = [(name, poller.view()) for name, poller in self._accounts]
            key = [(view.snapshot, repr(view.health)) for _, view in views]
            cached = self._rendered.get(content_type)
            if cached is not None and _same_inputs(cached[0], key):
                return cached[1]
            if content_type not in self._rendered and len(self._rendered) >= RENDERED_KEPT:
                # The Accept header picks the key: keep it bounded.
                self._rendered.clear()
                self._line_encoders.clear()
            line_encoder = self._line_encoders.get(content_type)
            if line_encoder is None:
                line_encoder = self._line_encoders[content_type] = LineEncoder(encoder)
            body = line_encoder(list(self._parts(views)))
            self._rendered[content_type] = (key, body)
            return body

    def _families(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        yield from self._lab_metrics(views)
        yield from self._health_metrics(views)
        yield from self._info_metrics(views)

    def _parts(self, views: list[tuple[str, PollView]]) -> Iterator[Metric | Rows]:
        yield from self._lab_parts(views)
        yield from self._health_metrics(views)
        yield from self._info_metrics(views)

    # -- helpers -----------------------------------------------------------

    def _labels(self, names: list[str]) -> list[str]:
        return (["account"] + names) if self._account_label else names

    def _values(self, account: str, values: Sequence[str]) -> list[str]:
        return ([account, *values]) if self._account_label else list(values)

    # -- lab metrics -------------------------------------------------------

    def _lab_families(self) -> dict[str, Metric]:
        """The lab metric families, empty, in the order they are exposed."""
        window = f"the last {self._window_minutes} minutes (the lookback window)"
        return {
            "instances": GaugeMetricFamily(
                "skillable_lab_instances",
                f"Ended lab instances whose last state change was within {window}, by current completion"
                " status; running labs are in skillable_lab_instances_running only." + SHARED_POLL_NOTE,
                labels=self._labels(PLACE + ["completion_status"]),
            ),
            "running": GaugeMetricFamily(
                "skillable_lab_instances_running",
                "Lab instances started and not ended, however long ago they started (a lab saved for later"
                " has no End either), up to --skillable.max-running-minutes." + SHARED_POLL_NOTE,
                labels=self._labels(PLACE),
            ),
            "started": CounterMetricFamily(
                "skillable_lab_instances_started_total",
                "Lab instances seen starting, each counted once however many polls return it.",
                labels=self._labels(PLACE),
            ),
            "ended": CounterMetricFamily(
                "skillable_lab_instances_ended_total",
                "Lab instances seen ending, counted once under the completion status they ended with.",
                labels=self._labels(PLACE + ["completion_status"]),
            ),
            "run_time": HistogramMetricFamily(
                "skillable_lab_run_time_seconds",
                "Total run time of ended lab instances, observed once per instance.",
                labels=self._labels(REGION),
            ),
            "task_completion": HistogramMetricFamily(
                "skillable_lab_task_completion_ratio",
                "Share of integrated tasks completed (0-1) in ended lab instances.",
                labels=self._labels(REGION),
            ),
            "exam_score": HistogramMetricFamily(
                "skillable_exam_score_ratio",
                "Exam score divided by the maximum possible score (0-1), observed once per scored exam.",
                labels=self._labels(REGION),
            ),
            "exams": CounterMetricFamily(
                "skillable_exams_total", "Scored exams, counted once when their score first appears.",
                labels=self._labels(PLACE),
            ),
            "exams_passed": CounterMetricFamily(
                "skillable_exams_passed_total", "Scored exams that the learner passed.",
                labels=self._labels(PLACE),
            ),
        }

    def _lab_metrics(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        for table, family in self._lab_families().items():
            if table in HISTOGRAM_TABLES:
                self._fill_histograms(family, views, table)
            else:
                self._place_rows(views, table, table in PER_STATUS_TABLES, family)
            yield family

    def _lab_parts(self, views: list[tuple[str, PollView]]) -> Iterator[Metric | Rows]:
        """What _lab_metrics yields, for the renderer: the per-place families as Rows (keys and
        values straight from the snapshots, no Sample objects), the histograms as families."""
        for table, family in self._lab_families().items():
            if table in HISTOGRAM_TABLES:
                self._fill_histograms(family, views, table)
                yield family
                continue
            per_status = table in PER_STATUS_TABLES
            keys, values = self._place_rows(views, table, per_status)

            def make(family: Metric = family, table: str = table, per_status: bool = per_status) -> Metric:
                filled = copy.copy(family)
                filled.samples = []
                self._place_rows(views, table, per_status, filled)
                return filled

            yield Rows(family, keys, values, make)

    def _fill_histograms(self, family: Metric, views: list[tuple[str, PollView]], table: str) -> None:
        for account, view in views:
            for region, hist in getattr(view.snapshot, table).items():
                family.add_metric(self._values(account, region), hist.cumulative(), hist.total)

    def _place_rows(
        self, views: list[tuple[str, PollView]], table: str, per_status: bool, family: Metric | None = None
    ) -> tuple[list[Any], list[float]]:
        """Keys (unique in the family) and values of one per-place family, in _lab_metrics' order;
        with `family`, also its samples, the way _lab_metrics adds them."""
        keys: list[Any] = []
        values: list[float] = []
        single = not self._account_label
        for account, view in views:
            counts = getattr(view.snapshot, table)
            for place in view.snapshot.places:
                if per_status:
                    for status in ALL_STATUSES:
                        key = (place, status)
                        value = counts[key]
                        keys.append(key if single else (account, key))
                        values.append(value)
                        if family is not None:
                            family.add_metric(self._values(account, (*place, status)), value)
                else:
                    value = counts[place]
                    keys.append(place if single else (account, place))
                    values.append(value)
                    if family is not None:
                        family.add_metric(self._values(account, place), value)
        return keys, values

    # -- exporter health ---------------------------------------------------

    def _health_metrics(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        no_labels = self._labels([])
        up = GaugeMetricFamily(
            "skillable_up", "1 if the last LatestResults poll succeeded, else 0." + SHARED_POLL_NOTE,
            labels=no_labels,
        )
        last_success = GaugeMetricFamily(
            "skillable_last_success_timestamp_seconds",
            "Unix time at which the last successful LatestResults poll was made.", labels=no_labels,
        )
        duration = GaugeMetricFamily(
            "skillable_poll_duration_seconds", "Seconds the last poll of the Skillable API took.",
            labels=no_labels,
        )
        minutes = GaugeMetricFamily(
            "skillable_poll_lookback_seconds", "How far back the last successful LatestResults poll asked (its minutes parameter, in seconds).",
            labels=no_labels,
        )
        requests = CounterMetricFamily(
            "skillable_api_requests_total", "Requests made to the Skillable API.",
            labels=self._labels(["endpoint"]),
        )
        failures = CounterMetricFamily(
            "skillable_api_request_failures_total", "Failed requests to the Skillable API, by reason.",
            labels=self._labels(["endpoint", "reason"]),
        )
        invalid = CounterMetricFamily(
            "skillable_results_invalid_total", "Results that failed validation and were skipped.",
            labels=no_labels,
        )
        overflow = CounterMetricFamily(
            "skillable_lab_host_overflow_total",
            "Lab instances whose host was reported as lab_host_id=\"other\" because of the host limit.",
            labels=no_labels,
        )
        expired = CounterMetricFamily(
            "skillable_lab_instances_expired_total",
            "Running lab instances dropped with no End after --skillable.max-running-minutes.",
            labels=no_labels,
        )
        tracked = GaugeMetricFamily(
            "skillable_tracked_instances", "Lab instances held in the exporter's memory.", labels=no_labels,
        )
        active = GaugeMetricFamily(
            "skillable_account_active_labs",
            "Labs active right now account-wide (starting, running, saving, tearing down), from /stats."
            + SHARED_POLL_NOTE,
            labels=no_labels,
        )
        saved = GaugeMetricFamily(
            "skillable_account_saved_labs", "Labs saved right now account-wide, from /stats." + SHARED_POLL_NOTE,
            labels=no_labels,
        )
        for account, view in views:
            h, labels = view.health, self._values(account, [])
            up.add_metric(labels, 1.0 if h.up else 0.0)
            if h.last_success is not None:
                last_success.add_metric(labels, h.last_success)
            if h.last_duration is not None:
                duration.add_metric(labels, h.last_duration)
            if h.last_minutes is not None:
                minutes.add_metric(labels, h.last_minutes * 60)
            for endpoint, count in sorted(h.requests.items()):
                requests.add_metric(self._values(account, [endpoint]), count)
            for (endpoint, reason), count in sorted(h.failures.items()):
                failures.add_metric(self._values(account, [endpoint, reason]), count)
            invalid.add_metric(labels, view.snapshot.invalid_total)
            overflow.add_metric(labels, view.snapshot.host_overflow_total)
            expired.add_metric(labels, view.snapshot.expired_total)
            tracked.add_metric(labels, view.snapshot.tracked)
            if h.stats is not None and h.stats.active is not None:
                active.add_metric(labels, h.stats.active)
            if h.stats is not None and h.stats.saved is not None:
                saved.add_metric(labels, h.stats.saved)
        window = GaugeMetricFamily(
            "skillable_lookback_window_seconds", "The lookback window the lab gauges cover.", labels=no_labels,
        )
        for account, poller in self._accounts:  # each account may have its own window
            window.add_metric(self._values(account, []), poller.window_minutes * 60)
        build = GaugeMetricFamily(
            "skillable_exporter_build_info", "Version of skillable-exporter, always 1.",
            labels=["version", "python_version"],
        )
        build.add_metric([__version__, platform.python_version()], 1)
        yield from (up, last_success, duration, minutes, requests, failures, invalid, overflow, expired, tracked)
        yield from (active, saved, window, build)

    # -- names for ids -----------------------------------------------------

    def _info_metrics(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        regions: dict[str, str] = {}
        for _, view in views:
            regions.update({str(k): v for k, v in view.health.region_names.items()})
        regions.update(self._names.delivery_regions)  # the config file wins over the API
        for metric, label, names in (
            ("skillable_datacenter_info", "datacenter", self._names.datacenters),
            ("skillable_delivery_region_info", "delivery_region", regions),
            ("skillable_lab_host_info", "lab_host", self._names.lab_hosts),
        ):
            family = GaugeMetricFamily(
                metric, f"Name of a {label.replace('_', ' ')} id, always 1.",
                labels=[f"{label}_id", f"{label}_name"],
            )
            for key in sorted(names, key=_id_order):
                family.add_metric([key, names[key]], 1)
            yield family


def _same_inputs(old: list[tuple[Snapshot, str]], new: list[tuple[Snapshot, str]]) -> bool:
    return len(old) == len(new) and all(o[0] is n[0] and o[1] == n[1] for o, n in zip(old, new))


def _id_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


