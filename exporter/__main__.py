"""The exporter's entry point: configuration, logging, then serve until SIGTERM; SIGHUP reloads.

The command line itself (flags, environment, the backfill subcommand) is cli.py's."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from typing import Callable, MutableMapping, Sequence

from . import statefile
from .app import ExporterApp, Reloader
from .cli import BACKFILL, EXIT_CONFIG, build_parser, load, subcommand
from .config import Account, Config, ConfigError
from .logs import setup_logging
from .server import Connections, ExporterServer
from .version import build_info
from .webconfig import WebConfig

log = logging.getLogger("exporter")


def parse_listen_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


SD_LISTEN_FDS_START = 3  # systemd passes its sockets from this file descriptor on (sd_listen_fds(3))


def systemd_listen_fds(environ: MutableMapping[str, str], unset: bool = False) -> list[int]:
    """The file descriptors of the sockets systemd passed to this process (socket activation), as
    sd_listen_fds(3) finds them; `unset` removes the variables so nothing started later inherits them."""
    try:
        pid, count = int(environ.get("LISTEN_PID", "")), int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        count = 0
    else:
        count = count if pid == os.getpid() else 0
    if count < 1:
        raise ConfigError("web.systemd-socket", "no sockets passed: LISTEN_FDS and LISTEN_PID are not set for this process")
    if unset:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            environ.pop(name, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def listen(config: Config, app: ExporterApp, web: WebConfig | None) -> list[ExporterServer] | None:
    """One server per listen address (or per socket systemd passed), sharing one connection bound."""
    connections = Connections()
    servers: list[ExporterServer] = []
    if config.systemd_socket:
        for fd in systemd_listen_fds(os.environ, unset=True):
            servers.append(ExporterServer(None, app, web, sock=socket.socket(fileno=fd), connections=connections,
                                          telemetry_path=config.telemetry_path))
        return servers
    for address in config.listen_addresses:
        try:
            servers.append(ExporterServer(parse_listen_address(address), app, web, connections=connections,
                                          telemetry_path=config.telemetry_path))
        except OSError as exc:
            log.error("cannot listen", extra={"address": address, "err": exc.strerror or str(exc)})
            for server in servers:
                server.server_close()
            return None
    return servers


def main(argv: Sequence[str] | None = None) -> int:
    command, argv = subcommand(sys.argv[1:] if argv is None else argv)
    if command == BACKFILL:
        from .backfill import main as backfill_main

        return backfill_main(argv)
    args = build_parser().parse_args(argv)
    flags = vars(args)
    try:
        config, web = load(flags, args.demo, read_keys=not args.config_check)
        if config.state_file:
            statefile.check_path(config.state_file)
        if config.systemd_socket and not args.config_check:
            systemd_listen_fds(os.environ)  # checked before anything starts; taken in serve()
    except ConfigError as exc:
        print(f"skillable-exporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_check:
        print(config_check_summary(args.config_file, config))
        return 0
    setup_logging(config.log_level, config.log_format)
    return serve(config, web, lambda: load(flags, args.demo))


def config_check_summary(path: str | None, config: Config) -> str:
    checked = f"configuration file {path}" if path else "configuration (flags and environment)"
    extra = f", web config {config.web_config_file}" if config.web_config_file else ""
    missing = [account.name or "default" for account in config.accounts if not account.api_key]
    if config.demo:
        keys = ""
    elif missing:
        keys = f"; API key not checked (none set) for: {', '.join(missing)}"
    else:
        keys = "; API keys found, not tried against the API"
    return f"skillable-exporter: {checked}{extra} is valid: {len(config.accounts)} account(s){keys}"


def serve(config: Config, web: WebConfig | None, reload_config: Callable[[], tuple[Config, WebConfig | None]]) -> int:
    stop = threading.Event()
    reload_requested = threading.Event()
    wake = threading.Event()
    stop_signal: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        # Only flags here: the main loop below does the work, outside the signal handler.
        if signum == signal.SIGHUP:
            reload_requested.set()
        else:
            stop_signal.append(signal.Signals(signum).name)
            stop.set()
        wake.set()

    # First of all: from here on no signal Prometheus tooling sends ends the process unplanned.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        store = statefile.open_store(config.state_file) if config.state_file else None  # locks the file: first
    except ConfigError as exc:
        print(f"skillable-exporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    simulator = None
    if config.demo:
        from .demo import DEMO_API_KEY, DEMO_HISTORY_MINUTES, start_demo_api

        # With a state file to restore, the simulated account has a past (as backfill saw it).
        restoring = config.state_file is not None and os.path.exists(config.state_file)
        try:
            simulator = start_demo_api(config.listen_addresses, None if restoring else DEMO_HISTORY_MINUTES)
        except OSError as exc:
            print(f"skillable-exporter: invalid setting web.listen-address: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
        log.info("demo mode: simulated Skillable API; it answers this key only",
                 extra={"address": simulator.url, "api_key": DEMO_API_KEY})
    demo_url = simulator.url if simulator is not None else None
    config = with_demo(config, demo_url)
    app = ExporterApp(config)
    if store is not None:
        statefile.attach(store, app.pollers)  # before the first scrape can poll
    servers = listen(config, app, web)
    if servers is None:
        return 1

    reloader = make_reloader(app, servers, reload_config, demo_url)
    scheme = "https" if web is not None and web.ssl_context is not None else "http"
    for server in servers:
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        log.info("listening", extra={
            "address": f"{scheme}://{server.server_address[0]}:{server.server_address[1]}",
            "version": build_info().version, "revision": build_info().revision,
            "accounts": len(config.accounts), "window_minutes": config.window_minutes,
        })
    while not stop.is_set():
        wake.wait()
        wake.clear()
        if reload_requested.is_set() and not stop.is_set():
            reload_requested.clear()
            log.info("received SIGHUP, reloading the configuration")
            reloader.reload()
    log.info("shutting down", extra={"signal": stop_signal[0] if stop_signal else ""})
    for server in servers:
        server.shutdown()
        server.server_close()
    if store is not None:
        statefile.shutdown(store, app.pollers, app.config.timeout + 1)
    app.close()
    if simulator is not None:
        simulator.shutdown()
        simulator.server_close()
    log.info("stopped")
    return 0


def make_reloader(
    app: ExporterApp, servers: list[ExporterServer], reload_config: Callable[[], tuple[Config, WebConfig | None]],
    demo_url: str | None = None,
) -> Reloader:
    """The reload of SIGHUP and POST /-/reload: the app takes the config, the server the web
    config, and logging its level and format."""

    def load_again() -> tuple[Config, WebConfig | None]:
        new, new_web = reload_config()
        for server in servers:
            server.check_web(new_web)  # raises ConfigError for what only a restart can change
        return with_demo(new, demo_url), new_web

    def apply(new: Config, new_web: WebConfig | None) -> None:
        for server in servers:
            server.set_web(new_web)
        setup_logging(new.log_level, new.log_format)

    reloader = Reloader(app, load_again, apply)
    for server in servers:
        server.reload = reloader.reload
    return reloader


def with_demo(config: Config, demo_url: str | None) -> Config:
    """In demo mode, the one account polls the simulator, and the demo's names stand in for
    the user's (unless the user has some)."""
    if demo_url is None:
        return config
    from .demo import DATACENTER_NAMES, DEMO_API_KEY, DEMO_MAX_ACTIVE_LABS, LAB_HOST_NAMES

    account = Account("", demo_url, DEMO_API_KEY, config.window_minutes,
                      config.accounts[0].max_active_labs or DEMO_MAX_ACTIVE_LABS)
    names = config.names
    if not names.datacenters and not names.lab_hosts:  # show off the name joins, unless the user has names
        names = dataclasses.replace(names, datacenters=DATACENTER_NAMES, lab_hosts=LAB_HOST_NAMES)
    return dataclasses.replace(config, accounts=(account,), names=names)


if __name__ == "__main__":
    sys.exit(main())
