"""Config reload: SIGHUP and POST /-/reload on a real process, counters kept, bad configs refused;
and a reloaded web config's certificate served to new connections."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import requests

from exporter.__main__ import make_reloader
from exporter.app import RELOADABLE, ExporterApp, Reloader
from exporter.cli import build_parser
from exporter.client import SkillableClient
from exporter.config import SETTINGS, Config, load_config, setting_name
from exporter.server import ExporterServer
from exporter.webconfig import load_web_config

from . import fakeapi as f
from .fakeapi import FakeSkillable, lab
from .harness import MonotonicStub, eventually, lab_counters, make_poller, parse, total
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


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
@pytest.mark.usefixtures("root_logging")
def test_a_reloaded_web_config_serves_the_new_certificate(certs: Path, tmp_path: Path, fake: FakeSkillable) -> None:
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


@pytest.mark.integration
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


# -- TLS settings a reload cannot apply fully ------------------------------------------------------


def tls_web_config(path: Path, certs: Path, client_ca: Path | None = None) -> Path:
    """A web config serving certs' server certificate; with `client_ca`, client certificates required."""
    lines = ["tls_server_config:", f"  cert_file: {certs / 'server.crt'}", f"  key_file: {certs / 'server.key'}"]
    if client_ca is not None:
        lines += ["  client_auth_type: RequireAndVerifyClientCert", f"  client_ca_file: {client_ca}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def reload_over_tls(exporter: Any, ca: Path, cert: tuple[str, str] | None = None) -> requests.Response:
    return requests.post(exporter.url + "/-/reload", verify=str(ca), cert=cert, timeout=15)


@pytest.mark.integration
def test_turning_client_certificates_on_is_refused_not_half_applied(
    certs: Path, tmp_path: Path, fake: FakeSkillable
) -> None:
    """On main the reload said 'config reloaded' and clients without a certificate were still served."""
    from .test_web import Exporter

    web = tls_web_config(tmp_path / "web.yml", certs)
    exporter = Exporter(fake, tmp_path / "exporter.log", f"--web.config-file={web}", https=True, ca=certs / "ca.crt")
    try:
        assert exporter.get("/metrics").status_code == 200
        tls_web_config(web, certs, client_ca=certs / "ca.crt")
        answer = reload_over_tls(exporter, certs / "ca.crt")
        assert answer.status_code == 500, answer.text
        assert "tls_server_config.client_auth_type" in answer.text and "needs_restart" in answer.text
        text = exporter.get("/metrics").text  # the running TLS settings, whole: no certificate asked
        assert total(parse(text), RELOAD_OK) == 0
        refused = [line for line in exporter.log().splitlines() if "config reload refused" in line]
        assert len(refused) == 1 and "client_auth_type" in refused[0]
    finally:
        assert exporter.stop() == 0


@pytest.mark.integration
def test_turning_client_certificates_off_is_refused_and_clients_with_one_stay_served(
    certs: Path, tmp_path: Path, fake: FakeSkillable
) -> None:
    """On main, after this reload every new connection failed."""
    from .test_web import Exporter

    web = tls_web_config(tmp_path / "web.yml", certs, client_ca=certs / "ca.crt")
    cert = (str(certs / "client.crt"), str(certs / "client.key"))
    exporter = Exporter(fake, tmp_path / "exporter.log", f"--web.config-file={web}", https=True,
                        ca=certs / "ca.crt", cert=cert)
    try:
        tls_web_config(web, certs)
        answer = reload_over_tls(exporter, certs / "ca.crt", cert)
        assert answer.status_code == 500 and "needs_restart" in answer.text
        for _ in range(3):  # new connections, each with the client certificate
            assert exporter.get("/metrics").status_code == 200
        with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
            requests.get(exporter.url + "/metrics", verify=str(certs / "ca.crt"), timeout=15)
    finally:
        assert exporter.stop() == 0


@pytest.mark.integration
def test_a_reload_swaps_the_client_ca(certs: Path, tmp_path: Path, fake: FakeSkillable) -> None:
    """What a running listener can change, it does: a new client CA trusts its own clients only."""
    from .test_web import Exporter
    from .tlsutil import make_certs

    second = tmp_path / "second"
    second.mkdir()
    make_certs(second)  # another CA, with a client certificate of its own
    web = tls_web_config(tmp_path / "web.yml", certs, client_ca=certs / "ca.crt")
    first_client = (str(certs / "client.crt"), str(certs / "client.key"))
    second_client = (str(second / "client.crt"), str(second / "client.key"))
    exporter = Exporter(fake, tmp_path / "exporter.log", f"--web.config-file={web}", https=True,
                        ca=certs / "ca.crt", cert=first_client)
    try:
        tls_web_config(web, certs, client_ca=second / "ca.crt")
        assert reload_over_tls(exporter, certs / "ca.crt", first_client).status_code == 200
        assert exporter.get("/metrics", cert=second_client).status_code == 200
        with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
            exporter.get("/metrics", cert=first_client)
    finally:
        assert exporter.stop() == 0


# -- a load failure is a refused reload, never a death ------------------------------------------------------------


def reload_both_ways(exporter: Any, refused_before: int) -> tuple[requests.Response, list[str]]:
    """POST /-/reload, then SIGHUP: the POST's answer and the log's refusal lines after both."""
    answer = requests.post(exporter.url + "/-/reload", timeout=10)
    exporter.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while exporter.log().count("config reload refused") < refused_before + 2 and time.monotonic() < deadline:
        if exporter.proc.poll() is not None:
            break
        time.sleep(0.1)
    return answer, [line for line in exporter.log().splitlines() if "config reload refused" in line]


@pytest.mark.integration
def test_a_file_that_cannot_be_read_is_a_refused_reload_and_the_process_keeps_serving(
    run_exporter: Any, fake: FakeSkillable, tmp_path: Path
) -> None:
    """Not UTF-8, NaN, UTF-16 or non-ASCII keys, a web config that is not text: each used to kill the
    process on SIGHUP (exit 1, no state written) and close POST /-/reload's connection unanswered."""
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4))
    exporter, config, key_file = start(run_exporter, fake, tmp_path)
    counters = lab_counters(parse(exporter.get("/metrics").text))
    good_config, good_key = config.read_bytes(), key_file.read_bytes()
    web = tmp_path / "web.yml"
    web.write_bytes(b"basic_auth_users:\n  \xff\xfe: x\n")
    cases = [
        (config, b"names:\n  datacenters:\n    3: caf\xe9\n", "invalid setting config.file: ", "is not UTF-8 text"),
        (config, good_config.replace(b"skillable:\n", b"skillable:\n  window_minutes: .nan\n"),
         "invalid setting skillable.window-minutes: ", "expected a finite number"),
        (config, good_config + b"web:\n  config_file: " + str(web).encode() + b"\n",
         "invalid setting web.config-file: ", "is not UTF-8 text"),
        (key_file, fake.state.api_key.encode("utf-16"), "invalid setting skillable.api-key-file: ", "is UTF-16 text"),
        (key_file, "cl\u00e9-\u00e9trange".encode(), "invalid setting skillable.api-key-file: ",
         "holds a character an API key cannot have"),
    ]
    refused = 0
    for path, content, reason_starts, reason_has in cases:
        path.write_bytes(content)
        answer, lines = reload_both_ways(exporter, refused)
        assert exporter.proc.poll() is None, exporter.log()  # alive
        assert answer.status_code == 500, answer.text
        assert answer.text.startswith("failed to reload config: " + reason_starts) and reason_has in answer.text
        assert len(answer.text.strip().splitlines()) == 1
        assert len(lines) == refused + 2, exporter.log()  # POST and SIGHUP: one line each
        assert f'reason="{reason_starts}' in lines[-1] and "Traceback" not in exporter.log()
        refused = len(lines)
        text = exporter.get("/metrics").text
        assert total(parse(text), RELOAD_OK) == 0
        assert total(parse(text), "skillable_up") == 1 and lab_counters(parse(text)) == counters
        assert datacenter_names(text) == {"Before"}
        config.write_bytes(good_config)
        key_file.write_bytes(good_key)
    assert "cl\u00e9" not in exporter.log()  # the refused key is never shown
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 200
    assert total(parse(exporter.get("/metrics").text), RELOAD_OK) == 1
    assert exporter.stop() == 0
    assert (tmp_path / "state.json").stat().st_size > 0


def url_config(path: Path, url: str, key_file: Path) -> None:
    path.write_text(f"skillable:\n  api_url: {url}\n  api_key_file: {key_file}\n"
                    "collector:\n  stats: false\n  delivery_regions: false\n  catalog: false\n")


def config_with_url(tmp_path: Path, fake: FakeSkillable) -> tuple[Path, Path]:
    """A config file naming the fake's URL and a key file with its key: (config, key file)."""
    key_file = tmp_path / "key"
    key_file.write_text(fake.state.api_key)
    key_file.chmod(0o600)
    config = tmp_path / "config.yaml"
    url_config(config, fake.url, key_file)
    return config, key_file


@pytest.fixture
def other(fake: FakeSkillable) -> Iterator[FakeSkillable]:
    """The same account behind a second URL (a proxy, another host): the fake's records, its key."""
    server = FakeSkillable()
    server.state.records = fake.state.records
    yield server
    server.stop()


@pytest.mark.integration
def test_after_a_reload_to_another_url_the_state_file_records_that_url_and_a_restart_restores_it(
    run_exporter: Any, fake: FakeSkillable, other: FakeSkillable, tmp_path: Path
) -> None:
    """The state file recorded the URL of the start, so after a reload to a new URL the next start found
    the account 'saved for another API URL' and started it cold, its counters lost."""
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4), lab(2, now - 300))
    config, key_file = config_with_url(tmp_path, fake)
    state = tmp_path / "state.json"
    args = (f"--config.file={config}", f"--storage.state-file={state}", "--skillable.min-poll-interval=0")
    exporter = run_exporter(*args)
    assert total(parse(exporter.get("/metrics").text), "skillable_lab_instances_started_total") == 2

    url_config(config, other.url, key_file)
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 200
    other.add(lab(3, now - 30))  # seen through the new URL only
    text = exporter.get("/metrics").text
    assert other.latest_requests(), "the reload did not switch the URL"
    counters = lab_counters(parse(text))
    assert total(parse(text), "skillable_lab_instances_started_total") == 3
    assert exporter.stop() == 0
    assert json.loads(state.read_text())["api_urls"] == {"": other.url}

    again = run_exporter(*args)  # the config names the new URL: its counters come back
    assert "was saved for API URL" not in again.log()
    assert lab_counters(parse(again.get("/metrics").text)) == counters


@pytest.mark.integration
@pytest.mark.parametrize("change", ["key", "url"])
def test_a_reload_with_a_new_key_or_url_lifts_the_retry_after_hold(
    run_exporter: Any, fake: FakeSkillable, other: FakeSkillable, tmp_path: Path, change: str
) -> None:
    """After a 429 with Retry-After: 3600, a reload that brought a new key (or URL) did not poll for up
    to an hour: skillable_up stayed 0. What the API told the old key does not hold the new one."""
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4))
    config, key_file = config_with_url(tmp_path, fake)
    exporter = run_exporter(f"--config.file={config}", "--skillable.min-poll-interval=0")
    assert total(parse(exporter.get("/metrics").text), "skillable_up") == 1

    fake.fault_always(f.retry_after(429, "3600"))
    text = exporter.get("/metrics").text  # the 429: held for an hour
    assert total(parse(text), "skillable_up") == 0
    asked = len(fake.state.seen)
    assert total(parse(exporter.get("/metrics").text), "skillable_up") == 0
    assert len(fake.state.seen) == asked  # held: no request

    if change == "key":  # the operator rotates to a key of its own (the old one was shared and throttled)
        fake.heal()
        fake.state.api_key = "a-key-of-its-own-42"
        key_file.write_text("a-key-of-its-own-42")
    else:  # or points the account at a URL that is not throttled
        url_config(config, other.url, key_file)
    assert requests.post(exporter.url + "/-/reload", timeout=10).status_code == 200
    text = exporter.get("/metrics").text  # the next scrape polls, with the new key or URL
    assert total(parse(text), "skillable_up") == 1, exporter.log()
    served = fake if change == "key" else other
    assert served.latest_requests()[-1].api_key == served.state.api_key


@pytest.mark.integration
def test_a_poll_still_running_with_the_old_key_sets_no_hold_after_the_reload(fake: FakeSkillable) -> None:
    """The reload lifts the hold; the old key's poll, answered 429 Retry-After 3600 only after the reload,
    must not set it again (a generation count: a poll's failures hold only the client it began with)."""
    now = fake.clock()
    fake.add(lab(1, now - 600, now - 60, status=4))
    answer = threading.Event()

    def late_429(handler: Any) -> None:
        answer.wait(10)
        f.retry_after(429, "3600")(handler)

    fake.fault(late_429, endpoint="LatestResults")
    poller = make_poller(fake, monotonic=MonotonicStub())
    try:
        old_poll = poller.request()
        assert old_poll is not None
        poller.reconfigure(SkillableClient(fake.url, fake.state.api_key, 1 << 20), 60, 2, 0.0, 9.0,
                           new_key_or_url=True)
        answer.set()
        assert poller.wait(old_poll, 10)
        asked = old_poll
        for _ in range(2):  # the poll the reload asked for, then the next: neither held back (None: held)
            asked = eventually(lambda after=asked: (n := poller.request()) is not None and n > after and n, 5,
                               "a new poll")
            assert poller.wait(asked, 10) and poller.health.up
        assert poller.health.failures[("LatestResults", "rate_limited")] == 1  # counted, all the same
        assert len(fake.latest_requests()) == 3
    finally:
        poller.stop(5)
        poller.client.close()
