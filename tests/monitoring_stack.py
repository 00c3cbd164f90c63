"""Real Prometheus and Alertmanager processes around an exporter, for the integration tests.

A Stack holds the processes of one test module, each started in its own temporary folder on
127.0.0.1 with a free port, its output in `<name>.log` there; `stop()` ends them by PID. The
binaries come from Debian's `prometheus` and `prometheus-alertmanager` packages (.ci/run installs
them); a missing one fails the test (harness.tool), never skips it.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from collections.abc import Callable

import requests

from . import harness
from .harness import stop_process

T = TypeVar("T")
STARTUP_DEADLINE = 20.0  # Prometheus holds new targets ~5 s before the first scrape


def eventually(check: Callable[[], T | None], deadline: float, what: str, interval: float = 0.2) -> T:
    """harness.eventually, polling less often, with a server still starting (no answer, a body
    that is not yet JSON or lacks a key) counted as not yet."""
    return harness.eventually(check, deadline, what, interval,  # type: ignore[no-any-return]
                              ignoring=(requests.RequestException, ValueError, KeyError))


@dataclass
class Stack:
    workdir: Path
    exporter_url: str = ""
    prometheus_url: str = ""
    alertmanager_url: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query (at `at`, else now): the vector's samples, or a scalar as one entry."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        body = requests.get(f"{self.prometheus_url}/api/v1/query", params=params, timeout=10).json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return body["data"]["result"] if body["data"]["resultType"] in ("vector", "matrix") else [body["data"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}"}
        body = requests.get(f"{self.prometheus_url}/api/v1/query_range", params=params, timeout=20).json()
        assert body.get("status") == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def start(self, name: str, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        environ = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=cwd or self.workdir,
                                            env=environ)
        log.close()

    def ready(self, name: str, url: str, deadline: float = STARTUP_DEADLINE) -> None:
        def check() -> bool:
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.log(name)}"
            return requests.get(url, timeout=1).status_code == 200

        eventually(check, deadline, f"{name} at {url}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()  # all at once; stop_process then waits for each
        for proc in self.procs.values():
            stop_process(proc)


def prometheus_args(stack: Stack, port: int, config: Path, data: Path | None = None) -> list[str]:
    return [harness.tool("prometheus"), f"--config.file={config}",
            f"--storage.tsdb.path={data or stack.workdir / 'prom'}", f"--web.listen-address=127.0.0.1:{port}"]


def alertmanager_args(stack: Stack, port: int, config: Path) -> list[str]:
    return [harness.tool("prometheus-alertmanager"), f"--config.file={config}",
            f"--storage.path={stack.workdir / 'am'}", f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address="]
