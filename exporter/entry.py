"""The `skillable-exporter` command: SIGHUP, SIGTERM and SIGINT are caught (signals.py) before the
rest of the exporter is imported, which takes a while; then __main__.main runs."""

from __future__ import annotations

from .signals import catch_early


def main() -> int:
    catch_early()
    from .__main__ import main as run

    return run()
