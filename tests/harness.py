"""Shared test helpers, one module: constants, records, clocks, free ports, required tools, building a poller
or an app, an exporter in this process (Harness) or as a process of its own (ExporterProcess), and reading
an exposition. Fixtures that use them are in conftest.py (and `harness` below)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest
import requests
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import statefile
from exporter.app import ExporterApp
from exporter.cli import build_parser
from exporter.client import SkillableClient
from exporter.config import load_config
from exporter.model import LabResult
from exporter.poller import Poller
from exporter.server import ExporterServer

from .fakeapi import FakeSkillable
from .ports import free_demo_port, free_port

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_800_000_000  # the fake API's clock at the start of every test
# What Prometheus sends, roughly: OpenMetrics first, the text format as the fallback.
OPENMETRICS = "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;q=0.3"


class MonotonicStub:
    """A monotonic clock the test moves by hand, for intervals and backoff."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def tool(
    name: str, install_hint: str = "Debian's prometheus / prometheus-alertmanager packages; .ci/run installs them"
) -> str:
    """Path of a required command-line tool: next to this Python first (a venv), then PATH. A missing
    tool fails the test (never skips it)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed ({install_hint})", pytrace=False)
    return found


def eventually(check: Callable[[], Any], deadline: float, what: str, interval: float = 0.05,
               ignoring: tuple[type[Exception], ...] = ()) -> Any:
    """Call `check` until it returns something truthy, or fail once `deadline` seconds have passed.
    Errors of the `ignoring` types (a server still starting) count as not yet, and the last one is
    named in the failure."""
    end = time.monotonic() + deadline
    last_error: Exception | None = None
    while True:
        try:
            got = check()
            if got:
                return got
        except ignoring as exc:
            last_error = exc
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g}s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return int(proc.returncode)


# Set by conftest.py before any test module is imported: True when the run deselects the integration
# tests (`pytest -m "not integration"`, the fast lane for day-to-day work).
FAST_LANE = False


def examples(n: int) -> int:
    """A property test's number of examples: `n` in the whole suite (CI runs that), a tenth of it (at
    least 10) in the fast lane, which must stay under 30 s."""
    return max(10, n // 10) if FAST_LANE else n


def result(instance_id: int, start: int | None, end: int | None = None, status: int = 4, host: int | None = 1,
           datacenter: int | None = 1, region: int | None = 1, **extra: Any) -> LabResult:
    """A decoded LatestResults record, for driving FleetState directly."""
    return LabResult(lab_instance_id=instance_id, start=start, end=end, completion_status=status,
                     lab_host_id=host, datacenter_id=datacenter, delivery_region_id=region, **extra)


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


def make_app(fake: FakeSkillable, mono: MonotonicStub, *argv: str) -> ExporterApp:
    """An ExporterApp configured by command-line flags, polling the fake with its clocks (no /stats, no regions,
    no launch collector unless `argv` turns it on)."""
    flags = vars(build_parser().parse_args(["--no-collector.stats", "--no-collector.delivery-regions",
                                            "--no-collector.launch", *argv]))
    config = load_config(flags, {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    return ExporterApp(config, clock=fake.clock, monotonic=mono)


def registry_text(app: ExporterApp) -> bytes:
    """The plain path: prometheus_client rendering the registry, no cache involved."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(app.collector)
    return generate_latest(registry)


SCRAPE_TIMEOUT = 3.0  # what Prometheus would send in X-Prometheus-Scrape-Timeout-Seconds
# --skillable.timeout in these tests: below the scrape timeout, as a deployment sets it, so a
# failing poll ends (and is counted) within the scrape that asked for it.
POLL_TIMEOUT = 2.0
MAX_BODY = 64 * 1024  # --skillable.max-response-bytes in these tests


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# The counters whose values must never be lost or doubled (the exporter's lab counters).
LAB_COUNTERS = (
    "skillable_lab_instances_started_total",
    "skillable_lab_instances_ended_total",
    "skillable_exams_total",
    "skillable_exams_passed_total",
    "skillable_lab_run_time_seconds_count",
    "skillable_lab_task_completion_ratio_count",
    "skillable_exam_score_ratio_count",
)


def lab_counters(samples: Samples) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {key: value for key, value in samples.items() if key[0] in LAB_COUNTERS}


@dataclass
class Scrape:
    status: int
    text: str
    elapsed: float

    @property
    def samples(self) -> Samples:
        return parse(self.text)

    @property
    def up(self) -> float:
        return total(self.samples, "skillable_up")

    def failures(self, reason: str | None = None) -> float:
        labels = {"endpoint": "LatestResults"} | ({"reason": reason} if reason else {})
        return total(self.samples, "skillable_api_request_failures_total", **labels)


class Harness:
    """ExporterApp + ExporterServer in this process, on loopback, polling the fake with its clocks."""

    def __init__(self, fake: FakeSkillable, state_file: str | None = None, **env: str) -> None:
        environ = {
            "SKILLABLE_API_URL": fake.url,
            "SKILLABLE_API_KEY": fake.state.api_key,
            "SKILLABLE_COLLECTOR_STATS": "false",
            "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false",
            "SKILLABLE_COLLECTOR_CATALOG": "false",
            "SKILLABLE_COLLECTOR_LAUNCH": "false",  # tests of the launch collector turn it on
            "SKILLABLE_MAX_RESPONSE_BYTES": str(MAX_BODY),
            "SKILLABLE_TIMEOUT": str(POLL_TIMEOUT),
            # Tests move the monotonic clock by hand: every scrape may poll unless a test sets an interval.
            "SKILLABLE_MIN_POLL_INTERVAL": "0",
        }
        environ.update(env)
        self.fake = fake
        self.mono = MonotonicStub()
        self.app = ExporterApp(load_config({}, environ), clock=fake.clock, monotonic=self.mono)
        self.store = statefile.open_store(state_file) if state_file else None
        if self.store is not None:
            statefile.attach(self.store, self.app.pollers)
        self.server = ExporterServer(("127.0.0.1", 0), self.app)
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.session = requests.Session()
        self._closed = False

    def scrape(self, scrape_timeout: float | None = SCRAPE_TIMEOUT) -> Scrape:
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": f"{scrape_timeout:g}"} if scrape_timeout else {}
        started = time.monotonic()
        response = self.session.get(self.url + "/metrics", headers=headers, timeout=30)
        return Scrape(response.status_code, response.text, time.monotonic() - started)

    @property
    def poller(self):  # type: ignore[no-untyped-def]
        return self.app.pollers[""]

    def close(self) -> None:
        """As on SIGTERM: stop serving, write the state file a last time, close."""
        if self._closed:
            return
        self._closed = True
        self.session.close()
        self.server.shutdown()
        self.server.server_close()
        if self.store is not None:
            statefile.shutdown(self.store, self.app.pollers, 5)
        self.app.close()


@pytest.fixture
def harness(fake: FakeSkillable) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(state_file: str | None = None, **env: str) -> Harness:
        made.append(Harness(fake, state_file, **env))
        return made[-1]

    yield make
    for h in made:
        h.close()


class ExporterProcess:
    """`python3 -m exporter ...` as a user would run it, with its log captured to a file.

    Ready once /healthz answers; with `https`, over TLS, checked against `verify` (a CA file)
    and presenting `cert` (a client certificate) on every request.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, https: bool = False,
        verify: str | bool = True, cert: tuple[str, str] | None = None, prefix: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the exporter runs under (e.g. prlimit), exec-ing it in the same process."""
        self.port = free_demo_port() if "--demo" in args else free_port()
        self.log_path = log_path
        self.verify = verify
        self.cert = cert
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}", *args],
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
        status = stop_process(self.proc, 15)
        if not self._log.closed:
            self._log.close()
        return status
