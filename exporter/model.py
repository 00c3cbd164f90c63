"""The LatestResults record model and its decoder: pure functions, no I/O.

Only the fields the exporter uses are declared. Everything else in a result
(user, class, IP address, geolocation) is skipped by the decoder and never held
in memory, which is both cheaper and keeps personal data out of the process.
"""

from __future__ import annotations

import codecs
import dataclasses
import html
import re
import sys
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

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
    salvaged: bool = False  # the body was not valid JSON: text repaired or records cut (decode_latest_results)


# -- text from the API -------------------------------------------------------------------------

MAX_LABEL_CHARS = 120  # a label value made of text from the API is cut to this
# An HTML tag, a comment, a doctype: "<" then a letter, "/", "!" or "?" (so "a < b" stays).
# An unclosed tag at the end counts too.
_TAG = re.compile(r"<[A-Za-z/!?][^<>]*(?:>|$)")


def clean_text(value: Any, limit: int = MAX_LABEL_CHARS) -> str:
    """Free text from the API as a safe label value (catalog names, delivery region names): no tags,
    no control or format characters (CR, NUL, RTL overrides, lone surrogates), collapsed whitespace,
    at most `limit` characters. Anything that is not a string is ""."""
    if not isinstance(value, str):
        return ""
    text = html.unescape(value[: limit * 8])  # bounded work; entities may spell tags, so unescape first
    text = _TAG.sub(" ", text)  # a space, so the pieces around a tag never join into a new one
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return " ".join(text.split())[:limit].rstrip()


T = TypeVar("T")


def decode_repairing(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """decoder.decode(body); a body that is not valid JSON text only inside its strings (repair_text)
    is decoded repaired. Raises what the decoder raises."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError:
        repaired = repair_text(bytes(body))
        if repaired is None:
            raise
    return decoder.decode(repaired)


_fast = msgspec.json.Decoder(_Envelope, strict=False)
_lenient = msgspec.json.Decoder(_LenientEnvelope, strict=False)
_one = msgspec.json.Decoder(LabResult, strict=False)


def decode_latest_results(body: bytes) -> Batch:
    """Decode a LatestResults body into typed records.

    The rules, in the order they are tried (each only when the one before failed):
    1. The whole payload at once (the fast path).
    2. A record that does not validate (a wrong type, a value out of range, JSON nested deeper
       than the decoder goes): the payload again, each record alone; a bad one is counted
       invalid and skipped, never sinking the batch.
    3. A body that is not valid JSON text only inside its strings (bytes that are not UTF-8, a
       lone UTF-16 surrogate such as "\\ud800", a raw control character, an unknown escape):
       those are replaced (repair_text) and 1-2 run again. No field the exporter reads is text,
       so this changes nothing it counts: the record stays valid.
    4. A body still not valid JSON (a stray byte between two values of a record): the record
       the decoder stopped in is cut out, counted invalid, and 1-3 run again, for up to
       MAX_RECORDS_CUT records. Only a body whole from its first to its last byte is salvaged:
       one cut short (truncated, or whose brackets do not close) is invalid_response, so a poll
       never stamps a success over records it did not read.
    """
    try:
        return _decode_valid_json(body)
    except msgspec.DecodeError as exc:
        body = bytes(body)  # the client may hand any buffer (client._body_buffer); what follows needs bytes
        _check_json(body)
        error = exc
    repaired = repair_text(body)
    if repaired is not None:
        body = repaired
        try:
            return dataclasses.replace(_decode_valid_json(body), salvaged=True)
        except msgspec.DecodeError as exc:
            error = exc
    return dataclasses.replace(_decode_cutting_records(body, error), salvaged=True)


def _decode_valid_json(body: bytes) -> Batch:
    """Rules 1 and 2. Raises msgspec.DecodeError (never ValidationError) when the body is not valid JSON."""
    try:
        env = _fast.decode(body)
        _check_status(env.Status, env.Error)
        return Batch(env.Results or [], 0)
    except (msgspec.ValidationError, RecursionError):
        pass
    try:
        lenient = _lenient.decode(body)
    except (msgspec.ValidationError, RecursionError) as exc:
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


MAX_RECORDS_CUT = 100  # records cut out of one body (rule 4); more, and the body is invalid_response
_ERROR_AT = re.compile(r"\(byte (\d+)\)$")


def _decode_cutting_records(body: bytes, error: msgspec.DecodeError) -> Batch:
    """Rule 4: cut out the record each decoding error lies in, while the body's structure holds."""
    spans = results_spans(body) or []
    cut, done = bytearray(body), set[tuple[int, int]]()
    while spans and len(done) < MAX_RECORDS_CUT:
        at = _ERROR_AT.search(str(error))
        if at is None or "truncated" in str(error):
            break
        where = int(at.group(1))
        span = next((s for s in spans if s[0] <= where < s[1]), None)
        if span is None or span in done:  # in the envelope, or in a record cut already
            break
        done.add(span)
        cut[span[0]:span[1]] = b"0".ljust(span[1] - span[0])  # a record that is no object: counted invalid
        try:
            batch = _decode_valid_json(bytes(cut))
        except msgspec.DecodeError as exc:
            error = exc
            continue
        if len(batch.results) + batch.invalid != len(spans):
            break  # the decoder saw other records than the scan did: not a body to salvage
        return batch
    raise DecodeError(f"response is not valid JSON: {error}") from None


# A JSON string (any bytes but an unescaped quote; a backslash escapes the next byte); an object with
# no object or array inside, whole (a record, mostly: one token instead of one per string); or a byte
# that opens, closes or separates.
# Possessive quantifiers: a run is never split again on a failed match (a string or object that does
# not end), so a hostile body cannot make the scan backtrack exponentially.
_STRING = rb'"(?:[^"\\]++|\\.)*+"'
_TOKEN = re.compile(_STRING + rb'|\{(?:[^{}\[\]"]++|' + _STRING + rb')*+\}|[\[\]{},]', re.S)
_RESULTS_KEY = b'"Results"'


def results_spans(body: bytes) -> list[tuple[int, int]] | None:
    """Where each record of the top-level Results array lies: (start, end) byte offsets, each from
    just after the `[` or `,` before it to the `,` or `]` after it. None unless the body is one
    object whose brackets all close, with nothing but whitespace after it, holding one Results
    array: a body cut short is never salvaged."""
    first = _WHITESPACE.match(body)
    if first is None or body[first.end():first.end() + 1] != b"{":
        return None
    spans: list[tuple[int, int]] = []
    depth, key, in_results, start, arrays = 0, b"", False, 0, 0
    for match in _TOKEN.finditer(body, first.end()):
        at = match.start()
        char = body[at]
        if char == 0x22:  # a string; at depth 1, the key of the value that follows
            if depth == 1:
                key = match.group()
        elif char == 0x7B and match.end() - at > 1:  # a whole object: depth stays
            if depth == 0:  # the body itself: it holds no Results array
                return None
        elif char == 0x5B or char == 0x7B:  # [ or {
            if depth == 1 and char == 0x5B and key == _RESULTS_KEY:
                in_results, start, arrays = True, at + 1, arrays + 1
            depth += 1
        elif char == 0x5D or char == 0x7D:  # ] or }
            depth -= 1
            if depth == 1 and in_results:
                if body[start:at].strip(b" \t\r\n"):
                    spans.append((start, at))
                in_results = False
            elif depth == 0:
                rest = _WHITESPACE.match(body, at + 1)
                return spans if arrays == 1 and rest is not None and rest.end() == len(body) else None
        elif depth == 2 and in_results:  # a comma between two records
            spans.append((start, at))
            start = at + 1
    return None


_WHITESPACE = re.compile(rb"[ \t\r\n]*")


# Escapes inside JSON strings, valid or not: a surrogate pair, any \uXXXX, a one-byte escape, or a
# backslash before anything else (or nothing).
_ESCAPE = re.compile(rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[0-9a-fA-F]{4}"
                     rb'|["\\/bfnrt]|.|$)', re.S)
_CONTROL = re.compile(rb"[\x00-\x1f]")
_REPLACEMENT_ESCAPE = b"\\ufffd"


def _escape(match: re.Match[bytes]) -> bytes:
    text = match.group()
    if len(text) == 6 and text[2:3] in b"dD" and text[3:4] in b"89abcdefABCDEF":
        return _REPLACEMENT_ESCAPE  # a lone surrogate: no character, so the replacement character
    if len(text) in (2, 6, 12) and (len(text) != 2 or text[1:2] in b'"\\/bfnrt'):
        return text
    return b"\\\\" + text[1:]  # an unknown escape (\q, \u12g4): the backslash as a character


def repair_text(body: bytes) -> bytes | None:
    """A body whose strings hold what JSON text may not, made valid; None if there was nothing to repair.

    Bytes that are not UTF-8 become U+FFFD; a raw control character becomes a space (inside a
    string it is not allowed; outside one, a tab or newline is whitespace like a space, any
    other an error); a lone surrogate escape becomes \\ufffd; an unknown escape keeps its
    backslash as a character. Valid JSON text keeps its meaning: only whitespace between values
    may change."""
    repaired = _valid_utf8(body)
    repaired = _CONTROL.sub(b" ", repaired)
    repaired = _ESCAPE.sub(_escape, repaired)
    return repaired if repaired != body else None


def _valid_utf8(body: bytes, chunk: int = 1 << 20) -> bytes:
    """`body` with every byte that is not UTF-8 replaced by U+FFFD, read a chunk at a time so that a large
    body never becomes one large str."""
    view = memoryview(body)
    strict = codecs.getincrementaldecoder("utf-8")()
    try:
        for i in range(0, len(body), chunk):
            strict.decode(view[i:i + chunk])
        strict.decode(b"", final=True)
        return body
    except UnicodeDecodeError:
        pass
    lenient = codecs.getincrementaldecoder("utf-8")("replace")
    parts = [lenient.decode(view[i:i + chunk]).encode() for i in range(0, len(body), chunk)]
    parts.append(lenient.decode(b"", final=True).encode())
    return b"".join(parts)


def _check_json(body: bytes) -> None:
    """Raise NotJsonError when the body does not even start like a JSON document."""
    start = bytes(body).lstrip()[:1]  # bytes(): the client may hand any buffer (client._body_buffer)
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
    """Decode /deliveryregions into {id: name}; a region that fails validation is left out. A name
    is a label value (delivery_region_name): cleaned and bounded as catalog names are (clean_text);
    a region whose name is nothing once cleaned has no name."""
    try:
        env = decode_repairing(_regions, body)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        _check_json(body)
        raise DecodeError(f"response is not a DeliveryRegions object: {exc}") from None
    _check_status(env.Status, env.Error)
    names: dict[int, str] = {}
    for raw in env.DeliveryRegions or []:
        try:
            region = decode_repairing(_region, bytes(raw))
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            continue
        name = clean_text(region.name)
        if name:
            names[region.id] = name
    return names


_regions = msgspec.json.Decoder(_DeliveryRegions, strict=False)
_stats = msgspec.json.Decoder(_Stats, strict=False)


def decode_stats(body: bytes) -> AccountStats:
    """Decode /stats into the account-wide active and saved lab counts."""
    try:
        env = decode_repairing(_stats, body)
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
