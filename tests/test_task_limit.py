"""A real task limit (RLIMIT_NPROC) on the exporter process, under a flood of idle and slow-header
connections and bursts of concurrent scrapes: polling goes on, real scrapes answer on time, and
skillable_up tells the truth (hostile input 1). Since the server is event-driven the
flood costs no thread at all; the scrape bursts ask for more worker threads than the limit leaves.

The limit is the kernel's: the exporter runs as an otherwise unused user id under
`prlimit --nproc`, so a thread it cannot start is a clone() the kernel refused, as under a
container pids limit or systemd's TasksMax. (Root is exempt from RLIMIT_NPROC, hence the user
id; it keeps CAP_DAC_READ_SEARCH only, to read the interpreter and the checkout.)
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Iterator

import pytest

from .conftest import ExporterProcess
from .fakeapi import FakeSkillable, lab
from .harness import parse, total

pytestmark = pytest.mark.integration  # the fake API and the exporter's server over loopback

# Threads the exporter process may have in all: main (the event loop), the poll worker, the client's
# deadline watchdog, one HTTP worker, and two more: the HTTP workers cannot grow to what a burst asks.
TASKS = 6
FLOOD = 120  # connections held open by the attacker, far more than the limit leaves
BURST = 6  # concurrent scrapes, each wanting a worker thread
UNUSED_UID = 61_337


def tasks_of_uid(uid: int) -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    with open(f"/proc/{pid}/status") as handle:
                        count += next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
            except (OSError, StopIteration):
                pass
    return count


def limited(tasks: int) -> list[str]:
    """A command prefix that runs the exporter under a kernel limit of `tasks` tasks."""
    for tool in ("prlimit", "setpriv"):
        assert shutil.which(tool), f"{tool} is missing: it comes with util-linux"
    if os.geteuid() != 0:  # the limit counts this user's other tasks too
        return ["prlimit", f"--nproc={tasks + tasks_of_uid(os.getuid())}"]
    return ["prlimit", f"--nproc={tasks}", "setpriv", f"--reuid={UNUSED_UID}", f"--regid={UNUSED_UID}",
            "--clear-groups", "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]


def sockets_of(pid: int) -> int:
    return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


class Flood:
    """Keeps `size` connections open to the exporter: half send nothing, half trickle a request head
    one byte a second. A connection the exporter closes is opened again at once."""

    def __init__(self, port: int, size: int) -> None:
        self.port, self.size = port, size
        self.stop = threading.Event()
        self.reopened = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(10)

    def _open(self, slow: bool) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            if slow:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            sock.setblocking(False)
            return sock
        except OSError:
            return None

    def _run(self) -> None:
        socks: list[tuple[socket.socket | None, bool]] = [
            (self._open(i % 2 == 1), i % 2 == 1) for i in range(self.size)]
        while not self.stop.wait(0.2):
            for i, (sock, slow) in enumerate(socks):
                alive = sock is not None
                if sock is not None:
                    try:
                        if sock.recv(1, socket.MSG_PEEK) == b"":
                            alive = False
                    except BlockingIOError:
                        pass
                    except OSError:
                        alive = False
                    if alive and slow:
                        try:
                            sock.send(b"a")
                        except OSError:
                            alive = False
                if not alive:
                    if sock is not None:
                        sock.close()
                    socks[i] = (self._open(slow), slow)
                    self.reopened += 1
        for sock, _ in socks:
            if sock is not None:
                sock.close()


@pytest.fixture
def live() -> Iterator[FakeSkillable]:
    server = FakeSkillable(live=True)
    yield server
    server.stop()


def test_polling_goes_on_at_a_real_task_limit_under_an_idle_and_slow_header_flood(
    live: FakeSkillable, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env.update({"SKILLABLE_API_URL": live.url, "SKILLABLE_API_KEY": live.state.api_key,
                "SKILLABLE_COLLECTOR_STATS": "false", "SKILLABLE_COLLECTOR_DELIVERY_REGIONS": "false"})
    now = int(time.time())
    live.add(lab(1, now - 600, now - 60, status=4))
    exporter = ExporterProcess(["--skillable.min-poll-interval=0.5", "--skillable.timeout=2", "--log.level=debug"],
                               env, tmp_path / "exporter.log", prefix=limited(TASKS))
    try:
        headers = {"X-Prometheus-Scrape-Timeout-Seconds": "3"}
        first = parse(exporter.get("/metrics", headers=headers).text)
        assert total(first, "skillable_up") == 1
        assert total(first, "skillable_lab_instances_started_total") == 1

        with Flood(exporter.port, FLOOD) as flood:
            time.sleep(2)  # the flood is in
            latencies: list[float] = []
            lock = threading.Lock()

            def scrape(i: int) -> None:
                started = time.monotonic()
                response = exporter.get("/metrics", headers=headers, timeout=10)  # a new connection each time
                with lock:
                    latencies.append(time.monotonic() - started)
                assert response.status_code == 200
                samples = parse(response.text)
                assert total(samples, "skillable_up") == 1, exporter.log()[-3000:]
                # Polling went on: the lab added just now is counted.
                assert total(samples, "skillable_lab_instances_started_total") == 2 + i

            for i in range(8):
                t = int(time.time())
                live.add(lab(100 + i, t - 5, t - 1, status=4))
                time.sleep(0.6)  # past the min poll interval: this burst must poll
                with ThreadPoolExecutor(BURST) as burst:
                    for done in [burst.submit(scrape, i) for _ in range(BURST)]:
                        done.result()
                assert threads_of(exporter.proc.pid) <= TASKS
            # Every flood connection was held the whole time, none closed to make room: they cost no thread.
            assert flood.reopened == 0
            assert sockets_of(exporter.proc.pid) >= FLOOD
        assert len(latencies) == 8 * BURST and max(latencies) < 3.0, latencies
        log = exporter.log()
        # The limit was real and was reached: the kernel refused threads.
        assert "cannot start a worker thread (at the task limit)" in log, log[-3000:]
        assert exporter.proc.poll() is None
        assert "Traceback" not in log
    finally:
        exporter.stop()
