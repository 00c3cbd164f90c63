"""The exporter's entry point: configuration, logging, then serve until SIGTERM; SIGHUP reloads.

The command line itself (flags, environment, the backfill subcommand) is cli.py's."""

from __future__ import annotations

if __name__ == "__main__":  # python3 -m exporter: SIGHUP and SIGTERM are caught before the imports below (signals.py)
    from exporter.signals import catch_early

    catch_early()

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence

from . import signals, statefile
from .app import ExporterApp, Reloader
from .cli import BACKFILL, EXIT_CONFIG, build_parser, load, subcommand
from .config import Account, Config, ConfigError
from .listeners import bind, describe, parse_listen_address, systemd_listen_fds
from .logs import setup_logging
from .server import ExporterServer, raise_open_file_limit
from .version import build_info
from .webconfig import WebConfig

log = logging.getLogger("exporter")


def listen(config: Config) -> list[socket.socket] | None:
    """The listening sockets: systemd's (checked in main) or one per listen address; None (logged)
    if an address cannot be listened on."""
    if config.systemd_socket:
        return [socket.socket(fileno=fd) for fd in systemd_listen_fds(os.environ, unset=True)]
    sockets: list[socket.socket] = []
    for address in config.listen_addresses:
        try:
            sockets.append(bind(parse_listen_address(address)))
        except OSError as exc:
            log.error("cannot listen", extra={"address": address, "err": exc.strerror or str(exc)})
            for sock in sockets:
                sock.close()
            return None
    return sockets


def main(argv: Sequence[str] | None = None) -> int:
    one_malloc_arena()
    command, argv = subcommand(sys.argv[1:] if argv is None else argv)
    if command == BACKFILL:
        from .backfill import main as backfill_main

        signals.release()  # a batch job: SIGTERM and SIGINT end it as usual
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
    unset = [account.name or "default" for account in config.accounts if not account.api_key and not account.key_file]
    # A key file named but not there is no error here (the check needs no key), but a start would fail: say so.
    absent = [f"{account.name or 'default'} ({account.key_file})" for account in config.accounts
              if not account.api_key and account.key_file]
    if config.demo:
        keys = ""
    elif unset or absent:
        keys = (f"; API key not checked (none set) for: {', '.join(unset)}" if unset else "") + (
            f"; API key file missing (a start would fail) for: {', '.join(absent)}" if absent else "")
    else:
        keys = "; API keys found, not tried against the API"
    return f"skillable-exporter: {checked}{extra} is valid: {len(config.accounts)} account(s){keys}"


def serve(config: Config, web: WebConfig | None, reload_config: Callable[[], tuple[Config, WebConfig | None]]) -> int:
    # Until the event loop takes them over, SIGHUP, SIGTERM and SIGINT wait in a queue (signals.py).
    signals.catch_early()
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
    raise_open_file_limit()
    sockets = listen(config)
    if sockets is None:
        return 1
    server = ExporterServer(None, app, web, sockets=sockets, telemetry_path=config.telemetry_path)
    reloader = make_reloader(app, [server], reload_config, demo_url)
    freeze_startup_objects()
    asyncio.run(_serve(server, reloader, config, web))
    signals.catch_early()  # the loop has given them back: SIGTERM must not cut the state file's last write
    if store is not None:
        statefile.shutdown(store, app.pollers, app.config.timeout + 1)
    app.close()
    if simulator is not None:
        simulator.shutdown()
        simulator.server_close()
    log.info("stopped")
    return 0


M_ARENA_MAX = -8  # glibc's mallopt() parameter (malloc.h)


def one_malloc_arena() -> None:
    """Have every thread allocate from one glibc malloc arena, as MALLOC_ARENA_MAX=1 would. glibc gives
    threads arenas of their own: the cold poll runs in a poller's thread and the first render in a server
    worker, so what the poll freed (the decoded records' lists, the dicts' old tables) sat in one arena
    while the render grew another. At the benchmark's fleet (2,000 lab hosts, 100k results) the peak RSS
    after the first good scrape was 138 MB with an arena per thread and 131 MB with one (VmHWM, three starts
    each; the afternoon script: 269 MB). The threads take the GIL to allocate anyway, so one arena costs no
    waiting worth measuring. Not glibc (musl, macOS): nothing to do."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def freeze_startup_objects() -> None:
    """Move what the start made (modules, classes, the configuration, a restored state) out of the garbage
    collector's reach: it lives as long as the process, yet every full collection walked all of it. At the
    benchmark's fleet (2,000 lab hosts, 500 profiles, 100k results) a full collection fell in every cold poll
    (25-32 ms of it) and another in the first render (32-45 ms); frozen, the first is gone and the second
    takes 4-6 ms (BENCHMARKS.md). The garbage the start left in reference cycles is collected first, so none
    of it is kept for ever."""
    gc.collect()
    gc.freeze()


async def _serve(server: ExporterServer, reloader: Reloader, config: Config, web: WebConfig | None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP reloads, one reload at a time (a storm of them is one
    or two). Signals queued before the loop took them over act now: a reload once serving, a stop
    before serving starts."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_wanted = asyncio.Event()
    stop_signal: list[str] = []

    def on_signal(signum: int) -> None:
        if signum == signal.SIGHUP:
            reload_wanted.set()
        else:
            stop_signal.append(signal.Signals(signum).name)
            stop.set()

    for signum in signals.CAUGHT:
        loop.add_signal_handler(signum, on_signal, signum)
    for pending in signals.take_pending():
        on_signal(pending)
    if stop.is_set():
        log.info("shutting down before serving", extra={"signal": stop_signal[0]})
        return

    async def reload_on_sighup() -> None:
        while True:
            await reload_wanted.wait()
            reload_wanted.clear()
            log.info("received SIGHUP, reloading the configuration")
            signals.notify(signals.reloading())
            await server.run_blocking(reloader.reload)
            signals.notify("READY=1")

    await server.start()
    scheme = "https" if web is not None and web.ssl_context is not None else "http"
    for sock in server.sockets:
        log.info("listening", extra={
            "address": describe(sock, scheme), "version": build_info().version, "revision": build_info().revision,
            "accounts": len(config.accounts), "window_minutes": config.window_minutes,
        })
    signals.notify("READY=1")
    reloads = loop.create_task(reload_on_sighup())
    await stop.wait()
    log.info("shutting down", extra={"signal": stop_signal[0]})
    signals.notify("STOPPING=1")
    reloads.cancel()
    await server.stop()


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
