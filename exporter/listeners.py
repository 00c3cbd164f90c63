"""The listening sockets: one per --web.listen-address, or the ones systemd passes (socket activation).

Addresses, as exporter-toolkit's Go servers read them:
- `:PORT` (no host) is every interface, IPv6 and IPv4 on one dual-stack socket; where the
  machine has no IPv6, IPv4's 0.0.0.0.
- `[::]:PORT` is dual-stack too (as Go makes it); `0.0.0.0:PORT` is IPv4 only.
- `HOST:PORT` and `[ADDR]:PORT` are that address.

Socket activation: systemd passes sockets from fd 3 on and says how many in LISTEN_FDS, for the
process LISTEN_PID names (sd_listen_fds(3)). Every one is checked before anything starts: an fd
that is not open, not a socket, not a stream socket or not listening is a configuration error
(exit 2, one line naming the fd), as is a count no process could have been handed.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
from collections.abc import MutableMapping

from .config import ConfigError

SETTING_ADDRESS = "web.listen-address"
SETTING_SYSTEMD = "web.systemd-socket"
BACKLOG = 1024  # connections the kernel queues before accept: a burst of scrapers waits, not refused
SD_LISTEN_FDS_START = 3  # systemd passes its sockets from this file descriptor on (sd_listen_fds(3))


def parse_listen_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind(address: tuple[str, int]) -> socket.socket:
    """A listening TCP socket on (host, port); host '' or '::' is dual-stack where IPv6 exists."""
    host, port = address
    if host in ("", "::"):
        try:
            return _listen(socket.AF_INET6, ("::", port), dual_stack=True)
        except OSError:
            if host == "::" or _has_ipv6():
                raise
        return _listen(socket.AF_INET, ("0.0.0.0", port))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _listen(family, (host, port))


def _has_ipv6() -> bool:
    """Whether this machine can make an IPv6 socket at all (a kernel without IPv6 cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _listen(family: socket.AddressFamily, address: tuple[str, int], dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:  # whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def systemd_listen_fds(environ: MutableMapping[str, str], unset: bool = False) -> list[int]:
    """The file descriptors of the sockets systemd passed to this process, each checked to be a
    listening stream socket; `unset` removes the variables so nothing started later inherits them.
    Raises ConfigError (one line) for anything else."""
    try:
        pid, count = int(environ.get("LISTEN_PID", "")), int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        count = 0
    else:
        count = count if pid == os.getpid() else 0
    if count < 1:
        raise ConfigError(SETTING_SYSTEMD, "no sockets passed: LISTEN_FDS and LISTEN_PID are not set for this process")
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files != resource.RLIM_INFINITY and SD_LISTEN_FDS_START + count > open_files:
        raise ConfigError(SETTING_SYSTEMD, f"LISTEN_FDS={count} is more file descriptors than this process may open")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        problem = _not_a_listener(fd)
        if problem:
            raise ConfigError(SETTING_SYSTEMD, f"fd {fd} (of LISTEN_FDS={count}) {problem}")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(name, None)
    return fds


def _not_a_listener(fd: int) -> str | None:
    """Why `fd` is not a listening stream socket, or None if it is."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "is not open"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    sock = socket.socket(fileno=fd)
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            return "is not a stream (TCP or Unix) socket"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is not listening"
    except OSError as exc:
        return f"cannot be read as a socket: {exc.strerror}"
    finally:
        sock.detach()  # the fd stays open, for serve() to take
    return None


def describe(sock: socket.socket, scheme: str) -> str:
    """The address a socket serves, as a URL for the 'listening' log line."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"{scheme}+unix://{name!s}"
    host, port = name[0], name[1]
    return f"{scheme}://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{scheme}://{host}:{port}"
