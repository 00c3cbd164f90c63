"""The exposition cache: reused while nothing changed, never stale, bounded whatever clients send."""

from __future__ import annotations

import gzip
import re
from typing import Any
from collections.abc import Iterator

import prometheus_client.exposition
import prometheus_client.openmetrics.exposition
import pytest
import requests
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from exporter.server import ExporterServer

from .fakeapi import FakeSkillable, lab
from .harness import NOW, OPENMETRICS, Harness, MonotonicStub, harness, make_app, registry_text  # noqa: F401

pytestmark = pytest.mark.integration  # every test here scrapes an exporter's HTTP server over loopback

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
    """Every OpenMetrics 1.x version is the same encoding: one body, rendered once, named as written."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    app = make_app(fake, MonotonicStub(), "--skillable.min-poll-interval=30")
    first, content_type = app.metrics("application/openmetrics-text;version=1.0.0", None)
    for version in range(20):
        body, answered = app.metrics(f"application/openmetrics-text;version=1.{version}.0", None)
        assert body is first and answered == content_type
    assert content_type == "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
    app.close()


@pytest.fixture
def encoder_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Every run of prometheus_client's encoders (both formats), with what it rendered: a render the
    cache did not spare, unless it rendered the runtime registry (ExporterApp.runtime), which
    /metrics renders on every scrape by design."""
    calls: list[tuple[str, Any]] = []
    for module in (prometheus_client.exposition, prometheus_client.openmetrics.exposition):
        real = module.generate_latest

        def counting(*args: Any, _real: Any = real, _name: str = module.__name__, **kwargs: Any) -> bytes:
            calls.append((_name, args[0] if args else kwargs.get("registry")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "generate_latest", counting)
    yield calls


ROTATION = [  # five valid Accept headers, five encodings (hostile input 7: four were kept)
    "",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=values",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
]


def lab_part(body: bytes) -> bytes:
    """/metrics without the runtime metrics that follow the cached exposition (process_*, python_*,
    the reload gauges), which change every scrape by design."""
    starts = [i for i in (body.find(b"# HELP process_"), body.find(b"# HELP python_")) if i >= 0]
    assert starts, "no runtime metrics after the exposition"
    return body[: min(starts)]


def test_rotating_accept_headers_cannot_force_a_render_per_scrape(
    harness: Any, encoder_calls: list[tuple[str, Any]]
) -> None:
    """Over real HTTP: after one scrape per encoding, scrapes with no poll due never run an encoder again,
    however the Accept headers rotate, and each answers what it answered the first time."""
    h: Harness = harness(SKILLABLE_MIN_POLL_INTERVAL="3600")
    h.fake.add(*[lab(i, NOW - 600, NOW - 60, status=4, host=100 + i % 7) for i in range(30)])
    first: dict[str, bytes] = {}
    content_types = set()
    for round_ in range(4):
        if round_ == 1:
            encoder_calls.clear()  # the first round learnt each encoding once
        for accept in ROTATION:
            response = requests.get(h.url + "/metrics", headers={"Accept": accept}, timeout=10)
            assert response.status_code == 200
            labs = lab_part(response.content)
            first.setdefault(accept, labs)
            assert labs == first[accept]
            content_types.add(response.headers["Content-Type"])
    assert [name for name, registry in encoder_calls if registry is not h.app.runtime] == []
    assert len(content_types) == len(ROTATION)


def test_an_accept_version_that_is_no_number_is_answered_and_serving_goes_on(harness: Any) -> None:
    """Over real HTTP, on one connection (hostile input 9): the default text format, then more answers."""
    h: Harness = harness()
    h.fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    with requests.Session() as session:
        for accept in ("text/plain; version=abc", "application/openmetrics-text; version=1.x", OPENMETRICS):
            response = session.get(h.url + "/metrics", headers={"Accept": accept}, timeout=10)
            assert response.status_code == 200
            assert b"skillable_up 1.0" in response.content
        assert response.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        garbage = session.get(h.url + "/metrics", headers={"Accept": "text/plain; version=abc"}, timeout=10)
    assert garbage.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert not garbage.content.endswith(b"# EOF\n")


def test_encodings_that_write_the_same_bytes_share_one_body_and_its_gzip(fake: FakeSkillable) -> None:
    """Escapings allow-utf-8 and underscores differ only for names that are not legacy names (every name
    here is one); dots and values escape underscores too, so they write other bytes."""
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    app = make_app(fake, MonotonicStub(), "--skillable.min-poll-interval=30")
    server = ExporterServer(("127.0.0.1", 0), app)
    bodies = [app.metrics(f"application/openmetrics-text;version={v};escaping={e}", None)[0]
              for v in ("1.0.0", "2.0.0") for e in ("allow-utf-8", "underscores")]
    assert all(body is bodies[0] for body in bodies)
    assert server.gzipped(bodies[1])[0] is server.gzipped(bodies[3])[0]
    dots = app.metrics("application/openmetrics-text;version=1.0.0;escaping=dots", None)[0]
    assert dots != bodies[0]
    text = app.metrics("text/plain;version=1.0.0;escaping=allow-utf-8", None)[0]
    assert text is not bodies[0] and text is app.metrics("", None)[0]
    server.server_close()
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
    assert gzip.decompress(b"".join(packed)) == body
    om, _ = app.metrics(OPENMETRICS, None)
    assert gzip.decompress(b"".join(server.gzipped(om))) == om
    assert server.gzipped(body)[0] is packed[0]  # kept with its body, whatever was compressed in between
    assert gzip.decompress(b"".join(server.gzipped(b"other"))) == b"other"
    server.server_close()
    app.close()
