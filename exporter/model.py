"""The LatestResults record model and its decoder: pure functions, no I/O.

Only the fields the exporter uses are declared. Everything else in a result
(user, class, IP address, geolocation) is skipped by the decoder and never held
in memory, which is both cheaper and keeps personal data out of the process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

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


class LabResult(msgspec.Struct, rename="pascal", frozen=True, gc=False):
    """One LabResult. Only LabInstanceId is required; every other field may be null or absent."""

    lab_instance_id: Int64
    start: Int64 | None = None
    end: Int64 | None = None
    completion_status: Int64 | None = None
    total_run_time_seconds: Int64 | None = None
    task_complete_percent: float | None = None
    is_exam: bool | None = None
    exam_passed: bool | None = None
    exam_score: float | None = None
    exam_max_possible_score: float | None = None
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


_fast = msgspec.json.Decoder(_Envelope, strict=False)
_lenient = msgspec.json.Decoder(_LenientEnvelope, strict=False)
_one = msgspec.json.Decoder(LabResult, strict=False)


def decode_latest_results(body: bytes) -> Batch:
    """Decode a LatestResults body into typed records.

    The fast path decodes the whole payload at once. If a single result is
    malformed, the payload is decoded again keeping each result raw, so one
    bad record is counted and skipped instead of sinking the batch.
    """
    try:
        env = _fast.decode(body)
        _check_status(env.Status, env.Error)
        return Batch(env.Results or [], 0)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        _check_json(body)
        raise DecodeError(f"response is not valid JSON: {exc}") from None
    try:
        lenient = _lenient.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"response is not a LatestResults object: {exc}") from None
    _check_status(lenient.Status, lenient.Error)
    results: list[LabResult] = []
    invalid = 0
    for raw in lenient.Results or []:
        try:
            results.append(_one.decode(raw))
        except (msgspec.ValidationError, msgspec.DecodeError):
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
    id: int
    name: str | None = None


class _DeliveryRegions(msgspec.Struct):
    DeliveryRegions: list[_DeliveryRegion] | None = None
    Status: int | None = None
    Error: str | None = None


class _Stats(msgspec.Struct):
    NumActive: Int64 | None = None
    NumSaved: Int64 | None = None
    Status: int | None = None
    Error: str | None = None


@dataclass(frozen=True)
class AccountStats:
    active: int | None
    saved: int | None


def decode_delivery_regions(body: bytes) -> dict[int, str]:
    """Decode /deliveryregions into {id: name}."""
    try:
        env = msgspec.json.decode(body, type=_DeliveryRegions, strict=False)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a DeliveryRegions object: {exc}") from None
    _check_status(env.Status, env.Error)
    return {r.id: r.name for r in env.DeliveryRegions or [] if r.name}


def decode_stats(body: bytes) -> AccountStats:
    """Decode /stats into the account-wide active and saved lab counts."""
    try:
        env = msgspec.json.decode(body, type=_Stats, strict=False)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a Stats object: {exc}") from None
    _check_status(env.Status, env.Error)
    return AccountStats(env.NumActive, env.NumSaved)
