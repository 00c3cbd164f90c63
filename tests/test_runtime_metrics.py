"""The exporter's own process metrics (client_python's standard collectors) on /metrics, after
the cached exposition, in every format and encoding the endpoint speaks."""

from __future__ import annotations

import gzip
import re
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from exporter.app import ExporterApp
from exporter.config import load_config
from exporter.server import ExporterServer

from .fakeapi import FakeSkillable, lab

pytestmark = pytest.mark.integration  # every test here scrapes an exporter's HTTP server over loopback

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
STANDARD = ("process_resident_memory_bytes", "process_cpu_seconds", "python_info", "python_gc_collections")


def test_runtime_metrics_follow_the_exposition_in_text_and_openmetrics_gzipped_or_not(run_exporter: Any) -> None:
    exporter = run_exporter("--demo")
    for encoding in ("gzip", "identity"):
        text = exporter.get("/metrics", headers={"Accept-Encoding": encoding}).text
        assert re.search(r"^process_resident_memory_bytes [1-9]", text, re.M), encoding
        assert re.search(r'^python_info\{[^}]*implementation="CPython"', text, re.M)
        assert text.index("skillable_up") < text.index("process_resident_memory_bytes")
        response = exporter.get("/metrics", headers={"Accept-Encoding": encoding, "Accept": OPENMETRICS})
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (response.headers.get("Content-Encoding") == "gzip") == (encoding == "gzip")
        om = response.text
        assert om.count("# EOF") == 1 and om.endswith("# EOF\n")
        names = {family.name for family in openmetrics_families(om)}  # the strict parser accepts it
        assert set(STANDARD) | {"skillable_up", "skillable_exporter_config_last_reload_successful"} <= names


def test_an_unchanged_exposition_is_compressed_once_and_only_the_tail_each_scrape(fake: FakeSkillable) -> None:
    fake.add(lab(1, fake.clock() - 600, fake.clock() - 60, status=4))
    app = ExporterApp(load_config({}, {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key}))
    server = ExporterServer(("127.0.0.1", 0), app)
    try:
        body, _ = app.metrics(OPENMETRICS, None)
        assert body.endswith(b"# EOF\n")
        head, rest = server.gzipped(body, b"tail one\n# EOF\n")
        assert gzip.decompress(head + rest) == body[: -len(b"# EOF\n")] + b"tail one\n# EOF\n"
        head_again, rest_again = server.gzipped(body, b"tail two\n# EOF\n")
        assert head_again is head  # the exposition was not compressed again
        assert gzip.decompress(head_again + rest_again).endswith(b"tail two\n# EOF\n")
        other, _ = server.gzipped(b"x 1\n", b"")
        assert other is not head
    finally:
        server.server_close()
        app.close()
