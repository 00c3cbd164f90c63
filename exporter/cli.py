"""The command line: subcommands, flags and the environment, for the server and for `backfill`.

`skillable-exporter [flags]` serves metrics (__main__.py); `skillable-exporter backfill [flags]`
writes history (backfill.py). Both take the exporter's settings from config.py's one table
(flag, environment variable, config file, default, in that order of precedence); each command's
parser offers only the settings that command reads, so `backfill --help` lists no listen address.
A bad command line exits 2 with one line, as every configuration error does.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Collection, Mapping, NoReturn, Sequence

from .config import SETTINGS, Config, closest, load_config
from .version import version_text
from .webconfig import WebConfig, load_web_config

PROG = "skillable-exporter"
EXIT_CONFIG = 2
BACKFILL = "backfill"  # the one subcommand
# What backfill reads of the exporter's settings: the accounts (URL, key, window), the limits its
# replay sizes the state by, the response limit and the state file it writes, and the launch
# collector's (whether it reads /labinstance/search, its page size, grace and cap). Nothing of
# serving, logging, the poll schedule or the other optional endpoints.
BACKFILL_SETTINGS: tuple[str, ...] = (
    "skillable.api-url", "skillable.api-key-file", "skillable.window-minutes", "skillable.max-response-bytes",
    "skillable.max-lab-hosts", "skillable.max-running-minutes", "skillable.max-lab-profiles", "storage.state-file",
    "collector.launch", "skillable.launch-page-size", "skillable.launch-grace-minutes", "skillable.max-api-consumers",
)
DEFAULT_RETENTION = "15d"  # Prometheus' default --storage.tsdb.retention.time (Debian's too)
DEFAULT_BLOCK_DURATION = "6h"  # 4 blocks a day: 4 passes of promtool over a file, none across midnight


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other configuration error; an unknown flag with the closest known one.
        self.exit(EXIT_CONFIG, f"{self.prog}: invalid command line: {message}{self._suggestion(message)}\n")

    def _suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments: "):
            return ""
        flags = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        unknown = [arg.split("=", 1)[0] for arg in message.split(": ", 1)[1].split() if arg.startswith("--")]
        near = [found for found in (closest(arg, flags) for arg in unknown) if found]
        return f"; did you mean {', '.join(near)}?" if near else ""


class _VersionAction(argparse.Action):
    """--version: the version block of Prometheus' Go exporters, then exit 0."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        sys.stdout.write(version_text())  # stdout, as Prometheus' binaries print it
        parser.exit(0)


def subcommand(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The subcommand the command line names (None: serve), and the arguments after it."""
    if argv[:1] == [BACKFILL]:
        return BACKFILL, list(argv[1:])
    return None, list(argv)


def _add_config(parser: argparse.ArgumentParser, demo: str) -> None:
    """--config.file, --config.check and --demo (`demo`: what it does for this command)."""
    parser.add_argument("--config.file", dest="config_file", metavar="PATH", help="YAML config file")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the configuration (without reading API keys) and exit")
    parser.add_argument("--demo", action="store_true", help=demo)


def _add_settings(parser: argparse.ArgumentParser, names: Collection[str] | None = None) -> None:
    """A flag per setting of config.SETTINGS: every one, or those named in `names`."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        env = f" (env {setting.env})" if setting.env else ""
        default = f" [default: {setting.default}]" if setting.default not in (None, "") else ""
        if setting.name == "web.listen-address":  # repeatable, as in exporter-toolkit
            parser.add_argument(setting.flag, dest=setting.dest, metavar="VALUE", default=None, action="append",
                                help=setting.help + env + default)
        elif isinstance(setting.default, bool):
            parser.add_argument(setting.flag, dest=setting.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=setting.help + env + default)
        else:
            parser.add_argument(setting.flag, dest=setting.dest, metavar="VALUE", default=None,
                                help=setting.help + env + default)


def build_parser() -> argparse.ArgumentParser:
    """The server's command line: every setting."""
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Prometheus exporter for Skillable (Lab on Demand) lab results. "
        "The API key comes from SKILLABLE_API_KEY or --skillable.api-key-file, never from a flag. "
        "SIGHUP or POST /-/reload reloads the config file and the web config.",
        epilog=f"Subcommand: '{PROG} {BACKFILL} --from TIME --to TIME --output DIR' writes past weeks "
        f"as OpenMetrics files and TSDB blocks for Prometheus (see '{PROG} {BACKFILL} --help' "
        "and docs/backfill.md).",
    )
    _add_config(parser, "serve metrics from a built-in simulation of the Skillable API (no account needed)")
    parser.add_argument("--version", action=_VersionAction, help="print the version and build details and exit")
    _add_settings(parser)
    # exporter-toolkit's spelling of the same flag, so operators can keep their unit files and manifests.
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="VALUE", default=None,
                        help=argparse.SUPPRESS)
    return parser


def build_backfill_parser() -> argparse.ArgumentParser:
    """`backfill`'s command line: the settings it reads (BACKFILL_SETTINGS), then its own options."""
    parser = _Parser(
        prog=f"{PROG} {BACKFILL}",
        allow_abbrev=False,
        description="Backfill Prometheus with the history of GET /Results: OpenMetrics files, one per UTC day, and "
        "TSDB blocks made by promtool. Takes the exporter's account settings (account, key, config file, --demo). "
        "docs/backfill.md has the whole procedure.",
    )
    _add_config(parser, "backfill the history of a built-in simulation of the Skillable API (no account needed)")
    _add_settings(parser, BACKFILL_SETTINGS)
    group = parser.add_argument_group("backfill")
    group.add_argument("--from", dest="bf_from", metavar="TIME", required=True,
                       help="start of the history: RFC 3339 (2026-11-01T00:00:00Z) or a date (midnight UTC)")
    group.add_argument("--to", dest="bf_to", metavar="TIME",
                       help="end of the history (not included) [default: now minus 3 hours, the head block "
                            "Prometheus may still be writing]")
    group.add_argument("--output", dest="bf_output", metavar="DIR", required=True,
                       help="folder for the OpenMetrics files and blocks (never a Prometheus data folder)")
    group.add_argument("--label", dest="bf_labels", metavar="NAME=VALUE", action="append", default=[],
                       help="label on every series, repeatable: the live target's job and instance, so "
                            "history joins the live series")
    group.add_argument("--step", dest="bf_step", metavar="DURATION", default="1m",
                       help="time between samples, 1s..5m, dividing a day [default: 1m]")
    group.add_argument("--promtool", dest="bf_promtool", metavar="PATH",
                       help="promtool to make blocks with [default: promtool on the PATH; without one, "
                            "only the files are written]")
    group.add_argument("--max-block-duration", dest="bf_block", metavar="DURATION", default=DEFAULT_BLOCK_DURATION,
                       help=f"promtool's --max-block-duration [default: {DEFAULT_BLOCK_DURATION}]")
    group.add_argument("--prometheus.retention", dest="bf_retention", metavar="DURATION",
                       default=DEFAULT_RETENTION,
                       help="the target Prometheus' --storage.tsdb.retention.time: older history is warned "
                            f"about, since Prometheus deletes it at once [default: {DEFAULT_RETENTION}]")
    group.add_argument("--keep-openmetrics", dest="bf_keep_openmetrics", action="store_true",
                       help="keep each day's OpenMetrics file [default: deleted once promtool made its blocks]")
    group.add_argument("--no-disk-check", dest="bf_no_disk_check", action="store_true",
                       help="start even when the estimate of the disk needed exceeds the free space of --output's "
                            "filesystem (it is an estimate: docs/backfill.md)")
    group.add_argument("--request-timeout", dest="bf_timeout", metavar="SECONDS", default="120",
                       help="total seconds one /Results request may take [default: 120]")
    group.add_argument("--retries", dest="bf_retries", metavar="N", default="3",
                       help="retries of a failed /Results request, with backoff [default: 3]")
    return parser


def load(flags: Mapping[str, Any], demo: bool, read_keys: bool = True) -> tuple[Config, WebConfig | None]:
    """Everything a start or a reload reads: flags, environment, config file, web config."""
    config = load_config(flags, os.environ, demo=demo, read_keys=read_keys)
    web = load_web_config(config.web_config_file) if config.web_config_file else None
    return config, web
