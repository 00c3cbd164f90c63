"""The state file, wired into the exporter: when it is read and written, and what it restores into.

With `--storage.state-file`, the file is locked and read once at start, before the first scrape
can poll: each account's saved memory goes into its poller (persistence.py decides what may be
restored). After each poll, the polling thread, still holding the poll, hands the poller's memory
to the store, which writes it from a thread of its own; at shutdown polling stops and the file is
written a last time. The storage itself (encoding, the lock, atomic writes, hostile files) is
persistence.py's; this module is where its errors become errors of the setting.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .config import ConfigError
from .persistence import StateFileError, StatePathError, StateStore, check_state_path, restore_account
from .poller import Poller

log = logging.getLogger(__name__)

SETTING = "storage.state-file"


def check_path(path: str) -> None:
    """Refuse, at start, a state path that cannot be used. Raises ConfigError naming the setting."""
    try:
        check_state_path(path)
    except StatePathError as exc:
        raise ConfigError(SETTING, str(exc)) from None


def open_store(path: str) -> StateStore:
    """Lock the state file for the life of the process. Raises ConfigError naming the setting."""
    try:
        return StateStore(path)
    except StatePathError as exc:
        raise ConfigError(SETTING, str(exc)) from None


def attach(store: StateStore, pollers: Mapping[str, Poller]) -> None:
    """Restore each poller's saved memory, then save it after each of its polls. Call before serving."""
    saved = store.load({name: poller.client.base_url for name, poller in pollers.items()})
    for name, poller in pollers.items():
        if name in saved:
            try:
                poller.restore(restore_account(saved[name], poller.state, poller.launch))
            except StateFileError as exc:
                log.warning("state file %s: account %r not restored, starting it empty: %s", store.path, name, exc)
            else:
                log.info("restored state", extra={"account": name, "instances": len(saved[name].fleet.instances),
                                                  "last_success": saved[name].last_success})
        # Encoded by the polling thread (which still holds the poll), written by the writer thread, with
        # the URL the account polls now (a reload may change it).
        poller.on_poll = lambda p, name=name: store.submit(name, p, p.client.base_url)


def shutdown(store: StateStore, pollers: Mapping[str, Poller], timeout: float) -> None:
    """Stop polling (a poll in flight may finish within `timeout`), write the file a last time."""
    idle = {name: poller.stop(timeout) for name, poller in pollers.items()}
    store.close({name: poller for name, poller in pollers.items() if idle[name]}, timeout,
                {name: poller.client.base_url for name, poller in pollers.items()})
    log.info("state file written", extra={"path": store.path, "accounts": sum(idle.values())})
