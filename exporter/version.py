"""Version and build details: `--version`'s block and skillable_exporter_build_info's labels.

The revision, branch, build user and date are known only where the package is built: the
Dockerfile (or any packager) writes them into exporter/_build_info.json before building the
wheel, with

    python3 -m exporter.version --write --revision=$(git rev-parse HEAD) --branch=main

A package built without that file says "unknown". Standard library only: the Dockerfile runs
this before the dependencies are installed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from . import __version__

BUILD_INFO_FILE = Path(__file__).with_name("_build_info.json")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class BuildInfo:
    version: str = __version__
    revision: str = UNKNOWN
    branch: str = UNKNOWN
    build_user: str = UNKNOWN
    build_date: str = UNKNOWN


@cache
def build_info() -> BuildInfo:
    """The build details written at build time, or "unknown" for each one missing."""
    try:
        raw = json.loads(BUILD_INFO_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return BuildInfo()
    if not isinstance(raw, dict):
        return BuildInfo()
    fields = {key: str(raw[key]) for key in ("revision", "branch", "build_user", "build_date")
              if isinstance(raw.get(key), str) and raw[key]}
    return BuildInfo(**fields)


def version_text() -> str:
    """What `--version` prints, in the layout of Prometheus' Go exporters (prometheus/common/version)."""
    info = build_info()
    machine = platform.machine().lower().replace("x86_64", "amd64").replace("aarch64", "arm64")
    return (
        f"skillable-exporter, version {info.version} (branch: {info.branch}, revision: {info.revision})\n"
        f"  build user:       {info.build_user}\n"
        f"  build date:       {info.build_date}\n"
        f"  python version:   {platform.python_version()}\n"
        f"  platform:         {sys.platform}/{machine}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m exporter.version",
                                     description="print the version, or write the build details")
    parser.add_argument("--write", action="store_true", help=f"write {BUILD_INFO_FILE.name} and exit")
    parser.add_argument("--revision", default=UNKNOWN)
    parser.add_argument("--branch", default=UNKNOWN)
    parser.add_argument("--build-user", default=None, help="default: user@host")
    parser.add_argument("--build-date", default=None, help="default: now, as 20060102-15:04:05")
    args = parser.parse_args(argv)
    if not args.write:
        print(version_text(), end="")
        return 0
    info = BuildInfo(
        revision=args.revision or UNKNOWN,
        branch=args.branch or UNKNOWN,
        build_user=args.build_user or f"{getpass.getuser()}@{socket.gethostname()}",
        build_date=args.build_date or time.strftime("%Y%m%d-%H:%M:%S", time.gmtime()),
    )
    fields = asdict(info)
    del fields["version"]  # always the package's own
    BUILD_INFO_FILE.write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
