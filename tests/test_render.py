"""The line renderer (render.py) writes exactly the bytes prometheus_client's encoders write,
and the series count grows as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import SummaryMetricFamily

from exporter.collector import SkillableCollector
from exporter.config import Names
from exporter.render import Encoding, LineEncoder, Rows, _Families, choose_encoding
from exporter.state import FleetState

from .fakeapi import FakeSkillable, lab
from .harness import NOW, OPENMETRICS, MonotonicStub, examples, make_app, make_poller, result


class CountingEncoder:
    """An encoder that counts the samples it is asked to write: what the renderer had to learn."""

    def __init__(self, accept: str) -> None:
        self.encoder, self.content_type = choose_encoder(accept)
        self.samples = 0

    def __call__(self, registry: Any) -> bytes:
        families = list(registry.collect())
        self.samples += sum(len(f.samples) for f in families)
        return self.encoder(_Families(families))

    def encoding(self) -> Encoding:
        return Encoding(self.content_type, self)


# -- series counts ---------------------------------------------------------------

@pytest.mark.integration
def test_exposition_series_grow_by_26_per_lab_host(fake: FakeSkillable) -> None:
    """What BENCHMARKS.md states per 100 lab hosts, counted in the exposition itself."""
    series = {}
    for hosts in (10, 20):
        state = FleetState(2000)
        state.apply([result(i, NOW - 100, NOW - 50, host=i, datacenter=1, region=1) for i in range(hosts)],
                    NOW - 3600)
        app = make_app(fake, MonotonicStub())
        next(iter(app.pollers.values())).state = state
        text, _ = app.metrics("", None)
        series[hosts] = sum(1 for line in text.splitlines()
                            if line.startswith((b"skillable_lab_instances", b"skillable_exams")))
        app.close()
    assert series[20] - series[10] == 26 * 10


# -- byte for byte against prometheus_client ------------------------------------------

ENCODINGS = [
    "",
    "text/plain;version=0.0.4",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=dots",
    OPENMETRICS,
]


def odd_families(step: int) -> list[Any]:
    """Every shape an encoder treats specially, values moving with `step`."""
    from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                                InfoMetricFamily, Metric, SummaryMetricFamily)
    from prometheus_client.samples import Exemplar

    gauge = GaugeMetricFamily("skillable_odd", 'Help with "quotes", a \\ and a\nnewline; é.', labels=["a", "b_c"])
    gauge.add_metric(['x"y', "line\nbreak"], step)
    gauge.add_metric(["back\\slash", "ünïcode"], float("nan"))
    gauge.add_metric(["inf", "1"], float("inf") if step % 2 else float("-inf"))
    gauge.add_metric(["big", "1"], 1e22 + step)
    gauge.add_metric(["small", "1"], 1.5e-7 * step)
    gauge.add_metric(["zero", "1"], 0.0)
    gauge.add_metric(["zero", "2"], -0.0)
    gauge.add_metric(["zero", "3"], 0)
    gauge.add_metric(["huge", "int"], 2**63 - 1)
    counter = CounterMetricFamily("skillable_things", "Things.", labels=["z", "a"], created=1_700_000_000.5)
    counter.add_metric(["1", "2"], step, created=1_700_000_001)
    plain_counter = CounterMetricFamily("skillable_plain", "Plain.", labels=["k"])
    plain_counter.add_metric(["v"], 3 + step, timestamp=1_700_000_000 if step % 2 else None)
    with_exemplar = CounterMetricFamily("skillable_ex", "Exemplar.", labels=["k"])
    with_exemplar.add_metric(["v"], step, exemplar=Exemplar({"trace_id": "abc"}, 1.0, 1_700_000_000))
    hist = HistogramMetricFamily("skillable_seconds", "Seconds.", labels=["r"], unit="seconds")
    hist.add_metric(["1"], [("0.5", step), ("+Inf", step + 1)], sum_value=2.5 * step)
    summary = SummaryMetricFamily("skillable_sum", "Summary.", count_value=step, sum_value=1.5)
    info = InfoMetricFamily("skillable_build", "Build.", value={"version": "1.0", "odd": 'a"b'})
    untyped = Metric("skillable_untyped", "Untyped.", "unknown")
    untyped.add_sample("skillable_untyped", {"x": "1"}, step)
    dotted = GaugeMetricFamily("skillable.dotted.name", "Not a legacy name.", labels=["ok"])
    dotted.add_metric(["1"], step)
    empty = GaugeMetricFamily("skillable_empty", "No samples.", labels=["a"])
    return [gauge, counter, plain_counter, with_exemplar, hist, summary, info, untyped, dotted, empty]


@pytest.mark.parametrize("accept", ENCODINGS)
def test_line_encoder_writes_exactly_what_the_encoder_writes(accept: str) -> None:
    encoder = CountingEncoder(accept)
    fast = LineEncoder(encoder)
    for step in range(4):  # kept prefixes and headers are reused with new values
        families = odd_families(step)
        before = encoder.samples
        assert fast(families) == encoder.encoder(_Families(families))
        if step == 1:
            first_time = before
    # From the second body on, only the families the fast path does not vouch for go to the encoder.
    asked_again = encoder.samples - before
    assert asked_again < first_time


@pytest.mark.integration
@pytest.mark.parametrize("accept", ENCODINGS)
def test_exposition_equals_the_encoder_over_polls_with_odd_names(fake: FakeSkillable, accept: str,
                                                                tmp_path: Path) -> None:
    config = tmp_path / "names.yml"
    config.write_text('names:\n  datacenters: {3: "US \\"East\\" \\\\ é"}\n  lab_hosts: {49: "line\\nbreak"}\n')
    mono = MonotonicStub()
    app = make_app(fake, mono, "--config.file", str(config))
    encoder, _ = choose_encoder(accept)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(app.collector)
    for step in range(5):
        fake.add(lab(100 + step, NOW + step * 60 - 30, NOW + step * 60 - 5, status=[4, 20, 1, 99, 3][step],
                     host=49 + step % 2, IsExam=True, ExamScore=50 + step, ExamMaxPossibleScore=100,
                     ExamPassed=step % 2 == 0))
        body, _ = app.metrics(accept, None)
        assert body == encoder(registry)
        fake.advance(60)
        mono.advance(1)
    app.close()


@pytest.mark.integration
@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_exposition_of_several_accounts_equals_the_encoder(fake: FakeSkillable, accept: str) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4), lab(2, NOW - 300, None, host=50))
    emea, americas = make_poller(fake), make_poller(fake, max_lab_hosts=1)
    collector = SkillableCollector([("emea", emea), ("americas", americas)], Names(), 60)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoding = choose_encoding(accept)
    encoder = encoding.encoder
    for step in range(3):
        emea.refresh(5)
        americas.refresh(5)
        body = collector.exposition(encoding)
        assert body == encoder(registry)
        assert b'account="americas"' in body and b'lab_host_id="other"' in body
        fake.advance(60)
        fake.add(lab(10 + step, NOW + step * 60, NOW + step * 60 + 30, status=20, host=51 + step))


def test_rows_the_encoder_writes_otherwise_go_through_the_encoder() -> None:
    """Rows whose samples come out other than prefix + value (here, a name outside the family's) are
    written by the encoder, as it writes them."""
    from prometheus_client.metrics_core import CounterMetricFamily

    empty = CounterMetricFamily("skillable_odd", "Odd.", labels=["k"])
    rows = Rows(empty, ["a", "b"], [1, 2], lambda key: ("skillable_other_total", {"k": str(key)}))
    for accept in ENCODINGS:
        encoder, _ = choose_encoder(accept)
        assert LineEncoder(encoder)([rows]) == encoder(_Families([rows.metric()]))


def summary_rows(profiles: list[str], step: int) -> Rows:
    """A summary without quantiles (_count and _sum per label value) as Rows, as the profile families come."""
    header = SummaryMetricFamily("skillable_odd_seconds", 'A "summary".', labels=["lab_profile_id"], unit="seconds")
    keys = [(p, suffix) for p in profiles for suffix in ("_count", "_sum")]
    values = [v for i, _ in enumerate(profiles) for v in (i + step, (i + step) * 1.5)]
    return Rows(header, keys, values, lambda key: ("skillable_odd_seconds" + key[1], {"lab_profile_id": key[0]}))


@pytest.mark.parametrize("accept", ENCODINGS)
def test_summaries_as_rows_equal_the_encoder_and_learn_only_new_rows(accept: str) -> None:
    encoder = CountingEncoder(accept)
    fast = LineEncoder(encoder)
    profiles = ["1", 'x"y', "é"]
    for step in range(4):
        if step == 2:
            profiles.insert(1, "new")  # a profile appears mid-stream, not at the end
        rows = summary_rows(profiles, step)
        before = encoder.samples
        assert fast([rows]) == encoder.encoder(_Families([rows.metric()]))
        assert encoder.samples - before == {0: 6, 1: 0, 2: 2, 3: 0}[step]  # only the unseen rows are learnt


TIMESTAMPED = ["application/openmetrics-text;version=1.0.0", OPENMETRICS, "application/openmetrics-text"]


@pytest.mark.parametrize("accept", TIMESTAMPED)
def test_timestamped_lines_are_the_encoders_lines_of_samples_with_timestamps(accept: str) -> None:
    """Backfill's lines (render.LineEncoder with timestamps) against the encoder's own, for samples that
    carry a timestamp: escaping, label order, -0.0, NaN, infinities, ints, rows that appear later."""
    from prometheus_client.metrics_core import CounterMetricFamily

    encoder = CountingEncoder(accept)
    fast = LineEncoder(encoder)
    keys = ['plain', 'x"y', "line\nbreak", "back\\slash", "é"]
    for step, values in enumerate([[0, -0.0, 1.5, float("nan"), 7], [3, float("inf"), -0.0, 1e308, 2**53 + 1],
                                   [0.0, float("-inf"), 10, 0.1, 12]]):
        at = 1_800_000_000 + 60 * step
        rows = summary_rows(["1", 'q"'], step)
        counter = Rows(CounterMetricFamily("skillable_odd", 'Help "text" \\ é.', labels=["k", "a"]),
                       keys[: 3 + step], values[: 3 + step],
                       lambda key: ("skillable_odd_total", {"k": str(key), "a": "second"}))
        for part in (rows, counter):
            want = encoder.encoder(_Families([part.metric(timestamp=at)])).decode()
            before = encoder.samples
            got = fast.header(part.family) + fast.timestamped_lines(fast.timestamped_starts(part, at), part.values, at)
            assert got + fast.trailer == want
            if step == 2 and part is counter:
                assert encoder.samples - before == 1  # only the row not seen before went to the encoder


def test_timestamped_starts_refuse_rows_the_encoder_writes_otherwise() -> None:
    """A sample named outside its family, or the text format (which writes timestamps in milliseconds):
    the line is not start + value + timestamp, and nothing is kept."""
    from prometheus_client.metrics_core import CounterMetricFamily

    rows = Rows(CounterMetricFamily("skillable_odd", "Odd.", labels=["k"]), ["a"], [1],
                lambda key: ("skillable_other_total", {"k": str(key)}))
    with pytest.raises(ValueError, match="skillable_odd"):
        LineEncoder(choose_encoding(OPENMETRICS).encoder).timestamped_starts(rows, 1_800_000_000)
    with pytest.raises(ValueError, match="skillable_odd_seconds"):
        LineEncoder(choose_encoding("").encoder).timestamped_starts(summary_rows(["1"], 0), 1_800_000_000)


@pytest.mark.integration
@pytest.mark.parametrize("accept", ["", OPENMETRICS, "text/plain;version=1.0.0;escaping=allow-utf-8"])
def test_new_hosts_mid_stream_are_learnt_alone_and_render_exactly(fake: FakeSkillable, accept: str) -> None:
    """Every render equals prometheus_client's; a new lab host costs its own 26 series at the encoder
    (13 place series, 11 + 2 status-less ones), not the whole family again."""
    poller = make_poller(fake)
    collector = SkillableCollector([("", poller)], Names(), 60)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder = CountingEncoder(accept)
    fake.add(*[lab(i, NOW - 600, NOW - 60, host=100 + i) for i in range(20)])
    asked = []
    for step in range(4):
        poller.refresh(5)
        before = encoder.samples
        assert collector.exposition(encoder.encoding()) == encoder.encoder(registry)
        asked.append(encoder.samples - before)
        fake.advance(60)
        # one more host in step 1 (between the others), none in step 2, two in step 3
        new_hosts = {0: [1055], 1: [], 2: [90, 999]}.get(step, [])
        fake.add(*[lab(1000 + step * 10 + i, NOW + step * 60, NOW + step * 60 + 30, host=host)
                   for i, host in enumerate(new_hosts)])
        fake.add(lab(2000 + step, NOW + step * 60, NOW + step * 60 + 20, host=101))  # a known host's change
    assert asked[0] > 20 * 26
    assert asked[1:] == [26, 0, 2 * 26]


@pytest.mark.parametrize("accept", ENCODINGS)
def test_exposition_of_a_state_with_new_hosts_equals_the_encoder_at_scale(accept: str) -> None:
    """The same at 120 hosts over two datacenters, with the state driven directly."""
    from exporter.account import Health, PollView

    state = FleetState(10_000)
    state.apply([result(i, NOW - 100, NOW - 50, host=i, datacenter=i % 2) for i in range(120)], NOW - 3600)

    class Stub:
        window_minutes = 60

        def view(self) -> PollView:
            return PollView(state.snapshot(), Health(up=True))

    collector = SkillableCollector([("", Stub())], Names(), 60)  # type: ignore[list-item]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder = CountingEncoder(accept)
    assert collector.exposition(encoder.encoding()) == encoder.encoder(registry)
    state.apply([result(5000, NOW - 10, None, host=150_000, datacenter=7)], NOW - 3600)  # new host and region
    before = encoder.samples
    assert collector.exposition(encoder.encoding()) == encoder.encoder(registry)
    assert encoder.samples - before == 26 + 40  # the host's series and its region's histograms
    state.apply([result(5000, NOW - 10, NOW - 5, host=150_000, datacenter=7)], NOW - 3600)
    before = encoder.samples
    assert collector.exposition(encoder.encoding()) == encoder.encoder(registry)
    assert encoder.samples == before


# -- choosing the encoding ---------------------------------------------------------

ACCEPT_PART = st.one_of(
    st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", "application/json", ""]),
    st.text(max_size=12),
)
PARAM = st.one_of(
    st.builds(lambda v: f"version={v}", st.one_of(
        st.sampled_from(["1.0.0", "0.0.1", "0.0.4", "2.0.0", "1.19.0", "abc", "1..0", "1.0.a", "", "01.0.0", "9"]),
        st.text(max_size=8))),
    st.builds(lambda e: f"escaping={e}", st.sampled_from(["allow-utf-8", "underscores", "dots", "values", "x"])),
    st.sampled_from(["q=0.5", "charset=utf-8", ""]),
)
ACCEPT = st.lists(st.builds(lambda m, ps: ";".join([m, *ps]), ACCEPT_PART, st.lists(PARAM, max_size=3)),
                  max_size=4).map(",".join)


@settings(max_examples=examples(300), deadline=None)
@given(ACCEPT)
def test_choose_encoding_answers_every_accept_header_from_a_closed_set(accept: str) -> None:
    """Never raises; one of at most 14 encodings, whatever the header; and where prometheus_client's
    choose_encoder answers, the same bytes (the version named may be the one written, see render.py)."""
    encoding = choose_encoding(accept)
    assert encoding.content_type in KNOWN_ENCODINGS
    families = odd_families(1)
    try:
        encoder, content_type = choose_encoder(accept)
    except TypeError:
        assert encoding.content_type == "text/plain; version=0.0.4; charset=utf-8"
        return
    assert encoding.encoder(_Families(families)) == encoder(_Families(families))
    if not content_type.startswith("application/openmetrics-text; version="):
        assert encoding.content_type == content_type


ESCAPINGS = ("allow-utf-8", "underscores", "dots", "values")
KNOWN_ENCODINGS = {
    "text/plain; version=0.0.4; charset=utf-8",
    "application/openmetrics-text; version=1.0.0; charset=utf-8",
    *(f"text/plain; version=1.0.0; charset=utf-8; escaping={e}" for e in ESCAPINGS),
    *(f"application/openmetrics-text; version={v}; charset=utf-8; escaping={e}"
      for v in ("1.0.0", "2.0.0") for e in ESCAPINGS),
}


def test_a_version_that_is_no_number_gets_the_default_format() -> None:
    for accept in ("text/plain; version=abc", "application/openmetrics-text; version=1.x.0", "text/plain;version=1..0"):
        assert choose_encoding(accept).content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert choose_encoding("application/openmetrics-text;version=1.19.0").content_type == \
        "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
