"""The line renderer (render.py) writes exactly the bytes prometheus_client's encoders write,
and the series count grows as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder

from exporter.__main__ import build_parser
from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.model import LabResult
from exporter.state import FleetState

from .conftest import MonotonicStub
from .fakeapi import FakeSkillable, lab

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000
OPENMETRICS = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;q=0.3"


def result(instance_id: int, start: int | None, end: int | None = None, status: int = 4, host: int | None = 1,
           datacenter: int | None = 1, region: int | None = 1, **extra: Any) -> LabResult:
    return LabResult(lab_instance_id=instance_id, start=start, end=end, completion_status=status,
                     lab_host_id=host, datacenter_id=datacenter, delivery_region_id=region, **extra)


def make_app(fake: FakeSkillable, mono: MonotonicStub, *argv: str) -> ExporterApp:
    flags = vars(build_parser().parse_args(["--no-collector.stats", "--no-collector.delivery-regions", *argv]))
    config = load_config(flags, {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    return ExporterApp(config, clock=fake.clock, monotonic=mono)


def registry_text(app: ExporterApp) -> bytes:
    """The plain path: prometheus_client rendering the registry, no cache involved."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(app.collector)
    return generate_latest(registry)


# -- the exposition cache ------------------------------------------------------

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


# -- the simulator's bench hooks and the benchmark itself ----------------------------


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
    from exporter.render import LineEncoder, _Families

    encoder, _ = choose_encoder(accept)
    fast = LineEncoder(encoder)
    for step in range(4):  # kept prefixes and headers are reused with new values
        families = odd_families(step)
        assert fast(families) == encoder(_Families(families))
    assert len(fast._prefixes) >= 5  # the plain families did take the fast path


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
    [line_encoder] = app.collector._line_encoders.values()
    assert len(line_encoder._prefixes) > 26  # every lab series went the fast way
    app.close()


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_exposition_of_several_accounts_equals_the_encoder(fake: FakeSkillable, accept: str) -> None:
    from exporter.collector import SkillableCollector
    from exporter.config import Names

    from .conftest import make_poller

    fake.add(lab(1, NOW - 600, NOW - 60, status=4), lab(2, NOW - 300, None, host=50))
    emea, americas = make_poller(fake), make_poller(fake, max_lab_hosts=1)
    collector = SkillableCollector([("emea", emea), ("americas", americas)], Names(), 60)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder, content_type = choose_encoder(accept)
    for step in range(3):
        emea.refresh(5)
        americas.refresh(5)
        body = collector.exposition(encoder, content_type)
        assert body == encoder(registry)
        assert b'account="americas"' in body and b'lab_host_id="other"' in body
        fake.advance(60)
        fake.add(lab(10 + step, NOW + step * 60, NOW + step * 60 + 30, status=20, host=51 + step))


def test_rows_the_encoder_writes_otherwise_go_through_the_encoder() -> None:
    from prometheus_client.metrics_core import CounterMetricFamily

    from exporter.render import LineEncoder, Rows, _Families

    def make() -> Any:
        family = CounterMetricFamily("skillable_stamped", "Stamped.", labels=["k"])
        family.add_metric(["a"], 1, timestamp=1_700_000_000)
        family.add_metric(["b"], 2, timestamp=1_700_000_000)
        return family

    empty = CounterMetricFamily("skillable_stamped", "Stamped.", labels=["k"])
    for accept in ENCODINGS:
        encoder, _ = choose_encoder(accept)
        assert LineEncoder(encoder)([Rows(empty, ["a", "b"], [1, 2], make)]) == encoder(_Families([make()]))
