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
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class NoWorker(RuntimeError):
    """The pool has no thread and could not start one."""


class Workers:
    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._queue: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._threads = 0
        self._idle = 0
        self._closed = False

    def start(self, count: int = 1) -> None:
        """Start up to `count` threads now (at start-up, while the process can)."""
        with self._lock:
            while self._threads < min(count, self.size) and self._start_one():
                pass

    def submit(self, work: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise NoWorker(f"{self.name}: closed")
            if self._idle <= len(self._queue) and self._threads < self.size:
                self._start_one()
            if self._threads == 0:
                raise NoWorker(f"{self.name}: no thread could be started")
            self._queue.append((future, work))
            self._ready.notify()
        return future

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in a pool thread, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(work))

    def close(self) -> None:
        """No more work; the threads end once the queue is empty."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()

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
                self._ready.wait_for(lambda: self._queue or self._closed)
                self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    return
                future, work = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its awaiter went away before it started
            try:
                future.set_result(work())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiter, which decides
                future.set_exception(exc)
