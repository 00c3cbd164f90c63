"""The metrics, built from the pollers' state: one list of parts serves both collect() and the exposition.

collect() never calls the API: the HTTP handler refreshes the pollers first,
then renders. So registering this collector, or serving /healthz, costs no
upstream request.

`parts()` is the one path from the state to what is exposed: the lab families as
Rows (keys and values straight from the snapshots, see render.py), the health and
name families as prometheus_client families. collect() turns the parts into
families; exposition() gives them to a LineEncoder and keeps the body (and its gzip)
until a poll changes what it shows.
"""

from __future__ import annotations

import platform
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from .account import AccountView, PollView
from .catalog import AccountProfiles, catalog_families
from .config import Names
from .render import Encoding, LineEncoder, Part, Rows, as_metric
from .state import Histogram, Snapshot, Summary
from .version import build_info

PLACE = ["datacenter_id", "delivery_region_id", "lab_host_id"]
REGION = ["datacenter_id", "delivery_region_id"]
PROFILE = ["lab_profile_id"]
GZIP_LEVEL = 1  # a 10x smaller exposition for about 1 ms per 100 kB
EOF_LINE = b"# EOF\n"  # how an OpenMetrics exposition ends
SHARED_POLL_NOTE = (
    " Values come from the most recent poll, which concurrent scrapes share and"
    " which is reused for --skillable.min-poll-interval seconds."
)
Views = list[tuple[str, PollView]]


@dataclass(slots=True)
class _Rendered:
    """One cached exposition: what it was rendered from, the body, and once asked for, its gzip
    without the closing `# EOF` together with the compressor's state after it (see gzipped())."""

    inputs: list[tuple[Snapshot, str]]
    body: bytes
    gzip_head: tuple[bytes, Any] | None = None


class SkillableCollector(Collector):
    def __init__(
        self, accounts: Sequence[tuple[str, AccountView]], names: Names, window_minutes: int | None,
        max_lab_profiles: int = 500, max_active_labs: Mapping[str, int] | None = None,
    ) -> None:
        """`window_minutes`: the window every account in `accounts` has, named in the HELP texts;
        None when they differ (each account's is in skillable_lookback_window_seconds).
        `max_active_labs`: the active-lab limit of the accounts whose limit is configured."""
        self._accounts = list(accounts)
        self._max_active_labs = dict(max_active_labs or {})
        self._max_lab_profiles = max_lab_profiles
        self._names = names
        self._window_minutes = window_minutes
        # The account label appears only when several accounts are configured,
        # so the single-account case keeps the simple label set.
        self._account_label = len(self._accounts) > 1
        # The exposition cache, by encoding (a closed set: render.choose_encoding), see exposition().
        self._lock = threading.Lock()
        self._rendered: dict[Encoding, _Rendered] = {}
        self._line_encoders: dict[Encoding, LineEncoder] = {}

    def describe(self) -> Iterable[Metric]:
        # Describing must not poll: an empty list keeps the registry from calling collect().
        return []

    def collect(self) -> Iterator[Metric]:
        return map(as_metric, self.parts(self._views()))

    def parts(self, views: Views) -> list[Part]:
        """Everything exposed, in order: lab families, exporter health, names for ids."""
        return [*self._lab_parts(views), *self._health_metrics(views), *self._info_metrics(views)]

    def _views(self) -> Views:
        return [(name, poller.view()) for name, poller in self._accounts]

    def lab_parts(self) -> list[Rows]:
        """Only the lab families (per place and per lab profile; no exporter health, no names), as Rows:
        what `backfill` writes for each step of history, built by the same code a scrape uses."""
        return list(self._lab_parts(self._views()))

    # -- the exposition cache ----------------------------------------------

    def exposition(self, encoding: Encoding) -> bytes:
        """What `encoding.encoder(registry)` would give, rendered again only when a poll changed something.

        Rendering is most of a scrape that does not poll (min-poll-interval, scrapes
        sharing one poll). A poller's snapshot is the same object until its state
        changes, and the health is compared by value, so a cached body is reused
        exactly while every input of parts() is unchanged. One render at a time:
        concurrent scrapes after a poll wait for the first one and reuse its body.
        Bodies are kept by the encoding chosen, one each: Accept headers cannot add
        entries (issue 10, item 7), and encodings that write the same bytes share one
        body and its gzip. A LineEncoder writes them (see render.py).
        """
        with self._lock:
            views = self._views()
            inputs = [(view.snapshot, repr(view.health)) for _, view in views]
            cached = self._rendered.get(encoding)
            if cached is not None and _same_inputs(cached.inputs, inputs):
                return cached.body
            line_encoder = self._line_encoders.get(encoding)
            if line_encoder is None:
                line_encoder = self._line_encoders[encoding] = LineEncoder(encoding.encoder)
            body = line_encoder(self.parts(views))
            for other in self._rendered.values():
                # Encodings can write the same bytes (OpenMetrics 1.0.0 and 2.0.0; allow-utf-8 and underscores
                # escaping, for legacy names): keep one copy.
                if other.body == body and _same_inputs(other.inputs, inputs):
                    body = other.body
                    break
            self._rendered[encoding] = _Rendered(inputs, body)
            return body

    def gzipped(self, body: bytes, tail: bytes | None = None) -> tuple[bytes, bytes] | None:
        """One gzip stream of `body`, if it is a cached exposition, in two pieces; else None.

        With `tail` (the runtime metrics, which bring their own OpenMetrics `# EOF`), the stream is
        the body without its `# EOF`, then the tail. The body's part is compressed once and kept
        with the compressor's state after it, so a scrape that reuses the exposition compresses
        only what follows it.
        """
        with self._lock:
            rendered = next((r for r in self._rendered.values() if r.body is body), None)
            if rendered is None:
                return None
            if rendered.gzip_head is None:
                rendered.gzip_head = gzip_head(body)
            head, compressor = rendered.gzip_head
            rest = compressor.copy()
        return head, rest.compress(eof_of(body) if tail is None else tail) + rest.flush()

    # -- helpers -----------------------------------------------------------

    def _labels(self, names: list[str]) -> list[str]:
        return (["account"] + names) if self._account_label else names

    def _values(self, account: str, values: Sequence[str]) -> list[str]:
        return ([account, *values]) if self._account_label else list(values)

    def _rows(self, spec: LabFamily, views: Views) -> Rows:
        """The rows of one lab family over every account, in account order."""
        family = spec.kind(spec.name, spec.help, labels=self._labels(spec.labels))
        label_names = self._labels(spec.labels) + (["le"] if spec.kind is HistogramMetricFamily else [])
        base = family.name  # a counter's without _total
        own_name = base + ("_total" if family.type == "counter" else "")
        name = spec.sample

        if self._account_label:
            keys: list[Any] = []
            values: list[Any] = []
            for account, view in views:
                some_keys, some_values = spec.rows(view.snapshot)
                keys += [(account, key) for key in some_keys]
                values += some_values

            def sample(key: Hashable) -> tuple[str, dict[str, str]]:
                account, inner = key  # type: ignore[misc]
                suffix, label_values = name(inner)
                return base + suffix if suffix else own_name, dict(zip(label_names, (account, *label_values)))
        else:
            keys, values = spec.rows(views[0][1].snapshot) if views else ([], [])

            def sample(key: Hashable) -> tuple[str, dict[str, str]]:
                suffix, label_values = name(key)
                return base + suffix if suffix else own_name, dict(zip(label_names, label_values))

        return Rows(family, keys, values, sample)

    # -- lab metrics -------------------------------------------------------

    def _lab_families(self) -> list[LabFamily]:
        """The lab metric families in the order they are exposed."""
        if self._window_minutes is None:
            window = "the account's lookback window (skillable_lookback_window_seconds)"
        else:
            window = f"the last {self._window_minutes} minutes (the lookback window)"
        return [
            LabFamily(
                GaugeMetricFamily, "skillable_lab_instances",
                f"Ended lab instances whose last state change was within {window}, by current completion"
                " status; running labs are in skillable_lab_instances_running only." + SHARED_POLL_NOTE,
                PLACE + ["completion_status"], _table("instances"), _per_status_sample,
            ),
            LabFamily(
                GaugeMetricFamily, "skillable_lab_instances_running",
                "Lab instances started and not ended, however long ago they started (a lab saved for later"
                " has no End either), up to --skillable.max-running-minutes." + SHARED_POLL_NOTE,
                PLACE, _table("running"), _plain_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_lab_instances_started_total",
                "Lab instances seen starting, each counted once however many polls return it.",
                PLACE, _table("started"), _plain_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_lab_instances_ended_total",
                "Lab instances seen ending, counted once under the completion status they ended with.",
                PLACE + ["completion_status"], _table("ended"), _per_status_sample,
            ),
            LabFamily(
                HistogramMetricFamily, "skillable_lab_run_time_seconds",
                "Total run time of ended lab instances, observed once per instance.",
                REGION, _histogram_table("run_time"), _histogram_sample,
            ),
            LabFamily(
                HistogramMetricFamily, "skillable_lab_task_completion_ratio",
                "Share of integrated tasks completed (0-1) in ended lab instances.",
                REGION, _histogram_table("task_completion"), _histogram_sample,
            ),
            LabFamily(
                HistogramMetricFamily, "skillable_exam_score_ratio",
                "Exam score divided by the maximum possible score (0-1), observed once per scored exam.",
                REGION, _histogram_table("exam_score"), _histogram_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_exams_total",
                "Scored exams, counted once when their score first appears.",
                PLACE, _table("exams"), _plain_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_exams_passed_total", "Scored exams that the learner passed.",
                PLACE, _table("exams_passed"), _plain_sample,
            ),
        ]

    def _profile_families(self) -> list[LabFamily]:
        """The lab-profile families (issue 11): labelled by lab_profile_id alone, never with the place labels,
        counted by the same rules as the per-place ones; summaries without quantiles (_count, _sum)."""
        return [
            LabFamily(
                CounterMetricFamily, "skillable_lab_profile_instances_started_total",
                "Lab instances seen starting, by lab profile, each counted once however many polls return it.",
                PROFILE, _table("profile_started"), _profile_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_lab_profile_instances_ended_total",
                "Lab instances seen ending, by lab profile, counted once under the completion status they ended"
                " with. Every status exists at 0 from the profile's first activity.",
                PROFILE + ["completion_status"], _table("profile_ended"), _plain_sample,
            ),
            LabFamily(
                GaugeMetricFamily, "skillable_lab_profile_instances_running",
                "Lab instances started and not ended, by lab profile." + SHARED_POLL_NOTE,
                PROFILE, _table("profile_running"), _profile_sample,
            ),
            LabFamily(
                SummaryMetricFamily, "skillable_lab_profile_run_time_seconds",
                "Total run time of ended lab instances, by lab profile, observed once per instance.",
                PROFILE, _summary_table("profile_run_time"), _summary_sample,
            ),
            LabFamily(
                SummaryMetricFamily, "skillable_lab_profile_task_completion_ratio",
                "Share of integrated tasks completed (0-1) in ended lab instances, by lab profile.",
                PROFILE, _summary_table("profile_task_completion"), _summary_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_lab_profile_exams_total",
                "Scored exams, by lab profile, counted once when their score first appears.",
                PROFILE, _table("profile_exams"), _profile_sample,
            ),
            LabFamily(
                CounterMetricFamily, "skillable_lab_profile_exams_passed_total",
                "Scored exams that the learner passed, by lab profile.",
                PROFILE, _table("profile_exams_passed"), _profile_sample,
            ),
            LabFamily(
                SummaryMetricFamily, "skillable_lab_profile_exam_score_ratio",
                "Exam score divided by the maximum possible score (0-1), by lab profile, observed once per scored"
                " exam.",
                PROFILE, _summary_table("profile_exam_score"), _summary_sample,
            ),
        ]

    def _lab_parts(self, views: Views) -> Iterator[Rows]:
        return (self._rows(spec, views) for spec in [*self._lab_families(), *self._profile_families()])

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
        profile_overflow = CounterMetricFamily(
            "skillable_lab_profile_overflow_total",
            "Lab instances whose profile was reported as lab_profile_id=\"other\" because of"
            " --skillable.max-lab-profiles.",
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
            profile_overflow.add_metric(labels, view.snapshot.profile_overflow_total)
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
        limit = GaugeMetricFamily(
            "skillable_account_max_active_labs",
            "The account's limit of active labs (Skillable's Max Active Lab Instances), from the exporter's "
            "configuration (the API does not report it); absent when not configured.", labels=no_labels,
        )
        for account, _ in self._accounts:
            if account in self._max_active_labs:
                limit.add_metric(self._values(account, []), self._max_active_labs[account])
        build = GaugeMetricFamily(
            "skillable_exporter_build_info", "Version of skillable-exporter, always 1.",
            labels=["version", "revision", "python_version"],
        )
        info = build_info()
        build.add_metric([info.version, info.revision, platform.python_version()], 1)
        yield from (up, last_success, duration, minutes, requests, failures, invalid, overflow, profile_overflow)
        yield from (expired, tracked)
        yield from (active, saved, limit, window, build)

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
        profiles = [AccountProfiles(a, v.health.catalog, v.snapshot.profiles) for a, v in views]
        yield from catalog_families(profiles, self._names, self._max_lab_profiles, self._account_label)


# -- the rows of one account's lab table: keys and values from its snapshot, and what a key names --

KeysValues = tuple[list[Any], list[Any]]


@dataclass(frozen=True, slots=True)
class LabFamily:
    """One lab family and where its rows come from.

    `rows(snapshot)` gives one account's keys and values; `sample(key)` the key's sample name
    suffix ("" for the family's own sample name) and label values in `labels` order (a bucket's
    `le` last).
    """

    kind: type[Metric]
    name: str
    help: str
    labels: list[str]
    rows: Callable[[Snapshot], KeysValues]
    sample: Callable[[Any], tuple[str, tuple[str, ...]]]


def _table(table: str) -> Callable[[Snapshot], KeysValues]:
    """A per-place table of the snapshot. It holds every place (in `places` order) and, in the per-status
    tables, every status of a place in ALL_STATUSES order: its own key order is the exposition's."""
    def rows(snapshot: Snapshot) -> KeysValues:
        counts = getattr(snapshot, table)
        return list(counts), list(counts.values())
    return rows


def _plain_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    return "", key


def _per_status_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    place, status = key
    return "", (*place, status)


def _profile_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    return "", (key,)


def _summary_table(table: str) -> Callable[[Snapshot], KeysValues]:
    """Per profile: _count, then _sum."""
    def rows(snapshot: Snapshot) -> KeysValues:
        keys: list[Any] = []
        values: list[Any] = []
        summary: Summary
        for profile, summary in getattr(snapshot, table).items():
            keys += [(profile, "_count"), (profile, "_sum")]
            values += [summary.count, summary.total]
        return keys, values
    return rows


def _summary_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    profile, suffix = key
    return suffix, (profile,)


def _histogram_table(table: str) -> Callable[[Snapshot], KeysValues]:
    """Per region: a key and value per bucket (cumulative, le ending in +Inf), then _count and _sum."""
    def rows(snapshot: Snapshot) -> KeysValues:
        keys: list[Any] = []
        values: list[Any] = []
        hist: Histogram
        for region, hist in getattr(snapshot, table).items():
            buckets = hist.cumulative()
            keys += [(region, le) for le, _ in buckets]
            values += [count for _, count in buckets]
            keys += [(region, "_count"), (region, "_sum")]
            values += [buckets[-1][1], hist.total]
        return keys, values
    return rows


def _histogram_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    region, le = key
    if le in ("_count", "_sum"):
        return le, region
    return "_bucket", (*region, le)


def shared_window(accounts: Iterable[AccountView]) -> int | None:
    """The lookback window every one of `accounts` has, which the HELP texts name; None if they differ."""
    windows = {account.window_minutes for account in accounts}
    return windows.pop() if len(windows) == 1 else None


def without_eof(body: bytes) -> memoryview:
    """The exposition minus OpenMetrics' closing `# EOF` (what follows it brings its own)."""
    return memoryview(body)[: len(body) - len(eof_of(body))]


def eof_of(body: bytes) -> bytes:
    return EOF_LINE if body.endswith(EOF_LINE) else b""


def gzip_head(body: bytes) -> tuple[bytes, Any]:
    """The gzip of `body` without its `# EOF`, and the compressor's state after it."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # 16+: a gzip header
    return compressor.compress(without_eof(body)), compressor


def _same_inputs(old: list[tuple[Snapshot, str]], new: list[tuple[Snapshot, str]]) -> bool:
    return len(old) == len(new) and all(o[0] is n[0] and o[1] == n[1] for o, n in zip(old, new))


def _id_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


