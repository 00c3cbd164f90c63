"""Property tests of the /labinstance/search (mode 5) decoder: whatever the API sends, a page of records or a
typed error, never a crash; a bad record never sinks its page; what is decoded holds no credential, person
or error message, names are safe label values, and each distinct error entry is counted once under one kind."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.model import (
    ERROR_KINDS,
    MAX_LABEL_CHARS,
    DecodeError,
    LaunchRecord,
    UpstreamError,
    decode_search_page,
)

from .test_model_properties import INT64, PROPERTY, json_values  # the same JSON strategies as LatestResults

UAT = Path(__file__).parent / "fixtures" / "labinstance_search__uat_mode5_redacted.json"  # the vendor's, as published
SECRET = "S3cr3t-Canary-Value"  # in every field the decoder must never read

chaos = json_values | st.sampled_from([0, -1, INT64, INT64 + 1, 10**30, 1e308, "12", "NaN", "", [], {}])
names = st.none() | st.text(max_size=300) | st.sampled_from(
    ["<b>HV-01</b>", "ASH\x00UAT\u202e", "&lt;script&gt;", " x " * 100, "LMS Prod"])
messages = st.one_of(
    st.sampled_from(["Configuration error encountered when executing life cycle action 3466 script.",
                     f'Error calling API Consumer webhook Scoring at URL https://h.invalid/?token={SECRET}',
                     "Something else", ""]),
    st.text(max_size=60)) | st.none()


@st.composite
def records(draw: Any) -> dict[str, Any]:
    """A mode-5 record: mostly plausible values, sometimes chaos, always the fields that must never be read."""
    def field(plausible: Any) -> Any:
        return draw(st.one_of(plausible, chaos) if draw(st.integers(0, 9)) == 0 else plausible)

    record: dict[str, Any] = {
        "Id": field(st.integers(1, 10**9)), "Start": field(st.integers(1_700_000_000, 1_900_000_000)),
        "End": field(st.none() | st.integers(1_700_000_000, 1_900_000_000)),
        "StartupDuration": field(st.none() | st.integers(0, 3600) | st.floats(0, 3600)),
        "LabProfileId": field(st.none() | st.integers(1, 99999)), "LabHostId": field(st.none() | st.integers(1, 999)),
        "DatacenterId": field(st.none() | st.integers(1, 99)), "DeliveryRegionId": field(st.none() | st.integers(1, 9)),
        "LabHostName": field(names), "DatacenterName": field(names), "DeliveryRegionName": field(names),
        "ApiConsumerName": field(names), "ErrorCount": field(st.text(max_size=3)),
        "Errors": field(st.lists(st.fixed_dictionaries(
            {"Time": st.integers(1_700_000_000, 1_900_000_000), "Message": messages}), max_size=6)),
        # What must never be read: credentials, people, notes, URLs.
        "UserEmail": f"{SECRET}@example.invalid", "UserFirstName": SECRET, "UserLastName": SECRET,
        "VirtualMachineCredentials": [{"Username": SECRET, "Password": SECRET}],
        "CloudCredentials": [{"Key": SECRET}], "Notes": [{"Text": SECRET}], "DetailsUrl": f"https://x/{SECRET}",
    }
    if draw(st.booleans()):
        del record[draw(st.sampled_from(sorted(record)))]  # a field missing
    return record


@PROPERTY
@given(body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_page_or_a_typed_error(body: bytes) -> None:
    try:
        page = decode_search_page(body)
    except (DecodeError, UpstreamError):
        return
    assert all(isinstance(r, LaunchRecord) for r in page.records) and page.invalid >= 0


@PROPERTY
@given(items=st.lists(records(), max_size=8), shape=st.sampled_from(["array", "object", "null", "missing"]))
def test_every_record_decodes_safely_or_is_counted_invalid(items: list[dict[str, Any]], shape: str) -> None:
    results: Any = {"array": items, "object": items[0] if items else None, "null": None}.get(shape)
    body = {"TotalResults": len(items), "TotalPages": 1, "Status": 1, "Error": None}
    if shape != "missing":
        body["Results"] = results
    page = decode_search_page(json.dumps(body).encode())
    sent = len(items) if shape == "array" else (1 if shape == "object" and items else 0)
    assert len(page.records) + page.invalid == sent  # a bad record is counted, never sinks its page
    assert SECRET not in repr(page)  # no credential, person, note, URL or message was kept
    for r in page.records:
        assert 0 <= (r.startup_duration or 0) <= 7 * 86400 and -(2**63) <= r.start <= INT64
        for name in (r.lab_host_name, r.datacenter_name, r.delivery_region_name, r.api_consumer or ""):
            # No tag, not even an unterminated one; a "<" that starts no tag ("a < b", "<") is plain text.
            assert len(name) <= MAX_LABEL_CHARS and name == name.strip() and not re.search(r"<[A-Za-z/!?]", name)
            assert not any(ord(ch) < 32 or 0x202A <= ord(ch) <= 0x202E for ch in name)
        assert r.api_consumer != ""  # absent or empty is None ("unknown")
        assert all(e.kind in ERROR_KINDS and e.count >= 1 for e in r.errors)
        # Each distinct (time, message) once, under one kind (where the record it came from is plain to see:
        # an integer Id no other record has).
        sources = [i for i in (items if shape == "array" else [items[0]]) if i.get("Id") == r.id
                   and type(i.get("Id")) is int]
        if len(sources) == 1 and isinstance(sources[0].get("Errors"), list):
            distinct = {(e["Time"], e["Message"] or "") for e in sources[0]["Errors"]}
            assert sum(e.count for e in r.errors) == len(distinct)


@pytest.mark.parametrize("error", ["Search is not enabled", f"Invalid API key for {SECRET}", None])
def test_a_status_0_answer_is_an_upstream_error_without_its_text(error: str | None) -> None:
    with pytest.raises(UpstreamError) as raised:
        decode_search_page(json.dumps({"Status": 0, "Error": error, "Results": None}).encode())
    assert SECRET not in str(raised.value) and "not enabled" not in str(raised.value)
    assert ("API key" in str(raised.value)) == (error is not None and "API key" in error)


def test_the_uat_page_decodes_whole() -> None:
    page = decode_search_page(UAT.read_bytes())
    assert (len(page.records), page.invalid, page.total_results, page.total_pages) == (14, 0, 14, 1)
    assert "Password" not in repr(page) and "@" not in repr(page) and "receiver.example.invalid" not in repr(page)
