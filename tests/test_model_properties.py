"""Property tests: whatever the API sends, the decoder returns records or a typed error, never a crash;
a bad record never sinks its batch; and whatever records decode, the state and the exposition hold."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import SkillableCollector
from exporter.config import Names
from exporter.model import (
    Batch,
    DecodeError,
    LabResult,
    UpstreamError,
    decode_delivery_regions,
    decode_latest_results,
    decode_stats,
)
from exporter.poller import Poller
from exporter.state import MAX_FUTURE_SECONDS, FleetState

from .harness import make_poller
from .fakeapi import FakeSkillable, lab, with_records
from .harness import examples, parse, total

PROPERTY = settings(max_examples=examples(300), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

INT64 = 2**63 - 1

# -- strategies -----------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.text(max_size=20)
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)

INT_FIELDS = ("LabInstanceId", "Start", "End", "CompletionStatus", "TotalRunTimeSeconds",
              "LabHostId", "DatacenterId", "DeliveryRegionId")
FLOAT_FIELDS = ("TaskCompletePercent", "ExamScore", "ExamMaxPossibleScore")
BOOL_FIELDS = ("IsExam", "ExamPassed")
FIELDS = INT_FIELDS + FLOAT_FIELDS + BOOL_FIELDS

# Values a field may take in a hostile payload: anything JSON, with the edges weighted in.
chaos_values = (
    json_values
    | st.sampled_from([0, -1, INT64, INT64 + 1, -(2**63), -(2**63) - 1, 10**30, 10**400, 1e308, -1e308, 0.5,
                       "12", "x", True, False, None, [], {}, "", "1e999", "NaN", "Infinity", "-Infinity", "nan"])
)

chaos_record = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), chaos_values, max_size=len(FIELDS) + 3
)

envelopes = st.fixed_dictionaries(
    {},
    optional={
        "Results": st.none() | st.lists(chaos_record | json_values, max_size=8) | json_values,
        "Status": st.sampled_from([1, 0, 2, -1, None, "1", "0", 1.0, True, [], {}]) | json_values,
        "Error": st.none() | st.text(max_size=40) | json_values,
        "Extra": json_values,
    },
)

# Records that are certainly valid: the right types, 64-bit integers, finite floats.
ints = st.integers(min_value=-(2**63), max_value=INT64)
valid_record = st.fixed_dictionaries(
    {"LabInstanceId": ints},
    optional={
        **{name: st.none() | ints for name in INT_FIELDS[1:]},
        **{name: st.none() | st.floats(allow_nan=False, allow_infinity=False, width=64) for name in FLOAT_FIELDS},
        **{name: st.none() | st.booleans() for name in BOOL_FIELDS},
        "UserId": st.text(max_size=5), "IpAddress": st.text(max_size=5),
    },
)
# Records that are certainly invalid: no id, an id out of range, or a field holding a structure.
invalid_record = st.one_of(
    valid_record.map(lambda r: {k: v for k, v in r.items() if k != "LabInstanceId"}),
    valid_record.map(lambda r: {**r, "LabInstanceId": None}),
    st.tuples(valid_record, st.integers(min_value=INT64 + 1, max_value=2**80)).map(
        lambda t: {**t[0], "LabInstanceId": t[1]}),
    st.tuples(valid_record, st.sampled_from(FIELDS), st.sampled_from([[1], {"a": 1}, [], {}])).map(
        lambda t: {**t[0], t[1]: t[2]}),
    st.sampled_from([None, 5, "record", [], [1, 2], True]),
)


def decode(body: bytes) -> Batch | None:
    """decode_latest_results, allowing only its typed errors."""
    try:
        return decode_latest_results(body)
    except (DecodeError, UpstreamError):
        return None


def check_state_and_exposition(results: list[LabResult]) -> None:
    """Whatever decoded must fold into the state and render, with sane numbers."""
    for r in results:
        for value in (r.task_complete_percent, r.exam_score, r.exam_max_possible_score):
            assert value is None or math.isfinite(value)
    state = FleetState(max_lab_hosts=50)
    now = 1_800_000_000
    state.apply(results, now - 3600, seen_at=now)
    state.apply(results, now - 3500, seen_at=now)  # the same batch again: an overlapping poll
    state.evict(now - 3600, now - 86400)
    snap = state.snapshot()
    place, profile = snap["place"], snap["profile"]
    assert all(v >= 0 for v in place.closed.values())
    assert all(v >= 0 for v in place.running.values())
    # Every instance held is in exactly one gauge: ended ones by status, running ones in _running.
    assert sum(place.closed.values()) + sum(place.running.values()) == snap.tracked == len(state.instances)
    assert sum(profile.closed.values()) + sum(profile.running.values()) == snap.tracked
    assert sum(profile.running.values()) == sum(place.running.values())
    assert sum(place.started.values()) <= len({r.lab_instance_id for r in results})
    for table in (place.run_time, place.task_completion, place.exam_score):
        for hist in table.values():
            assert math.isfinite(hist.total) and all(c >= 0 for c in hist.counts)


# -- properties ----------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_records_or_a_typed_error(body: bytes) -> None:
    batch = decode(body)
    if batch is not None:
        check_state_and_exposition(batch.results)


@PROPERTY
@given(json_values)
def test_arbitrary_json_gives_records_or_a_typed_error(value: Any) -> None:
    batch = decode(json.dumps(value).encode())
    if batch is not None:
        check_state_and_exposition(batch.results)


@PROPERTY
@given(envelopes)
def test_latestresults_shaped_payloads_never_crash(payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    batch = decode(body)
    if batch is None:
        return
    results = payload.get("Results")
    # A batch that decodes accounts for every record: used or counted as invalid.
    assert len(batch.results) + batch.invalid == (len(results) if isinstance(results, list) else 0)
    for r in batch.results:
        assert isinstance(r, LabResult) and -(2**63) <= r.lab_instance_id <= INT64
    check_state_and_exposition(batch.results)


@PROPERTY
@given(st.lists(st.tuples(st.booleans(), valid_record, invalid_record), max_size=15))
def test_a_bad_record_never_sinks_the_batch(mix: list[tuple[bool, dict[str, Any], Any]]) -> None:
    records = [good if is_good else bad for is_good, good, bad in mix]
    body = json.dumps({"Results": records, "Status": 1, "Error": None}).encode()
    batch = decode_latest_results(body)  # never an error: the envelope is fine
    valid = [good for is_good, good, _ in mix if is_good]
    assert [r.lab_instance_id for r in batch.results] == [r["LabInstanceId"] for r in valid]
    assert batch.invalid == len(records) - len(valid)
    for decoded, raw in zip(batch.results, valid):
        assert decoded.start == raw.get("Start") and decoded.exam_score == raw.get("ExamScore")
    check_state_and_exposition(batch.results)


# Every way JSON can carry a number that is not finite: a string the lenient decoder reads as a
# float (any case, signed or not), or a number beyond float range.
non_finite = st.one_of(
    st.tuples(st.sampled_from(["", "+", "-"]), st.sampled_from(["nan", "inf", "infinity"]), st.randoms()).map(
        lambda t: json.dumps(t[0] + "".join(c.upper() if t[2].random() < 0.5 else c for c in t[1]))),
    st.tuples(st.sampled_from(["", "-"]), st.integers(min_value=309, max_value=9999)).map(
        lambda t: f"{t[0]}1e{t[1]}"),
)


@PROPERTY
@given(st.lists(st.tuples(valid_record, st.booleans()), min_size=1, max_size=8),
       st.sampled_from(FLOAT_FIELDS), non_finite)
def test_a_non_finite_number_makes_its_record_invalid(
    mix: list[tuple[dict[str, Any], bool]], field: str, spelling: str
) -> None:
    """A poisoned float field skips its record (counted), whatever its spelling; the others stay."""
    parts = []
    for record, poisoned in mix:
        text = json.dumps({k: v for k, v in record.items() if k != field})
        parts.append(text[:-1] + f', "{field}": {spelling}}}' if poisoned else text)
    body = ('{"Status": 1, "Results": [' + ", ".join(parts) + "]}").encode()
    batch = decode_latest_results(body)
    kept = [record["LabInstanceId"] for record, poisoned in mix if not poisoned]
    assert [r.lab_instance_id for r in batch.results] == kept
    assert batch.invalid == len(mix) - len(kept)
    check_state_and_exposition(batch.results)


@PROPERTY
@given(json_values | envelopes)
def test_stats_and_delivery_regions_never_crash(value: Any) -> None:
    body = json.dumps(value).encode()
    for decoder in (decode_stats, decode_delivery_regions):
        try:
            decoder(body)
        except (DecodeError, UpstreamError):
            pass


def dated_after_tomorrow(record: dict[str, Any], now: int = 1_800_000_000) -> bool:
    stamps = [t for t in (record.get("Start"), record.get("End")) if t is not None]
    return bool(stamps) and max(stamps) > now + MAX_FUTURE_SECONDS


@pytest.mark.integration
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.booleans(), valid_record, invalid_record), min_size=1, max_size=10))
def test_invalid_records_are_counted_in_the_exposition(mix: list[tuple[bool, dict[str, Any], Any]]) -> None:
    """Through real HTTP and the collector: skillable_results_invalid_total counts the skipped records."""
    fake = FakeSkillable(now=1_800_000_000)
    try:
        fake.add(lab(1, 1_800_000_000 - 600, 1_800_000_000 - 60, status=4))
        records = [good if is_good else bad for is_good, good, bad in mix]
        fake.fault(with_records(*records), endpoint="LatestResults")
        poller: Poller = make_poller(fake)
        poller.refresh(5)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SkillableCollector([("", poller)], Names(), 60))
        samples = parse(generate_latest(registry).decode())
        assert total(samples, "skillable_up") == 1
        # Invalid: what the decoder refuses, and decodable records dated more than a day after the
        # poll (state.py, rule 9).
        refused = sum(1 for is_good, good, _ in mix if is_good and dated_after_tomorrow(good))
        assert total(samples, "skillable_results_invalid_total") == \
            sum(1 for is_good, *_ in mix if not is_good) + refused
        # The good record from the fake is always there, whatever its neighbours.
        assert total(samples, "skillable_lab_instances_ended_total", completion_status="complete") >= 1
        poller.client.close()
    finally:
        fake.stop()


@pytest.mark.parametrize("value", ["1e999", "-1e999"])
def test_infinite_numbers_are_an_invalid_record(value: str) -> None:
    body = ('{"Status":1,"Results":[{"LabInstanceId":1,"ExamScore":' + value + ',"ExamMaxPossibleScore":1},'
            + '{"LabInstanceId":2}]}').encode()
    batch = decode_latest_results(body)
    assert [r.lab_instance_id for r in batch.results] == [2] and batch.invalid == 1


# -- salvage: bad bytes spoil only their own record; a body cut short is never salvaged -------------------------

# What no JSON library writes inside a string: bytes that are not UTF-8, raw control characters, lone
# surrogates, unknown escapes. Never a quote or a backslash that would end the string.
string_garbage = st.lists(
    st.sampled_from([b"\xff", b"\xc3", b"\xe9t\xe9", b"\xed\xa0\x80", b"\x00", b"\x01", b"\t", b"\n", b"\x1f",
                     b"\\ud800", b"\\udfff", b"\\udc00\\ud800", b"\\q", b"\\u12G4", b"\\x41", b"\\U0001F600",
                     b"\\\\ud800", "\u202e".encode(), b"<b>", b"a"]),
    min_size=1, max_size=6,
).map(b"".join)
# A stray byte between two values of a record (after a space, so it never joins a number). Not a control
# character: outside a string, repair_text reads those as the whitespace they stand beside.
record_junk = st.sampled_from([b" x", b" \xff", b" #", b" 1", b" @", b" tru", b" 'a'", b" }{"])


def body_of(records: list[dict[str, Any]], status_first: bool) -> bytes:
    envelope = {"Status": 1, "Results": records} if status_first else {"Results": records, "Status": 1}
    return json.dumps(envelope).encode()


@PROPERTY
@given(records=st.lists(st.tuples(valid_record, st.none() | string_garbage), min_size=1, max_size=8),
       status_first=st.booleans())
def test_text_json_does_not_allow_in_fields_never_read_changes_no_record(
    records: list[tuple[dict[str, Any], bytes | None]], status_first: bool
) -> None:
    """Whatever a string the exporter never reads holds, every record decodes as it would without it."""
    clean = [{**r, "UserId": f"@@{i}@@"} for i, (r, _) in enumerate(records)]
    body = body_of(clean, status_first)
    expected = decode_latest_results(body)
    for i, (_, garbage) in enumerate(records):
        if garbage is not None:
            body = body.replace(f'"@@{i}@@"'.encode(), b'"' + garbage + b'"')
    got = decode_latest_results(body)
    assert (got.results, got.invalid) == (expected.results, 0)


@PROPERTY
@given(records=st.lists(st.tuples(valid_record, st.none() | record_junk), min_size=1, max_size=12),
       status_first=st.booleans(), garbage=st.none() | string_garbage)
def test_a_record_broken_between_its_values_is_skipped_and_counted_the_others_kept(
    records: list[tuple[dict[str, Any], bytes | None]], status_first: bool, garbage: bytes | None
) -> None:
    """A stray byte inside a record costs that record alone (counted invalid), wherever it is, with
    or without bad text elsewhere in the body."""
    marked = [{**r, "UserId": "@@text@@", "Zz": f"@@{i}@@"} for i, (r, _) in enumerate(records)]
    body = body_of(marked, status_first)
    if garbage is not None:
        body = body.replace(b'"@@text@@"', b'"' + garbage + b'"')
    for i, (_, junk) in enumerate(records):
        if junk is not None:
            body = body.replace(f'"@@{i}@@"'.encode(), f'"@@{i}@@"'.encode() + junk)
    kept = [r for r, junk in records if junk is None]
    got = decode_latest_results(body)
    assert got.invalid == len(records) - len(kept)
    assert got.results == decode_latest_results(body_of(kept, status_first)).results


@PROPERTY
@given(records=st.lists(st.tuples(valid_record, st.none() | record_junk, st.none() | string_garbage), max_size=6),
       status_first=st.booleans(), cut=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_a_body_cut_short_is_never_salvaged(
    records: list[tuple[dict[str, Any], bytes | None, bytes | None]], status_first: bool, cut: float
) -> None:
    """However bad the bytes before the cut, a body that ends too soon is an error, never records."""
    body = body_of([{**r, "UserId": f"@@t{i}@@", "Zz": f"@@{i}@@"} for i, (r, _, _) in enumerate(records)],
                   status_first)
    for i, (_, junk, garbage) in enumerate(records):
        body = body.replace(f'"@@{i}@@"'.encode(), f'"@@{i}@@"'.encode() + (junk or b""))
        body = body.replace(f'"@@t{i}@@"'.encode(), b'"' + (garbage or b"") + b'"')
    with pytest.raises(DecodeError):
        decode_latest_results(body[: int(len(body) * cut)])


@PROPERTY
@given(body=st.binary(max_size=400), junk=st.binary(min_size=1, max_size=4), at=st.integers(min_value=0))
def test_any_bytes_anywhere_give_records_or_a_typed_error(body: bytes, junk: bytes, at: int) -> None:
    """Arbitrary bytes dropped into a real answer: records or DecodeError/UpstreamError, never a crash."""
    real = body_of([{"LabInstanceId": 1, "UserId": body.decode("latin-1")}, {"LabInstanceId": 2}], False)
    at %= len(real) + 1
    batch = decode(real[:at] + junk + real[at:])
    if batch is not None:
        check_state_and_exposition(batch.results)
