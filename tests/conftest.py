"""Shared fixtures: the fake API on loopback and exporter processes. The helpers they use are in harness.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest

from . import harness as helpers
from . import integration_guard
from .fakeapi import FakeSkillable
from .harness import NOW, ExporterProcess
# Helpers tests once imported from here: harness.py is their one home, these names only point there.
from .harness import ROOT, MonotonicStub, free_port, make_poller  # noqa: F401


def pytest_configure(config: pytest.Config) -> None:
    # A test that starts a process or binds a socket without the integration marker fails (integration_guard.py).
    config.pluginmanager.register(integration_guard, "integration_guard")
    # The fast lane: property tests run a tenth of their examples (harness.examples); the whole suite runs all.
    helpers.FAST_LANE = "not integration" in (config.getoption("markexpr") or "")


@pytest.fixture
def fake() -> Iterator[FakeSkillable]:
    server = FakeSkillable(now=NOW)
    yield server
    server.stop()


@pytest.fixture
def run_exporter(tmp_path: Path) -> Iterator[Any]:
    started: list[ExporterProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ExporterProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
        base.update(env or {})
        proc = ExporterProcess(list(args), base, tmp_path / f"exporter-{len(started)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()
