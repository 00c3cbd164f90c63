"""The endpoint: TLS and basic auth from an exporter-toolkit web config, with throw-away certificates
and real HTTPS clients (requests and curl); the key file's permissions; the API key in no output."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import bcrypt
import pytest
import requests

from exporter.client import SkillableClient
from exporter.config import ConfigError, load_config, read_key_file
from exporter.webconfig import WebConfig, load_web_config

from . import fakeapi as f
from .harness import ROOT, ExporterProcess
from .fakeapi import FakeSkillable, lab
from .tlsutil import certs  # noqa: F401 (the fixture)

NOW = 1_800_000_000
USER, PASSWORD = "prometheus", "correct horse battery staple"


def web_config(folder: Path, tls: bool = True, users: bool = True, client_auth: bool = False) -> Path:
    lines = []
    if tls:
        lines += ["tls_server_config:", "  cert_file: server.crt", "  key_file: server.key"]  # relative paths
        if client_auth:
            lines += ["  client_auth_type: RequireAndVerifyClientCert", "  client_ca_file: ca.crt"]
    if users:
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        lines += ["basic_auth_users:", f"  {USER}: {hashed}", f"  other: {hashed}"]
    path = folder / f"web-{tls}-{users}-{client_auth}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the exporter process --------------------------------------------------------------------


def Exporter(fake: FakeSkillable, log_path: Path, *args: str, https: bool, ca: Path | None,  # noqa: N802
             cert: tuple[str, str] | None = None) -> ExporterProcess:
    """`python3 -m exporter` with a web config, against the fake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env.update({"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"})
    return ExporterProcess(list(args), env, log_path, https=https, verify=str(ca) if ca else True, cert=cert)


@pytest.fixture
def start(fake: FakeSkillable, tmp_path: Path) -> Iterator[Any]:
    started: list[ExporterProcess] = []

    def run(
        *args: str, https: bool = False, ca: Path | None = None, cert: tuple[str, str] | None = None
    ) -> ExporterProcess:
        started.append(Exporter(fake, tmp_path / f"exporter-{len(started)}.log", *args, https=https, ca=ca,
                                cert=cert))
        return started[-1]

    yield run
    for exporter in started:
        exporter.stop()


def curl(*args: str) -> tuple[int, str]:
    tool = shutil.which("curl")
    assert tool, "curl is missing: install Debian's curl package (.ci/run does)"
    result = subprocess.run([tool, "-sS", "--max-time", "15", "-w", "\n%{http_code}", *args],
                            capture_output=True, text=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body + result.stderr


# -- TLS and basic auth ---------------------------------------------------------------------------


@pytest.mark.integration
def test_tls_and_basic_auth_with_requests_and_curl(start: Any, fake: FakeSkillable, certs: Path) -> None:
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    exporter = start(f"--web.config-file={web_config(certs)}", https=True, ca=certs / "ca.crt")
    url = exporter.base + "/metrics"

    ok = exporter.get("/metrics", auth=(USER, PASSWORD))
    assert ok.status_code == 200 and "skillable_up 1.0" in ok.text
    polls = len(fake.latest_requests())
    for auth in (None, (USER, "wrong"), ("nobody", PASSWORD), (USER, ""), ("", "")):
        refused = exporter.get("/metrics", auth=auth)
        assert refused.status_code == 401, auth
        assert refused.headers["WWW-Authenticate"].startswith("Basic ")
        assert "skillable_" not in refused.text
    assert exporter.get("/", auth=None).status_code == 401  # the landing page names accounts: protected too
    assert exporter.get("/probe?account=x", auth=None).status_code == 401
    assert len(fake.latest_requests()) == polls  # a refused scrape never reaches the API
    # Malformed Authorization headers are refused, not an error.
    for header in ("Basic", "Basic !!!", "Bearer abc", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert exporter.get("/metrics", headers={"Authorization": header}).status_code == 401

    # /healthz stays open (liveness probes carry no password), but only over TLS.
    assert exporter.get("/healthz").text == "OK\n"

    code, body = curl("--cacert", str(certs / "ca.crt"), "-u", f"{USER}:{PASSWORD}", url)
    assert code == 200 and "skillable_up 1.0" in body
    code, _ = curl("--cacert", str(certs / "ca.crt"), "-u", f"{USER}:nope", url)
    assert code == 401
    code, _ = curl("--cacert", str(certs / "ca.crt"), url)
    assert code == 401
    code, body = curl("--cacert", str(certs / "ca.crt"), "--compressed", "-u", f"{USER}:{PASSWORD}", url)
    assert code == 200 and "skillable_up" in body

    # It is real TLS: an unknown CA is refused by both clients, and plain HTTP gets no metrics.
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url, auth=(USER, PASSWORD), timeout=5)
    code, _ = curl("-u", f"{USER}:{PASSWORD}", url)
    assert code == 0
    plain = f"http://127.0.0.1:{exporter.port}/metrics"
    with pytest.raises(requests.ConnectionError):
        requests.get(plain, auth=(USER, PASSWORD), timeout=5)
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=5) as raw:
        raw.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        try:
            answer = raw.recv(65536)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"skillable_" not in answer
    assert exporter.get("/metrics", auth=(USER, PASSWORD)).status_code == 200  # it shrugged all that off
    assert exporter.proc.poll() is None
    assert exporter.stop() == 0
    assert "Traceback" not in exporter.log()
    assert "listening address=https://" in exporter.log()


@pytest.mark.integration
def test_basic_auth_without_tls(start: Any, certs: Path) -> None:
    exporter = start(f"--web.config-file={web_config(certs, tls=False)}")
    assert exporter.get("/metrics").status_code == 401
    assert exporter.get("/metrics", auth=(USER, PASSWORD)).status_code == 200
    assert exporter.get("/healthz").status_code == 200


@pytest.mark.integration
def test_tls_without_users_needs_no_password(start: Any, certs: Path) -> None:
    exporter = start(f"--web.config-file={web_config(certs, users=False)}", https=True, ca=certs / "ca.crt")
    assert exporter.get("/metrics").status_code == 200


@pytest.mark.integration
def test_client_certificates_when_required(start: Any, certs: Path) -> None:
    config = web_config(certs, client_auth=True)
    cert = (str(certs / "client.crt"), str(certs / "client.key"))
    exporter = start(f"--web.config-file={config}", https=True, ca=certs / "ca.crt", cert=cert)
    url = exporter.base + "/metrics"
    assert requests.get(url, auth=(USER, PASSWORD), verify=str(certs / "ca.crt"), cert=cert,
                        timeout=15).status_code == 200
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        requests.get(url, auth=(USER, PASSWORD), verify=str(certs / "ca.crt"), timeout=15)
    code, _ = curl("--cacert", str(certs / "ca.crt"), "--cert", cert[0], "--key", cert[1],
                   "-u", f"{USER}:{PASSWORD}", url)
    assert code == 200


@pytest.mark.integration
def test_exporter_toolkit_flag_name_is_accepted(start: Any, certs: Path) -> None:
    """Operators reuse their exporter-toolkit flags: --web.config.file works as well as --web.config-file."""
    exporter = start(f"--web.config.file={web_config(certs)}", https=True, ca=certs / "ca.crt")
    assert exporter.get("/metrics").status_code == 401
    assert exporter.get("/metrics", auth=(USER, PASSWORD)).status_code == 200


@pytest.mark.integration
def test_without_a_web_config_plain_http_is_unchanged(start: Any) -> None:
    exporter = start()
    assert exporter.get("/metrics").status_code == 200
    assert exporter.get("/metrics", auth=("anyone", "anything")).status_code == 200  # credentials are ignored
    assert exporter.get("/").status_code == 200
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"https://127.0.0.1:{exporter.port}/metrics", verify=False, timeout=5)


def test_default_listen_address_is_loopback() -> None:
    config = load_config({}, {"SKILLABLE_API_KEY": "k"})
    assert config.listen_address == "127.0.0.1:10180"


TLS_BASE = 'tls_server_config:\n  cert_file: "server.crt"\n  key_file: "server.key"\n'


@pytest.mark.parametrize(
    "content, setting",
    [
        ("tls_server_config:\n  cert_file: server.crt\n", "tls_server_config"),
        ("tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n", "cert_file"),
        ("basic_auth_users:\n  prometheus: plaintext-password\n", "basic_auth_users.prometheus"),
        ("tls_config:\n  cert_file: server.crt\n", "tls_config"),
        ("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: Maybe\n",
         "client_auth_type"),
        ("basic_auth_users: [a, b]\n", "basic_auth_users"),
        ("{{{", "web.config-file"),
        # exporter-toolkit's own bad examples (web/testdata/*.bad.yml), and TLS99
        (TLS_BASE + "  min_version: TLS99\n", "min_version"),
        (TLS_BASE + "  min_version: TLS111\n", "min_version"),
        (TLS_BASE + "  max_version: SSL3\n", "max_version"),
        (TLS_BASE + "  min_version: TLS13\n  max_version: TLS12\n", "min_version"),
        (TLS_BASE + "  cipher_suites:\n  - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA2048\n", "cipher_suites"),
        (TLS_BASE + "  curve_preferences:\n    - CurveP257\n", "curve_preferences"),
        (TLS_BASE + "  prefer_server_cipher_suites: maybe\n", "prefer_server_cipher_suites"),
        (TLS_BASE + "  client_ca_file: ca.crt\n", "client_ca_file"),  # a CA without a client_auth_type
        ("http_server_config:\n  headers:\n    Content-Type: foo\n", "headers.Content-Type"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: foo\n", "headers.X-Frame-Options"),
        ("http_server_config:\n  headers:\n    X-Content-Type-Options: sniff\n", "headers.X-Content-Type-Options"),
        ("http_server_config:\n  http2: sometimes\n", "http2"),
        ("basic_auth_users:\n  prometheus: $2y$10$tooshort\n", "basic_auth_users.prometheus"),
    ],
)
@pytest.mark.integration
def test_a_bad_web_config_stops_start_up_with_one_line(content: str, setting: str, certs: Path) -> None:
    path = certs / "bad-web.yml"
    path.write_text(content)
    result = subprocess.run([sys.executable, "-m", "exporter", f"--web.config-file={path}", "--config.check"],
                            env={**os.environ, "SKILLABLE_API_KEY": "k"}, capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 2, result.stderr
    assert setting in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.integration
def test_password_check_costs_the_same_for_unknown_users(monkeypatch: pytest.MonkeyPatch, certs: Path) -> None:
    web = load_web_config(str(web_config(certs, tls=False)))
    calls: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert web.check_authorization(header(USER, PASSWORD))
    assert not web.check_authorization(header(USER, "wrong"))
    assert not web.check_authorization(header("nobody", PASSWORD))  # a bcrypt check all the same
    assert len(calls) == 3
    assert WebConfig().check_authorization(None)  # no users: open


# -- the API key file ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("mode, allowed", [(0o600, True), (0o400, True), (0o640, True), (0o644, False),
                                           (0o604, False), (0o602, False), (0o601, False)])
def test_key_file_readable_by_others_is_refused(mode: int, allowed: bool, tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("secret-key-42\n")
    path.chmod(mode)
    if allowed:
        assert read_key_file("skillable.api-key-file", str(path)) == "secret-key-42"
    else:
        with pytest.raises(ConfigError, match="readable by other users") as info:
            read_key_file("skillable.api-key-file", str(path))
        assert "secret-key-42" not in str(info.value)
    result = subprocess.run([sys.executable, "-m", "exporter", f"--skillable.api-key-file={path}", "--config.check"],
                            env={k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")},
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == (0 if allowed else 2), result.stderr
    assert "secret-key-42" not in result.stdout + result.stderr


# -- the API key in no output ----------------------------------------------------------------------


@pytest.mark.integration
def test_api_key_appears_in_no_output(start: Any, fake: FakeSkillable, tmp_path: Path) -> None:
    key = fake.state.api_key
    fake.add(lab(1, NOW - 600, NOW - 60, status=4))
    state = tmp_path / "state.json"
    exporter = start("--log.level=debug", f"--storage.state-file={state}", "--skillable.min-poll-interval=0")
    outputs = [exporter.get("/metrics").text, exporter.get("/").text]
    # Answers that echo the key back, each a different failure path into the log.
    echoes = [
        f.status_error(f"Invalid API key {key}"),
        f.status_error(f"Internal error for key {key}"),
        f.http_status(401, f"bad key {key}".encode()),
        f.http_status(500, f"trace: api_key={key}".encode()),
        f.html_page(200),
        lambda h: h.send_raw(302, b"", "text/plain", {"Location": f"https://evil.example/?k={key}"}),
        lambda h: h.send_raw(200, f'{{"Status": 1, "Results": [{{"LabInstanceId": "{key}"}}]}}'.encode(),
                             "application/json"),
    ]
    for echo in echoes:
        fake.fault(echo, endpoint="LatestResults")
        played = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until the fault is played and a good poll reset the backoff
            text = exporter.get("/metrics").text
            outputs.append(text)
            played = played or not fake.state.faults
            if played and "skillable_up 1.0" in text:
                break
            time.sleep(0.2)
        assert played
    outputs.append(exporter.get("/").text)
    assert exporter.stop() == 0
    outputs += [exporter.log(), state.read_text()]
    assert "reason=unauthorized" in exporter.log() or "API key refused" in exporter.log()
    for output in outputs:
        assert key not in output
    assert any("<redacted>" in output for output in outputs)  # the key was there to leak, and was blanked


@pytest.mark.integration
def test_api_key_not_in_reprs_or_exception_text(fake: FakeSkillable) -> None:
    key = fake.state.api_key
    config = load_config({}, {"SKILLABLE_API_KEY": key, "SKILLABLE_API_URL": fake.url})
    client = SkillableClient(fake.url, key, 1 << 20)
    assert key not in repr(config) and key not in repr(config.accounts[0]) and key not in repr(client)
    fake.fault(f.http_status(401, key.encode()), f.reset())
    for _ in range(2):
        with pytest.raises(Exception) as info:
            client.get("LatestResults", {"minutes": 5}, 5)
        assert key not in str(info.value) and key not in repr(info.value)
    client.close()


@pytest.mark.integration
def test_tls_context_refuses_old_protocols(certs: Path) -> None:
    web = load_web_config(str(web_config(certs)))
    assert web.ssl_context is not None
    assert web.ssl_context.minimum_version >= ssl.TLSVersion.TLSv1_2


# -- hostile basic auth (hostile input 5, 6, 11) ----------------------------------------------------


def users_config(folder: Path, password: bytes, cost: int) -> Path:
    hashed = bcrypt.hashpw(password[:72], bcrypt.gensalt(rounds=cost)).decode()  # as htpasswd -B hashes it
    path = folder / f"users-{cost}.yml"
    path.write_text(f"basic_auth_users:\n  {USER}: {hashed}\n")
    return path


@pytest.mark.integration
def test_a_password_longer_than_72_bytes_gets_an_answer(start: Any, certs: Path) -> None:
    """bcrypt reads 72 bytes; Go's bcrypt.CompareHashAndPassword (exporter-toolkit's) compares those
    and answers, where Python's bcrypt raises. The exporter answers as the toolkit does."""
    long_password = ("p" * 60 + "0123456789ab" + "tail-beyond-72-bytes").encode()
    assert len(long_password) > 72
    exporter = start(f"--web.config-file={users_config(certs, long_password, 4)}")
    assert exporter.get("/metrics", auth=(USER, long_password.decode())).status_code == 200
    # Bytes past the 72nd are not part of a bcrypt hash, in Go as in C: the same 72 log in.
    assert exporter.get("/metrics", auth=(USER, long_password[:72].decode() + "x" * 30)).status_code == 200
    assert exporter.get("/metrics", auth=(USER, "q" + long_password[1:].decode())).status_code == 401
    assert exporter.get("/metrics", auth=("nobody", long_password.decode())).status_code == 401
    assert exporter.proc.poll() is None and "Traceback" not in exporter.log()


@pytest.mark.integration
def test_a_wrong_password_flood_does_not_starve_real_scrapes(start: Any, certs: Path) -> None:
    """32 clients sending wrong passwords to a cost-10 hash; the real scraper's p99 stays under a second."""
    exporter = start(f"--web.config-file={users_config(certs, PASSWORD.encode(), 10)}")
    auth = (USER, PASSWORD)
    assert exporter.get("/metrics", auth=auth).status_code == 200  # Prometheus has logged in before
    stop = threading.Event()
    refused: list[int] = []

    def flood(index: int) -> None:
        session = requests.Session()
        for attempt in range(40):  # bounded: the flood ends on its own
            if stop.is_set():
                break
            response = session.get(exporter.url + "/metrics", auth=(USER, f"wrong-{index}-{attempt}"), timeout=30)
            refused.append(response.status_code)
        session.close()

    flooders = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(32)]
    for thread in flooders:
        thread.start()
    time.sleep(0.5)  # the flood is on
    latencies = []
    session = requests.Session()
    for _ in range(20):
        began = time.monotonic()
        response = session.get(exporter.url + "/metrics", auth=auth, timeout=30)
        latencies.append(time.monotonic() - began)
        assert response.status_code == 200
        time.sleep(0.1)
    flooding = any(t.is_alive() for t in flooders)
    stop.set()
    for thread in flooders:
        thread.join(60)
    assert flooding  # the real scrapes ran during the flood
    assert refused and set(refused) == {401}
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    assert p99 < 1.0, latencies


@pytest.mark.integration
def test_unknown_users_are_checked_at_the_cost_of_the_configured_hashes(
    monkeypatch: pytest.MonkeyPatch, certs: Path
) -> None:
    """With cost-5 hashes (htpasswd -B's default), an unknown user costs what a wrong password does."""
    web = load_web_config(str(users_config(certs, PASSWORD.encode(), 5)))
    checked: list[bytes] = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda password, hashed: checked.append(hashed) or real(password, hashed))

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def cpu_seconds(user: str, password: str) -> float:
        """This thread's CPU time for one check: what the check costs, whatever else the machine runs."""
        began = time.thread_time()
        assert not web.check_authorization(header(user, password))
        return time.thread_time() - began

    assert not web.check_authorization(header("nobody", PASSWORD))
    assert checked[-1][:7] == b"$2b$05$"  # the dummy hash has the configured cost
    rounds = [(cpu_seconds("nobody", "x"), cpu_seconds(USER, "x")) for _ in range(15)]  # interleaved
    unknown, wrong = min(r[0] for r in rounds), min(r[1] for r in rounds)
    assert unknown < wrong * 3, (unknown, wrong)  # it was 21 times slower with a fixed cost-10 dummy


@pytest.mark.integration
def test_a_request_head_cut_by_the_clients_eof_is_not_answered_nor_polled(fake: FakeSkillable) -> None:
    """A flood connection that hangs up mid-head used to be answered as a full request, polling first."""
    from .harness import Harness

    h = Harness(fake)
    try:
        assert h.scrape().status == 200
        polls = len(fake.latest_requests())
        with socket.create_connection(("127.0.0.1", h.server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa")
            sock.shutdown(socket.SHUT_WR)  # the client's EOF, no blank line
            assert sock.recv(65536) == b""  # closed without an answer
        with socket.create_connection(("127.0.0.1", h.server.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # a whole head is answered
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert len(fake.latest_requests()) == polls
    finally:
        h.close()
