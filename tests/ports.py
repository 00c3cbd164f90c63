"""Free loopback ports for the processes the tests start. Also a script: `python3 -m tests.ports`
prints a port for `--demo` (.ci/docker-test.sh runs the container on it)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_demo_port() -> int:
    """A free port whose next one is free too: `--demo` serves its simulated API at the
    exporter's port plus one (exporter.demo.demo_api_address). Both are taken below the kernel's
    ephemeral range, so that no outgoing connection or bind to port 0 (every fake API, the other
    tests running meanwhile) can take port + 1 between this choice and the exporter's start."""
    low = ephemeral_range()[0]
    top = low - 1 if low > DEMO_PORTS_FROM + 1000 else 65534  # no room below it: anywhere, then
    for _ in range(200):
        port = random.randrange(DEMO_PORTS_FROM, top)
        if all(bindable(p) for p in (port, port + 1)):
            return port
    raise RuntimeError("no two free ports in a row")


DEMO_PORTS_FROM = 20000


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    print(free_demo_port())
