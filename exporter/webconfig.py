"""The web config file, in the format of Prometheus' exporter-toolkit.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                          # optional
      min_version: TLS12                              # optional, also max_version
      cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]   # optional, Go's names
      curve_preferences: [X25519]                     # optional
    http_server_config:
      headers: {X-Frame-Options: deny}                # optional, the toolkit's five headers
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Relative paths are taken from the web config file's folder, as exporter-toolkit does. Every
value is checked as the toolkit checks it; a bad one is a ConfigError naming it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
import threading
from dataclasses import dataclass, field

import bcrypt

from .config import MAX_CONFIG_FILE_BYTES, ConfigError, check_mapping, decode_utf8, load_yaml, read_small_file

SETTING = "web.config-file"
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version",
             "cipher_suites", "curve_preferences", "prefer_server_cipher_suites"}
_HTTP_KEYS = {"headers", "http2"}
# client_auth_type as exporter-toolkit spells it. Python's ssl module verifies every certificate a
# client sends, so RequestClientCert and RequireAnyClientCert verify too (against client_ca_file):
# stricter than Go, never looser.
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "RequireAnyClientCert": ssl.CERT_REQUIRED,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# Go's tls.CipherSuites() names (what the toolkit accepts) -> OpenSSL's. The TLS 1.3 suites are
# accepted and, as in Go, not configurable: cipher_suites applies to TLS 1.2 and below.
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None,
    "TLS_AES_256_GCM_SHA384": None,
    "TLS_CHACHA20_POLY1305_SHA256": None,
}
# Go's curve names -> OpenSSL's. Python's ssl sets one ECDHE curve: the first one listed is used.
_CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# The headers exporter-toolkit lets a web config set, with the values it allows (None: any).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}
BCRYPT_MAX_PASSWORD_BYTES = 72  # bcrypt reads no further; see check_authorization
AUTH_CACHE_SIZE = 100  # successful checks remembered, as exporter-toolkit's cache
BCRYPT_QUEUE_SECONDS = 5.0  # a check that cannot start within this (a flood of them) answers 401


def _dummy_hash(cost: int) -> bytes:
    """Checked for unknown users, at the cost of the configured hashes, so a wrong user name takes
    as long as a wrong password. Made when a config with users is loaded, not at import."""
    return bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(rounds=cost))


class _AuthCheck:
    """Basic-auth checking as exporter-toolkit does it: one bcrypt at a time, successful checks
    cached by a hash of (user, hash, password), unknown users checked against a dummy hash."""

    def __init__(self, users: dict[bytes, bytes]) -> None:
        self.users = users
        cost = max((bcrypt_cost(h) for h in users.values()), default=10)
        self._dummy = _dummy_hash(cost) if users else b""
        self._ok: dict[bytes, None] = {}  # digests of credentials that passed; oldest first
        self._lock = threading.Lock()
        self._bcrypt = threading.Lock()  # bcrypt is CPU-bound: one check at a time

    def _key(self, user: bytes, password: bytes) -> bytes:
        return hashlib.sha256(b"\0".join((user, self.users.get(user) or b"", password))).digest()

    def passed_before(self, user: bytes, password: bytes) -> bool:
        """These credentials passed a bcrypt check lately (the cache): true without another."""
        if user not in self.users:
            return False
        key = self._key(user, password)
        with self._lock:
            return key in self._ok

    def check(self, user: bytes, password: bytes) -> bool:
        if self.passed_before(user, password):
            return True
        hashed = self.users.get(user)
        key = self._key(user, password)
        # bcrypt uses the first 72 bytes of a password and Go's bcrypt.CompareHashAndPassword (the
        # toolkit's) compares only those; Python's bcrypt raises on longer ones. Cut, as Go reads.
        password = password[:BCRYPT_MAX_PASSWORD_BYTES]
        if not self._bcrypt.acquire(timeout=BCRYPT_QUEUE_SECONDS):
            return False
        try:
            # bcrypt.checkpw compares in constant time; the dummy keeps timing equal for unknown users.
            ok = bcrypt.checkpw(password, hashed if hashed is not None else self._dummy)
        except ValueError:  # a hash bcrypt cannot read: refused, never an error
            ok = False
        finally:
            self._bcrypt.release()
        ok = ok and hashed is not None
        if ok:
            with self._lock:
                self._ok[key] = None
                while len(self._ok) > AUTH_CACHE_SIZE:
                    del self._ok[next(iter(self._ok))]
        return ok


def bcrypt_cost(hashed: bytes) -> int:
    """The cost field of a $2?$NN$ hash."""
    return int(hashed[4:6])


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[bytes, bytes] = field(default_factory=dict, repr=False)
    headers: dict[str, str] = field(default_factory=dict)  # http_server_config.headers, on every answer
    # The tls_server_config settings a TLS handshake is made with, as written (see handshake_changes).
    handshake: dict[str, str] = field(default_factory=dict)
    _auth: _AuthCheck = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_auth", _AuthCheck(self.users))

    def check_authorization(self, header: str | None) -> bool:
        """True when no users are configured, or the Basic credentials match a bcrypt hash."""
        if not self.users:
            return True
        credentials = _credentials(header)
        return credentials is not None and self._auth.check(*credentials)

    def authorization_without_bcrypt(self, header: str | None) -> bool | None:
        """The verdict of check_authorization when it needs no bcrypt check (no users, a malformed
        header, credentials that passed lately), else None: the server runs bcrypt off its loop."""
        if not self.users:
            return True
        credentials = _credentials(header)
        if credentials is None:
            return False
        return True if self._auth.passed_before(*credentials) else None


def _credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) of a Basic Authorization header, or None."""
    if not header or not header.startswith("Basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return user, password


def handshake_changes(old: WebConfig | None, new: WebConfig | None) -> list[str]:
    """The tls_server_config settings that differ between two web configs, other than the
    certificate, key and client CA. A running listener cannot apply those: a new connection's
    context is swapped in (the certificate, key and CA go with it) only after OpenSSL has set up the
    handshake from the listener's first one (client_auth_type, versions, ciphers, curves)."""
    before = old.handshake if old is not None else {}
    after = new.handshake if new is not None else {}
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")


def load_web_config(path: str) -> WebConfig:
    # Read and parsed as the config file is: a regular file, UTF-8, no key twice (config.py).
    data, _ = read_small_file(SETTING, path, MAX_CONFIG_FILE_BYTES)
    tree = load_yaml(SETTING, path, decode_utf8(SETTING, path, data))[0] or {}
    tree = check_mapping(SETTING, tree, _TOP_KEYS, f"{path} to hold a mapping")
    base = os.path.dirname(os.path.abspath(path))
    tls = tree.get("tls_server_config")
    context, handshake = _ssl_context(tls, base) if tls else (None, {})
    headers = _headers(tree.get("http_server_config"))
    users_raw = tree.get("basic_auth_users") or {}
    if not isinstance(users_raw, dict):
        raise ConfigError(f"{SETTING}: basic_auth_users", "expected a mapping of user to bcrypt hash")
    users: dict[bytes, bytes] = {}
    for user, hashed in users_raw.items():
        if not isinstance(hashed, str) or not _HASH.match(hashed):
            raise ConfigError(f"{SETTING}: basic_auth_users.{user}", "expected a bcrypt hash")
        users[str(user).encode()] = hashed.encode()
    return WebConfig(context, users, headers, handshake)


def _headers(raw: object) -> dict[str, str]:
    where = f"{SETTING}: http_server_config"
    if raw is None:
        return {}
    http = check_mapping(where, raw, _HTTP_KEYS, "a mapping")
    if "http2" in http and not isinstance(http["http2"], bool):  # accepted; this server speaks HTTP/1.1
        raise ConfigError(f"{where}.http2", "expected true or false")
    headers = http.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{where}.headers", "expected a mapping of header to value")
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name not in _HEADERS:
            raise ConfigError(f"{where}.headers.{name}", f"cannot be set; one of {', '.join(_HEADERS)}")
        allowed = _HEADERS[name]
        text = "" if value is None else str(value)
        if allowed is not None and text not in allowed:
            raise ConfigError(f"{where}.headers.{name}", f"{text!r} is not one of {', '.join(allowed)}")
        if "\r" in text or "\n" in text:
            raise ConfigError(f"{where}.headers.{name}", "a header value is one line")
        if text:  # blank: unset, as in the toolkit
            out[str(name)] = text
    return out


def _strings(where: str, raw: object) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ConfigError(where, "expected a list of names")
    return raw


def _tls_version(where: str, raw: object, default: str) -> ssl.TLSVersion:
    name = default if raw is None else str(raw)
    if name not in _TLS_VERSIONS:
        raise ConfigError(where, f"{name!r} is not one of {', '.join(_TLS_VERSIONS)}")
    return _TLS_VERSIONS[name]


def _ssl_context(raw: object, base: str) -> tuple[ssl.SSLContext, dict[str, str]]:
    """The context, and the handshake settings it was made with (WebConfig.handshake)."""
    where = f"{SETTING}: tls_server_config"
    tls = check_mapping(where, raw, _TLS_KEYS, "a mapping")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise ConfigError(where, "cert_file and key_file are both required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    low = _tls_version(f"{where}.min_version", tls.get("min_version"), "TLS12")
    high = _tls_version(f"{where}.max_version", tls.get("max_version"), "TLS13")
    if low > high:
        raise ConfigError(f"{where}.min_version", "is above max_version")
    context.minimum_version, context.maximum_version = low, high
    suites = _strings(f"{where}.cipher_suites", tls.get("cipher_suites"))
    for suite in suites:
        if suite not in _CIPHERS:
            raise ConfigError(f"{where}.cipher_suites", f"unknown cipher {suite!r}")
    openssl_suites = [_CIPHERS[suite] for suite in suites if _CIPHERS[suite]]
    if openssl_suites:
        context.set_ciphers(":".join(openssl_suites))  # type: ignore[arg-type]
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise ConfigError(f"{where}.prefer_server_cipher_suites", "expected true or false")
    if prefer:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    curves = _strings(f"{where}.curve_preferences", tls.get("curve_preferences"))
    for curve in curves:
        if curve not in _CURVES:
            raise ConfigError(f"{where}.curve_preferences", f"unknown curve {curve!r}")
    if curves:
        context.set_ecdh_curve(_CURVES[curves[0]])
    try:
        context.load_cert_chain(_path(base, tls["cert_file"]), _path(base, tls["key_file"]))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.cert_file", f"cannot load certificate and key: {exc}") from None
    auth = str(tls.get("client_auth_type", "NoClientCert"))
    if auth not in _CLIENT_AUTH:
        raise ConfigError(f"{where}.client_auth_type", f"{auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    context.verify_mode = _CLIENT_AUTH[auth]
    if tls.get("client_ca_file"):
        if auth == "NoClientCert":
            raise ConfigError(f"{where}.client_ca_file", "set without a client_auth_type that asks for certificates")
        try:
            context.load_verify_locations(_path(base, tls["client_ca_file"]))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.client_ca_file", f"cannot load: {exc}") from None
    elif auth != "NoClientCert":
        context.load_default_certs(ssl.Purpose.CLIENT_AUTH)  # as Go does without ClientCAs: the system's
    handshake = {
        "client_auth_type": auth, "min_version": low.name, "max_version": high.name,
        "cipher_suites": ",".join(suites), "curve_preferences": ",".join(curves),
        "prefer_server_cipher_suites": str(prefer),
    }
    return context, handshake


def _path(base: str, value: object) -> str:
    return os.path.join(base, str(value))
