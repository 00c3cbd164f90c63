"""Config reload: SIGHUP and POST /-/reload on a real process, counters kept, bad configs refused;
and a reloaded web config's certificate served to new connections."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from exporter.__main__ import make_reloader
from exporter.app import RELOADABLE, ExporterApp, Reloader
from exporter.cli import build_parser
from exporter.config import SETTINGS, Config, load_config, setting_name
from exporter.server import ExporterServer
from exporter.webconfig import load_web_config

from .fakeapi import FakeSkillable, lab
from .harness import lab_counters, parse, total
from .tlsutil import certs, issue  # noqa: F401 (certs is a fixture)


@pytest.fixture
def fake() -> Iterator[FakeSkillable]:
    """The fake on the real clock: the exporter processes here run on it, and labs dated in their
    future would be refused as invalid (a record more than a day ahead of its poll)."""
    server = FakeSkillable()
    yield server
    server.stop()

RELOAD_OK = "skillable_exporter_config_last_reload_successful"
RELOAD_TIME = "skillable_exporter_config_last_reload_success_timestamp_seconds"


def write_config(path: Path, datacenter_name: str, key_file: Path) -> None:
    path.write_text(
        "skillable:\n"
        f"  api_key_file: {key_file}\n"
        "collector:\n  stats: false\n  delivery_regions: false\n"
        f"names:\n  datacenters:\n    3: {datacenter_name}\n"
    )


def datacenter_names(text: str) -> set[str]:
    return {dict(labels)["datacenter_name"] for (name, labels) in parse(text) if name == "skillable_datacenter_info"}


def start(run_exporter: Any, fake: FakeSkillable, tmp_path: Path) -> tuple[Any, Path, Path]:
    key_file = tmp_path / "key"
    key_file.write_text(fake.state.api_key)
    key_file.chmod(0o600)
    config = tmp_path / "config.yaml"
    write_config(config, "Before", key_file)
    # Every scrape polls (whatever the default interval), so a scrape after a reload uses its key.
    exporter = run_exporter(f"--config.file={config}", f"--storage.state-file={tmp_path / 'state.json'}",
                            "--skillable.min-poll-interval=0", env={"SKILLABLE_API_URL": fake.url})
    return exporter, config, key_file


def wait_for(exporter: Any, check: Any, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = exporter.get("/metrics").text
        if check(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_sighup_and_post_reload_a_changed_name_and_keep_the_counters(
    run_exporter: Any, fake: FakeSkillable, tmp_path: Path
) -> None:
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4), lab(2, now - 300), lab(3, now - 200, now - 100, status=20))
    exporter, config, key_file = start(run_exporter, fake, tmp_path)
    first = exporter.get("/metrics").text
    counters = lab_counters(parse(first))
    assert total(parse(first), "skillable_lab_instances_started_total") == 3
    assert datacenter_names(first) == {"Before"}
    assert total(parse(first), RELOAD_OK) == 1
    started_at = total(parse(first), RELOAD_TIME)

    write_config(config, "After SIGHUP", key_file)
    exporter.proc.send_signal(signal.SIGHUP)
    text = wait_for(exporter, lambda t: datacenter_names(t) == {"After SIGHUP"})
    assert datacenter_names(text) == {"After SIGHUP"}
    assert exporter.proc.poll() is None  # SIGHUP no longer kills the process
    assert lab_counters(parse(text)) == counters
    assert total(parse(text), RELOAD_OK) == 1 and total(parse(text), RELOAD_TIME) >= started_at

    # The key file changes too: the fake now wants the new key, and the reload brings it.
    fake.state.api_key = "rotated-key-9876"
    key_file.write_text("rotated-key-9876")
    write_config(config, "After POST", key_file)
    answer = requests.post(exporter.url + "/-/reload", timeout=10)
    assert (answer.status_code, answer.text) == (200, "OK\n")
    text = exporter.get("/metrics").text
    assert datacenter_names(text) == {"After POST"}
    assert total(parse(text), "skillable_up") == 1
    assert fake.state.seen[-1].api_key == "rotated-key-9876"
    assert lab_counters(parse(text)) == counters
    assert "config reloaded" in exporter.log()
    assert "rotated-key-9876" not in exporter.log() and "rotated-key-9876" not in text
    assert requests.get(exporter.url + "/-/reload", timeout=10).status_code == 405


def test_a_reload_names_the_settings_that_wait_for_a_restart_by_their_documented_names(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {"SKILLABLE_API_KEY": "k", "SKILLABLE_API_URL": "http://127.0.0.1:9/api/v3"}
    running = load_config({}, environ)
    changed = load_config({"web_listen_address": ["127.0.0.1:19999"], "collector_stats": False,
                           "skillable_max_lab_hosts": "10", "log_level": "debug"}, environ)
    app = ExporterApp(running)
    try:
        caplog.set_level(logging.INFO, logger="exporter")
        assert Reloader(app, lambda: (changed, None), lambda config, extra: None).reload() is None
    finally:
        app.close()
    [reloaded] = [r for r in caplog.records if r.getMessage() == "config reloaded"]
    # As --help, the README and the config file name them; log.level is applied, so not listed.
    assert reloaded.needs_restart == "web.listen-address,skillable.max-lab-hosts,collector.stats"
    # Every setting a reload does not apply has its documented name, from the one table.
    flags = build_parser().format_help()
    waiting = [f.name for f in dataclasses.fields(Config) if f.name not in RELOADABLE and f.name != "demo"]
    assert waiting and all(f"--{setting_name(name)}" in flags for name in waiting), waiting
    assert {s.field for s in SETTINGS if s.field} | {"accounts", "names", "demo"} == \
        {f.name for f in dataclasses.fields(Config)}


def test_a_broken_config_is_refused_and_the_old_one_keeps_serving(
    run_exporter: Any, fake: FakeSkillable, tmp_path: Path
) -> None:
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4))
    exporter, config, key_file = start(run_exporter, fake, tmp_path)
    counters = lab_counters(parse(exporter.get("/metrics").text))

    config.write_text("skillable:\n  window_minutes: 0\n")  # out of range
    answer = requests.post(exporter.url + "/-/reload", timeout=10)
    assert answer.status_code == 500
    assert answer.text.startswith("failed to reload config: invalid setting skillable.window-minutes")
    text = exporter.get("/metrics").text
    assert total(parse(text), RELOAD_OK) == 0
    assert datacenter_names(text) == {"Before"}
    assert total(parse(text), "skillable_up") == 1
    assert lab_counters(parse(text)) == counters

    config.write_text("names: [\n")  # not YAML: SIGHUP refuses it the same way
    exporter.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while exporter.log().count("config reload refused") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    refused = [line for line in exporter.log().splitlines() if "config reload refused" in line]
    assert len(refused) == 2, exporter.log()  # one line per refused reload
    assert 'reason="invalid setting config.file:' in refused[1]
    assert exporter.proc.poll() is None
    assert datacenter_names(exporter.get("/metrics").text) == {"Before"}

    write_config(config, "Fixed", key_file)  # a good config again: the gauge says so
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 200
    text = exporter.get("/metrics").text
    assert total(parse(text), RELOAD_OK) == 1 and datacenter_names(text) == {"Fixed"}
    assert exporter.stop() == 0
    assert (tmp_path / "state.json").stat().st_size > 0


def served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True) or b""


@pytest.fixture
def root_logging() -> Iterator[None]:
    """A reload sets up logging again; give pytest its root logger back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_a_reloaded_web_config_serves_the_new_certificate(certs: Path, tmp_path: Path, fake: FakeSkillable) -> None:  # noqa: F811
    for name in ("ca.crt", "ca.key"):
        shutil.copy(certs / name, tmp_path / name)
    issue(tmp_path, "one", "subjectAltName=IP:127.0.0.1\n")
    issue(tmp_path, "two", "subjectAltName=IP:127.0.0.1\n")
    web_file = tmp_path / "web.yml"
    web_file.write_text("tls_server_config:\n  cert_file: one.crt\n  key_file: one.key\n")
    config = load_config({}, {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key})
    app = ExporterApp(config)
    server = ExporterServer(("127.0.0.1", 0), app, load_web_config(str(web_file)))
    make_reloader(app, [server], lambda: (config, load_web_config(str(web_file))))

    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        pem = ssl.PEM_cert_to_DER_cert
        assert served_certificate(server.port) == pem((tmp_path / "one.crt").read_text())
        web_file.write_text("tls_server_config:\n  cert_file: two.crt\n  key_file: two.key\n")
        assert server.reload() is None
        assert served_certificate(server.port) == pem((tmp_path / "two.crt").read_text())
        web_file.write_text("basic_auth_users: {}\n")  # TLS off needs a restart: refused, TLS stays
        assert "needs a restart" in (server.reload() or "")
        assert served_certificate(server.port) == pem((tmp_path / "two.crt").read_text())
    finally:
        server.shutdown()
        server.server_close()
        app.close()


def test_what_a_reload_applies_and_what_waits_for_a_restart(fake: FakeSkillable) -> None:
    env = {"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key}
    app = ExporterApp(load_config({}, env))
    poller = app.pollers[""]
    try:
        waiting = app.reconfigure(load_config({}, env | {
            "SKILLABLE_WINDOW_MINUTES": "120", "SKILLABLE_MIN_POLL_INTERVAL": "7", "SKILLABLE_TIMEOUT": "3",
            "SKILLABLE_MAX_LAB_HOSTS": "5", "SKILLABLE_STATE_FILE": "/tmp/elsewhere.json",
        }))
        assert sorted(waiting) == ["skillable.max-lab-hosts", "storage.state-file"]
        assert app.pollers[""] is poller  # the same poller: its state and counters
        assert (poller.window_minutes, poller.min_interval, app.config.timeout) == (120, 7, 3)
        assert (app.config.max_lab_hosts, app.config.state_file) == (2000, None)  # kept until a restart
        assert app.status()[0].window_minutes == 120
        client = poller.client
        app.reconfigure(load_config({}, env | {"SKILLABLE_WINDOW_MINUTES": "120"}))
        assert poller.client is client  # same key and URL: the connection pool is kept
        app.reconfigure(load_config({}, env | {"SKILLABLE_API_KEY": "another"}))
        assert poller.client is not client
    finally:
        app.close()
