"""Every metric family the exporter exposes, in one table: name, type, labels and help.

The lab families derive from the dimensions' declarations (state.DIMENSIONS): each dimension
names its families, and the templates below (TABLE_FAMILIES) give each table's type, labels and
help. The launch collector's families (launches.py) are listed, but for launches per integration,
which derive from its dimension's declaration (launches.INTEGRATION) as the others do. The other
families are listed. The collector builds the lab, health and name families
from this table; catalog.py's families, app.py's reload gauges and prometheus_client's process
and Python collectors are listed as they serve them. tests/test_exposition.py checks every family
served against this table and the README's metrics table against it (name, type, labels).

Labels are given without `account`, which every family with `accounts` gains when several
accounts are configured, and without the `le` and `quantile` of histogram and summary samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Sequence

from .launches import INTEGRATION
from .model import ALL_STATUSES
from .state import DIMENSIONS, PLACE, PROFILE, Dimension

SHARED_POLL_NOTE = (
    " Values come from the most recent poll, which concurrent scrapes share and"
    " which is reused for --skillable.min-poll-interval seconds."
)
STATUS_LABEL = "completion_status"


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # gauge, counter, histogram or summary
    labels: tuple[str, ...]
    help: str
    accounts: bool = True  # gains `account` with several accounts
    dimension: Dimension | None = None  # a lab family: its dimension and table
    table: str = ""  # a lab family's table; a launch family's (launch=True) attribute of LaunchCounts
    launch: bool = False  # read from the launch memory (launches.py), served with the launch collector on


@dataclass(frozen=True)
class TableFamily:
    """How a table of a dimension is exposed. The help is a template: {by} is the dimension's `by`,
    {window} the lookback window, {running} the dimension's running family, {zero} a sentence on the
    statuses that exist at zero (empty when all do)."""

    type: str  # gauge or counter; "observer" for a histogram or summary, as the dimension declares
    labels: str  # "key" (the dimension's labels), "status" (and completion_status) or "observer" (its observer labels)
    help: str


TABLE_FAMILIES: dict[str, TableFamily] = {
    "closed": TableFamily(
        "gauge", "status",
        "Ended lab instances whose last state change was within {window}{by}, by current completion status;"
        " running labs are in {running} only." + SHARED_POLL_NOTE),
    "running": TableFamily(
        "gauge", "key",
        "Lab instances started and not ended{by}, however long ago they started (a lab saved for later has no End"
        " either), up to --skillable.max-running-minutes." + SHARED_POLL_NOTE),
    "started": TableFamily(
        "counter", "key", "Lab instances seen starting{by}, each counted once however many polls return it."),
    "ended": TableFamily(
        "counter", "status",
        "Lab instances seen ending{by}, counted once under the completion status they ended with.{zero}"),
    "run_time": TableFamily(
        "observer", "observer", "Total run time of ended lab instances{by}, observed once per instance."),
    "task_completion": TableFamily(
        "observer", "observer", "Share of integrated tasks completed (0-1) in ended lab instances{by}."),
    "exam_score": TableFamily(
        "observer", "observer",
        "Exam score divided by the maximum possible score (0-1){by}, observed once per scored exam."),
    "exams": TableFamily("counter", "key", "Scored exams{by}, counted once when their score first appears."),
    "exams_passed": TableFamily("counter", "key", "Scored exams that the learner passed{by}."),
}


def window_text(window_minutes: int | None) -> str:
    if window_minutes is None:
        return "the account's lookback window (skillable_lookback_window_seconds)"
    return f"the last {window_minutes} minutes (the lookback window)"


def lab_families(dimensions: Sequence[Dimension] = DIMENSIONS, window_minutes: int | None = None) -> list[Family]:
    """Every dimension's families, in exposition order: the dimensions in order, each one's families
    in the order it declares them."""
    out: list[Family] = []
    for dim in dimensions:
        names = dict(dim.families)
        zero = "" if set(dim.zero_statuses) == set(ALL_STATUSES) else (
            f" The statuses {', '.join(dim.zero_statuses)} exist from the start, the others once they occur.")
        for table, name in dim.families:
            spec = TABLE_FAMILIES[table]
            kind = spec.type if spec.type != "observer" else "histogram" if dim.histogram else "summary"
            labels = {"key": dim.labels, "status": (*dim.labels, STATUS_LABEL),
                      "observer": dim.observer_labels}[spec.labels]
            text = spec.help.format(by=dim.by, window=window_text(window_minutes), zero=zero,
                                    running=names.get("running", "the running gauge"))
            out.append(Family(name, kind, labels, text, dimension=dim, table=table))
    return out


KIND_LABEL = "kind"
LAUNCH_NOTE = " From /labinstance/search (the launch collector), each instance counted once."


def launch_families() -> list[Family]:
    """The launch collector's lab families (launches.py), in exposition order: start-up times, labs never
    ready, errors by kind, per place and per profile, then launches per integration (a dimension declared
    as the state's are, its families derived the same way)."""
    profile = PROFILE.labels
    return [
        Family("skillable_lab_startup_duration_seconds", "histogram", PLACE.observer_labels,
               "Seconds from a lab's launch until it was ready (StartupDuration), by datacenter and delivery"
               " region, observed once per instance when it first appears." + LAUNCH_NOTE,
               table="startup", launch=True),
        Family("skillable_lab_profile_startup_duration_seconds", "summary", profile,
               "Seconds from a lab's launch until it was ready (StartupDuration), by lab profile." + LAUNCH_NOTE,
               table="profile_startup", launch=True),
        Family("skillable_lab_instances_not_ready_total", "counter", PLACE.labels,
               "Lab instances that ended without ever reporting a StartupDuration." + LAUNCH_NOTE,
               table="not_ready", launch=True),
        Family("skillable_lab_profile_instances_not_ready_total", "counter", profile,
               "Lab instances that ended without ever reporting a StartupDuration, by lab profile." + LAUNCH_NOTE,
               table="profile_not_ready", launch=True),
        Family("skillable_lab_errors_total", "counter", (*PLACE.labels, KIND_LABEL),
               "Errors lab instances reported (life-cycle action scripts, webhooks, other), each entry counted"
               " once, including entries dated after the lab's End." + LAUNCH_NOTE,
               table="errors", launch=True),
        Family("skillable_lab_profile_errors_total", "counter", (*profile, KIND_LABEL),
               "Errors lab instances reported, by lab profile and kind, each entry counted once." + LAUNCH_NOTE,
               table="profile_errors", launch=True),
        *(dataclasses.replace(f, launch=True) for f in lab_families((INTEGRATION,))),
    ]


def launch_health_families() -> list[Family]:
    """The launch collector's own health, served after the exporter's health with the collector on."""
    return [
        Family(INTEGRATION.overflow_family, "counter", (),
               'Launches whose API consumer was reported as api_consumer="other" because of '
               f'--{INTEGRATION.cap_setting}.',
               dimension=INTEGRATION, launch=True),
        Family("skillable_lab_search_results_invalid_total", "counter", (),
               "Records of /labinstance/search that failed validation and were skipped.", launch=True),
        Family("skillable_launch_last_success_timestamp_seconds", "gauge", (),
               "Unix time at which the last complete launch poll (/labinstance/search) began.", launch=True),
    ]


def health_families(dimensions: Sequence[Dimension] = DIMENSIONS) -> list[Family]:
    """The exporter's health, in exposition order (after the lab families); one overflow counter per dimension."""
    return [
        Family("skillable_up", "gauge", (),
               "1 if the last LatestResults poll succeeded, else 0." + SHARED_POLL_NOTE),
        Family("skillable_last_success_timestamp_seconds", "gauge", (),
               "Unix time at which the last successful LatestResults poll was made."),
        Family("skillable_poll_duration_seconds", "gauge", (), "Seconds the last poll of the Skillable API took."),
        Family("skillable_poll_lookback_seconds", "gauge", (),
               "How far back the last successful LatestResults poll asked (its minutes parameter, in seconds)."),
        Family("skillable_api_requests_total", "counter", ("endpoint",), "Requests made to the Skillable API."),
        Family("skillable_api_request_failures_total", "counter", ("endpoint", "reason"),
               "Failed requests to the Skillable API, by reason."),
        Family("skillable_results_invalid_total", "counter", (), "Results that failed validation and were skipped."),
        *(Family(d.overflow_family, "counter", (),
                 f'Lab instances whose {d.noun} was reported as {d.labels[-1]}="other" because of --{d.cap_setting}.',
                 dimension=d)
          for d in dimensions),
        Family("skillable_lab_instances_expired_total", "counter", (),
               "Running lab instances dropped with no End after --skillable.max-running-minutes."),
        Family("skillable_tracked_instances", "gauge", (), "Lab instances held in the exporter's memory."),
        Family("skillable_account_active_labs", "gauge", (),
               "Labs active right now account-wide (starting, running, saving, tearing down), from /stats."
               + SHARED_POLL_NOTE),
        Family("skillable_account_saved_labs", "gauge", (),
               "Labs saved right now account-wide, from /stats." + SHARED_POLL_NOTE),
        Family("skillable_account_max_active_labs", "gauge", (),
               "The account's limit of active labs (Skillable's Max Active Lab Instances), from the exporter's "
               "configuration (the API does not report it); absent when not configured."),
        Family("skillable_lookback_window_seconds", "gauge", (), "The lookback window the lab gauges cover."),
        Family("skillable_exporter_build_info", "gauge", ("version", "revision", "python_version"),
               "Version of skillable-exporter, always 1.", accounts=False),
    ]


# Names for ids, from the config (and /deliveryregions): (family, the id's label stem).
NAME_FAMILIES: tuple[Family, ...] = tuple(
    Family(f"skillable_{stem}_info", "gauge", (f"{stem}_id", f"{stem}_name"),
           f"Name of a {stem.replace('_', ' ')} id, always 1.", accounts=False)
    for stem in ("datacenter", "delivery_region", "lab_host"))

# Built by catalog.catalog_families.
CATALOG_FAMILIES: tuple[Family, ...] = (
    Family("skillable_lab_profile_info", "gauge",
           ("lab_profile_id", "lab_profile_name", "lab_profile_number", "lab_series_id", "platform", "exam"),
           "Name, number, series, platform and exam flag of a lab profile, from /catalog and the config, always 1.",
           accounts=False),
    Family("skillable_lab_series_info", "gauge", ("lab_series_id", "lab_series_name"),
           "Name of a lab series, from /catalog and the config, always 1.", accounts=False),
    Family("skillable_lab_profile_enabled", "gauge", ("lab_profile_id",),
           "1 if the lab profile is enabled in /catalog, else 0."),
    Family("skillable_lab_profile_max_duration_seconds", "gauge", ("lab_profile_id",),
           "How long a lab of this profile may run before it expires (DurationMinutes in /catalog)."),
    Family("skillable_catalog_entries_skipped_total", "counter", (),
           "Lab profiles and lab series in /catalog answers skipped: not an object, or no usable Id (each "
           "fetch counts its own, hourly)."),
)

# The app's runtime registry: its reload gauges (app.py), then prometheus_client's process and
# platform and GC collectors (Linux), as served.
RUNTIME_FAMILIES: tuple[Family, ...] = (
    Family("skillable_exporter_config_last_reload_successful", "gauge", (),
           "1 if the last configuration reload (or the start) succeeded, else 0.", accounts=False),
    Family("skillable_exporter_config_last_reload_success_timestamp_seconds", "gauge", (),
           "Unix time of the last successful configuration reload (or of the start).", accounts=False),
    *(Family(name, kind, labels, "", accounts=False) for name, kind, labels in (
        ("process_cpu_seconds_total", "counter", ()),
        ("process_resident_memory_bytes", "gauge", ()),
        ("process_virtual_memory_bytes", "gauge", ()),
        ("process_start_time_seconds", "gauge", ()),
        ("process_open_fds", "gauge", ()),
        ("process_max_fds", "gauge", ()),
        ("python_info", "gauge", ("implementation", "major", "minor", "patchlevel", "version")),
        ("python_gc_objects_collected_total", "counter", ("generation",)),
        ("python_gc_objects_uncollectable_total", "counter", ("generation",)),
        ("python_gc_collections_total", "counter", ("generation",)),
    )),
)


def all_families(dimensions: Sequence[Dimension] = DIMENSIONS) -> list[Family]:
    """The whole table, in the order a scrape of /metrics serves it."""
    return [*lab_families(dimensions), *launch_families(), *health_families(dimensions), *launch_health_families(),
            *NAME_FAMILIES, *CATALOG_FAMILIES, *RUNTIME_FAMILIES]


# Every label a lab family uses: backfill refuses them as its own extra labels.
LAB_LABELS: frozenset[str] = frozenset(label for f in (*lab_families(), *launch_families()) for label in f.labels)
