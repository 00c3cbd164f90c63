"""The state file, as storage: each account's memory (counters, per-instance memory, the last
success time) encoded, written atomically under a lock, and read back entry by entry.

An account's memory is its FleetState and the part of its poll health that outlives a restart
(account.py): restored, its counters continue instead of resetting, its first poll asks only for
the minutes since the saved last success, and its per-instance memory keeps it from counting
anything twice. When the file is read and written, and into what it is restored, is the
wiring's business (statefile.py); this module imports neither the poller nor the config.

The file is JSON, keyed by account name:

    {"format": "skillable-exporter-state", "version": 3, "saved_at": <unix time>,
     "api_urls": {"<name>": "https://host/path"},
     "accounts": {"<name>": {"last_success": ..., "requests": {...}, "fleet": {...}, ...}}}

where "fleet" is FleetState.export() (exporter/state.py): every tracked instance,
running ones included, and the counters and histograms of each dimension.

It holds ids, counts and times only: no API key and no personal data. Each write
goes to a temporary file in the same folder, is fsynced, and renamed over the
old one, so a crash leaves the old file or the new one, never half of one.
StateStore.submit encodes in the caller's thread (the polling thread, while it
still holds the poll, so no other poll changes the state meanwhile and no lock
is taken); the disk write happens in a writer thread of its own. No scrape waits
for the encoding or for a disk.
A missing, unreadable, corrupt or foreign-version file gives one warning and a
clean start.

Hostile files and hostile neighbours (docs/failure-modes.md, "Hostile input"):

- **One bad entry is left out, never the file.** Every value is checked as it is
  read: counts are never below zero, floats are finite (NaN is written as null,
  and null is no count), ids and times fit 64 bits. The smallest part holding a
  bad value is left out: one element of a list (an instance, one count row, one
  histogram), one value of a mapping (one endpoint's request count). A bad plain
  field of an account (its `invalid_total`, say) leaves out that account, never
  the others. Each account with a problem gives one warning; the next write
  holds only what was kept, so the file never holds a value its reader rejects.
- **One exporter per file.** The exporter holds an exclusive flock on
  `<state file>.lock` for the life of the process (the state file itself is
  replaced by each write, so its inode cannot carry the lock). A second process
  exits 2 with one line naming --storage.state-file. The lock file holds the
  holder's pid and is never deleted (deleting a lock file races with the next
  process taking it). (This module raises StatePathError; statefile.py names
  the setting.)
- **Whose accounts.** The file records, per account, the API URL it was saved for
  (scheme, host, port and path: no user, password or query, never the key). An
  account whose saved URL is not the one it polls now is not restored: one
  warning and a clean start for it. The saved state stays in the file, untouched,
  until that account's first successful poll, so a typo in the URL costs nothing
  once fixed; the first successful poll replaces it. Files of the previous layout
  have no URLs and are restored as before.
- **Regular files only.** A FIFO, socket or device at the state path (or the lock
  path) is refused at start, exit status 2; the file is opened non-blocking, so
  even one that appears later cannot hang a start.
- **Temporary files are recognisable.** They are named `.<state file name>.<pid>-<8 hex>.tmp`
  in the state file's folder. A write cut short by SIGKILL or power loss leaves one
  behind; the next start (once it holds the lock, so no live writer owns one) removes
  every such leftover, and those of earlier versions (`.skillable-state-*.tmp`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
import sys
import threading
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import msgspec

from .account import AccountMemory, Health, Memory
from .launches import LaunchExport, LaunchState
from .model import Count, Finite
from .state import FleetExport, FleetState, RestoreError

log = logging.getLogger(__name__)

FORMAT = "skillable-exporter-state"
VERSION = 3  # 2: the fleet is FleetState.export() (running instances, lab profiles); 3: with its keys' order
# Versions read: a file of version 2 restores with every counter (FleetExport.order's default, state.py).
READABLE_VERSIONS = (2, VERSION)
LOCK_SUFFIX = ".lock"
UNREADABLE_URL = "(unreadable)"

# The value rules of the file, applied as it is read (with model.py's Count, Finite and Int64).
Sum = Annotated[float, msgspec.Meta(ge=0.0, le=sys.float_info.max)]  # a histogram's sum of values >= 0


# -- the schema (arrays, not objects, for the large lists) ---------------------


class _Failure(msgspec.Struct, array_like=True):
    endpoint: str
    reason: str
    count: Count


class AccountState(msgspec.Struct, forbid_unknown_fields=True):
    """One account's saved state."""

    last_success: Finite | None
    requests: dict[str, Count]
    failures: list[_Failure]
    fleet: FleetExport  # FleetState.export(): instances (running ones too), counters, histograms
    # LaunchState.export(): the launch collector's checkpoints, watched labs, what was counted (absent
    # with the collector off, and in files written before it)
    launch: LaunchExport | None = None


class _Header(msgspec.Struct):
    format: str | None = None
    version: int | None = None


class _File(msgspec.Struct):
    format: str
    version: int
    accounts: dict[str, msgspec.Raw]  # each account read on its own: one bad account never sinks the others
    api_urls: dict[str, Any] = {}  # account -> the API URL it was saved for (api_identity); absent before
    saved_at: float | None = None  # for people reading the file; never used


_encoder = msgspec.json.Encoder()
_account_decoder = msgspec.json.Decoder(AccountState)


class StateFileError(Exception):
    """The state file cannot be used (corrupt, foreign, inconsistent)."""


class StatePathError(Exception):
    """The state file's path cannot be used at all: its folder is missing or not writable, it is
    not a regular file, another process holds its lock. str() is one line; the wiring names the
    setting (statefile.py)."""


# -- one account: encode and restore -------------------------------------------


def encode_account(memory: Memory) -> bytes:
    """One account's memory as JSON. Call only while nothing changes it.

    That holds in Poller.on_poll (the polling thread still holds the single
    flight) and after Poller.stop(); FleetState and Health are then read
    without the lock, so scrapes are not held up.
    """
    health = memory.health
    launch = getattr(memory, "launch", None)  # a memory of an older shape has none
    doc = AccountState(
        last_success=health.last_success,
        requests=dict(health.requests),
        failures=[_Failure(e, r, n) for (e, r), n in sorted(health.failures.items())],
        fleet=memory.state.export(),
        launch=launch.export() if launch is not None else None,
    )
    return _encoder.encode(doc)


def restore_account(saved: AccountState, empty: FleetState, empty_launch: LaunchState | None = None) -> AccountMemory:
    """The memory a saved account holds, with the limits (hosts, profiles, running time) of `empty`,
    the state of an account not polled yet, and of `empty_launch`, its launch memory (None: the launch
    collector is off, and what the file holds of it is left out). Raises StateFileError when the saved
    fleet is inconsistent; a launch memory that is gives a warning and starts empty."""
    try:
        state = FleetState.restore(saved.fleet, empty.max_lab_hosts, empty.max_lab_profiles,
                                   empty.max_running_seconds)
    except RestoreError as exc:
        raise StateFileError(str(exc)) from None
    health = Health(last_success=saved.last_success, requests=Counter(saved.requests),
                    failures=Counter({(f.endpoint, f.reason): f.count for f in saved.failures}))
    launch = None
    if empty_launch is not None and saved.launch is not None:
        try:
            launch = LaunchState.restore(saved.launch, empty_launch)
        except RestoreError as exc:
            log.warning("launch memory not restored, starting it empty: %s", exc)
    return AccountMemory(state, health, launch)


# -- reading: every entry on its own ---------------------------------------------


@dataclass
class SavedFile:
    """What a state file holds, after every value was checked."""

    accounts: dict[str, AccountState]  # every account that could be read, bad entries left out
    api_urls: dict[str, str]  # account -> the API URL it was saved for (none in files of the earlier layout)
    refused: dict[str, str] = field(default_factory=dict)  # account -> why it cannot be restored at all
    left_out: dict[str, tuple[int, str]] = field(default_factory=dict)  # account -> (entries left out, first one)


_raw_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(kind: Any) -> msgspec.json.Decoder[Any]:
    if kind not in _decoders:
        _decoders[kind] = msgspec.json.Decoder(kind)
    return _decoders[kind]


def decode_account(raw: bytes) -> tuple[AccountState, int, str]:
    """One account, leaving out each bad entry. Returns (account, entries left out, the first of them).

    Raises StateFileError when the account itself cannot be used (see salvage).
    """
    try:
        return _account_decoder.decode(raw), 0, ""
    except (msgspec.DecodeError, msgspec.ValidationError):
        pass  # the slow path below finds what is wrong, entry by entry
    problems: list[str] = []
    account = salvage(raw, AccountState, problems)
    return account, len(problems), problems[0] if problems else ""


def salvage(raw: bytes, kind: type[Any], problems: list[str], where: str = "account") -> Any:
    """Decode a struct of type `kind`, leaving out the bad entries of its lists and mappings.

    The rules: an element of a list field, or a value of a mapping field, that fails
    validation is left out and described in `problems`. A field holding a struct (not
    an array-like one) is salvaged the same way, one level down; an optional one (`X | None`,
    the launch memory) that cannot be used is left out and described. Any other field that
    fails (a plain number, a missing required field, an unknown field) fails the whole
    struct: StateFileError.
    """
    try:
        fields = _raw_fields.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"{where}: {exc}") from None
    declared = {f.encode_name: f for f in msgspec.structs.fields(kind)}
    unknown = sorted(set(fields) - set(declared))
    if unknown:
        raise StateFileError(f"{where}: unknown field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, f in declared.items():
        path = name if where == "account" else f"{where}.{name}"
        if name not in fields:
            if f.required:
                raise StateFileError(f"{path} is missing")
            continue
        origin, args = typing.get_origin(f.type), typing.get_args(f.type)
        try:
            if origin is list:
                items = enumerate(_decoder(list[msgspec.Raw]).decode(fields[name]))
                values[f.name] = [value for _, value in _good_entries(items, args[0], path, problems)]
            elif origin is dict and _is_object_struct(args[1]):  # one level down, per value
                mapping = _decoder(types.GenericAlias(dict, (args[0], msgspec.Raw))).decode(fields[name])
                values[f.name] = dict(_salvaged_values(mapping.items(), args[1], path, problems))
            elif origin is dict:
                mapping = _decoder(types.GenericAlias(dict, (args[0], msgspec.Raw))).decode(fields[name])
                values[f.name] = dict(_good_entries(mapping.items(), args[1], path, problems))
            elif _is_object_struct(f.type):
                values[f.name] = salvage(fields[name], f.type, problems, path)
            elif _optional_object_struct(f.type) is not None and bytes(fields[name]).strip() != b"null":
                try:  # an optional part that cannot be used is left out, never the struct holding it
                    values[f.name] = salvage(fields[name], _optional_object_struct(f.type), problems, path)
                except StateFileError as exc:
                    problems.append(str(exc))
            else:
                values[f.name] = _decoder(f.type).decode(fields[name])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateFileError(f"{path}: {exc}") from None
    return kind(**values)


def _good_entries(entries: Iterable[tuple[Any, bytes]], kind: Any, path: str,
                  problems: list[str]) -> list[tuple[Any, Any]]:
    """The (key, value) pairs whose value decodes as `kind`; each other one is described in `problems`."""
    good: list[tuple[Any, Any]] = []
    for key, raw in entries:
        try:
            good.append((key, _decoder(kind).decode(raw)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            problems.append(f"{path}[{key!r}]: {exc}")
    return good


def _salvaged_values(entries: Iterable[tuple[Any, bytes]], kind: Any, path: str,
                     problems: list[str]) -> list[tuple[Any, Any]]:
    """Each value salvaged on its own; a value that cannot be used at all is left out and described."""
    good: list[tuple[Any, Any]] = []
    for key, raw in entries:
        try:
            good.append((key, salvage(raw, kind, problems, f"{path}[{key!r}]")))
        except StateFileError as exc:
            problems.append(str(exc))
    return good


def _optional_object_struct(kind: Any) -> Any:
    """X of a field typed `X | None` where X is an object struct (salvaged one level down), else None."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = args[0] if args[1] is type(None) else args[1]
        return inner if _is_object_struct(inner) else None
    return None


def _is_object_struct(kind: Any) -> bool:
    return (isinstance(kind, type) and issubclass(kind, msgspec.Struct)
            and not kind.__struct_config__.array_like)


def load_state_file(path: str) -> SavedFile:
    """Every account in the file, each read on its own. Raises OSError (FileNotFoundError) or
    StateFileError when the file as a whole cannot be used (not JSON, another format or version)."""
    data = _read_regular_file(path)
    try:
        header = msgspec.json.decode(data, type=_Header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"not a state file ({exc})") from None
    if header.format != FORMAT or header.version not in READABLE_VERSIONS:
        raise StateFileError(f"format {header.format!r} version {header.version!r}, expected {FORMAT!r} "
                             f"version {VERSION}")
    try:
        whole = msgspec.json.decode(data, type=_File)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(f"corrupt ({exc})") from None
    # A URL that is not a string proves no account's identity: it matches none (see StateStore.load).
    urls = {name: url if isinstance(url, str) else UNREADABLE_URL for name, url in whole.api_urls.items()}
    saved = SavedFile({}, urls)
    for name, raw in whole.accounts.items():
        try:
            account, left_out, first = decode_account(raw)
        except StateFileError as exc:
            saved.refused[name] = str(exc)
            continue
        saved.accounts[name] = account
        if left_out:
            saved.left_out[name] = (left_out, first)
    return saved


def read_state_file(path: str) -> dict[str, AccountState]:
    """Every account that can be restored from the file (see load_state_file)."""
    return load_state_file(path).accounts


def _read_regular_file(path: str) -> bytes:
    # Non-blocking, so a FIFO put there after the start-up check cannot hang the start.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateFileError("not a regular file")
        return handle.read()


# -- the file on disk: checks, the lock, temporary files --------------------------


def check_state_path(path: str) -> None:
    """Refuse, at start, a state path whose folder does not exist or cannot be written,
    or that is something other than a regular file (a folder, a FIFO, a socket, a device)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StatePathError(f"folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StatePathError(f"folder {folder} is not writable")
    for candidate in (path, path + LOCK_SUFFIX):
        _check_regular(candidate)


def _check_regular(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StatePathError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(mode):
        raise StatePathError(f"{path} is a folder")
    if not stat.S_ISREG(mode):
        raise StatePathError(f"{path} is {_file_kind(mode)}, not a regular file")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a file")


def lock_state_file(path: str) -> int:
    """Take the exclusive lock of this state file for the life of the process; returns the fd.

    Raises StatePathError when another process holds it (or it cannot be taken at all).
    """
    lock_path = path + LOCK_SUFFIX
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StatePathError(f"cannot open the lock file {lock_path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StatePathError(f"{lock_path} is {_file_kind(os.fstat(fd).st_mode)}, not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StatePathError(f"{path} is in use by another exporter{pid}: give each exporter a state "
                                 "file of its own") from None
        except OSError as exc:
            raise StatePathError(f"cannot lock {lock_path}: {exc.strerror}") from None
        try:  # the pid is for the message of the next process only: a full disk must not stop the start
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def _temporary_name(path: str) -> str:
    return f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _is_temporary(name: str, path: str) -> bool:
    """A temporary file of this state file, or one of an earlier version (named by tempfile.mkstemp)."""
    own = rf"\.{re.escape(os.path.basename(path))}\.\d+-[0-9a-f]{{8}}\.tmp"
    return re.fullmatch(own, name) is not None or re.fullmatch(r"\.skillable-state-\w{8}\.tmp", name) is not None


def remove_temporaries(path: str) -> list[str]:
    """Remove the temporary files that interrupted writes left beside `path`. Call only holding its lock."""
    folder = os.path.dirname(os.path.abspath(path))
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not _is_temporary(name, path):
            continue
        candidate = os.path.join(folder, name)
        try:
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                os.unlink(candidate)
                removed.append(name)
        except OSError:
            pass  # gone meanwhile, or not ours to remove: the next start tries again
    return sorted(removed)


def write_atomically(path: str, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, _temporary_name(path))
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
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


# -- whose accounts ------------------------------------------------------------------


def api_identity(url: str) -> str:
    """The API URL as the file records it: scheme, host, port and path; no user, password, query or fragment."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    return f"{parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"


# -- the store -------------------------------------------------------------------------


class StateStore:
    """The state file of one exporter: lock it and load it once at start, then save from a writer thread.

    Raises StatePathError when another process holds the file's lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd: int | None = lock_state_file(path)  # first: nothing below may touch another's file
        removed = remove_temporaries(path)
        if removed:
            log.info("state file %s: removed %d temporary files left by interrupted writes: %s",
                     path, len(removed), ", ".join(removed))
        self._fragments: dict[str, bytes] = {}  # account name -> its latest encoded state
        self._urls: dict[str, str] = {}  # account name -> the API URL its fragment was saved for
        self._own_urls: dict[str, str] = {}  # account name -> the API URL it polls
        self._foreign: set[str] = set()  # accounts whose fragment is another URL's, kept until they succeed
        self._cond = threading.Condition()
        self._dirty = False  # something submitted is not written yet
        self._writing = False
        self._closed = False
        self._failing = False
        self.writes = 0
        self._thread = threading.Thread(target=self._run, name="state-writer", daemon=True)
        self._thread.start()

    def load(self, urls: Mapping[str, str]) -> dict[str, AccountState]:
        """The saved state of each account of this process (`urls`: account name -> the API URL it
        polls) that may be restored into it.

        A file that cannot be used gives one warning and {}; an account that cannot be
        used, that lost entries or that was saved for another API URL, one warning each.
        """
        own_urls = {name: api_identity(url) for name, url in urls.items()}
        with self._cond:
            self._own_urls = dict(own_urls)
            self._urls = dict(own_urls)
        try:
            saved = load_state_file(self.path)
        except FileNotFoundError:
            log.warning("state file %s does not exist yet: starting with empty counters", self.path)
            return {}
        except (OSError, StateFileError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.warning("state file %s cannot be used, starting with empty counters: %s", self.path, detail)
            return {}
        dropped = sorted((set(saved.accounts) | set(saved.refused)) - set(own_urls))
        if dropped:
            log.info("state file %s: dropping accounts no longer configured: %s", self.path, ", ".join(dropped))
        restored: dict[str, AccountState] = {}
        for name, url in own_urls.items():
            if name in saved.refused:
                log.warning("state file %s: account %r cannot be used, starting it empty: %s",
                            self.path, name, saved.refused[name])
                continue
            if name not in saved.accounts:
                continue
            saved_url = saved.api_urls.get(name)
            if saved_url is not None and saved_url != url:
                log.warning("state file %s: account %r was saved for API URL %s, not %s: not restored, starting "
                            "it empty; the saved state is kept until this account's first successful poll",
                            self.path, name, saved_url, url)
                with self._cond:
                    self._fragments[name] = _encoder.encode(saved.accounts[name])
                    self._urls[name] = saved_url
                    self._foreign.add(name)
                continue
            if name in saved.left_out:
                count, first = saved.left_out[name]
                log.warning("state file %s: account %r: %d bad entries left out, the rest restored (first: %s)",
                            self.path, name, count, first)
            restored[name] = saved.accounts[name]
        with self._cond:
            for name, account in restored.items():
                # Until that account's first poll, the file keeps what it had (without the bad entries).
                self._fragments[name] = _encoder.encode(account)
        return restored

    def _may_replace(self, name: str, memory: Memory) -> bool:
        """Whether this account's memory may replace its fragment now. Call holding the condition."""
        if name in self._foreign:
            if memory.health.last_success is None:
                return False  # keep the other URL's state: this account has nothing of its own yet
            self._foreign.discard(name)
            log.info("state file %s: account %r polled %s successfully: its state replaces the one saved for %s",
                     self.path, name, self._own_urls.get(name), self._urls.get(name))
        if name in self._own_urls:
            self._urls[name] = self._own_urls[name]
        return True

    def _now_polls(self, name: str, url: str | None) -> None:
        """The account polls `url` now (a reload may have changed it): the file records that URL with
        its memory from here on, so the next start restores it. Call holding the condition."""
        if url is not None and name in self._own_urls:
            self._own_urls[name] = api_identity(url)

    def submit(self, name: str, memory: Memory, url: str | None = None) -> None:
        """Save this account's memory soon, as polled from `url` (None: the URL it had at load); a newer
        submit before the write replaces it.

        It is encoded here, in the caller's thread: call it only while nothing changes the memory
        (encode_account)."""
        with self._cond:
            self._now_polls(name, url)
            if not self._may_replace(name, memory):
                return
        fragment = encode_account(memory)
        with self._cond:
            self._fragments[name] = fragment
            self._dirty = True
            self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is on disk."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._dirty and not self._writing, timeout)

    def close(self, final: Mapping[str, Memory], timeout: float = 10.0,
              urls: Mapping[str, str] | None = None) -> None:
        """Write `final` (each account's last memory, polled from its URL in `urls`) synchronously, stop the
        writer, release the lock."""
        with self._cond:
            for name, url in (urls or {}).items():
                self._now_polls(name, url)
            kept = [name for name, memory in final.items() if self._may_replace(name, memory)]
        fragments = {name: encode_account(final[name]) for name in kept}
        with self._cond:
            self._fragments.update(fragments)
            self._closed = True
            self._dirty = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._lock_fd is not None and not self._thread.is_alive():  # else at exit, after the last write
            os.close(self._lock_fd)
            self._lock_fd = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closed)
                if not self._dirty and self._closed:
                    return
                fragments = dict(self._fragments)
                urls = {name: self._urls[name] for name in fragments if name in self._urls}
                self._dirty = False
                self._writing = True
                closing = self._closed
            self._write(fragments, urls)
            with self._cond:
                self._writing = False
                self._cond.notify_all()  # flush() waiters
                if closing and not self._dirty:
                    return

    def _write(self, fragments: dict[str, bytes], urls: dict[str, str]) -> None:
        try:
            write_atomically(self.path, _file_bytes(fragments, urls))
        except OSError as exc:
            if not self._failing:  # once per run of failures, not per poll
                log.error("cannot write state file %s", self.path,
                          extra={"path": self.path, "reason": "write_error", "err": exc.strerror or str(exc)})
            self._failing = True
            return
        if self._failing:
            log.info("state file %s written again", self.path)
        self._failing = False
        self.writes += 1


def _file_bytes(fragments: Mapping[str, bytes], urls: Mapping[str, str]) -> bytes:
    """The whole file: each account's encoded memory, with the API URL it was saved for."""
    return _encoder.encode(
        {"format": FORMAT, "version": VERSION, "saved_at": time.time(), "api_urls": dict(sorted(urls.items())),
         "accounts": {name: msgspec.Raw(body) for name, body in sorted(fragments.items())}}
    )


def write_state_file(path: str, memories: Mapping[str, Memory], urls: Mapping[str, str]) -> None:
    """Write these accounts' memories once, each with the API URL it polls (`urls`), holding the
    file's lock while writing: for a process that does not serve (backfill).

    Raises StatePathError when the lock cannot be taken, OSError when the write fails (a full disk):
    nothing is logged, the caller reports it.
    """
    fd = lock_state_file(path)
    try:
        fragments = {name: encode_account(memory) for name, memory in memories.items()}
        write_atomically(path, _file_bytes(fragments, {name: api_identity(url) for name, url in urls.items()}))
    finally:
        os.close(fd)
