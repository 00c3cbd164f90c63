"""/catalog: the decoder (spec examples and property tests), the export rules, and the exporter
against the independent fake API (names in skillable_lab_profile_info, failures, body cap, budget)."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.catalog import (
    MAX_LABEL_CHARS,
    AccountProfiles,
    Catalog,
    LabProfile,
    catalog_families,
    clean_text,
    decode_catalog,
    exported_profiles,
)
from exporter.config import Names
from exporter.model import DecodeError, UpstreamError

from .fakeapi import FakeSkillable, catalog_profile, catalog_series, http_status, lab
from .harness import Harness, harness, total  # noqa: F401 (the fixture)
from .test_model_properties import PROPERTY, json_scalars, json_values  # the same JSON strategies as LatestResults

NOW = 1_800_000_000


def body(profiles: list[Any], series: list[Any] | None = None, **top: Any) -> bytes:
    return json.dumps({"LabSeries": series or [], "LabProfiles": profiles, "DeliveryRegions": [],
                       "Status": 1, "Error": None, **top}).encode()


# -- the decoder on what the spec shows ---------------------------------------------------


def test_the_spec_example_decodes_to_trimmed_names_and_facts() -> None:
    catalog = decode_catalog(body(
        [catalog_profile(5522, "Configure <b>Azure</b> AD", Number=" Module 1", PlatformId=10, IsExam=True,
                         DurationMinutes=90),
         catalog_profile(5523, "Module 3", series_id=None, Number=None, Name=None, PlatformId=99, IsExam=None,
                         Enabled=False, DurationMinutes=None, Created=1656366326607)],
        [catalog_series(1, "AZ-104 &amp; friends")]))
    first, second = catalog.profiles["5522"], catalog.profiles["5523"]
    assert first == LabProfile("5522", "Configure Azure AD", "Module 1", "1", "azure", True, True, 5400.0)
    assert second == LabProfile("5523", "5523", "", "", "unknown", False, False, None)
    assert catalog.series == {"1": "AZ-104 & friends"}
    assert catalog.skipped == 0


def test_bad_records_are_skipped_and_counted_not_the_catalog() -> None:
    catalog = decode_catalog(body(
        [catalog_profile(1, "ok"), {"Id": None, "Name": "no id"}, "not an object", {"Id": "12", "Name": "digits"},
         {"Id": True}, {"Id": 2**70}, catalog_profile(1, "duplicate, first wins")],
        [{"Id": "x"}, catalog_series(4, "s")]))
    assert sorted(catalog.profiles) == ["1", "12"]
    assert catalog.profiles["1"].name == "ok"
    assert catalog.series == {"4": "s"}
    assert catalog.skipped == 5  # four profiles and a series; a duplicate is not counted


@pytest.mark.parametrize("raw, error", [
    (b"<html>login</html>", DecodeError),
    (b'{"LabProfiles": 5, "Status": 1}', DecodeError),
    (b'{"LabProfiles": [], "Status": 0, "Error": "Invalid API key"}', UpstreamError),
    (b'{"LabProfiles": []}', UpstreamError),
])
def test_a_body_that_is_no_catalog_is_a_typed_error(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_catalog(raw)


# -- property tests -----------------------------------------------------------------------

timestamps = st.one_of(st.integers(min_value=0, max_value=2**53), st.none(),
                       st.integers(min_value=0, max_value=2**45).map(lambda ms: f"/Date({ms})/"),
                       st.integers(min_value=0, max_value=2**45).map(lambda ms: f"/Date({ms})"), st.text(max_size=20))
# JSON text (msgspec refuses a lone surrogate in a body: that whole answer is invalid_response).
json_text = st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=300), st.none(), st.integers(),
                      st.sampled_from(["<script>alert(1)</script>", "&lt;b&gt;bold&lt;/b&gt;", "<<a>b>",
                                       "a\x00b\u202ec\r\nd", " Module  7 ", "x" * 5000, "<img src=x"]))
hostile_text = st.one_of(json_text, st.text(max_size=50), st.just("\ud800x"))
profiles = st.fixed_dictionaries(
    {"Id": st.one_of(st.integers(min_value=-5, max_value=2**64), st.text(max_size=6), st.none(), st.booleans())},
    optional={"Name": json_text, "Number": json_text, "SeriesId": json_scalars, "PlatformId": json_scalars,
              "IsExam": json_scalars, "Enabled": json_scalars, "DurationMinutes": json_scalars,
              "Created": timestamps, "LastModified": timestamps, "Objective": json_text, "Tags": json_values})
LABEL_SAFE = re.compile(r"<[A-Za-z/!?]|[\x00-\x1f\x7f]")


def _label_safe(text: str) -> None:
    assert not LABEL_SAFE.search(text), text
    assert len(text) <= MAX_LABEL_CHARS and text == text.strip()
    text.encode("utf-8")  # no lone surrogate


@PROPERTY
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_any_body_decodes_or_raises_a_typed_error(raw: bytes) -> None:
    try:
        decode_catalog(raw)
    except (DecodeError, UpstreamError):
        pass


@PROPERTY
@given(st.lists(st.one_of(profiles, json_values), max_size=8))
def test_every_profile_is_decoded_with_safe_labels_or_skipped_and_counted(records: list[Any]) -> None:
    catalog = decode_catalog(json.dumps({"LabProfiles": records, "LabSeries": records, "Status": 1}).encode())
    # Each record, read once as a profile and once as a series, is decoded, skipped or a duplicate.
    assert len(catalog.profiles) + len(catalog.series) + catalog.skipped <= 2 * len(records)
    usable = [r for r in records if isinstance(r, dict) and isinstance(r.get("Id"), (int, str))
              and not isinstance(r.get("Id"), bool) and str(r["Id"]).strip().isdecimal() and int(r["Id"]) < 2**63]
    assert catalog.skipped == 2 * (len(records) - len(usable))
    for profile in catalog.profiles.values():
        assert profile.id.isdigit() and int(profile.id) < 2**63
        for text in (profile.name, profile.number):
            _label_safe(text)
        assert profile.series_id == "" or profile.series_id.isdigit()
        assert profile.platform in {"none", "hyperv", "esx", "azure", "aws", "docker", "unknown"}
        assert profile.max_duration_seconds is None or 0 <= profile.max_duration_seconds
    for name in catalog.series.values():
        _label_safe(name)
    assert set(catalog.profiles) == {str(int(r["Id"])) for r in usable}


@PROPERTY
@given(hostile_text)
def test_clean_text_never_leaves_tags_control_characters_or_long_values(value: Any) -> None:
    cleaned = clean_text(value)
    _label_safe(cleaned)
    assert clean_text(cleaned) == cleaned


def test_clean_text_keeps_ordinary_names() -> None:
    assert clean_text(" Module 1") == "Module 1"
    assert clean_text("Install SQL Server 2022 & SSMS (a < b)") == "Install SQL Server 2022 & SSMS (a < b)"
    assert clean_text("<p>Configure <b>Azure</b>  AD</p>") == "Configure Azure AD"


# -- export rules -------------------------------------------------------------------------


def _catalog(n: int, enabled_every: int = 1) -> Catalog:
    return Catalog({str(i): LabProfile(str(i), f"p{i}", "", "7", "azure", i % 2 == 0, i % enabled_every == 0, 600.0)
                    for i in range(1, n + 1)}, {"7": "Series seven"})


def test_info_goes_to_active_profiles_then_enabled_idle_ones_within_the_budget() -> None:
    catalog = _catalog(5000)
    chosen = exported_profiles(["4999", "other", "unknown", "77777"], catalog, Names(), budget=50)
    assert chosen[0] == "4999" and len(chosen) == 1 + 46  # "other", "unknown" and 77777 take budget, no info
    assert chosen[1:] == [str(i) for i in range(1, 47)]
    # More active profiles than the budget: only they, whatever the catalog holds.
    active = [str(i) for i in range(100, 160)]
    assert exported_profiles(active, catalog, Names(), budget=50) == active
    # Only enabled idle profiles.
    assert exported_profiles([], _catalog(10, enabled_every=3), Names(), budget=50) == ["3", "6", "9"]


def test_config_names_win_and_name_profiles_the_catalog_does_not_know() -> None:
    names = Names(lab_profiles={"2": "Renamed two", "900": "From the config"}, lab_series={"8": "Config series"})
    families = {f.name: f for f in catalog_families(
        [AccountProfiles("", _catalog(3, enabled_every=2), ["900", "2"])], names, budget=3, account_label=False)}
    info = {s.labels["lab_profile_id"]: s.labels for s in families["skillable_lab_profile_info"].samples}
    assert info["2"]["lab_profile_name"] == "Renamed two" and info["2"]["lab_series_id"] == "7"
    assert info["900"] == {"lab_profile_id": "900", "lab_profile_name": "From the config", "lab_profile_number": "",
                           "lab_series_id": "", "platform": "unknown", "exam": "false"}
    assert set(info) == {"2", "900"}  # 1 and 3 are idle and disabled
    series = {s.labels["lab_series_id"]: s.labels["lab_series_name"]
              for s in families["skillable_lab_series_info"].samples}
    assert series == {"7": "Series seven", "8": "Config series"}
    enabled = {s.labels["lab_profile_id"] for s in families["skillable_lab_profile_enabled"].samples}
    assert enabled == {"2"}  # 900 is not in the catalog


# -- against the fake API -----------------------------------------------------------------


def _fake_catalog(fake: FakeSkillable) -> None:
    fake.state.catalog_series = [catalog_series(1, "AZ-104 Administrator"), catalog_series(2, "Security")]
    fake.state.catalog_profiles = [
        catalog_profile(5522, "Configure Azure AD", Number="  Module 1 ", PlatformId=10, DurationMinutes=180),
        catalog_profile(6001, "Final exam", series_id=2, IsExam=True, PlatformId=2),
        catalog_profile(6002, "Retired lab", series_id=2, Enabled=False, DevelopmentStatusId=1),
        catalog_profile(6003, "Never launched", series_id=2),
    ]


def _info(samples: dict[Any, float]) -> dict[str, dict[str, str]]:
    return {dict(labels)["lab_profile_id"]: dict(labels) for (name, labels) in samples
            if name == "skillable_lab_profile_info"}


@pytest.mark.integration
def test_lab_profile_info_carries_the_catalogs_names(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    _fake_catalog(fake)
    fake.add(lab(1, NOW - 600, NOW - 60, status=4), lab(2, NOW - 300, LabProfileId=6001),
             lab(3, NOW - 200, LabProfileId=6002), lab(4, NOW - 100, LabProfileId=9999))
    h: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true")
    samples = h.scrape().samples
    info = _info(samples)
    # Profiles with series of their own: the disabled 6002 too; 9999 is in no catalog, so it has no info.
    active = {dict(ls)["lab_profile_id"] for (n, ls) in samples if n == "skillable_lab_profile_instances_started_total"}
    assert active == {"5522", "6001", "6002", "9999"}
    assert info["6002"]["lab_profile_name"] == "Retired lab" and "9999" not in info
    assert total(samples, "skillable_lab_profile_enabled", lab_profile_id="6002") == 0
    assert info["5522"] == {"lab_profile_id": "5522", "lab_profile_name": "Configure Azure AD",
                            "lab_profile_number": "Module 1", "lab_series_id": "1", "platform": "azure",
                            "exam": "false"}
    assert info["6001"]["lab_profile_name"] == "Final exam" and info["6001"]["exam"] == "true"
    assert info["6003"]["lab_profile_name"] == "Never launched"  # enabled, unused, within the budget
    assert total(samples, "skillable_lab_profile_max_duration_seconds", lab_profile_id="5522") == 10800
    assert total(samples, "skillable_lab_profile_enabled", lab_profile_id="6003") == 1
    series = {dict(ls)["lab_series_id"]: dict(ls)["lab_series_name"] for (n, ls) in samples
              if n == "skillable_lab_series_info"}
    assert series == {"1": "AZ-104 Administrator", "2": "Security"}
    catalog_calls = [s for s in fake.state.seen if s.path.endswith("/catalog")]
    assert len(catalog_calls) == 1
    text = h.scrape().text
    assert "<" not in text and "Learn" not in text  # no HTML, no objective
    assert len([s for s in fake.state.seen if s.path.endswith("/catalog")]) == 1  # hourly, not per scrape


@pytest.mark.integration
def test_catalog_failures_are_counted_and_never_set_up_to_zero(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    _fake_catalog(fake)
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    fake.fault(http_status(500), endpoint="catalog")
    h: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true")
    scrape = h.scrape()
    assert scrape.up == 1
    samples = scrape.samples
    assert total(samples, "skillable_api_request_failures_total", endpoint="catalog", reason="http_error") == 1
    assert total(samples, "skillable_api_request_failures_total", endpoint="catalog", reason="too_large") == 0
    assert _info(samples) == {}
    h.mono.advance(301)  # a failed call is tried again after 5 minutes, not an hour
    assert "5522" in _info(h.scrape().samples)


@pytest.mark.integration
def test_the_catalog_has_its_own_body_cap(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    _fake_catalog(fake)
    fake.state.catalog_profiles += [catalog_profile(7000 + i, f"Lab {i}") for i in range(60)]  # ~150 KB
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    big: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true")  # 64 KiB for LatestResults, 64 MiB for the catalog
    assert len(_info(big.scrape().samples)) > 60
    small: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true", SKILLABLE_MAX_CATALOG_BYTES="20000")
    samples = small.scrape().samples
    assert total(samples, "skillable_api_request_failures_total", endpoint="catalog", reason="too_large") == 1
    assert total(samples, "skillable_up") == 1


@pytest.mark.integration
def test_no_collector_catalog_makes_no_call(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    _fake_catalog(fake)
    h: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="false")
    samples = h.scrape().samples
    assert not [s for s in fake.state.seen if s.path.endswith("/catalog")]
    assert _info(samples) == {}
    assert not [k for k in samples if k[0] == "skillable_api_requests_total" and ("endpoint", "catalog") in k[1]]


@pytest.mark.integration
def test_info_series_stay_within_the_profile_budget(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    """5,000 catalog profiles and 5 active ones with a budget of 3: info only for the 3 with series of their own."""
    fake.state.catalog_series = [catalog_series(1, "Big")]
    fake.state.catalog_profiles = [{"Id": 10_000 + i, "Name": f"Lab {i}", "SeriesId": 1, "Enabled": True}
                                   for i in range(5000)]
    fake.add(*[lab(i, NOW - 600 + i, LabProfileId=10_000 + i) for i in range(5)])
    h: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true", SKILLABLE_MAX_LAB_PROFILES="3")
    samples = h.scrape().samples
    active = {dict(ls)["lab_profile_id"] for (n, ls) in samples if n == "skillable_lab_profile_instances_started_total"}
    assert "other" in active and len(active) <= 4
    info = _info(samples)
    assert set(info) == active - {"other"}
    assert len([k for k in samples if k[0] == "skillable_lab_profile_enabled"]) == len(info)


def test_with_several_accounts_only_the_gauges_carry_the_account() -> None:
    other = Catalog({"2": LabProfile("2", "Same id, other account", "", "", "aws", False, True, None)})
    families = {f.name: f for f in catalog_families(
        [AccountProfiles("emea", _catalog(2), ["2"]), AccountProfiles("apac", other, ["2"])],
        Names(), budget=1, account_label=True)}
    [info] = families["skillable_lab_profile_info"].samples  # one per id: the first account that knows it names it
    assert "account" not in info.labels and info.labels["lab_profile_name"] == "p2"
    enabled = {(s.labels["account"], s.labels["lab_profile_id"])
               for s in families["skillable_lab_profile_enabled"].samples}
    assert enabled == {("emea", "2"), ("apac", "2")}
    assert [s.labels["account"] for s in families["skillable_lab_profile_max_duration_seconds"].samples] == ["emea"]


@pytest.mark.integration
def test_entries_skipped_for_a_bad_id_are_counted_and_logged_once(  # type: ignore[no-untyped-def]
    fake: FakeSkillable, harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Profiles skipped for a bad id were once neither logged nor counted. Each fetch counts
    what it skipped (as each poll counts its invalid results); the log says so once, and again only when
    the number changes."""
    _fake_catalog(fake)
    fake.state.catalog_profiles += [catalog_profile(1, "x", Id="not-an-id"), catalog_profile(1, "y", Id=None), "junk"]
    fake.state.catalog_series += [{"Id": -3, "Name": "negative"}]
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    caplog.set_level(logging.DEBUG, logger="exporter")
    h: Harness = harness(SKILLABLE_COLLECTOR_CATALOG="true")
    samples = h.scrape().samples
    assert total(samples, "skillable_catalog_entries_skipped_total") == 4
    assert "5522" in _info(samples)  # the good entries are used
    h.mono.advance(3601)
    fake.advance(3601)
    assert total(h.scrape().samples, "skillable_catalog_entries_skipped_total") == 8  # the next hour's fetch
    logged = [r for r in caplog.records if r.getMessage().startswith("catalog entries skipped")]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].levelname == "WARNING" and logged[0].count == 4  # type: ignore[attr-defined]
    first = "LabProfiles[4]: Id 'not-an-id' is not a whole number below 2^63"
    assert logged[0].first == first  # type: ignore[attr-defined]
    fake.state.catalog_profiles.pop()  # one fewer: said again
    h.mono.advance(3601)
    fake.advance(3601)
    assert total(h.scrape().samples, "skillable_catalog_entries_skipped_total") == 11
    assert len([r for r in caplog.records if r.getMessage().startswith("catalog entries skipped")]) == 2


@pytest.mark.integration
def test_no_catalog_yet_means_no_skipped_count(fake: FakeSkillable, harness) -> None:  # type: ignore[no-untyped-def]
    _fake_catalog(fake)
    samples = harness(SKILLABLE_COLLECTOR_CATALOG="false").scrape().samples
    assert not [k for k in samples if k[0] == "skillable_catalog_entries_skipped_total"]
