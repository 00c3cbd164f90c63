"""The LatestResults decoder on the vendor's own example and on the awkward answers the API may give."""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

import pytest

from exporter import client
from exporter.catalog import MAX_LABEL_CHARS, Catalog, clean_text, decode_catalog
from exporter.model import (
    ALL_STATUSES,
    DecodeError,
    LabResult,
    UpstreamError,
    decode_delivery_regions,
    decode_latest_results,
    decode_search_page,
    decode_stats,
    status_name,
)

VENDOR = Path(__file__).parent / "fixtures" / "latestresults__vendor_example.json"


def test_vendor_example_parses_exactly() -> None:
    batch = decode_latest_results(VENDOR.read_bytes())
    assert batch.invalid == 0
    assert batch.results == [
        LabResult(
            lab_instance_id=349744, start=1325376800, end=1325376900, completion_status=1,
            total_run_time_seconds=2548, task_complete_percent=33, is_exam=False, exam_passed=None,
            exam_score=None, exam_max_possible_score=None, lab_host_id=49, datacenter_id=3, delivery_region_id=2,
                lab_profile_id=5522,
        ),
        LabResult(
            lab_instance_id=349745, start=1325377000, end=1325377100, completion_status=1,
            total_run_time_seconds=4168, task_complete_percent=44, is_exam=False, exam_passed=None,
            exam_score=None, exam_max_possible_score=None, lab_host_id=125, datacenter_id=4, delivery_region_id=3,
                lab_profile_id=5523,
        ),
    ]


def test_personal_fields_are_not_kept() -> None:
    result = decode_latest_results(VENDOR.read_bytes()).results[0]
    assert not hasattr(result, "user_id") and not hasattr(result, "ip_address")


def test_exam_score_decimal_and_every_nullable_field_null() -> None:
    body = json.dumps({"Status": 1, "Error": None, "Results": [
        {"LabInstanceId": 1, "ExamScore": 87.25, "ExamMaxPossibleScore": 100, "ExamPassed": True},
        {"LabInstanceId": 2, "Start": None, "End": None, "LastActivity": None, "UserId": None, "ClassId": None,
         "CompletionStatus": None, "TotalRunTimeSeconds": None, "TaskCompletePercent": None, "IsExam": None,
         "ExamPassed": None, "ExamScore": None, "ExamMaxPossibleScore": None, "ExamPassingScore": None,
         "IpAddress": None, "Country": None, "Region": None, "City": None, "Latitude": None, "Longitude": None,
         "LabHostId": None, "DatacenterId": None, "DeliveryRegionId": None},
    ]}).encode()
    batch = decode_latest_results(body)
    assert batch.invalid == 0
    assert batch.results[0].exam_score == 87.25
    assert batch.results[1] == LabResult(lab_instance_id=2)


def test_unknown_fields_are_ignored() -> None:
    body = b'{"Results":[{"LabInstanceId":5,"Tag":"x","StartTime":"/Date(1)/","ExamDetails":[1]}],' \
           b'"Status":1,"Error":null,"Extra":{"a":1}}'
    assert decode_latest_results(body).results == [LabResult(lab_instance_id=5)]


def test_one_bad_record_is_skipped_and_counted() -> None:
    body = b'{"Results":[{"LabInstanceId":1},{"LabInstanceId":"not-a-number"},{"Start":5},7,' \
           b'{"LabInstanceId":2,"LabHostId":{"x":1}},{"LabInstanceId":3}],"Status":1,"Error":null}'
    batch = decode_latest_results(body)
    assert [r.lab_instance_id for r in batch.results] == [1, 3]
    assert batch.invalid == 4


@pytest.mark.parametrize("body", [
    b'{"Results":null,"Status":0,"Error":"Timeframe cannot exceed 7 days"}',
    b'{"Status":0,"Error":"Invalid API key"}',
    b'{"Results":[],"Error":null}',
])
def test_error_envelopes_raise_upstream_error(body: bytes) -> None:
    with pytest.raises(UpstreamError):
        decode_latest_results(body)


def test_error_message_is_kept() -> None:
    with pytest.raises(UpstreamError, match="Timeframe cannot exceed 7 days"):
        decode_latest_results(b'{"Results":null,"Status":0,"Error":"Timeframe cannot exceed 7 days"}')


def test_results_null_with_success_is_an_empty_batch() -> None:
    assert decode_latest_results(b'{"Results":null,"Status":1,"Error":null}').results == []


@pytest.mark.parametrize("body", [
    b"<html><body>502 Bad Gateway</body></html>",
    b'{"Results":[{"LabInstanceId":1}',
    b"",
    b"[1,2,3]",
    b'"just a string"',
    b'{"Results":"nope","Status":1}',
])
def test_non_latestresults_bodies_raise_decode_error(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_latest_results(body)


def test_status_names_cover_every_documented_code() -> None:
    documented = {1: "cancelled", 2: "no_show", 3: "incomplete", 4: "complete",
                  10: "storage_provisioning_failed", 20: "lab_creation_failed", 30: "resume_failed",
                  40: "save_failed", 50: "submitted_for_grading", 60: "grading_in_progress"}
    for code, name in documented.items():
        assert status_name(code) == name
    assert status_name(0) == status_name(99) == status_name(None) == "unknown"
    assert set(ALL_STATUSES) == set(documented.values()) | {"unknown"}


def test_stats_and_delivery_regions() -> None:
    stats = decode_stats(b'{"NumActive":12,"NumSaved":3,"Status":1,"Error":null}')
    assert (stats.active, stats.saved) == (12, 3)
    regions = decode_delivery_regions(
        b'{"DeliveryRegions":[{"Id":1,"Name":"North America","Description":null},{"Id":2,"Name":null}],'
        b'"Status":1,"Error":null}'
    )
    assert regions == {1: "North America"}
    with pytest.raises(UpstreamError):
        decode_stats(b'{"Status":0,"Error":"no permission"}')


@pytest.mark.parametrize("where", ["record", "envelope"])
def test_json_nested_past_the_decoders_depth_is_bad_input_not_a_bug(where: str) -> None:
    """1,000 levels in an unknown field made msgspec raise RecursionError (counted as internal_error)."""
    deep = b"[" * 1000 + b"]" * 1000
    if where == "record":
        body = b'{"Status": 1, "Results": [{"LabInstanceId": 1, "Extra": ' + deep + b'}, {"LabInstanceId": 2}]}'
    else:
        body = b'{"Status": 1, "Extra": ' + deep + b', "Results": [{"LabInstanceId": 2}]}'
    with pytest.raises(DecodeError):
        decode_latest_results(body)
    with pytest.raises(DecodeError):
        decode_stats(b'{"Status": 1, "NumActive": 1, "Extra": ' + deep + b"}")
    with pytest.raises(DecodeError):
        decode_delivery_regions(b'{"Status": 1, "Extra": ' + deep + b"}")


# The spellings of a non-finite number the lenient decoder would otherwise read as a float
# (hostile input 2): as a JSON string, and as a JSON number beyond float range.
NON_FINITE = ['"NaN"', '"nan"', '"Infinity"', '"-Infinity"', '"inf"', '"-inf"', "1e999", "-1e999", '"1e999"']


@pytest.mark.parametrize("field", ["TaskCompletePercent", "ExamScore", "ExamMaxPossibleScore"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_a_non_finite_number_makes_its_record_invalid(field: str, value: str) -> None:
    # JSON text put together by hand: the value is raw JSON (a bare 1e999 or a string "NaN").
    body = ('{"Status":1,"Results":[{"LabInstanceId":1,"' + field + '":' + value + '},'
            + '{"LabInstanceId":2,"' + field + '":"12.5"}]}').encode()
    batch = decode_latest_results(body)
    assert [r.lab_instance_id for r in batch.results] == [2] and batch.invalid == 1
    assert batch.results[0] == LabResult(2, **{  # a number in a string still reads as a number
        {"TaskCompletePercent": "task_complete_percent", "ExamScore": "exam_score",
         "ExamMaxPossibleScore": "exam_max_possible_score"}[field]: 12.5})


@pytest.mark.parametrize("body", [
    b'{"NumActive":"NaN","Status":1}', b'{"NumSaved":"Infinity","Status":1}', b'{"NumActive":1e999,"Status":1}',
    b'{"NumActive":-3,"Status":1}', b'{"NumActive":2.5,"Status":1}',
])
def test_stats_with_a_count_that_is_no_count_is_invalid(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_stats(body)


def test_a_bad_delivery_region_is_left_out_not_the_answer() -> None:
    regions = decode_delivery_regions(
        b'{"DeliveryRegions":[{"Id":"NaN","Name":"a"},{"Id":1e999,"Name":"b"},{"Id":1' + b"0" * 30 +
        b',"Name":"c"},{"Id":[1],"Name":"d"},7,{"Id":"4","Name":"Europe"},{"Id":5,"Name":"Asia"}],"Status":1}'
    )
    assert regions == {4: "Europe", 5: "Asia"}


def test_delivery_region_names_are_cleaned_and_bounded_as_catalog_names() -> None:
    """Region names once reached labels raw (1 MiB, HTML, CR, NUL, RTL overrides) while catalog
    names were cleaned; one function (clean_text) now serves both."""
    hostile = {
        1: "A" * (1 << 20),
        2: "<script>alert(1)</script>Europe <b>West</b>",
        3: "East\r\nUS\u0000 2",
        4: "\u202eevil\u202c Asia",
        5: "   ",
        6: "Caf\u00e9 &amp; Bar",
    }
    body = json.dumps({"DeliveryRegions": [{"Id": k, "Name": v} for k, v in hostile.items()], "Status": 1}).encode()
    regions = decode_delivery_regions(body)
    assert regions == {1: "A" * MAX_LABEL_CHARS, 2: "alert(1) Europe West", 3: "East US 2", 4: "evil Asia",
                       6: "Caf\u00e9 & Bar"}
    assert all(name == clean_text(hostile[key]) for key, name in regions.items())


def test_a_region_name_that_is_not_json_text_is_repaired_not_the_answer_lost() -> None:
    """A lone surrogate or a byte that is not UTF-8 in one region's name cost every region's name."""
    body = (b'{"DeliveryRegions":[{"Id":1,"Name":"Europe \\ud800"},{"Id":2,"Name":"Caf\xe9"},'
            b'{"Id":3,"Name":"Asia"}],"Status":1}')
    assert decode_delivery_regions(body) == {1: "Europe \ufffd", 2: "Caf\ufffd", 3: "Asia"}


# -- any buffer: large bodies are read into a populated mapping (client._body_buffer) ---------------------------

MAPPED_BODIES = [
    VENDOR.read_bytes(),
    b'{"Results":[{"LabInstanceId":1},{"LabInstanceId":"not-a-number"},{"LabInstanceId":3}],"Status":1}',
    b'{"Results":[{"LabInstanceId":1,"UserId":"us\xe9r \x00 \\q"},{"LabInstanceId":2,"Country":"US" \xff},'
    b'{"LabInstanceId":3}],"Status":1,"Error":null}',  # repaired, then one record cut out: salvaged
    b'{"Results":null,"Status":0,"Error":"Invalid API key"}',
    b"  <html><body>502 Bad Gateway</body></html>",
    b'{"Results":[{"LabInstanceId":1}',
    b'{"NumActive":3,"NumSaved":1,"Status":1}',
    b'{"DeliveryRegions":[{"Id":1,"Name":"Europe \\ud800"},{"Id":2,"Name":"Caf\xe9"}],"Status":1}',
    b'{"LabProfiles":[{"Id":7,"Name":"Lab \\ud800","Enabled":true}],"LabSeries":[],"Status":1}',
    b'{"Results":[{"Id":1,"Start":100,"LabHostName":"<b>HV</b>"},{"Id":"x"}],"Status":1,"TotalResults":2,'
    b'"TotalPages":1}',
    b'{"Results":{"Id":1,"Start":100},"Status":1}',
]


def outcome(decode: Any, body: Any) -> Any:
    try:
        value = decode(body)
    except Exception as exc:  # noqa: BLE001 - the outcome compared is the exception, whatever it is
        return type(exc), str(exc)
    if isinstance(value, Catalog):  # compared by what it holds, not by the generation each catalog gets
        return {k: v for k, v in vars(value).items() if k != "generation"}
    return value


@pytest.mark.parametrize("huge_pages", [True, False])
@pytest.mark.parametrize("body", MAPPED_BODIES)
@pytest.mark.parametrize("decode", [decode_latest_results, decode_stats, decode_delivery_regions, decode_catalog,
                                    decode_search_page])
def test_every_decoder_takes_the_mapping_large_bodies_are_read_into(decode: Any, body: bytes, huge_pages: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """From client.POPULATE_BYTES on, a body is read into an mmap (on huge pages or populated), not a
    bytearray: each decoder gives what it gives for the same bytes (a result, a repair, a record cut out, the
    same error), never a bug."""
    monkeypatch.setattr(client, "POPULATE_BYTES", 1)
    monkeypatch.setattr(client, "_huge_pages_advised", lambda: huge_pages)
    mapped = client._body_buffer(len(body))
    assert isinstance(mapped, mmap.mmap)
    mapped[:] = body
    assert outcome(decode, mapped) == outcome(decode, body)
