"""Threads for the blocking work of the HTTP server's event loop: waiting for a poll, rendering,
gzip, the landing page, a reload, a bcrypt check.

A Workers pool holds at most `size` threads. They start as work needs them (no idle thread, and
fewer than `size` running) and then live as long as the pool, so a process at its task limit (a
container pids limit, systemd TasksMax) keeps every thread it once had. When a thread cannot be
started there, the work waits for one that runs; only a pool with no thread at all refuses work
(NoWorker). Threads are daemons and nothing joins them at exit: a scrape waiting for a hung poll
never holds up a SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, TypeVar
from collections.abc import Callable

log = logging.getLogger(__name__)
T = TypeVar("T")
_STOP = object()


class NoWorker(RuntimeError):
    """The pool has no thread and could not start one."""


class Workers:
    """The hand-over is a queue.SimpleQueue one way and loop.call_soon_threadsafe the other: the
    cheapest pair in Python (a scrape's two thread switches cost tens of microseconds)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()  # for the counts
        self._threads = 0
        self._idle = 0
        self._waiting = 0  # work queued and not yet taken
        self._closed = False

    def start(self, count: int = 1) -> None:
        """Start up to `count` threads now (at start-up, while the process can)."""
        with self._lock:
            while self._threads < min(count, self.size) and self._start_one():
                pass

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in a pool thread, awaited from the running event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise NoWorker(f"{self.name}: closed")
            if self._idle <= self._waiting and self._threads < self.size:
                self._start_one()
            if self._threads == 0:
                raise NoWorker(f"{self.name}: no thread could be started")
            self._waiting += 1
        self._queue.put((loop, future, work))
        return await future

    def close(self) -> None:
        """No more work; the threads end once the queue is empty."""
        with self._lock:
            self._closed = True
            threads = self._threads
        for _ in range(threads):
            self._queue.put(_STOP)

    @property
    def threads(self) -> int:
        with self._lock:
            return self._threads

    def _start_one(self) -> bool:
        """Called with the lock held."""
        thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't start new thread": the process is at its task limit
            log.debug("cannot start a worker thread (at the task limit)",
                      extra={"pool": self.name, "threads": self._threads})
            return False
        self._threads += 1
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
                if item is _STOP:
                    self._threads -= 1
                    return
                self._waiting -= 1
            loop, future, work = item
            if future.cancelled():  # its awaiter went away before it started
                continue
            try:
                result, error = work(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiter, which decides
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_deliver, future, result, error)
            except RuntimeError:  # the loop is closed: nobody awaits it any more
                pass


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
