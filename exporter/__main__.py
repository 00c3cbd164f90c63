"""Command line: flags, configuration, logging, then serve until SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from typing import NoReturn, Sequence

from . import __version__
from .app import ExporterApp
from .config import SETTINGS, Account, Config, ConfigError, load_config
from .logs import setup_logging
from .persistence import StateStore, check_state_path
from .server import ExporterServer
from .webconfig import WebConfig, load_web_config

log = logging.getLogger("exporter")
EXIT_CONFIG = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other configuration error.
        self.exit(EXIT_CONFIG, f"{self.prog}: invalid command line: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="skillable-exporter",
        allow_abbrev=False,
        description="Prometheus exporter for Skillable (Lab on Demand) lab results. "
        "The API key comes from SKILLABLE_API_KEY or --skillable.api-key-file, never from a flag.",
    )
    parser.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML config file")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the configuration and exit")
    parser.add_argument("--demo", action="store_true",
                        help="serve metrics from a built-in simulation of the Skillable API (no account needed)")
    parser.add_argument("--version", action="version", version=f"skillable-exporter {__version__}")
    for setting in SETTINGS:
        env = f" (env {setting.env})" if setting.env else ""
        default = f" [default: {setting.default}]" if setting.default not in (None, "") else ""
        if isinstance(setting.default, bool):
            parser.add_argument(setting.flag, dest=setting.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=setting.help + env + default)
        else:
            parser.add_argument(setting.flag, dest=setting.dest, metavar="VALUE", default=None,
                                help=setting.help + env + default)
    # exporter-toolkit's spelling of the same flag, so operators can keep their unit files and manifests.
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="VALUE", default=None,
                        help=argparse.SUPPRESS)
    return parser


def parse_listen_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["backfill"]:  # the subcommand lives in backfill.py
        from .backfill import main as backfill_main

        return backfill_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        config = load_config(vars(args), os.environ, demo=args.demo)
        web = load_web_config(config.web_config_file) if config.web_config_file else None
        if config.state_file:
            check_state_path(config.state_file)
    except ConfigError as exc:
        print(f"skillable-exporter: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.config_check:
        print("skillable-exporter: configuration is valid")
        return 0
    setup_logging(config.log_level, config.log_format)
    return serve(config, web)


def serve(config: Config, web: WebConfig | None) -> int:
    simulator = None
    if config.demo:
        from .demo import DATACENTER_NAMES, LAB_HOST_NAMES, start_simulator

        simulator = start_simulator()
        account = Account("", simulator.url, "demo", config.window_minutes)
        names = config.names
        if not names.datacenters and not names.lab_hosts:  # show off the name joins, unless the user has names
            names = dataclasses.replace(names, datacenters=DATACENTER_NAMES, lab_hosts=LAB_HOST_NAMES)
        config = dataclasses.replace(config, accounts=(account,), names=names)
        log.info("demo mode: simulated Skillable API at %s", simulator.url)
    app = ExporterApp(config)
    store = StateStore(config.state_file) if config.state_file else None
    if store is not None:
        store.attach(app.pollers)  # before the first scrape can poll
    try:
        server = ExporterServer(parse_listen_address(config.listen_address), app, web)
    except OSError as exc:
        log.error("cannot listen on %s: %s", config.listen_address, exc.strerror or exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    scheme = "https" if web is not None and web.ssl_context is not None else "http"
    log.info(
        "listening address=%s://%s:%d version=%s accounts=%d window_minutes=%d",
        scheme, *server.server_address[:2], __version__, len(config.accounts), config.window_minutes,
    )
    stop.wait()
    server.shutdown()
    server.server_close()
    if store is not None:
        store.shutdown(app.pollers, config.timeout + 1)
    app.close()
    if simulator is not None:
        simulator.shutdown()
        simulator.server_close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
