"""One account's memory, and the one step that a good read of results applies to it.

An account's memory is its FleetState (state.py: the lab instances it tracks and the tallies the
lab metrics are read from), its LaunchState when the launch collector is on (launches.py), and its
Health (what the exporter knows of its own polling: up, the last success, request and failure
counts, the names fetched). The state file keeps the state and
the health's last success and counters (persistence.py).

`apply_poll` is the poll step. The live poller (poller.py) takes it for each good /LatestResults
answer, backfill (backfill.py) for each step of its replay of /Results: both count by the same
code, so they cannot drift apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Iterable

from . import catalog
from .launches import LaunchCounts, LaunchState
from .model import AccountStats, LabResult
from .state import FleetState, Snapshot


@dataclass
class Health:
    """The exporter's own view of its polling, exported as skillable_* health metrics."""

    up: bool = False
    last_success: float | None = None  # wall-clock time the last good LatestResults poll was asked for
    last_duration: float | None = None
    last_minutes: int | None = None
    requests: Counter[str] = field(default_factory=Counter)
    failures: Counter[tuple[str, str]] = field(default_factory=Counter)
    stats: AccountStats | None = None
    region_names: dict[int, str] = field(default_factory=dict)
    catalog: catalog.Catalog | None = None  # the last good /catalog
    catalog_skipped: int = 0  # catalog entries skipped, over every /catalog fetched


@dataclass
class PollView:
    """What the collector reads of one account: a snapshot of the state, the health, and a snapshot of
    the launch memory (None with the launch collector off)."""

    snapshot: Snapshot
    health: Health
    launch: LaunchCounts | None = None


class Memory(Protocol):
    """An account's memory, wherever it is held: a Poller, or an account replayed by backfill."""

    state: FleetState
    health: Health
    launch: LaunchState | None


class AccountView(Protocol):
    """What the collector reads an account through (a Poller, or an account replayed by backfill)."""

    @property
    def window_minutes(self) -> int: ...

    def view(self) -> PollView: ...


@dataclass
class AccountMemory:
    """An account's memory on its own: what a state file restores, what backfill replays into."""

    state: FleetState
    health: Health = field(default_factory=Health)
    launch: LaunchState | None = None  # the launch collector's memory (launches.py), when it is on


def empty_memory(max_lab_hosts: int, max_lab_profiles: int, max_running_minutes: int) -> AccountMemory:
    """The memory of an account that has not been polled: no instances, every tally empty."""
    return AccountMemory(FleetState(max_lab_hosts, max_lab_profiles, max_running_minutes * 60))


def apply_poll(memory: Memory, results: Iterable[LabResult], invalid: int, *, now: float, horizon: float,
               window_minutes: int, max_running_minutes: int) -> int:
    """A good read of results, applied to an account's memory as of `now`. Returns the records found
    invalid: the `invalid` ones the decoder skipped (a record without LabInstanceId, a value out of
    range) and those the state refused (state.py, rule 9).

    The step, in this order:
    1. apply: each result counted by the state's rules (state.py, rules 1-9), nothing older
       than `horizon` counted again;
    2. count the invalid records in skillable_results_invalid_total (the state counts its own);
    3. evict: ended instances whose last change is older than the window, running ones older
       than max-running-minutes;
    4. stamp the success: up, and `now` as the last success (a later read asks from there).
    """
    state, health = memory.state, memory.health
    refused = state.apply(results, horizon, seen_at=now)
    state.invalid_total += invalid
    state.evict(now - window_minutes * 60, now - max_running_minutes * 60)
    health.up = True
    health.last_success = now
    return invalid + refused
