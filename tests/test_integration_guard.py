"""The `integration` marker stays true (integration_guard.py): in a pytest run of its own, on the tests
below, every test without the marker that starts a process or binds a socket fails, before the process
starts, with a message that names the marker, and the tests that do neither, or carry it, pass."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from .harness import ROOT

pytestmark = pytest.mark.integration  # runs pytest in a process of its own

CONFTEST = """
from tests import integration_guard


def pytest_configure(config):
    config.pluginmanager.register(integration_guard, "integration_guard")
"""

TESTS = """
import os
import socket
import subprocess
import sys
import threading

import pytest


@pytest.fixture(scope="module")
def server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


@pytest.mark.integration
def test_marked_starts_a_process_and_a_server(server):
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_pure():
    assert sum(range(4)) == 6


def test_binds():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))


def test_binds_in_a_thread():
    def serve():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()


def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "open('started', 'w')"])


def test_runs_a_shell_command_and_swallows_the_failure():
    try:
        os.system("touch system")
    except BaseException:
        pass


def test_uses_a_server_a_marked_test_started(server):
    assert server
"""


def outcomes(report: Path) -> dict[str, str]:
    """Test name -> "passed", or the message of its failure or error."""
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        found[case.attrib["name"]] = "passed" if problem is None else problem.attrib.get("message", "")
    return found


def test_tests_without_the_marker_that_start_a_process_or_bind_a_socket_fail(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_cases.py").write_text(TESTS)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:cloudcoil", "-o", "markers=integration",
         f"--junit-xml={tmp_path / 'report.xml'}", "test_cases.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    got = outcomes(tmp_path / "report.xml")
    assert got["test_marked_starts_a_process_and_a_server"] == "passed"
    assert got["test_pure"] == "passed"
    python = repr(sys.executable)
    for name, what in [("test_binds", "binds a socket (('127.0.0.1', 0))"),
                       ("test_binds_in_a_thread", "binds a socket (('127.0.0.1', 0))"),
                       ("test_starts_a_process", f"starts a process ([{python}, '-c', \"open('started', 'w')\"])"),
                       ("test_runs_a_shell_command_and_swallows_the_failure",
                        "starts a process (os.system 'touch system')")]:
        message = got[name]
        assert f"test_cases.py::{name} {what} but is not marked integration: mark it" in message, (name, message)
        assert "(@pytest.mark.integration, or pytestmark = pytest.mark.integration for a whole module)" in message
    # A server the marked test started, used by a test without the marker: the setup fails.
    assert "uses fixture 'server' (set up for test_cases.py::test_marked_starts_a_process_and_a_server)" \
        in got["test_uses_a_server_a_marked_test_started"]
    assert len(got) == 7
    # Refused before it began: neither command ran.
    assert not (tmp_path / "started").exists() and not (tmp_path / "system").exists()
