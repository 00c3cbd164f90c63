"""Wiring: the pollers of every configured account, the collector and the registry they feed.

The HTTP server asks this object for an exposition; it refreshes the pollers
(within the scrape's deadline) and renders the registry from their state.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry

from .client import SkillableClient
from .collector import SkillableCollector
from .config import Config
from .poller import Poller
from .render import choose_encoding

# Prometheus sends X-Prometheus-Scrape-Timeout-Seconds; answering this much
# earlier leaves room to render and send the exposition.
TIMEOUT_OFFSET_SECONDS = 0.5
MIN_POLL_TIMEOUT_SECONDS = 0.5


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
                max_running_minutes=config.max_running_minutes,
                max_lab_profiles=config.max_lab_profiles,
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

    def poll_timeout(self, scrape_timeout_header: str | None) -> float:
        """Deadline for this scrape's polls: the configured timeout, capped by Prometheus' own."""
        timeout = self.config.timeout
        try:
            scrape_timeout = float(scrape_timeout_header) if scrape_timeout_header else None
        except ValueError:
            scrape_timeout = None
        if scrape_timeout is not None and scrape_timeout > 0:
            timeout = min(timeout, scrape_timeout - TIMEOUT_OFFSET_SECONDS)
        return max(timeout, MIN_POLL_TIMEOUT_SECONDS)

    def metrics(self, accept: str, scrape_timeout_header: str | None) -> tuple[bytes, str]:
        """Refresh every account (in parallel), then render. Returns (body, content type)."""
        self._refresh(list(self.pollers.values()), self.poll_timeout(scrape_timeout_header))
        encoding = choose_encoding(accept)
        return self.collector.exposition(encoding), encoding.content_type

    def probe(self, account: str, accept: str, scrape_timeout_header: str | None) -> tuple[bytes, str] | None:
        """The multi-target form: metrics of one account only, or None if there is no such account."""
        poller = self.pollers.get(account)
        if poller is None:
            return None
        self._refresh([poller], self.poll_timeout(scrape_timeout_header))
        encoding = choose_encoding(accept)
        return self._probe_collectors[account].exposition(encoding), encoding.content_type

    def gzipped(self, body: bytes) -> bytes:
        """gzip of `body`: kept beside it in the collector's exposition cache when it is an exposition."""
        for collector in (self.collector, *self._probe_collectors.values()):
            packed = collector.gzipped(body)
            if packed is not None:
                return packed
        return gzip.compress(body, compresslevel=1)

    @staticmethod
    def _refresh(pollers: list[Poller], timeout: float) -> None:
        if len(pollers) == 1:
            pollers[0].refresh(timeout)
            return
        threads = [threading.Thread(target=p.refresh, args=(timeout,), daemon=True) for p in pollers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 1)

    def status(self) -> list[AccountStatus]:
        return [
            AccountStatus(name, p.health.up, p.health.last_success) for name, p in self.pollers.items()
        ]

    def close(self) -> None:
        for poller in self.pollers.values():
            poller.client.close()
