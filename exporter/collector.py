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
from functools import partial
from typing import Any, cast
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence

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
from .families import (
    KIND_LABEL,
    NAME_FAMILIES,
    STATUS_LABEL,
    Family,
    health_families,
    lab_families,
    launch_families,
    launch_health_families,
)
from .launches import LaunchCounts
from .state import DIMENSIONS, PROFILE, Dimension, Histogram, Snapshot, Summary
from .version import build_info

GZIP_LEVEL = 1  # a 10x smaller exposition for about 1 ms per 100 kB
EOF_LINE = b"# EOF\n"  # how an OpenMetrics exposition ends
Views = list[tuple[str, PollView]]


@dataclass(slots=True)
class _Rendered:
    """One cached exposition: what it was rendered from, the body, and once asked for, its gzip
    without the closing `# EOF` together with the compressor's state after it (see gzipped())."""

    inputs: list[tuple[Snapshot, LaunchCounts | None, str]]
    body: bytes
    gzip_head: tuple[bytes, Any] | None = None


class SkillableCollector(Collector):
    def __init__(
        self, accounts: Sequence[tuple[str, AccountView]], names: Names, window_minutes: int | None,
        max_lab_profiles: int = 500, dimensions: Sequence[Dimension] = DIMENSIONS,
        max_active_labs: Mapping[str, int] | None = None,
    ) -> None:
        """`window_minutes`: the window every account in `accounts` has, named in the HELP texts;
        None when they differ (each account's is in skillable_lookback_window_seconds). `dimensions`:
        those of the accounts' states (state.DIMENSIONS unless a test declares others).
        `max_active_labs`: the active-lab limit of the accounts whose limit is configured."""
        self._accounts = list(accounts)
        self._dimensions = tuple(dimensions)
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
        entries (docs/failure-modes.md, hostile input 7), and encodings that write the same bytes share one
        body and its gzip. A LineEncoder writes them (see render.py).
        """
        with self._lock:
            views = self._views()
            inputs = [(view.snapshot, view.launch, repr(view.health)) for _, view in views]
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
                some_keys, some_values = spec.rows(view)
                keys += [(account, key) for key in some_keys]
                values += some_values

            def sample(key: Hashable) -> tuple[str, dict[str, str]]:
                account, inner = cast(tuple[str, Hashable], key)
                suffix, label_values = name(inner)
                return base + suffix if suffix else own_name, dict(zip(label_names, (account, *label_values)))
        else:
            keys, values = spec.rows(views[0][1]) if views else ([], [])

            def sample(key: Hashable) -> tuple[str, dict[str, str]]:
                suffix, label_values = name(key)
                return base + suffix if suffix else own_name, dict(zip(label_names, label_values))

        return Rows(family, keys, values, sample)

    # -- lab metrics -------------------------------------------------------

    def _lab_families(self, launch: bool) -> list[LabFamily]:
        """The lab metric families in the order they are exposed, from the dimensions' declarations
        (families.lab_families): each reads its dimension's table of the snapshot; then, with `launch`
        (an account has the launch collector on), the launch families, read from the launch memory."""
        specs = [*lab_families(self._dimensions, self._window_minutes), *(launch_families() if launch else ())]
        return [LabFamily(KINDS[f.type], f.name, f.help, list(f.labels), *_table_rows(f)) for f in specs]

    def _lab_parts(self, views: Views) -> Iterator[Rows]:
        launch = any(view.launch is not None for _, view in views)
        return (self._rows(spec, views) for spec in self._lab_families(launch))

    # -- exporter health ---------------------------------------------------

    def _health_metrics(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        """The families of families.health_families, in its order."""
        made = {f.name: self._plain_family(f) for f in health_families(self._dimensions)}
        up, last_success = made["skillable_up"], made["skillable_last_success_timestamp_seconds"]
        duration, minutes = made["skillable_poll_duration_seconds"], made["skillable_poll_lookback_seconds"]
        requests, failures = made["skillable_api_requests_total"], made["skillable_api_request_failures_total"]
        invalid, expired = made["skillable_results_invalid_total"], made["skillable_lab_instances_expired_total"]
        tracked, window = made["skillable_tracked_instances"], made["skillable_lookback_window_seconds"]
        active, saved = made["skillable_account_active_labs"], made["skillable_account_saved_labs"]
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
            for dim in self._dimensions:
                made[dim.overflow_family].add_metric(labels, view.snapshot[dim.name].overflow_total)
            expired.add_metric(labels, view.snapshot.expired_total)
            tracked.add_metric(labels, view.snapshot.tracked)
            if h.stats is not None and h.stats.active is not None:
                active.add_metric(labels, h.stats.active)
            if h.stats is not None and h.stats.saved is not None:
                saved.add_metric(labels, h.stats.saved)
        for account, poller in self._accounts:  # each account may have its own window
            window.add_metric(self._values(account, []), poller.window_minutes * 60)
        limit = made["skillable_account_max_active_labs"]
        for account, _ in self._accounts:
            if account in self._max_active_labs:
                limit.add_metric(self._values(account, []), self._max_active_labs[account])
        info = build_info()
        made["skillable_exporter_build_info"].add_metric([info.version, info.revision, platform.python_version()], 1)
        yield from made.values()
        if any(view.launch is not None for _, view in views):
            yield from self._launch_health(views)

    def _launch_health(self, views: Views) -> Iterator[Metric]:
        """The launch collector's own health (families.launch_health_families), for the accounts that have it."""
        made = {f.name: self._plain_family(f) for f in launch_health_families()}
        overflow, invalid = made["skillable_lab_integration_overflow_total"], \
            made["skillable_lab_search_results_invalid_total"]
        last_success = made["skillable_launch_last_success_timestamp_seconds"]
        for account, view in views:
            launch, labels = view.launch, self._values(account, [])
            if launch is None:
                continue
            overflow.add_metric(labels, launch.integration.overflow_total)
            invalid.add_metric(labels, launch.invalid_total)
            if launch.last_success is not None:
                last_success.add_metric(labels, launch.last_success)
        yield from made.values()

    def _plain_family(self, f: Family) -> GaugeMetricFamily | CounterMetricFamily:
        """An empty gauge or counter family of the table, with `account` among its labels if it has one."""
        labels = self._labels(list(f.labels)) if f.accounts else list(f.labels)
        kind = CounterMetricFamily if f.type == "counter" else GaugeMetricFamily
        return kind(f.name, f.help, labels=labels)

    # -- names for ids -----------------------------------------------------

    def _info_metrics(self, views: list[tuple[str, PollView]]) -> Iterator[Metric]:
        # Names: the config file wins, then /deliveryregions (regions), then the names /labinstance/search
        # carries (the first account that names an id).
        found: dict[str, dict[str, str]] = {"datacenter": {}, "delivery_region": {}, "lab_host": {}}
        for _, view in reversed(views):
            if view.launch is not None:
                for kind, names in view.launch.names.items():
                    found[kind].update(names)
        regions = found["delivery_region"]
        for _, view in views:
            regions.update({str(k): v for k, v in view.health.region_names.items()})
        regions.update(self._names.delivery_regions)  # the config file wins over the API
        datacenters = {**found["datacenter"], **self._names.datacenters}
        hosts = {**found["lab_host"], **self._names.lab_hosts}
        for spec, names in zip(NAME_FAMILIES, (datacenters, regions, hosts)):
            family = GaugeMetricFamily(spec.name, spec.help, labels=list(spec.labels))
            for key in sorted(names, key=_id_order):
                family.add_metric([key, names[key]], 1)
            yield family
        profiles = [AccountProfiles(a, v.health.catalog, [key[0] for key in v.snapshot[PROFILE.name].keys],
                                    v.health.catalog_skipped)
                    for a, v in views]
        yield from catalog_families(profiles, self._names, self._max_lab_profiles, self._account_label)


# -- the rows of one account's lab table: keys and values from its snapshot, and what a key names --

KeysValues = tuple[list[Any], list[Any]]


FamilyKind = type[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily | SummaryMetricFamily]


@dataclass(frozen=True, slots=True)
class LabFamily:
    """One lab family and where its rows come from.

    `rows(view)` gives one account's keys and values; `sample(key)` the key's sample name
    suffix ("" for the family's own sample name) and label values in `labels` order (a bucket's
    `le` last).
    """

    kind: FamilyKind
    name: str
    help: str
    labels: list[str]
    rows: Callable[[PollView], KeysValues]
    sample: Callable[[Any], tuple[str, tuple[str, ...]]]


KINDS: dict[str, FamilyKind] = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily,
                                "histogram": HistogramMetricFamily, "summary": SummaryMetricFamily}


Tables = Callable[[PollView], Any]  # one table of one account (a dict by key), or None if it has none


def _table_rows(f: Family) -> tuple[Callable[[PollView], KeysValues], Callable[[Any], tuple[str, tuple[str, ...]]]]:
    """How a lab family reads its table of an account (`rows`), and names a row (`sample`). A family of a
    dimension reads the dimension's table of the snapshot (of the launch memory's, for launches per
    integration); a launch family reads its attribute of the launch memory's snapshot."""
    table: Tables
    if f.launch and f.dimension is None:
        table = partial(_launch_table, f.table)
    elif f.launch:
        table = partial(_dimension_table, "launch", f.dimension.name, f.table)  # type: ignore[union-attr]
    else:
        table = partial(_dimension_table, "snapshot", f.dimension.name, f.table)  # type: ignore[union-attr]
    if f.type == "histogram":
        return partial(_histogram_rows, table), _histogram_sample
    if f.type == "summary":
        return partial(_summary_rows, table), _summary_sample
    per_label = STATUS_LABEL in f.labels or KIND_LABEL in f.labels
    return partial(_dict_rows, table), (_per_status_sample if per_label else _plain_sample)


def _dimension_table(source: str, dimension: str, table: str, view: PollView) -> Any:
    counts = getattr(view, source)
    return None if counts is None else getattr(counts[dimension], table)


def _launch_table(table: str, view: PollView) -> Any:
    return None if view.launch is None else getattr(view.launch, table)


def _dict_rows(table: Tables, view: PollView) -> KeysValues:
    """A table of one dimension: it holds every key (in `keys` order) and, in the per-status (per-kind)
    tables, the statuses (kinds) of a key in their order: its own key order is the exposition's."""
    counts = table(view)
    if counts is None:
        return [], []
    return list(counts), list(counts.values())


def _plain_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    return "", key


def _per_status_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    labels, status = key
    return "", (*labels, status)


def _summary_rows(table: Tables, view: PollView) -> KeysValues:
    """Per observer key: _count, then _sum."""
    keys: list[Any] = []
    values: list[Any] = []
    summary: Summary
    for key, summary in (table(view) or {}).items():
        keys += [(key, "_count"), (key, "_sum")]
        values += [summary.count, summary.total]
    return keys, values


def _summary_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    labels, suffix = key
    return suffix, labels


def _histogram_rows(table: Tables, view: PollView) -> KeysValues:
    """Per observer key: a key and value per bucket (cumulative, le ending in +Inf), then _count and _sum."""
    keys: list[Any] = []
    values: list[Any] = []
    hist: Histogram
    for key, hist in (table(view) or {}).items():
        buckets = hist.cumulative()
        keys += [(key, le) for le, _ in buckets]
        values += [count for _, count in buckets]
        keys += [(key, "_count"), (key, "_sum")]
        values += [buckets[-1][1], hist.total]
    return keys, values


def _histogram_sample(key: Any) -> tuple[str, tuple[str, ...]]:
    labels, le = key
    if le in ("_count", "_sum"):
        return le, labels
    return "_bucket", (*labels, le)


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


Inputs = list[tuple[Snapshot, LaunchCounts | None, str]]


def _same_inputs(old: Inputs, new: Inputs) -> bool:
    return len(old) == len(new) and all(o[0] is n[0] and o[1] is n[1] and o[2] == n[2] for o, n in zip(old, new))


def _id_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


