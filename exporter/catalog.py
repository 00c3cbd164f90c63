"""Lab profile and lab series names and facts from `GET /catalog?includeAll=1`.

The poller fetches the catalog hourly (like /deliveryregions), within the poll's
deadline and with a body cap of its own (--skillable.max-catalog-bytes: the
catalog is one unpaged answer, 1.5-10 KB per profile). Its failures are counted
under endpoint="catalog" and never touch skillable_up; the last good catalog is
kept until a new one decodes.

Decoding rules (what the OpenAPI spec really shows, see
shared/reference/catalog-and-backfill.md section 1):
- `includeAll=1`, so disabled and unfinished profiles are named too.
- A profile needs an `Id` (an integer, or a string of digits); a profile or
  series without one, or that is not an object, is skipped and counted.
  The first record of an id wins.
- Only Id, Name, Number, SeriesId, PlatformId, IsExam, Enabled and
  DurationMinutes are read. Timestamps (`Created`, `LastModified`: int
  milliseconds, `"/Date(ms)/"` strings, even malformed ones) and every other
  field are never read, so no value there can invalidate a record.
- Names and `Number` are free text: tags and entities are removed, control
  characters dropped, whitespace collapsed (`" Module 1"` becomes
  `"Module 1"`), and the result cut to MAX_LABEL_CHARS. No other free text
  (descriptions, HTML objectives, tags, skills) ever reaches a label.
- A null or mistyped field becomes its empty value: name -> the id,
  number and series -> "", platform -> "unknown" (or "none"), exam -> "false",
  Enabled and DurationMinutes -> no sample.

Export rules (catalog_families):
- Profiles with series of their own (Snapshot.profiles, minus "other" and
  "unknown") get skillable_lab_profile_info; so do enabled catalog profiles with
  no activity, in id order, while the account's profiles number fewer than
  --skillable.max-lab-profiles. So a catalog of 5,000 profiles costs at most
  that budget of info series, whatever its size.
- A profile the catalog does not know has an info series only if the config's
  `names.lab_profiles` names it. Names in the config win over the catalog's.
- skillable_lab_series_info: the series of the exported profiles that have a
  name, plus every series the config names.
- _info metrics carry no account label (the first account that knows an id
  names it); skillable_lab_profile_enabled and _max_duration_seconds do, with
  several accounts, for the same profiles as the info series.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Iterator, Sequence

import msgspec
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from .config import Names
# Names are cleaned and bounded as every text from the API that becomes a label value (model.py).
from .model import MAX_LABEL_CHARS, DecodeError, _check_json, _check_status, clean_text, decode_repairing  # noqa: F401

ENDPOINT = "catalog"
PARAMS = {"includeAll": 1}
REFRESH_SECONDS = 3600.0
MAX_PROFILES = 100_000  # kept from one catalog; beyond this they are counted as skipped
MAX_DURATION_MINUTES = 10 * 365 * 24 * 60
NOT_PROFILES = ("other", "unknown")  # lab_profile_id values of the state that are no profile

# PlatformId as documented ([OAS] enums; /details uses -1 for None).
PLATFORMS = {-1: "none", 1: "none", 2: "hyperv", 3: "esx", 10: "azure", 11: "aws", 20: "docker"}
UNKNOWN_PLATFORM = "unknown"

_generation = itertools.count(1)


@dataclass(frozen=True, slots=True)
class LabProfile:
    id: str
    name: str
    number: str
    series_id: str
    platform: str
    exam: bool
    enabled: bool | None
    max_duration_seconds: float | None


@dataclass(frozen=True, eq=False)
class Catalog:
    """One decoded catalog. Its repr names its generation only: the collector compares
    health by repr, and a new catalog must look new however similar (cheaply, too)."""

    profiles: dict[str, LabProfile] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)  # id -> name
    skipped: int = 0  # records that were not objects or had no usable Id
    first_skipped: str = ""  # the first of them, for the log line: "LabProfiles[3]: Id 'x' is no id"
    generation: int = field(default_factory=lambda: next(_generation))

    def __repr__(self) -> str:
        return f"Catalog(generation={self.generation}, profiles={len(self.profiles)}, series={len(self.series)})"


# -- decoding ------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    LabSeries: list[Any] | None = None
    LabProfiles: list[Any] | None = None
    Status: int | None = None
    Error: str | None = None


_decoder = msgspec.json.Decoder(_Envelope, strict=False)

_DIGITS = re.compile(r"\s*\d{1,19}\s*")


def _id(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if 0 <= value < 2**63 else None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
        return str(number) if number < 2**63 else None
    return None


def _platform(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return PLATFORMS.get(value, UNKNOWN_PLATFORM)
    return UNKNOWN_PLATFORM


def _duration_seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not 0 <= value <= MAX_DURATION_MINUTES:  # NaN fails this too
        return None
    return float(value) * 60


def _profile(raw: Any) -> LabProfile | None:
    if not isinstance(raw, dict):
        return None
    pid = _id(raw.get("Id"))
    if pid is None:
        return None
    enabled = raw.get("Enabled")
    return LabProfile(
        id=pid,
        name=clean_text(raw.get("Name")) or pid,
        number=clean_text(raw.get("Number")),
        series_id=_id(raw.get("SeriesId")) or "",
        platform=_platform(raw.get("PlatformId")),
        exam=raw.get("IsExam") is True,
        enabled=enabled if isinstance(enabled, bool) else None,
        max_duration_seconds=_duration_seconds(raw.get("DurationMinutes")),
    )


def decode_catalog(body: bytes) -> Catalog:
    """Decode a /catalog body (see the module docstring for the rules)."""
    try:
        env = decode_repairing(_decoder, body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a Catalog object: {exc}") from None
    _check_status(env.Status, env.Error)
    skipped: list[str] = []
    profiles: dict[str, LabProfile] = {}
    for index, raw in enumerate(env.LabProfiles or []):
        profile = _profile(raw)
        if profile is None or len(profiles) >= MAX_PROFILES:
            skipped.append(_why_skipped("LabProfiles", index, raw, profile is not None))
        elif profile.id not in profiles:
            profiles[profile.id] = profile
    series: dict[str, str] = {}
    for index, raw in enumerate(env.LabSeries or []):
        sid = _id(raw.get("Id")) if isinstance(raw, dict) else None
        if sid is None or len(series) >= MAX_PROFILES:
            skipped.append(_why_skipped("LabSeries", index, raw, sid is not None))
        elif sid not in series:
            series[sid] = clean_text(raw.get("Name")) or sid
    return Catalog(profiles, series, len(skipped), skipped[0] if skipped else "")


def _why_skipped(where: str, index: int, raw: Any, over_the_cap: bool) -> str:
    """Why one catalog entry was skipped, in a few words for the log (never more than an id's repr)."""
    if over_the_cap:
        return f"{where}[{index}]: more than {MAX_PROFILES} entries"
    if not isinstance(raw, dict):
        return f"{where}[{index}]: not an object"
    return f"{where}[{index}]: Id {clean_text(repr(raw.get('Id')), 40)} is not a whole number below 2^63"


# -- metric families -------------------------------------------------------------


@dataclass(frozen=True)
class AccountProfiles:
    """What catalog_families needs from one account: its catalog, its profiles with series, and how
    many catalog entries it skipped over every catalog fetched (Health.catalog_skipped)."""

    account: str
    catalog: Catalog | None
    active: Sequence[str]  # Snapshot.profiles
    skipped_total: int = 0


def exported_profiles(active: Sequence[str], catalog: Catalog | None, names: Names, budget: int) -> list[str]:
    """The profile ids of one account that get info series, in the order of the rules above."""
    known = catalog.profiles if catalog is not None else {}
    chosen = [p for p in active if p not in NOT_PROFILES and (p in known or p in names.lab_profiles)]
    taken = set(chosen)
    room = budget - len(active)  # every profile with series counts, "other" and "unknown" too
    if room > 0:
        idle = [p.id for p in known.values() if p.enabled and p.id not in taken]
        chosen += sorted(idle, key=int)[:room]
    return chosen


def catalog_families(accounts: Sequence[AccountProfiles], names: Names, budget: int,
                     account_label: bool) -> Iterator[Metric]:
    """skillable_lab_profile_info, skillable_lab_series_info, _enabled and _max_duration_seconds, and
    skillable_catalog_entries_skipped_total once an account has a catalog."""
    per_account = ["account", "lab_profile_id"] if account_label else ["lab_profile_id"]
    info = GaugeMetricFamily(
        "skillable_lab_profile_info",
        "Name, number, series, platform and exam flag of a lab profile, from /catalog and the config, always 1.",
        labels=["lab_profile_id", "lab_profile_name", "lab_profile_number", "lab_series_id", "platform", "exam"],
    )
    series_info = GaugeMetricFamily(
        "skillable_lab_series_info", "Name of a lab series, from /catalog and the config, always 1.",
        labels=["lab_series_id", "lab_series_name"],
    )
    enabled = GaugeMetricFamily(
        "skillable_lab_profile_enabled", "1 if the lab profile is enabled in /catalog, else 0.", labels=per_account,
    )
    duration = GaugeMetricFamily(
        "skillable_lab_profile_max_duration_seconds",
        "How long a lab of this profile may run before it expires (DurationMinutes in /catalog).",
        labels=per_account,
    )
    skipped = CounterMetricFamily(
        "skillable_catalog_entries_skipped_total",
        "Lab profiles and lab series in /catalog answers skipped: not an object, or no usable Id (each "
        "fetch counts its own, hourly).", labels=per_account[:-1],
    )
    infos: dict[str, tuple[str, ...]] = {}
    series_names: dict[str, str] = {}
    for entry in accounts:
        known = entry.catalog.profiles if entry.catalog is not None else {}
        known_series = entry.catalog.series if entry.catalog is not None else {}
        values = [entry.account] if account_label else []
        if entry.catalog is not None:
            skipped.add_metric(values, entry.skipped_total)
        for pid in sorted(exported_profiles(entry.active, entry.catalog, names, budget), key=int):
            profile = known.get(pid)
            name = names.lab_profiles.get(pid) or (profile.name if profile else pid)
            if profile is None:
                infos.setdefault(pid, (pid, name, "", "", UNKNOWN_PLATFORM, "false"))
                continue
            infos.setdefault(pid, (pid, name, profile.number, profile.series_id, profile.platform,
                                   "true" if profile.exam else "false"))
            if profile.series_id:
                series_name = names.lab_series.get(profile.series_id) or known_series.get(profile.series_id)
                if series_name:
                    series_names.setdefault(profile.series_id, series_name)
            if profile.enabled is not None:
                enabled.add_metric([*values, pid], 1.0 if profile.enabled else 0.0)
            if profile.max_duration_seconds is not None:
                duration.add_metric([*values, pid], profile.max_duration_seconds)
    series_names.update(names.lab_series)
    for pid in sorted(infos, key=int):
        info.add_metric(list(infos[pid]), 1)
    for sid in sorted(series_names, key=int):
        series_info.add_metric([sid, series_names[sid]], 1)
    yield from (info, series_info, enabled, duration, skipped)
