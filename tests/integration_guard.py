"""The `integration` marker kept true: a test without it may not start a process or bind a socket.

`pytest -m "not integration"` is the fast lane for day-to-day work. It stays fast, and needs no
binaries, only while every test that starts a process (the exporter, Prometheus, promtool, Docker,
Chromium, ...) or a real server (the fake API on loopback, the exporter's HTTP server) carries the
marker. These hooks (conftest.py imports them) check that on every run, the whole suite's as well:

- While a test without the marker is set up and runs, starting a process (subprocess.Popen,
  os.fork, os.posix_spawn, os.system) or binding or listening on a socket fails it, with a message
  that names the marker. Done from a thread, it fails the test when the phase ends.
- A fixture whose setup did either (a module-scoped server first set up for a marked test) fails a
  test without the marker that uses it, so the whole suite catches what the fast lane would.

Teardown is not checked: pytest finalizes a module's fixtures after whichever test comes last.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

MARKER = "integration"

# (owner, attribute, what a call does, in the failure's words)
GUARDED: list[tuple[Any, str, Callable[..., str]]] = [
    (subprocess.Popen, "__init__", lambda self, args, *_, **__: f"starts a process ({args!r})"),
    (os, "fork", lambda *_, **__: "forks (os.fork)"),
    (os, "posix_spawn", lambda path, *_, **__: f"starts a process (os.posix_spawn {path!r})"),
    (os, "posix_spawnp", lambda path, *_, **__: f"starts a process (os.posix_spawnp {path!r})"),
    (os, "system", lambda command, *_, **__: f"starts a process (os.system {command!r})"),
    (socket.socket, "bind", lambda self, address, *_, **__: f"binds a socket ({address!r})"),
    (socket.socket, "listen", lambda self, *_, **__: "listens on a socket"),
]


class Guard:
    def __init__(self) -> None:
        self.unmarked: str | None = None  # the test without the marker being set up or run
        self.violations: list[str] = []  # what it did (a thread's included)
        self.starts = 0  # processes started and sockets bound or listened on, in any test or fixture
        self.setting_up = ""  # the test whose setup is running, named when one of its fixtures taints
        self.fixtures: dict[tuple[str, str], str] = {}  # (name, baseid) set up -> the test it started in, or ""
        self.originals: list[tuple[Any, str, Any]] = []

    def check(self, what: str) -> None:
        self.starts += 1
        if self.unmarked is not None:
            message = (f"{self.unmarked} {what} but is not marked {MARKER}: mark it (@pytest.mark.{MARKER}, "
                       f"or pytestmark = pytest.mark.{MARKER} for a whole module) so that "
                       f'`pytest -m "not {MARKER}"` stays the fast lane')
            self.violations.append(message)
            pytest.fail(message)

    def install(self) -> None:
        for owner, name, describe in GUARDED:
            original = getattr(owner, name)
            self.originals.append((owner, name, original))
            setattr(owner, name, self.wrap(original, describe))

    def wrap(self, original: Callable[..., Any], describe: Callable[..., str]) -> Callable[..., Any]:
        @functools.wraps(original)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check(describe(*args, **kwargs))
            return original(*args, **kwargs)
        return guarded

    def uninstall(self) -> None:
        for owner, name, original in reversed(self.originals):
            setattr(owner, name, original)
        self.originals.clear()

    @contextlib.contextmanager
    def forbidding(self, item: pytest.Item) -> Iterator[None]:
        """Fail `item` if it has no marker and starts a process or binds a socket in this phase."""
        if item.get_closest_marker(MARKER) is not None:
            yield
            return
        self.unmarked, self.violations = item.nodeid, []
        try:
            yield
        finally:
            self.unmarked = None
        if self.violations:  # done in a thread (the test's own thread has raised already), or caught
            pytest.fail(self.violations[0], pytrace=False)

    def tainted_fixture(self, item: pytest.Item) -> str | None:
        """A fixture `item` uses whose setup started a process or bound a socket, named with the test it
        was set up for. Of the fixtures of one name, the one `item` sees is the one defined nearest it."""
        for name in getattr(item, "fixturenames", ()):
            visible = [(len(baseid), where) for (argname, baseid), where in self.fixtures.items()
                       if argname == name and sees(item.nodeid, baseid)]
            if visible and max(visible)[1]:
                return f"fixture {name!r} (set up for {max(visible)[1]})"
        return None


def sees(nodeid: str, baseid: str) -> bool:
    """Whether a fixture defined at `baseid` (a directory, a module, a class) is visible to `nodeid`."""
    return not baseid or nodeid == baseid or nodeid.startswith((baseid + "/", baseid + "::"))


GUARD = Guard()


def pytest_configure(config: pytest.Config) -> None:
    GUARD.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    GUARD.uninstall()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
    before = GUARD.starts
    try:
        return (yield)
    finally:
        GUARD.fixtures[(fixturedef.argname, fixturedef.baseid)] = GUARD.setting_up if GUARD.starts != before else ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    GUARD.setting_up = item.nodeid
    with GUARD.forbidding(item):
        result = yield
    tainted = None if item.get_closest_marker(MARKER) else GUARD.tainted_fixture(item)
    if tainted:
        pytest.fail(f"{item.nodeid} uses {tainted}, which starts a process or binds a socket, but is not "
                    f"marked {MARKER}: mark it (@pytest.mark.{MARKER})", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    with GUARD.forbidding(item):
        return (yield)
