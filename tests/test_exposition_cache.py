"""The exposition cache: reused while nothing changed, never stale, bounded whatever clients send."""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import choose_encoder

from exporter.__main__ import build_parser
from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.model import LabResult
from exporter.server import ExporterServer

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


def test_exposition_is_reused_between_polls_and_rendered_again_after_one(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    mono = MonotonicStub()
    app = make_app(fake, mono, "--skillable.min-poll-interval=30")
    first, _ = app.metrics("", None)
    again, _ = app.metrics("", None)  # no poll due: the very same body
    assert again is first
    assert first == registry_text(app)

    fake.advance(60)
    fake.add(lab(2, NOW + 10, NOW + 30, status=20))
    mono.advance(31)
    after_poll, _ = app.metrics("", None)
    assert after_poll is not first
    assert after_poll == registry_text(app)
    assert b'completion_status="lab_creation_failed"' in after_poll
    assert re.search(rb'^skillable_lab_instances_ended_total\{completion_status="lab_creation_failed"[^}]*\} 1\.0$',
                     after_poll, re.M)
    app.close()


def test_a_failed_poll_changes_the_exposition_even_with_the_state_unchanged(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    mono = MonotonicStub()
    app = make_app(fake, mono, "--skillable.min-poll-interval=0")  # the second scrape polls
    good, _ = app.metrics("", None)
    assert b"skillable_up 1.0" in good
    fake.fault(lambda h: h.send_raw(502, b"bad gateway", "text/plain"))
    bad, _ = app.metrics("", None)
    assert b"skillable_up 0.0" in bad
    assert bad == registry_text(app)
    app.close()


def test_each_content_type_gets_its_own_cached_body(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    app = make_app(fake, MonotonicStub(), "--skillable.min-poll-interval=30")
    text, text_type = app.metrics("", None)
    om, om_type = app.metrics(OPENMETRICS, None)
    assert text_type.startswith("text/plain") and om_type.startswith("application/openmetrics-text")
    assert om.endswith(b"# EOF\n") and not text.endswith(b"# EOF\n")
    encoder, _ = choose_encoder(OPENMETRICS)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(app.collector)
    assert om == encoder(registry)
    assert app.metrics(OPENMETRICS, None)[0] is om
    assert app.metrics("", None)[0] is text
    app.close()


def test_the_cache_stays_small_whatever_accept_headers_arrive(fake: FakeSkillable) -> None:
    mono = MonotonicStub()
    app = make_app(fake, mono, "--skillable.min-poll-interval=30")
    for version in range(20):
        app.metrics(f"application/openmetrics-text;version=1.{version}.0", None)
    assert len(app.collector._rendered) == 4  # each version names its own content type; four are kept
    kept = dict(app.collector._line_encoders)
    last = app.metrics("application/openmetrics-text;version=1.19.0", None)[0]
    fake.advance(60)
    mono.advance(31)  # a poll: the kept type is rendered again...
    assert app.metrics("application/openmetrics-text;version=1.19.0", None)[0] is not last
    assert app.collector._line_encoders == kept  # ...without dropping what the others learnt
    app.close()


def test_probe_has_its_own_cache(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    app = make_app(fake, MonotonicStub(), "--skillable.min-poll-interval=30")
    metrics, _ = app.metrics("", None)
    probe = app.probe("", "", None)
    assert probe is not None and probe[0] == metrics
    app.close()


def test_gzip_of_an_unchanged_exposition_is_reused(fake: FakeSkillable) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    app = make_app(fake, MonotonicStub(), "--skillable.min-poll-interval=30")
    server = ExporterServer(("127.0.0.1", 0), app)
    body, _ = app.metrics("", None)
    packed = server.gzipped(body)
    assert gzip.decompress(packed) == body
    assert server.gzipped(body) is packed
    assert gzip.decompress(server.gzipped(b"other")) == b"other"
    server.server_close()
    app.close()


# -- snapshots -------------------------------------------------------------------

