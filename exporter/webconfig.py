"""The web config file, in the format of Prometheus' exporter-toolkit.

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # optional
      client_ca_file: ca.crt                          # optional
      min_version: TLS12                              # optional
    basic_auth_users:
      prometheus: $2y$10$...   # bcrypt hash, e.g. from `htpasswd -nBC 10 "" | tr -d ':\\n'`

Relative paths are taken from the web config file's folder, as exporter-toolkit does.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import ssl
from dataclasses import dataclass, field

import bcrypt
import yaml

from .config import ConfigError, check_mapping

SETTING = "web.config-file"
_TOP_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
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


@functools.cache
def _dummy_hash() -> bytes:
    """Checked for unknown users, so a wrong user name takes as long as a wrong password.
    Made when a config with users is loaded, not at import: it costs ~60 ms of every start."""
    return bcrypt.hashpw(b"not-a-password", bcrypt.gensalt(rounds=10))


@dataclass(frozen=True)
class WebConfig:
    ssl_context: ssl.SSLContext | None = None
    users: dict[bytes, bytes] = field(default_factory=dict, repr=False)

    def check_authorization(self, header: str | None) -> bool:
        """True when no users are configured, or the Basic credentials match a bcrypt hash."""
        if not self.users:
            return True
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        hashed = self.users.get(user)
        # bcrypt.checkpw compares in constant time; the dummy keeps timing equal for unknown users.
        ok = bcrypt.checkpw(password, hashed if hashed is not None else _dummy_hash())
        return ok and hashed is not None


def load_web_config(path: str) -> WebConfig:
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle) or {}
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise ConfigError(SETTING, f"{path} is not valid YAML") from None
    tree = check_mapping(SETTING, tree, _TOP_KEYS, f"{path} to hold a mapping")
    base = os.path.dirname(os.path.abspath(path))
    tls = tree.get("tls_server_config")
    context = _ssl_context(tls, base) if tls else None
    users_raw = tree.get("basic_auth_users") or {}
    if not isinstance(users_raw, dict):
        raise ConfigError(f"{SETTING}: basic_auth_users", "expected a mapping of user to bcrypt hash")
    users: dict[bytes, bytes] = {}
    for user, hashed in users_raw.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise ConfigError(f"{SETTING}: basic_auth_users.{user}", "expected a bcrypt hash")
        users[str(user).encode()] = hashed.encode()
    if users:
        _dummy_hash()
    return WebConfig(context, users)


def _ssl_context(raw: object, base: str) -> ssl.SSLContext:
    where = f"{SETTING}: tls_server_config"
    tls = check_mapping(where, raw, _TLS_KEYS, "a mapping")
    if not tls.get("cert_file") or not tls.get("key_file"):
        raise ConfigError(where, "cert_file and key_file are both required")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS.get(str(tls.get("min_version", "TLS12")), ssl.TLSVersion.TLSv1_2)
    if tls.get("max_version"):
        context.maximum_version = _TLS_VERSIONS.get(str(tls["max_version"]), ssl.TLSVersion.TLSv1_3)
    try:
        context.load_cert_chain(_path(base, tls["cert_file"]), _path(base, tls["key_file"]))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{where}.cert_file", f"cannot load certificate and key: {exc}") from None
    auth = str(tls.get("client_auth_type", "NoClientCert"))
    if auth not in _CLIENT_AUTH:
        raise ConfigError(f"{where}.client_auth_type", f"{auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    context.verify_mode = _CLIENT_AUTH[auth]
    if tls.get("client_ca_file"):
        try:
            context.load_verify_locations(_path(base, tls["client_ca_file"]))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{where}.client_ca_file", f"cannot load: {exc}") from None
    elif auth in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise ConfigError(f"{where}.client_ca_file", f"required with client_auth_type {auth}")
    return context


def _path(base: str, value: object) -> str:
    return os.path.join(base, str(value))
