"""exporter/workers.py: the server's threads for blocking work."""

from __future__ import annotations

import asyncio
import threading

import pytest

from exporter.workers import NoWorker, Workers


def test_work_runs_off_the_loop_and_errors_reach_the_awaiter() -> None:
    async def main() -> None:
        pool = Workers("test", 2)
        loop_thread = threading.get_ident()
        assert await pool.run(threading.get_ident) != loop_thread
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
        pool.close()
        with pytest.raises(NoWorker):
            await pool.run(lambda: None)

    asyncio.run(main())


def test_threads_start_as_work_needs_them_up_to_the_size() -> None:
    async def main() -> None:
        pool = Workers("test", 3)
        release = threading.Event()
        blocked = [asyncio.ensure_future(pool.run(release.wait)) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert pool.threads == 3  # five waiting pieces of work, three threads: the rest queue
        release.set()
        assert await asyncio.gather(*blocked) == [True] * 5
        assert pool.threads == 3  # they stay
        pool.close()

    asyncio.run(main())
