"""The LatestResults record model and its decoder: pure functions, no I/O.

Only the fields the exporter uses are declared. Everything else in a result
(user, class, IP address, geolocation) is skipped by the decoder and never held
in memory, which is both cheaper and keeps personal data out of the process.
"""

from __future__ import annotations

import html
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

# CompletionStatus codes as documented by Skillable, mapped to label values.
STATUS_NAMES: dict[int, str] = {
    1: "cancelled",
    2: "no_show",
    3: "incomplete",
    4: "complete",
    10: "storage_provisioning_failed",
    20: "lab_creation_failed",
    30: "resume_failed",
    40: "save_failed",
    50: "submitted_for_grading",
    60: "grading_in_progress",
}
UNKNOWN_STATUS = "unknown"
ALL_STATUSES: tuple[str, ...] = (*STATUS_NAMES.values(), UNKNOWN_STATUS)


def status_name(code: int | None) -> str:
    """Label value for a CompletionStatus code; undocumented codes are kept as 'unknown'."""
    if code is None:
        return UNKNOWN_STATUS
    return STATUS_NAMES.get(code, UNKNOWN_STATUS)


# JSON integers can be of any size; ids and times beyond 64 bits make a record invalid
# instead of reaching arithmetic that would overflow (float() of a 400-digit run time).
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# A float that is a number: the lenient decoder (strict=False, so "12" reads as 12) would also
# read the strings "NaN" and "Infinity" as floats, and one NaN would poison a histogram sum for
# good. NaN fails both bounds and the infinities one, so a non-finite value makes its record invalid.
Finite = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
# A count (labs active, a counter in the state file): a 64-bit integer, never below zero.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class LabResult(msgspec.Struct, rename="pascal", frozen=True, gc=False):
    """One LabResult. Only LabInstanceId is required; every other field may be null or absent."""

    lab_instance_id: Int64
    start: Int64 | None = None
    end: Int64 | None = None
    completion_status: Int64 | None = None
    total_run_time_seconds: Int64 | None = None
    task_complete_percent: Finite | None = None
    is_exam: bool | None = None
    exam_passed: bool | None = None
    exam_score: Finite | None = None
    exam_max_possible_score: Finite | None = None
    lab_host_id: Int64 | None = None
    datacenter_id: Int64 | None = None
    delivery_region_id: Int64 | None = None
    lab_profile_id: Int64 | None = None


class _Envelope(msgspec.Struct):
    Results: list[LabResult] | None = None
    Status: int | None = None
    Error: str | None = None


class _LenientEnvelope(msgspec.Struct):
    """Second pass when one result is malformed: keep each result undecoded."""

    Results: list[msgspec.Raw] | None = None
    Status: int | None = None
    Error: str | None = None


MAX_ERROR_CHARS = 300  # of an upstream Error message, as kept in logs


class DecodeError(Exception):
    """The body is not a LatestResults answer at all (not JSON, wrong shape)."""


class NotJsonError(DecodeError):
    """The body is not JSON at all: an HTML error or login page, plain text, nothing."""


class UpstreamError(Exception):
    """The API answered with Status 0 (or no Status) and an Error message."""


@dataclass(frozen=True)
class Batch:
    results: list[LabResult]
    invalid: int  # results that failed validation and were skipped


# -- text from the API -------------------------------------------------------------------------

MAX_LABEL_CHARS = 120  # a label value made of text from the API is cut to this
# An HTML tag, a comment, a doctype: "<" then a letter, "/", "!" or "?" (so "a < b" stays).
# An unclosed tag at the end counts too.
_TAG = re.compile(r"<[A-Za-z/!?][^<>]*(?:>|$)")


def clean_text(value: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """Free text from the API as a safe label value (catalog names, names in /labinstance/search): no
    tags, no control characters, collapsed whitespace, at most `limit` characters. Anything that is
    not a string is ""."""
    if not isinstance(value, str):
        return ""
    text = html.unescape(value[: limit * 8])  # bounded work; entities may spell tags, so unescape first
    text = _TAG.sub(" ", text)  # a space, so the pieces around a tag never join into a new one
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return " ".join(text.split())[:limit].rstrip()


_fast = msgspec.json.Decoder(_Envelope, strict=False)
_lenient = msgspec.json.Decoder(_LenientEnvelope, strict=False)
_one = msgspec.json.Decoder(LabResult, strict=False)


def decode_latest_results(body: bytes) -> Batch:
    """Decode a LatestResults body into typed records.

    The fast path decodes the whole payload at once. If a single result is
    malformed, the payload is decoded again keeping each result raw, so one
    bad record is counted and skipped instead of sinking the batch. JSON
    nested deeper than the decoder goes (RecursionError) is bad input like any
    other: the record holding it is skipped, or the answer is invalid_response.
    """
    try:
        env = _fast.decode(body)
        _check_status(env.Status, env.Error)
        return Batch(env.Results or [], 0)
    except (msgspec.ValidationError, RecursionError):
        pass
    except msgspec.DecodeError as exc:
        _check_json(body)
        raise DecodeError(f"response is not valid JSON: {exc}") from None
    try:
        lenient = _lenient.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise DecodeError(f"response is not a LatestResults object: {exc}") from None
    _check_status(lenient.Status, lenient.Error)
    results: list[LabResult] = []
    invalid = 0
    for raw in lenient.Results or []:
        try:
            results.append(_one.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            invalid += 1
    return Batch(results, invalid)


def _check_json(body: bytes) -> None:
    """Raise NotJsonError when the body does not even start like a JSON document."""
    start = body.lstrip()[:1]
    if start not in (b"{", b"["):
        kind = "an empty body" if not start else ("HTML" if start == b"<" else "not JSON")
        raise NotJsonError(f"response is {kind}, not JSON ({len(body)} bytes)")


def _check_status(status: int | None, error: str | None) -> None:
    if status != 1:
        message = error if error else f"Status {status!r} without an error message"
        raise UpstreamError(message[:MAX_ERROR_CHARS])


class _DeliveryRegion(msgspec.Struct, rename="pascal"):
    id: Int64
    name: str | None = None


class _DeliveryRegions(msgspec.Struct):
    DeliveryRegions: list[msgspec.Raw] | None = None  # each decoded alone: a bad one is skipped
    Status: int | None = None
    Error: str | None = None


class _Stats(msgspec.Struct):
    NumActive: Count | None = None
    NumSaved: Count | None = None
    Status: int | None = None
    Error: str | None = None


@dataclass(frozen=True)
class AccountStats:
    active: int | None
    saved: int | None


_region = msgspec.json.Decoder(_DeliveryRegion, strict=False)


def decode_delivery_regions(body: bytes) -> dict[int, str]:
    """Decode /deliveryregions into {id: name}; a region that fails validation is left out."""
    try:
        env = msgspec.json.decode(body, type=_DeliveryRegions, strict=False)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a DeliveryRegions object: {exc}") from None
    _check_status(env.Status, env.Error)
    names: dict[int, str] = {}
    for raw in env.DeliveryRegions or []:
        try:
            region = _region.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            continue
        if region.name:
            names[region.id] = region.name
    return names


def decode_stats(body: bytes) -> AccountStats:
    """Decode /stats into the account-wide active and saved lab counts."""
    try:
        env = msgspec.json.decode(body, type=_Stats, strict=False)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a Stats object: {exc}") from None
    _check_status(env.Status, env.Error)
    return AccountStats(env.NumActive, env.NumSaved)


# -- /labinstance/search, mode 5 (concise) ------------------------------------------------------
#
# A mode-5 record also carries VM passwords, cloud credentials, user names and e-mails, notes and
# URLs: none of them is declared here, so the decoder skips them and they are never held. The one
# free text it reads, an error's Message, is read only to classify it (error_kind) and dropped
# with the raw record: what a record keeps of an error is its time, its kind and how many distinct
# messages share that time and kind.

LIFECYCLE_ACTION = "lifecycle_action"
WEBHOOK = "webhook"
OTHER_ERROR = "other"
ERROR_KINDS: tuple[str, ...] = (LIFECYCLE_ACTION, WEBHOOK, OTHER_ERROR)
# "Configuration error encountered when executing life cycle action 3466 script." and "Error calling
# API Consumer webhook Scoring ..." are the two kinds the UAT records show.
_LIFECYCLE = re.compile(r"life[\s_-]*cycle[\s_-]*action", re.IGNORECASE)
_WEBHOOK = re.compile(r"web[\s_-]*hook", re.IGNORECASE)
MAX_ERROR_MESSAGE_CHARS = 4096  # of a message, what is looked at to classify it
# An Error about the API key (Skillable answers a bad key with HTTP 200, Status 0 and such an Error).
KEY_ERROR = re.compile(r"api[ _-]?key|unauthori[sz]ed|forbidden|not authenticated", re.IGNORECASE)
MAX_STARTUP_SECONDS = 7 * 86400  # a StartupDuration beyond a week (or below 0) is a bad value


def error_kind(message: str | None) -> str:
    """The kind of an error entry, from its message: a life-cycle action, a webhook, or other."""
    text = (message or "")[:MAX_ERROR_MESSAGE_CHARS]
    if _LIFECYCLE.search(text):
        return LIFECYCLE_ACTION
    if _WEBHOOK.search(text):
        return WEBHOOK
    return OTHER_ERROR


class _SearchError(msgspec.Struct, rename="pascal"):
    time: Int64  # an entry without a time is a bad value: its record is invalid
    message: str | None = None


class _Concise(msgspec.Struct, rename="pascal"):
    """A mode-5 record as decoded: only the fields the launch collector uses."""

    id: Int64
    start: Int64  # a record without a Start cannot be placed in time: invalid
    end: Int64 | None = None
    lab_profile_id: Int64 | None = None
    lab_host_id: Int64 | None = None
    datacenter_id: Int64 | None = None
    delivery_region_id: Int64 | None = None
    startup_duration: Annotated[float, msgspec.Meta(ge=0, le=MAX_STARTUP_SECONDS)] | None = None
    errors: list[_SearchError] | None = None
    lab_host_name: str | None = None
    datacenter_name: str | None = None
    delivery_region_name: str | None = None
    api_consumer_name: str | None = None


class ErrorEntries(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """The error entries of a record that share one time and kind: how many distinct messages."""

    time: int
    kind: str
    count: int


class LaunchRecord(msgspec.Struct, frozen=True, gc=False):
    """What the launch collector keeps of a mode-5 record: ids, times, the start-up duration, the
    errors by time and kind, and cleaned names (never a message, a credential or a person)."""

    id: int
    start: int
    end: int | None
    startup_duration: float | None
    errors: tuple[ErrorEntries, ...]
    lab_profile_id: int | None = None
    lab_host_id: int | None = None
    datacenter_id: int | None = None
    delivery_region_id: int | None = None
    lab_host_name: str = ""
    datacenter_name: str = ""
    delivery_region_name: str = ""
    api_consumer: str | None = None  # the API consumer's name, cleaned; None when absent or empty


@dataclass(frozen=True)
class SearchPage:
    """One page of /labinstance/search: its records, the records skipped as invalid, and the paging."""

    records: list[LaunchRecord]
    invalid: int
    total_results: int | None
    total_pages: int | None


class _SearchEnvelope(msgspec.Struct):
    Results: msgspec.Raw = msgspec.Raw(b"null")  # an array, as real answers are (the spec's oneOf says an object)
    TotalResults: Count | None = None
    TotalPages: Count | None = None
    Status: int | None = None
    Error: str | None = None


_search_envelope = msgspec.json.Decoder(_SearchEnvelope, strict=False)
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])
_concise = msgspec.json.Decoder(_Concise, strict=False)


def launch_record(c: _Concise) -> LaunchRecord:
    """What is kept of a decoded record (the LaunchRecord docstring)."""
    distinct: dict[tuple[int, str], set[str]] = {}
    for e in c.errors or ():
        message = (e.message or "")[:MAX_ERROR_MESSAGE_CHARS]
        distinct.setdefault((e.time, error_kind(message)), set()).add(message)
    errors = tuple(ErrorEntries(t, kind, len(messages)) for (t, kind), messages in sorted(distinct.items()))
    return LaunchRecord(
        id=c.id, start=c.start, end=c.end, startup_duration=c.startup_duration, errors=errors,
        lab_profile_id=c.lab_profile_id, lab_host_id=c.lab_host_id, datacenter_id=c.datacenter_id,
        delivery_region_id=c.delivery_region_id, lab_host_name=clean_text(c.lab_host_name),
        datacenter_name=clean_text(c.datacenter_name), delivery_region_name=clean_text(c.delivery_region_name),
        api_consumer=clean_text(c.api_consumer_name) or None,
    )


def decode_search_page(body: bytes) -> SearchPage:
    """Decode one page of `/labinstance/search?mode=5`.

    A record that fails validation (no Id or Start, a value out of range, an error without a time)
    is skipped and counted; the page is refused as a whole only when it is not a search answer at
    all (not JSON, Status other than 1, Results neither an array nor an object). A single object
    as Results (the spec's oneOf) is read as a page of one record.
    """
    try:
        env = _search_envelope.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a lab instance search answer: {_first_line(exc)}") from None
    if env.Status != 1:
        # The Error text is not kept: this endpoint's answers carry personal data. Whether it is about the
        # API key is (failures.py reads that from the message).
        about_key = "; it is about the API key" if env.Error and KEY_ERROR.search(env.Error) else ""
        raise UpstreamError(f"Status {env.Status!r} (the Error text of a search answer is not shown){about_key}")
    raws: list[msgspec.Raw]
    first = bytes(env.Results).lstrip()[:1]
    if first in (b"", b"n"):  # absent, or null
        raws = []
    elif first == b"[":
        try:
            raws = _raw_list.decode(env.Results)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise DecodeError(f"Results is not an array of records: {_first_line(exc)}") from None
    elif first == b"{":
        raws = [env.Results]
    else:
        raise DecodeError("Results is neither an array nor an object")
    records: list[LaunchRecord] = []
    invalid = 0
    for raw in raws:
        try:
            records.append(launch_record(_concise.decode(raw)))
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            invalid += 1
    return SearchPage(records, invalid, env.TotalResults, env.TotalPages)


def _first_line(exc: BaseException) -> str:
    """msgspec's message names a path and a type, never a value; kept to one bounded line anyway."""
    return str(exc).splitlines()[0][:MAX_ERROR_CHARS] if str(exc) else type(exc).__name__
