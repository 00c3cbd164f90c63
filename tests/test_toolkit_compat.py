"""exporter-toolkit compatibility, against real exporter processes: repeatable
--web.listen-address, --web.systemd-socket, --web.telemetry-path, and web config files in the shapes
of the toolkit's own examples (web/testdata/*.good.yml), with headers applied and TLS settings in force."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import ROOT, free_port
from .fakeapi import FakeSkillable
from .test_web import start  # noqa: F401 (the fixture)
from .tlsutil import certs  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration  # every test here starts the exporter (or openssl) as a process

# The toolkit's example files, as in its web/testdata (server.crt/server.key are ours: EC keys).
ALL_CIPHERS = """tls_server_config:
  cert_file: "server.crt"
  key_file: "server.key"
  client_auth_type: "VerifyClientCertIfGiven"
  cipher_suites:
  - TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
  - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
  - TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
  - TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
  - TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
  - TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
  - TLS_AES_128_GCM_SHA256
  - TLS_AES_256_GCM_SHA384
  - TLS_CHACHA20_POLY1305_SHA256
  - TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA
  - TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA
  - TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA
  - TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA
"""
SOME_CURVES = """tls_server_config:
  cert_file: "server.crt"
  key_file: "server.key"
  client_auth_type: "VerifyClientCertIfGiven"
  min_version: TLS13
  curve_preferences:
  - CurveP521
"""
ALL_CURVES = """tls_server_config:
  cert_file: "server.crt"
  key_file: "server.key"
  client_auth_type: "VerifyClientCertIfGiven"
  curve_preferences:
    - CurveP256
    - CurveP384
    - CurveP521
    - X25519
"""
# web_config_noAuth_someCiphers.good.yml names RSA suites; with our EC key, the ECDSA ones.
ONE_CIPHER_TLS12 = """tls_server_config:
  cert_file: "server.crt"
  key_file: "server.key"
  cipher_suites:
  - TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
  min_version: TLS12
  max_version: TLS12
"""
HEADERS = """http_server_config:
  headers:
    X-Frame-Options: deny
    Strict-Transport-Security: max-age=31536000; includeSubDomains
    X-Content-Type-Options: nosniff
    X-XSS-Protection: 1
    Content-Security-Policy: "default-src 'self' *.test.example.net"
"""
EXPECTED_HEADERS = {
    "X-Frame-Options": "deny",
    "Strict-Transport-Security": "max-age=31536000; includeSubDomains",
    "X-Content-Type-Options": "nosniff",
    "X-XSS-Protection": "1",
    "Content-Security-Policy": "default-src 'self' *.test.example.net",
}


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def handshake(port: int, ca: Path, **versions: ssl.TLSVersion) -> tuple[str, str]:
    """(TLS version, cipher) a client that allows `versions` negotiates with the exporter."""
    context = ssl.create_default_context(cafile=str(ca))
    for key, value in versions.items():
        setattr(context, key, value)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return str(tls.version()), tls.cipher()[0]


@pytest.mark.parametrize("name, text", [("allCiphers", ALL_CIPHERS), ("someCurves", SOME_CURVES),
                                        ("allCurves", ALL_CURVES), ("oneCipherTLS12", ONE_CIPHER_TLS12)])
def test_the_toolkits_tls_example_configs_serve(name: str, text: str, start: Any, certs: Path) -> None:
    exporter = start(f"--web.config.file={write(certs, name + '.yml', text)}", https=True, ca=certs / "ca.crt")
    response = exporter.get("/metrics")
    assert response.status_code == 200 and "skillable_up" in response.text
    version, cipher = handshake(exporter.port, certs / "ca.crt")
    if name == "someCurves":
        assert version == "TLSv1.3"  # min_version: TLS13 is in force
        with pytest.raises(ssl.SSLError):
            handshake(exporter.port, certs / "ca.crt", maximum_version=ssl.TLSVersion.TLSv1_2)
    if name == "oneCipherTLS12":
        assert (version, cipher) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")  # the one suite allowed
        with pytest.raises(ssl.SSLError):
            handshake(exporter.port, certs / "ca.crt", minimum_version=ssl.TLSVersion.TLSv1_3)


def test_the_toolkits_headers_example_is_applied_to_every_answer(start: Any, certs: Path) -> None:
    exporter = start(f"--web.config.file={write(certs, 'headers.yml', HEADERS)}")
    for path, status in (("/metrics", 200), ("/", 200), ("/healthz", 200), ("/nothing", 404),
                         ("/probe?account=nope", 400)):
        response = exporter.get(path)
        assert response.status_code == status, path
        for header, value in EXPECTED_HEADERS.items():
            assert response.headers.get(header) == value, (path, header)


def test_headers_are_on_the_401_too(start: Any, certs: Path) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    config = write(certs, "headers-users.yml", HEADERS + f"basic_auth_users:\n  u: {hashed}\n")
    exporter = start(f"--web.config-file={config}")
    refused = exporter.get("/metrics")
    assert refused.status_code == 401 and refused.headers["X-Frame-Options"] == "deny"
    assert exporter.get("/metrics", auth=("u", "pw")).headers["X-Content-Type-Options"] == "nosniff"


def test_every_listen_address_serves(start: Any) -> None:
    second = free_port()
    exporter = start(f"--web.listen-address=127.0.0.1:{second}")  # the fixture gives the first one
    for port in (exporter.port, second):
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=15)
        assert response.status_code == 200 and "skillable_up 1.0" in response.text
    assert exporter.log().count("listening address=http://") == 2


def test_telemetry_path_moves_the_metrics(start: Any) -> None:
    exporter = start("--web.telemetry-path=/custom/metrics")
    assert "skillable_up" in exporter.get("/custom/metrics").text
    assert exporter.get("/metrics").status_code == 404
    assert exporter.get("/healthz").status_code == 200
    assert 'href="custom/metrics"' in exporter.get("/").text  # the landing page links to it


# "//metrics" and the dot segments were accepted on main, and then every scrape got 404.
BAD_TELEMETRY_PATHS = ["metrics", "/healthz", "/", "/probe", "/a b", "//metrics", "/custom//metrics", "/./metrics",
                       "/custom/../metrics", "/-/reload"]


@pytest.mark.parametrize("path", BAD_TELEMETRY_PATHS)
def test_a_bad_telemetry_path_is_refused(path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "exporter", f"--web.telemetry-path={path}", "--config.check"],
                            env={**os.environ, "SKILLABLE_API_KEY": "k"}, capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "web.telemetry-path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_telemetry_path_that_cannot_be_served_stops_start_up(fake: FakeSkillable) -> None:
    """Not only --config.check: the exporter itself exits 2 with one line instead of serving 404s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    result = subprocess.run([sys.executable, "-m", "exporter", "--web.telemetry-path=//metrics",
                             f"--web.listen-address=127.0.0.1:{free_port()}"],
                            env={**env, "SKILLABLE_API_KEY": "k", "SKILLABLE_API_URL": fake.url},
                            capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "web.telemetry-path" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_a_listen_address_without_a_host_serves_ipv6_and_ipv4(start: Any) -> None:
    """':PORT' is every interface, as in Go's exporters: one dual-stack socket where IPv6 exists
    (on main it was 0.0.0.0 only, and an IPv6 scraper could not reach it)."""
    port = free_port()
    exporter = start(f"--web.listen-address=:{port}")
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=15).status_code == 200
    if ipv6_loopback():
        response = requests.get(f"http://[::1]:{port}/metrics", timeout=15)
        assert response.status_code == 200 and "skillable_up" in response.text
        assert f"listening address=http://[::]:{port}" in exporter.log()
    else:  # a machine without IPv6: IPv4's every interface
        assert f"listening address=http://0.0.0.0:{port}" in exporter.log()


# What systemd could be made to pass (a unit's ListenDatagram=, a mistaken LISTEN_FDS): each was a
# traceback on main (ENOTSOCK, EBADF, MemoryError), or for UDP a "listening" line and no service.
SOCKET_LAUNCHER = """
import os, socket, sys
kind, path = sys.argv[1], sys.argv[2]
count = "1"
if kind == "regular-file":
    fd = os.open(path, os.O_RDONLY)
elif kind == "udp":
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fd = udp.detach()
elif kind == "not-listening":
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    fd = tcp.detach()
elif kind == "closed-fd":
    fd = None
else:  # a good listening socket, and a count no process could have been passed
    fd = socket.create_server(("127.0.0.1", 0)).detach()
    count = "1000000000"
if fd is None:
    try:
        os.close(3)
    except OSError:
        pass
else:
    os.dup2(fd, 3)
    os.set_inheritable(3, True)  # dup2 onto itself (fd was already 3) keeps it close-on-exec
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = count
os.execv(sys.executable, [sys.executable, "-m", "exporter", "--web.systemd-socket"])
"""


@pytest.mark.parametrize("kind, problem", [
    ("regular-file", "is not a socket"), ("closed-fd", "is not open"), ("udp", "is not a stream"),
    ("not-listening", "is not listening"), ("absurd-count", "LISTEN_FDS=1000000000"),
])
def test_socket_activation_refuses_anything_but_listening_stream_sockets(
    kind: str, problem: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKILLABLE_", "LISTEN_"))}
    regular = tmp_path / "regular-file"
    regular.write_text("not a socket\n")
    result = subprocess.run([sys.executable, "-c", SOCKET_LAUNCHER, kind, str(regular)],
                            env={**env, "SKILLABLE_API_KEY": "k"}, capture_output=True, text=True, cwd=ROOT, timeout=20)
    assert result.returncode == 2, result.stderr
    assert "web.systemd-socket" in result.stderr and problem in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_systemd_socket_activation(fake: FakeSkillable, tmp_path: Path) -> None:
    """As systemd does it: the listening socket on fd 3, LISTEN_FDS=1 and LISTEN_PID the exporter's pid."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKILLABLE_", "LISTEN_"))}
    env.update({"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"})
    # The launcher moves the socket to fd 3, sets LISTEN_PID to its own pid and execs the exporter,
    # which keeps that pid, as systemd's fork-and-exec does.
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_PID'] = str(os.getpid()); "
                "os.environ['LISTEN_FDS'] = '1'; "
                "os.execv(sys.executable, [sys.executable, '-m', 'exporter', '--web.systemd-socket'])")
    log = open(tmp_path / "exporter.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno())], env=env, cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),))
    listener.close()  # the exporter holds it now
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=20)  # queued until it serves
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "exporter.log").read_text()
                time.sleep(0.1)
        assert response.status_code == 200 and "skillable_up 1.0" in response.text
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        log.close()
    assert f"listening address=http://127.0.0.1:{port}" in (tmp_path / "exporter.log").read_text()


def test_systemd_socket_without_sockets_is_a_config_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    result = subprocess.run([sys.executable, "-m", "exporter", "--web.systemd-socket"],
                            env={**env, "SKILLABLE_API_KEY": "k"}, capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 2 and "web.systemd-socket" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
