"""The state file: counters, per-instance memory and the last success time, kept across restarts.

With `--storage.state-file`, every account's FleetState and poll health is
saved after each poll and on shutdown, and restored on start, so counters
continue instead of resetting, the first poll after a restart asks only for
the minutes since the saved last success, and the restored per-instance memory
keeps it from counting anything twice.

The file is JSON, keyed by account name:

    {"format": "skillable-exporter-state", "version": 2, "saved_at": <unix time>,
     "accounts": {"<name>": {"last_success": ..., "requests": {...}, "fleet": {...}, ...}}}

where "fleet" is FleetState.export() (exporter/state.py): every tracked instance,
running ones included, and the counters and histograms of each dimension.

It holds ids, counts and times only: no API key and no personal data. Each write
goes to a temporary file in the same folder, is fsynced, and renamed over the
old one, so a crash leaves the old file or the new one, never half of one. The
encoding happens in the polling thread while it still holds the poll (so no
other poll changes the state meanwhile, and no lock is taken) but after the
scrapes waiting for the poll were let go; the disk write happens in a writer
thread of its own. No scrape waits for the encoding or for a disk.
A missing, unreadable, corrupt or foreign-version file gives one warning and a
clean start.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Mapping

import msgspec

from .config import ConfigError
from .state import FleetExport, FleetState, RestoreError

if TYPE_CHECKING:
    from .poller import Poller

log = logging.getLogger(__name__)

FORMAT = "skillable-exporter-state"
VERSION = 2  # 2: the fleet is FleetState.export() (running instances, lab profiles)
SETTING = "storage.state-file"


# -- the schema (arrays, not objects, for the large lists) ---------------------


class _Failure(msgspec.Struct, array_like=True):
    endpoint: str
    reason: str
    count: int


class AccountState(msgspec.Struct, forbid_unknown_fields=True):
    """One account's saved state."""

    last_success: float | None
    requests: dict[str, int]
    failures: list[_Failure]
    fleet: FleetExport  # FleetState.export(): instances (running ones too), counters, histograms


class _Header(msgspec.Struct):
    format: str | None = None
    version: int | None = None


class _File(msgspec.Struct):
    format: str
    version: int
    saved_at: float
    accounts: dict[str, msgspec.Raw]


_encoder = msgspec.json.Encoder()
_account_decoder = msgspec.json.Decoder(AccountState)


class StateFileError(Exception):
    """The state file cannot be used (corrupt, foreign, inconsistent)."""


# -- one account: encode and restore -------------------------------------------


def encode_account(poller: Poller) -> bytes:
    """One account's state as JSON. Call only while no poll of this poller can run.

    That holds in Poller.on_poll (the polling thread still holds the single
    flight) and after Poller.stop(); FleetState and Health are then read
    without the lock, so scrapes are not held up.
    """
    health = poller.health
    doc = AccountState(
        last_success=health.last_success,
        requests=dict(health.requests),
        failures=[_Failure(e, r, n) for (e, r), n in sorted(health.failures.items())],
        fleet=poller.state.export(),
    )
    return _encoder.encode(doc)


def restore_account(poller: Poller, saved: AccountState) -> None:
    """Put a saved state into a poller that has not polled yet."""
    old = poller.state
    try:
        state = FleetState.restore(saved.fleet, old.max_lab_hosts, old.max_lab_profiles, old.max_running_seconds)
    except RestoreError as exc:
        raise StateFileError(str(exc)) from None
    poller.restore(state, saved.last_success, Counter(saved.requests),
                   Counter({(f.endpoint, f.reason): f.count for f in saved.failures}))


# -- the file ------------------------------------------------------------------


def check_state_path(path: str) -> None:
    """Refuse, at start, a state file whose folder does not exist or cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(SETTING, f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(SETTING, f"folder {folder} is not writable")
    if os.path.isdir(path):
        raise ConfigError(SETTING, f"{path} is a folder")


def read_state_file(path: str) -> dict[str, AccountState]:
    """Every account in the file. Raises FileNotFoundError or StateFileError."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        header = msgspec.json.decode(data, type=_Header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"not a state file ({exc})") from None
    if header.format != FORMAT or header.version != VERSION:
        raise StateFileError(f"format {header.format!r} version {header.version!r}, expected {FORMAT!r} "
                             f"version {VERSION}")
    try:
        whole = msgspec.json.decode(data, type=_File)
        return {name: _account_decoder.decode(raw) for name, raw in whole.accounts.items()}
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"corrupt ({exc})") from None


def write_atomically(path: str, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".skillable-state-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        folder_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder_fd)
    except OSError:
        pass
    finally:
        os.close(folder_fd)


class StateStore:
    """The state file of one exporter: load once at start, then save from a writer thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fragments: dict[str, bytes] = {}  # account name -> its latest encoded state
        self._cond = threading.Condition()
        self._dirty = False  # something submitted is not written yet
        self._writing = False
        self._closed = False
        self._failing = False
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._thread.start()

    def attach(self, pollers: Mapping[str, Poller]) -> None:
        """Restore each poller's saved state, then save it after each of its polls. Call before serving."""
        saved = self.load(list(pollers))
        for name, poller in pollers.items():
            if name in saved:
                try:
                    restore_account(poller, saved[name])
                except StateFileError as exc:
                    log.warning("state file %s: account %r not restored, starting it empty: %s", self.path, name, exc)
                else:
                    log.info("restored state account=%r instances=%d last_success=%s",
                             name, len(saved[name].fleet.instances), saved[name].last_success)
            # Encoded by the polling thread (which still holds the poll), written by the writer thread.
            poller.on_poll = lambda p, name=name: self.submit(name, encode_account(p))

    def shutdown(self, pollers: Mapping[str, Poller], timeout: float) -> None:
        """Stop polling (a poll in flight may finish within `timeout`), write the file a last time."""
        idle = {name: poller.stop(timeout) for name, poller in pollers.items()}
        final = {name: encode_account(poller) for name, poller in pollers.items() if idle[name]}
        self.close(final, timeout)
        log.info("state file written path=%s accounts=%d", self.path, len(final))

    def load(self, names: list[str]) -> dict[str, AccountState]:
        """The saved state of each configured account; problems give one warning and {}."""
        try:
            saved = read_state_file(self.path)
        except FileNotFoundError:
            log.warning("state file %s does not exist yet: starting with empty counters", self.path)
            return {}
        except (OSError, StateFileError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("state file %s cannot be used, starting with empty counters: %s", self.path, detail)
            return {}
        dropped = sorted(set(saved) - set(names))
        if dropped:
            log.info("state file %s: dropping accounts no longer configured: %s", self.path, ", ".join(dropped))
        restored = {name: saved[name] for name in names if name in saved}
        with self._cond:
            for name, account in restored.items():
                # Until that account's first poll, the file keeps what it had.
                self._fragments[name] = _encoder.encode(account)
        return restored

    def submit(self, name: str, fragment: bytes) -> None:
        """Save this account's state soon; a newer submit before the write replaces it."""
        with self._cond:
            self._fragments[name] = fragment
            self._dirty = True
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is on disk."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._writing, timeout)

    def close(self, final: dict[str, bytes], timeout: float = 10.0) -> None:
        """Write `final` (each account's last state) synchronously and stop the writer."""
        with self._cond:
            self._fragments.update(final)
            self._closed = True
            self._dirty = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closed)
                if not self._dirty and self._closed:
                    return
                fragments = dict(self._fragments)
                self._dirty = False
                self._writing = True
                closing = self._closed
            self._write(fragments)
            with self._cond:
                self._writing = False
                self._cond.notify_all()  # flush() waiters
                if closing and not self._dirty:
                    return

    def _write(self, fragments: dict[str, bytes]) -> None:
        data = _encoder.encode(
            {"format": FORMAT, "version": VERSION, "saved_at": time.time(),
             "accounts": {name: msgspec.Raw(body) for name, body in sorted(fragments.items())}}
        )
        try:
            write_atomically(self.path, data)
        except OSError as exc:
            if not self._failing:  # once per run of failures, not per poll
                log.error("cannot write state file %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return
        if self._failing:
            log.info("state file %s written again", self.path)
        self._failing = False
        self.writes += 1
