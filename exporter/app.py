"""Wiring: the pollers of every configured account, the collector and the registry they feed.

The HTTP server asks this object for an exposition; it refreshes the pollers
(within the scrape's deadline) and renders the registry from their state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .client import SkillableClient
from .collector import SkillableCollector
from .config import Config
from .poller import Poller

# Prometheus sends X-Prometheus-Scrape-Timeout-Seconds; answering this much
# earlier leaves room to render and send the exposition.
TIMEOUT_OFFSET_SECONDS = 0.5
MIN_SCRAPE_WAIT_SECONDS = 0.5
# A scrape waits this much past the poll's own deadline, so a poll that keeps it lands in the scrape.
POLL_MARGIN_SECONDS = 0.1
DEFAULT_ACCOUNT_NAME = "default"  # what the landing page and /probe call the unnamed single account


@dataclass(frozen=True)
class AccountStatus:
    name: str
    up: bool
    last_success: float | None


class ExporterApp:
    def __init__(
        self,
        config: Config,
        make_client: Callable[[str, str], SkillableClient] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` and `monotonic` are for tests: the wall clock polls are timed by, and the backoff clock."""
        self.config = config
        make = make_client or (lambda url, key: SkillableClient(url, key, config.max_response_bytes))
        self.pollers: dict[str, Poller] = {
            account.name: Poller(
                make(account.api_url, account.api_key),
                window_minutes=account.window_minutes,
                overlap_minutes=config.overlap_minutes,
                min_interval=config.min_poll_interval,
                max_lab_hosts=config.max_lab_hosts,
                timeout=config.timeout,
                collect_stats=config.collect_stats,
                collect_region_names=config.collect_delivery_regions,
                clock=clock,
                monotonic=monotonic,
            )
            for account in config.accounts
        }
        self.collector = self._collector(list(self.pollers.items()))
        self._probe_collectors = {
            name: self._collector([(name, poller)]) for name, poller in self.pollers.items()
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)

    def _collector(self, accounts: list[tuple[str, Poller]]) -> SkillableCollector:
        return SkillableCollector(accounts, self.config.names, self.config.window_minutes)

    def scrape_wait(self, scrape_timeout_header: str | None) -> float:
        """How long this scrape waits for its polls: the configured timeout (and a margin), capped by
        Prometheus' own. The header only shortens the wait: the poll itself always keeps
        --skillable.timeout, so no client can make polls fail by sending a short one."""
        wait = self.config.timeout + POLL_MARGIN_SECONDS
        try:
            scrape_timeout = float(scrape_timeout_header) if scrape_timeout_header else None
        except ValueError:
            scrape_timeout = None
        if scrape_timeout is not None and scrape_timeout > 0:
            wait = min(wait, scrape_timeout - TIMEOUT_OFFSET_SECONDS)
        return max(wait, MIN_SCRAPE_WAIT_SECONDS)

    def metrics(self, accept: str, scrape_timeout_header: str | None) -> tuple[bytes, str]:
        """Refresh every account (in parallel), then render. Returns (body, content type)."""
        self._refresh(list(self.pollers.values()), self.scrape_wait(scrape_timeout_header))
        encoder, content_type = choose_encoder(accept)
        return self.collector.exposition(encoder, content_type), content_type

    def probe_account(self, account: str) -> str | None:
        """The account `/probe?account=` names, or None.

        An account by its name; the unnamed account of a single-account config as "default" (the
        name the landing page shows); and with one account, no `account` at all means that one.
        """
        if account in self.pollers and account:
            return account
        if account == DEFAULT_ACCOUNT_NAME and "" in self.pollers:
            return ""
        if not account and len(self.pollers) == 1:
            return next(iter(self.pollers))
        return None

    def probe(self, account: str, accept: str, scrape_timeout_header: str | None) -> tuple[bytes, str] | None:
        """The multi-target form: metrics of one account only, or None if there is no such account."""
        name = self.probe_account(account)
        if name is None:
            return None
        self._refresh([self.pollers[name]], self.scrape_wait(scrape_timeout_header))
        encoder, content_type = choose_encoder(accept)
        return self._probe_collectors[name].exposition(encoder, content_type), content_type

    @staticmethod
    def _refresh(pollers: list[Poller], timeout: float) -> None:
        """Ask every account's worker for a poll at once, then wait for all within one deadline:
        the accounts poll in parallel in their own long-lived threads, and a scrape starts none."""
        asked = [(poller, poller.request()) for poller in pollers]
        deadline = time.monotonic() + timeout
        for poller, poll in asked:
            if poll is not None:
                poller.wait(poll, max(0.0, deadline - time.monotonic()))

    def status(self) -> list[AccountStatus]:
        return [
            AccountStatus(name, p.health.up, p.health.last_success) for name, p in self.pollers.items()
        ]

    def close(self) -> None:
        for poller in self.pollers.values():
            poller.stop(0)  # its worker thread ends
            poller.client.close()
