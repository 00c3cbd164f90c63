"""SIGHUP and SIGTERM from the process's first moment, and systemd's readiness protocol.

On main a SIGHUP in the first ~130 ms (while the exporter imported its dependencies: systemd's
`start` then `reload` on a Type=simple unit) killed the process, and systemd counts a death by
SIGHUP as a clean exit. The tests stop the exporter the moment it catches the signal (SIGSTOP, as
seen in /proc/PID/status), check that it has not imported its dependencies yet, then send it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Iterator

import pytest
import requests

from .fakeapi import FakeSkillable
from .harness import ROOT, free_port, stop_process

pytestmark = pytest.mark.integration

DEPENDENCIES = ("msgspec", "bcrypt", "aiohttp")  # C extensions the exporter imports after its entry point


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as handle:
        mask = next(int(line.split()[1], 16) for line in handle if line.startswith("SigCgt:"))
    return bool(mask >> (signum - 1) & 1)


def loaded_dependencies(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as handle:
        maps = handle.read()
    return {name for name in DEPENDENCIES if f"/{name}/" in maps}


class Starting:
    """`python3 -m exporter` on a free port, against the fake, its log in a file."""

    def __init__(self, fake: FakeSkillable, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "exporter.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("SKILLABLE_", "NOTIFY_SOCKET"))}
        environ.update({"SKILLABLE_API_URL": fake.url, "SKILLABLE_API_KEY": fake.state.api_key,
                        "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"}, **env)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}"],
                                     env=environ, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    def stop_at_first_catch(self, signum: int) -> None:
        """Busy-wait until the process catches `signum`, then stop it (SIGSTOP) right there."""
        deadline = time.monotonic() + 15
        while not catches(self.proc.pid, signum):
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the signal was never caught"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def healthz(self) -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def wait_serving(self) -> None:
        deadline = time.monotonic() + 20
        while not self.healthz():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def starting(fake: FakeSkillable, tmp_path: Path) -> Iterator[Starting]:
    exporter = Starting(fake, tmp_path)
    yield exporter
    exporter.close()


def test_a_sighup_before_the_imports_are_done_is_a_reload_once_serving(starting: Starting) -> None:
    starting.stop_at_first_catch(signal.SIGHUP)
    try:
        assert loaded_dependencies(starting.proc.pid) == set()  # caught before the exporter's imports
        assert not starting.healthz()
        starting.proc.send_signal(signal.SIGHUP)  # delivered as it goes on
    finally:
        os.kill(starting.proc.pid, signal.SIGCONT)
    starting.wait_serving()
    deadline = time.monotonic() + 10
    while "received SIGHUP" not in starting.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = starting.log()
    assert log.index("msg=listening") < log.index("received SIGHUP") < log.index("config reloaded")
    assert starting.proc.poll() is None and "Traceback" not in log


def test_a_sigterm_before_serving_is_a_clean_stop(starting: Starting) -> None:
    starting.stop_at_first_catch(signal.SIGTERM)
    try:
        assert loaded_dependencies(starting.proc.pid) == set()
        starting.proc.send_signal(signal.SIGTERM)
    finally:
        os.kill(starting.proc.pid, signal.SIGCONT)
    assert starting.proc.wait(20) == 0  # not killed by the signal: exit status 0, as systemd wants
    log = starting.log()
    assert "shutting down" in log and "msg=listening" not in log and "Traceback" not in log


def test_readiness_reload_and_stop_are_told_to_systemd(fake: FakeSkillable, tmp_path: Path) -> None:
    """sd_notify(3) over $NOTIFY_SOCKET: READY=1 once serving (a scrape right after it is answered),
    RELOADING=1 then READY=1 around a SIGHUP's reload, STOPPING=1 at SIGTERM."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(20)
        exporter = Starting(fake, tmp_path, NOTIFY_SOCKET=str(path))
        try:
            assert listener.recv(4096) == b"READY=1"
            assert exporter.healthz()  # serving when it said so, not after
            exporter.proc.send_signal(signal.SIGHUP)
            reloading = listener.recv(4096).decode().split("\n")
            assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
            assert int(reloading[1].partition("=")[2]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert listener.recv(4096) == b"READY=1"
            assert "config reloaded" in exporter.log()
            exporter.proc.send_signal(signal.SIGTERM)
            assert listener.recv(4096) == b"STOPPING=1"
            assert exporter.proc.wait(20) == 0
        finally:
            exporter.close()
