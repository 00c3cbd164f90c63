"""SIGHUP, SIGTERM and SIGINT from the process's first moment, and systemd's readiness protocol.

Their default actions end a process, and systemd counts a death by SIGHUP as a clean exit (so
`Restart=on-failure` does not restart it). So the program's entry points (`skillable-exporter`:
entry.py; `python3 -m exporter`: the top of __main__.py) catch them before importing anything
else, and queue them: serve() takes them over once it can act on them (a SIGHUP is a reload once
serving, a SIGTERM a clean stop), and release() hands them back for a command that is not the
server (backfill), delivering what was queued.

notify() speaks sd_notify(3) over $NOTIFY_SOCKET (a few bytes on a Unix datagram socket, written
here rather than with a library): READY=1 once every listener serves, RELOADING=1 and READY=1
around a reload, STOPPING=1 at SIGTERM. With `Type=notify` (deploy/systemd) `systemctl start`
returns when the exporter serves, and `systemctl reload` waits for it.
"""

from __future__ import annotations

import os
import signal
import socket
import time

CAUGHT = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []


def _queue(signum: int, _frame: object) -> None:
    _pending.append(signum)


def catch_early() -> None:
    """Queue SIGHUP, SIGTERM and SIGINT until taken over (take_pending) or released."""
    for signum in CAUGHT:
        signal.signal(signum, _queue)


def take_pending() -> list[int]:
    """The signals queued so far, oldest first; the queue is emptied."""
    taken = list(_pending)
    del _pending[: len(taken)]
    return taken


def release() -> None:
    """Give the signals their default actions back, then deliver those that were queued."""
    for signum in CAUGHT:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    for pending in take_pending():
        os.kill(os.getpid(), pending)


def notify(state: str) -> bool:
    """Tell systemd `state` (sd_notify(3)) if it is listening: True if sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def reloading() -> str:
    """The RELOADING=1 message, with the monotonic time systemd (253 and later) asks for beside it."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
