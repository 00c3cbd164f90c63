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
import textwrap
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from .config import SETTINGS, Config, Setting, closest, load_config
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
DEFAULT_REQUEST_TIMEOUT = "120s"  # one day of /Results of a large account
HELP_WIDTH = 78  # the description and epilog are wrapped here, as argparse wraps the rest for a terminal


@dataclass(frozen=True)
class Flag:
    """One flag as --help and the README's Flags table show it: its spellings (the first is its name),
    what its value is (None: a switch), what it does, its environment variable and its default as shown."""

    options: tuple[str, ...]
    help: str
    metavar: str | None = None
    env: str | None = None
    default: str = ""
    negatable: bool = False  # also --no-<name> (argparse.BooleanOptionalAction)

    def help_text(self) -> str:
        env = f" (env {self.env})" if self.env else ""
        default = f" [default: {self.default}]" if self.default else ""
        return self.help + env + default

    def markdown_row(self) -> str:
        """A row of the Flags table: flag, environment, default, meaning."""
        name = self.options[0]
        if self.negatable:
            shown = f"`--[no-]{name[2:]}`"
        else:
            shown = f"`{name} {self.metavar}`" if self.metavar else f"`{name}`"
        if len(self.options) > 1:
            shown += " (also " + ", ".join(f"`{alias}`" for alias in self.options[1:]) + ")"
        cells = (shown, f"`{self.env}`" if self.env else "", f"`{self.default}`" if self.default else "", self.help)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and the Flag of each argument kept, in order, for the Flags table."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False, **kwargs)
        self.flags: list[Flag] = []

    def add_flag(self, flag: Flag, group: Any = None, **argparse_options: Any) -> None:
        """Add `flag` (to `group`, an argument group, if given) with argparse's own options (dest, action, ...)."""
        if flag.metavar is not None:
            argparse_options["metavar"] = flag.metavar
        (group or self).add_argument(*flag.options, help=flag.help_text(), **argparse_options)
        self.flags.append(flag)

    def markdown(self) -> str:
        """The Flags table of this command, as the README has it (`python3 -m exporter.cli --markdown`)."""
        rows = [flag.markdown_row() for flag in self.flags]
        return "\n".join(["| Flag | Environment | Default | Meaning |", "|---|---|---|---|", *rows]) + "\n"

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


def _add_config(parser: _Parser, demo: str) -> None:
    """--config.file, --config.check and --demo (`demo`: what it does for this command)."""
    parser.add_flag(Flag(("--config.file",), "YAML config file (config.yaml in the source lists every setting)",
                         "PATH"), dest="config_file")
    parser.add_flag(Flag(("--config.check",), "validate the configuration (without reading API keys) and exit"),
                    dest="config_check", action="store_true")
    parser.add_flag(Flag(("--demo",), demo), dest="demo", action="store_true")


def setting_flag(setting: Setting) -> Flag:
    """The flag of a setting of config.SETTINGS, as --help shows it."""
    negatable = isinstance(setting.default, bool)
    return Flag((setting.flag, *setting.aliases), setting.help, None if negatable else setting.metavar, setting.env,
                setting.shown_default, negatable)


def _add_settings(parser: _Parser, names: Collection[str] | None = None) -> None:
    """A flag per setting of config.SETTINGS: every one, or those named in `names`."""
    for setting in SETTINGS:
        if names is not None and setting.name not in names:
            continue
        flag = setting_flag(setting)
        if setting.name == "web.listen-address":  # repeatable, as in exporter-toolkit
            parser.add_flag(flag, dest=setting.dest, default=None, action="append")
        elif flag.negatable:
            parser.add_flag(flag, dest=setting.dest, default=None, action=argparse.BooleanOptionalAction)
        else:
            parser.add_flag(flag, dest=setting.dest, default=None)


def _wrap(text: str) -> str:
    return textwrap.fill(text, HELP_WIDTH)


# The HTTP endpoints, named in the epilog of --help (tests/test_help.py asks each of a running exporter).
ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("/metrics", "every account's metrics; polls the API when a poll is due (--web.telemetry-path moves it)"),
    ("/probe?account=NAME", "one account's metrics, without the account label (one scrape job per account)"),
    ("/healthz", "liveness: OK while the exporter serves; never calls the API"),
    ("POST /-/reload", "reload the config file, key files and web config, as SIGHUP does"),
    ("/", "landing page: version, links, each account's polling, the last reload"),
)


def _endpoints() -> str:
    width = max(len(path) for path, _ in ENDPOINTS) + 2
    indent = " " * (width + 2)
    lines = [textwrap.fill(what, HELP_WIDTH, initial_indent=f"  {path:<{width}}", subsequent_indent=indent)
             for path, what in ENDPOINTS]
    return "HTTP endpoints:\n" + "\n".join(lines)


def build_parser() -> _Parser:
    """The server's command line: every setting."""
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [flags]\n       {PROG} {BACKFILL} --from TIME --output DIR [flags]",
        description=_wrap(
            "Prometheus exporter for Skillable (Lab on Demand) lab results. Every setting is a flag, an environment "
            "variable (env) and a key of the --config.file; precedence: flag, environment, file, default. The API "
            "key comes from SKILLABLE_API_KEY or --skillable.api-key-file, never from a flag. SIGHUP or POST "
            "/-/reload reloads the config file and the web config."),
        epilog=_endpoints() + "\n\n" + _wrap(
            f"Subcommand: '{PROG} {BACKFILL}' writes past weeks as OpenMetrics files and TSDB blocks for "
            f"Prometheus (see '{PROG} {BACKFILL} --help' and docs/backfill.md). Documentation: README.md and docs/."),
    )
    _add_config(parser, "serve metrics from a built-in simulation of the Skillable API (no account needed)")
    parser.add_flag(Flag(("--version",), "print the version and build details and exit"), action=_VersionAction)
    _add_settings(parser)
    return parser


def build_backfill_parser() -> _Parser:
    """`backfill`'s command line: the settings it reads (BACKFILL_SETTINGS), then its own options."""
    parser = _Parser(
        prog=f"{PROG} {BACKFILL}",
        usage=f"{PROG} {BACKFILL} --from TIME [--to TIME] --output DIR [flags]",
        description=_wrap(
            "Backfill Prometheus with the history of GET /Results: OpenMetrics files, one per UTC day, and TSDB "
            "blocks made by promtool. Takes the exporter's account settings (account, key, config file, --demo)."),
        epilog=_wrap(
            "Then move DIR/blocks/* into Prometheus' data folder (Prometheus 2.39 or newer loads them within a "
            "minute) and start the exporter with the state file backfill wrote, so its counters continue from "
            "--to. docs/backfill.md has the whole procedure and the disk and time it takes."),
    )
    _add_config(parser, "backfill the history of a built-in simulation of the Skillable API (no account needed)")
    _add_settings(parser, BACKFILL_SETTINGS)
    group = parser.add_argument_group("backfill")
    own = (
        (Flag(("--from",), "start of the history: RFC 3339 (2026-11-01T00:00:00Z) or a date (midnight UTC)", "TIME"),
         {"dest": "bf_from", "required": True}),
        (Flag(("--to",), "end of the history (not included); 3 hours ago by default, before the head block "
                         "Prometheus may still be writing", "TIME", default="now - 3h"), {"dest": "bf_to"}),
        (Flag(("--output",), "folder for the OpenMetrics files and blocks (never a Prometheus data folder)", "DIR"),
         {"dest": "bf_output", "required": True}),
        (Flag(("--label",), "label on every series, repeatable: the live target's job and instance, so history "
                            "joins the live series", "NAME=VALUE"),
         {"dest": "bf_labels", "action": "append", "default": []}),
        (Flag(("--step",), "time between samples, 1s..5m, dividing a day", "DURATION", default="1m"),
         {"dest": "bf_step", "default": "1m"}),
        (Flag(("--promtool",), "promtool to make blocks with; without one, only the files are written", "PATH",
              default="promtool on the PATH"), {"dest": "bf_promtool"}),
        (Flag(("--max-block-duration",), "promtool's --max-block-duration", "DURATION",
              default=DEFAULT_BLOCK_DURATION), {"dest": "bf_block", "default": DEFAULT_BLOCK_DURATION}),
        (Flag(("--prometheus.retention",), "the target Prometheus' --storage.tsdb.retention.time: older history is "
                                           "warned about, since Prometheus deletes it at once", "DURATION",
              default=DEFAULT_RETENTION), {"dest": "bf_retention", "default": DEFAULT_RETENTION}),
        (Flag(("--keep-openmetrics",), "keep each day's OpenMetrics file (else deleted once promtool made its "
                                       "blocks)"),
         {"dest": "bf_keep_openmetrics", "action": "store_true"}),
        (Flag(("--no-disk-check",), "start even when the estimate of the disk needed exceeds the free space of "
                                    "--output's filesystem (it is an estimate: docs/backfill.md)"),
         {"dest": "bf_no_disk_check", "action": "store_true"}),
        (Flag(("--request-timeout",), "total time one /Results request may take", "SECONDS",
              default=DEFAULT_REQUEST_TIMEOUT), {"dest": "bf_timeout", "default": DEFAULT_REQUEST_TIMEOUT}),
        (Flag(("--retries",), "retries of a failed /Results request, with backoff", "N", default="3"),
         {"dest": "bf_retries", "default": "3"}),
    )
    for flag, options in own:
        parser.add_flag(flag, group, **options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 -m exporter.cli --markdown [backfill]`: the Flags table of a command, as the README
    (or docs/backfill.md, for backfill) has it between its `flags:` markers."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in (["--markdown"], ["--markdown", BACKFILL]):
        print(f"usage: python3 -m exporter.cli --markdown [{BACKFILL}]", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write((build_backfill_parser() if BACKFILL in args else build_parser()).markdown())
    return 0


def load(flags: Mapping[str, Any], demo: bool, read_keys: bool = True) -> tuple[Config, WebConfig | None]:
    """Everything a start or a reload reads: flags, environment, config file, web config."""
    config = load_config(flags, os.environ, demo=demo, read_keys=read_keys)
    web = load_web_config(config.web_config_file) if config.web_config_file else None
    return config, web


if __name__ == "__main__":
    sys.exit(main())
