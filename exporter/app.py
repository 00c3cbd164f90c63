"""Wiring: the pollers of every configured account, the collector and the registry they feed,
and the config reload (SIGHUP, POST /-/reload).

The HTTP server asks this object for an exposition; it refreshes the pollers
(within the scrape's deadline) and renders the registry from their state, then
appends the exporter's own runtime metrics (process_*, python_*, the reload gauges).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Gauge

from .client import SkillableClient
from .collector import SkillableCollector, eof_of, gzip_head, shared_window
from .config import Config, ConfigError, setting_name
from .launches import LaunchSettings
from .poller import Failure, Poller
from .render import choose_encoding

log = logging.getLogger(__name__)

# Prometheus sends X-Prometheus-Scrape-Timeout-Seconds; answering this much
# earlier leaves room to render and send the exposition.
TIMEOUT_OFFSET_SECONDS = 0.5
MIN_SCRAPE_WAIT_SECONDS = 0.5
# A scrape waits this much past the poll's own deadline, so a poll that keeps it lands in the scrape.
POLL_MARGIN_SECONDS = 0.1
DEFAULT_ACCOUNT_NAME = "default"  # what the landing page and /probe call the unnamed single account


# Config fields a reload applies; a change of any other one waits for a restart (and says so, by the
# setting's documented name: config.setting_name).
RELOADABLE = frozenset({
    "accounts", "names", "min_poll_interval", "overlap_minutes", "timeout", "max_response_bytes",
    "log_level", "log_format", "web_config_file",
})


@dataclass(frozen=True)
class AccountStatus:
    """What the landing page shows of one account; read from memory, never from the API."""

    name: str
    up: bool
    last_success: float | None
    failure: Failure | None  # the LatestResults failure run it is in, if any
    window_minutes: int
    min_poll_interval: float


def launch_settings(config: Config) -> LaunchSettings | None:
    """The launch collector's settings, None when --no-collector.launch turns it off."""
    if not config.collect_launch:
        return None
    return LaunchSettings(config.launch_interval, config.launch_page_size, config.launch_grace_minutes,
                          config.launch_timeout, config.max_api_consumers)


@dataclass(frozen=True)
class ReloadStatus:
    """What the landing page shows of the configuration: when the running one was loaded (by the start
    or a reload), and the reload refused since then, if any, with its one-line reason."""

    loaded_at: float
    by_reload: bool = False
    refused_at: float | None = None
    refused_reason: str | None = None


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
        self.monotonic = monotonic  # the pollers' clock: scrapes are stamped with it as they arrive (server.py)
        self._make_client = make_client or (
            lambda url, key: SkillableClient(url, key, self.config.max_response_bytes)
        )
        self.pollers: dict[str, Poller] = {
            account.name: Poller(
                self._make_client(account.api_url, account.api_key),
                window_minutes=account.window_minutes,
                overlap_minutes=config.overlap_minutes,
                min_interval=config.min_poll_interval,
                max_lab_hosts=config.max_lab_hosts,
                timeout=config.timeout,
                max_running_minutes=config.max_running_minutes,
                max_lab_profiles=config.max_lab_profiles,
                collect_stats=config.collect_stats,
                collect_region_names=config.collect_delivery_regions,
                collect_catalog=config.collect_catalog,
                max_catalog_bytes=config.max_catalog_bytes,
                clock=clock,
                monotonic=monotonic,
                account=account.name,
                launch=launch_settings(config),
            )
            for account in config.accounts
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self._build_collectors()
        # The exporter's own process: client_python's standard collectors, and the reload gauges.
        self.runtime = CollectorRegistry(auto_describe=True)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.runtime.register(standard)
        self.reload_successful = Gauge(
            "skillable_exporter_config_last_reload_successful",
            "1 if the last configuration reload (or the start) succeeded, else 0.", registry=self.runtime,
        )
        self.reload_success_time = Gauge(
            "skillable_exporter_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration reload (or of the start).", registry=self.runtime,
        )
        self.reload_successful.set(1)
        self.reload_success_time.set(clock())
        self.reload_status = ReloadStatus(clock())

    def _build_collectors(self) -> None:
        """The collectors read the config's names and windows; a reload builds them again
        (which also drops the expositions they cached under the old config)."""
        collector = self._collector(list(self.pollers.items()))
        self._probe_collectors = {
            name: self._collector([(name, poller)]) for name, poller in self.pollers.items()
        }
        old: SkillableCollector | None = getattr(self, "collector", None)
        if old is not None:
            self.registry.unregister(old)
        self.collector = collector
        self.registry.register(collector)

    def _collector(self, accounts: list[tuple[str, Poller]]) -> SkillableCollector:
        window = shared_window(poller for _, poller in accounts)
        return SkillableCollector(accounts, self.config.names, window, self.config.max_lab_profiles,
                                  max_active_labs=self.config.max_active_labs)

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

    def metrics(self, accept: str, scrape_timeout_header: str | None,
                arrived: float | None = None) -> tuple[bytes, str]:
        """Refresh every account (in parallel), then render. Returns (body, content type).
        `arrived`: when the scrape came in, by self.monotonic (Poller.request)."""
        self._refresh(list(self.pollers.values()), self.scrape_wait(scrape_timeout_header), arrived)
        encoding = choose_encoding(accept)
        return self.collector.exposition(encoding), encoding.content_type

    def runtime_metrics(self, accept: str) -> bytes:
        """The exporter's own process metrics and reload gauges, in the format `accept` picks.
        /metrics sends them after the exposition (server.py). They change every scrape (CPU,
        memory), so they are rendered each time, apart from the cached exposition."""
        return choose_encoding(accept).encoder(self.runtime)
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

    def probe(self, account: str, accept: str, scrape_timeout_header: str | None,
              arrived: float | None = None) -> tuple[bytes, str] | None:
        """The multi-target form: metrics of one account only, or None if there is no such account."""
        name = self.probe_account(account)
        if name is None:
            return None
        self._refresh([self.pollers[name]], self.scrape_wait(scrape_timeout_header), arrived)
        encoding = choose_encoding(accept)
        return self._probe_collectors[name].exposition(encoding), encoding.content_type

    def gzipped(self, body: bytes, tail: bytes | None = None) -> tuple[bytes, bytes]:
        """One gzip stream of `body` (then `tail`, see SkillableCollector.gzipped), in two pieces. An
        exposition's compressed part is kept with it, in its collector's cache: the one cache."""
        for collector in (self.collector, *self._probe_collectors.values()):
            packed = collector.gzipped(body, tail)
            if packed is not None:
                return packed
        head, compressor = gzip_head(body)
        return head, compressor.compress(eof_of(body) if tail is None else tail) + compressor.flush()

    @staticmethod
    def _refresh(pollers: list[Poller], timeout: float, arrived: float | None = None) -> None:
        """Ask every account's worker for a poll at once, then wait for all within one deadline:
        the accounts poll in parallel in their own long-lived threads, and a scrape starts none."""
        asked = [(poller, poller.request(arrived)) for poller in pollers]
        deadline = time.monotonic() + timeout
        for poller, poll in asked:
            if poll is not None:
                poller.wait(poll, max(0.0, deadline - time.monotonic()))

    def status(self) -> list[AccountStatus]:
        return [
            AccountStatus(name, p.health.up, p.health.last_success, p.failing.get("LatestResults"),
                          p.window_minutes, p.min_interval)
            for name, p in self.pollers.items()
        ]

    # -- reload --------------------------------------------------------------

    def reconfigure(self, new: Config) -> list[str]:
        """Apply a reloaded config; return the settings whose change waits for a restart.

        Applied: names, every kept account's key, key file, URL and window, the poll interval,
        overlap and timeout, the response limit (and logging and the web config, which the
        caller applies). Accounts are matched by name; state and counters stay. Everything
        else (listen address, state file, limits sized at start, collectors, which accounts
        exist) keeps its running value until a restart.
        """
        old = self.config
        waiting = [
            setting_name(f.name) for f in dataclasses.fields(Config)
            if f.name not in RELOADABLE and getattr(new, f.name) != getattr(old, f.name)
        ]
        by_name = {account.name: account for account in new.accounts}
        names = [account.name for account in old.accounts]
        if set(by_name) != set(names):
            waiting.append("accounts (added or removed)")
        accounts = tuple(by_name.get(account.name, account) for account in old.accounts)
        kept = {f.name: getattr(old, f.name) for f in dataclasses.fields(Config) if f.name not in RELOADABLE}
        self.config = dataclasses.replace(new, **kept, accounts=accounts)
        limit_changed = new.max_response_bytes != old.max_response_bytes
        for before, after in zip(old.accounts, accounts):
            new_key_or_url = (before.api_url, before.api_key) != (after.api_url, after.api_key)
            self.pollers[after.name].reconfigure(
                self._make_client(after.api_url, after.api_key) if new_key_or_url or limit_changed else None,
                after.window_minutes, self.config.overlap_minutes, self.config.min_poll_interval,
                self.config.timeout, new_key_or_url=new_key_or_url,
            )
        self._build_collectors()
        return waiting

    def close(self) -> None:
        for poller in self.pollers.values():
            poller.stop(0)  # its worker thread ends
            poller.client.close()


class Reloader:
    """SIGHUP and POST /-/reload: read the configuration again and apply it, one reload at a time.

    `load` reads the config file, the flags and the environment as at start and returns
    (Config, anything the caller applies); `apply` gets both after the app took the config
    (the web config, logging). A config that does not load is refused with one log line;
    the running one stays, and skillable_exporter_config_last_reload_successful says 0
    until a reload succeeds, as blackbox_exporter does.
    """

    def __init__(self, app: ExporterApp, load: Callable[[], tuple[Config, Any]],
                 apply: Callable[[Config, Any], None], clock: Callable[[], float] = time.time) -> None:
        self._app = app
        self._load = load
        self._apply = apply
        self._clock = clock
        self._lock = threading.Lock()

    def reload(self) -> str | None:
        """Reload; None on success, else the one-line reason the new config was refused."""
        with self._lock:
            try:
                config, extra = self._load()
            except ConfigError as exc:
                return self._refuse(str(exc))
            except Exception as exc:
                log.exception("bug: loading the configuration failed outside its own checks")
                return self._refuse(f"cannot load the configuration: {type(exc).__name__}: {exc}")
            waiting = self._app.reconfigure(config)
            self._apply(self._app.config, extra)
            now = self._clock()
            self._app.reload_successful.set(1)
            self._app.reload_success_time.set(now)
            self._app.reload_status = ReloadStatus(now, by_reload=True)
            fields: dict[str, object] = {"accounts": len(self._app.pollers)}
            if waiting:
                fields["needs_restart"] = ",".join(waiting)
            log.info("config reloaded", extra=fields)
            return None

    def _refuse(self, reason: str) -> str:
        self._app.reload_successful.set(0)
        self._app.reload_status = dataclasses.replace(self._app.reload_status, refused_at=self._clock(),
                                                      refused_reason=reason)
        log.error("config reload refused, keeping the running config", extra={"reason": reason})
        return reason
