"""Shared fixtures: the fake API on loopback, pollers wired to it, and a running exporter process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from exporter.client import SkillableClient
from exporter.poller import Poller

from .fakeapi import FakeSkillable

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake() -> Iterator[FakeSkillable]:
    server = FakeSkillable(now=1_800_000_000)
    yield server
    server.stop()


class MonotonicStub:
    """A monotonic clock the test moves by hand, for intervals and backoff."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_poller(fake: FakeSkillable, **overrides: Any) -> Poller:
    """A Poller talking real HTTP to the fake, sharing the fake's wall clock. Its monotonic clock
    runs with the fake's too unless a test gives one (the poller times polls by it: see Poller._now)."""
    options: dict[str, Any] = {
        "window_minutes": 60,
        "overlap_minutes": 2,
        "min_interval": 0.0,
        "max_lab_hosts": 2000,
        "clock": fake.clock,
        "monotonic": fake.clock,
    }
    options.update(overrides)
    client = SkillableClient(fake.url, fake.state.api_key, 64 * 1024 * 1024)
    return Poller(client, **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ExporterProcess:
    """`python -m exporter ...` as a user would run it, with its log captured to a file.

    Ready once /healthz answers; with `https`, over TLS, checked against `verify` (a CA file)
    and presenting `cert` (a client certificate) on every request.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, https: bool = False,
        verify: str | bool = True, cert: tuple[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.verify = verify
        self.cert = cert
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        self.url = f"{'https' if https else 'http'}://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited early: {self.log()}")
            try:
                if self.get("/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"exporter did not come up: {self.log()}")

    @property
    def base(self) -> str:
        return self.url

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("cert", self.cert)
        return requests.get(self.url + path, timeout=kwargs.pop("timeout", 15), **kwargs)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()
        return int(self.proc.returncode)


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
