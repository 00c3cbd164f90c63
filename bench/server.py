"""The HTTP server's benchmark: one exporter checkout against another (before and after), one run.

    python3 bench/server.py --before ../server-base        # full run (about 6 minutes); writes BENCHMARKS.md
    python3 bench/server.py --before ../server-base --quick --no-write    # shorter loads (about 2 minutes)

`--before DIR` is a checkout of the exporter to compare with (a `git worktree add` of main); it
runs as `python3 -m exporter` from that folder, with this interpreter, so both use the same
libraries. This checkout is "after". Each target, in turn, against the same simulated API
(bench/simulator.py on real time, 25 labs a minute, a 60-minute window; polls every 10 s, the
default min poll interval):

- steady: sequential scrapes as Prometheus makes them (a fresh connection, its Accept header, gzip),
  the two targets taking turns ten scrapes at a time: p50 and p99; once answered from the exposition
  cache (the server's own cost), once with a poll and a render each (--skillable.min-poll-interval=0,
  as bench/run.py's steady scrape);
- keep-alive load: 50, then 200 clients each on one keep-alive connection, scraping back to back
  for LOAD_SECONDS: answers, failed requests (a connection closed or reset without an answer, an
  error status, no answer within 30 s), p50/p99, peak threads;
- slow-header flood: 200 connections each trickling a request head, a byte a second, reconnecting
  when closed; meanwhile real scrapes (fresh connections, 5 s timeout): answered, p50/p99;
- slow-reader flood: 70 connections each pipelining 50 uncompressed /metrics requests and never
  reading (4 kB receive buffers); meanwhile real scrapes as above;
- RSS after each phase, and the peak (VmHWM).

The load clients are asyncio coroutines on raw sockets in this process (cheap, so the exporter gets
the CPU); the machine's other work shows in the p99s, and only ratios within one run count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # python3 bench/server.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import PROMETHEUS_HEADERS, die_with_parent, free_port, machine_facts, percentile

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- server-bench:begin -->", "<!-- server-bench:end -->"
LOAD_SECONDS, QUICK_LOAD_SECONDS = 30.0, 8.0
STEADY_SCRAPES, QUICK_STEADY_SCRAPES = 1000, 200
POLLING_SCRAPES, QUICK_POLLING_SCRAPES = 300, 100
SLOW_HEADERS = 200
SLOW_READERS, PIPELINED = 70, 50
FLOOD_SCRAPES = 15
FLOOD_SCRAPE_TIMEOUT = 5.0
REQUEST = ("GET /metrics HTTP/1.1\r\nHost: exporter\r\n"
           + "".join(f"{k}: {v}\r\n" for k, v in PROMETHEUS_HEADERS.items()) + "\r\n").encode()
UNCOMPRESSED = b"GET /metrics HTTP/1.1\r\nHost: exporter\r\n\r\n"


# -- the processes ----------------------------------------------------------------------------------

def start_simulator() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.simulator", "--listen", "127.0.0.1:0",
                             "--labs-per-minute", "25"], stdout=subprocess.PIPE, cwd=ROOT, text=True,
                            preexec_fn=die_with_parent)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        raise RuntimeError("the simulator did not print its URL")
    return proc, url


class Exporter:
    def __init__(self, name: str, checkout: Path, api_url: str, *args: str) -> None:
        self.name = name
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
        # Not the launch collector's endpoint (by the environment, which versions without it ignore).
        env.update(SKILLABLE_API_URL=api_url, SKILLABLE_API_KEY="bench", SKILLABLE_COLLECTOR_LAUNCH="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", f"--web.listen-address=127.0.0.1:{self.port}",
             "--no-collector.stats", "--no-collector.delivery-regions", "--no-collector.catalog", "--log.level=warn",
             *args],
            cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(key)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# -- one HTTP exchange on raw asyncio streams ----------------------------------------------------------

async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server keeps the connection) of one answer, its body read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
    if length is None:
        raise ValueError("no Content-Length")
    await reader.readexactly(int(length.group(1)))
    return status, not re.search(rb"\r\nconnection: *close", head, re.I)


ERRORS = (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError, IndexError)


async def fresh_scrape(port: int, timeout: float) -> float | None:
    """A scrape on a new connection: seconds, or None if it failed or timed out."""
    began = time.perf_counter()
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)
            status, _ = await read_answer(reader)
        return time.perf_counter() - began if status == 200 else None
    except ERRORS:
        return None
    finally:
        if writer is not None:
            writer.close()


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    threads: int = 0


async def keep_alive_scraper(port: int, until: float, load: Load) -> None:
    reader = writer = None
    while time.monotonic() < until:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                load.failed += 1
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        began = time.perf_counter()
        try:
            writer.write(REQUEST)
            async with asyncio.timeout(30):
                status, keep = await read_answer(reader)
            load.latencies.append(time.perf_counter() - began)
            if status != 200:
                load.failed += 1
            if not keep:
                writer.close()
                writer = None
        except ERRORS:
            load.failed += 1
            if writer is not None:
                writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def sample_threads(exporter: Exporter, until: float, load: Load) -> None:
    while time.monotonic() < until:
        load.threads = max(load.threads, exporter.status("Threads"))
        await asyncio.sleep(0.25)


async def keep_alive_load(exporter: Exporter, clients: int, seconds: float) -> Load:
    load = Load()
    until = time.monotonic() + seconds
    await asyncio.gather(sample_threads(exporter, until, load),
                         *(keep_alive_scraper(exporter.port, until, load) for _ in range(clients)))
    return load


async def slow_header_client(port: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: exporter\r\nX-Slow: ")
            while not stop.is_set() and not reader.at_eof():
                writer.write(b"a")
                await writer.drain()
                try:
                    async with asyncio.timeout(1.0):
                        if await reader.read(1024) == b"":
                            break
                except TimeoutError:
                    pass
        except ERRORS:
            pass
        finally:
            writer.close()


async def scrapes_during(port: int, count: int) -> tuple[list[float], int]:
    """`count` real scrapes, 0.2 s apart: (latencies of those answered, how many were not)."""
    latencies, failed = [], 0
    for _ in range(count):
        seconds = await fresh_scrape(port, FLOOD_SCRAPE_TIMEOUT)
        if seconds is None:
            failed += 1
        else:
            latencies.append(seconds)
        await asyncio.sleep(0.2)
    return latencies, failed


async def slow_header_flood(exporter: Exporter) -> tuple[list[float], int]:
    stop = asyncio.Event()
    clients = [asyncio.create_task(slow_header_client(exporter.port, stop)) for _ in range(SLOW_HEADERS)]
    await asyncio.sleep(2.0)
    try:
        return await scrapes_during(exporter.port, FLOOD_SCRAPES)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)


async def slow_reader_flood(exporter: Exporter) -> tuple[list[float], int]:
    flood = []
    try:
        for _ in range(SLOW_READERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                sock.connect(("127.0.0.1", exporter.port))
            except BlockingIOError:
                pass
            flood.append(sock)
        await asyncio.sleep(0.5)
        for sock in flood:
            try:
                sock.send(UNCOMPRESSED * PIPELINED)
            except OSError:
                pass
        await asyncio.sleep(2.0)  # the answers are stuck
        return await scrapes_during(exporter.port, FLOOD_SCRAPES)
    finally:
        for sock in flood:
            sock.close()


# -- a target, every phase ---------------------------------------------------------------------------

async def wait_up(exporter: Exporter) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if exporter.proc.poll() is not None:
            raise RuntimeError(f"{exporter.name} exited")
        if await fresh_scrape(exporter.port, 30) is not None:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{exporter.name} did not come up")


async def steady(exporters: list[Exporter], scrapes: int) -> dict[str, list[float]]:
    """Sequential scrapes, the targets taking turns ten at a time, so a change in the machine's
    other load falls on both alike."""
    latencies: dict[str, list[float]] = {exporter.name: [] for exporter in exporters}
    for _ in range(scrapes // 10):
        for exporter in exporters:
            for _ in range(10):
                seconds = await fresh_scrape(exporter.port, 30)
                if seconds is None:
                    raise RuntimeError(f"{exporter.name}: a steady scrape failed")
                latencies[exporter.name].append(seconds)
    return latencies


async def under_load(exporter: Exporter, quick: bool, log: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"rss_idle": exporter.status("VmRSS")}
    seconds = QUICK_LOAD_SECONDS if quick else LOAD_SECONDS
    for clients in (50, 200):
        load = await keep_alive_load(exporter, clients, seconds)
        m[f"load{clients}"] = load
        m[f"rss_load{clients}"] = exporter.status("VmRSS")
        log(f"{exporter.name}: {clients} keep-alive scrapers: {len(load.latencies)} answers, {load.failed} failed")
        await asyncio.sleep(1.0)
    m["slow_headers"] = await slow_header_flood(exporter)
    m["rss_slow_headers"] = exporter.status("VmRSS")
    log(f"{exporter.name}: slow-header flood: {m['slow_headers'][1]} of {FLOOD_SCRAPES} real scrapes unanswered")
    m["slow_readers"] = await slow_reader_flood(exporter)
    m["rss_slow_readers"] = exporter.status("VmRSS")
    log(f"{exporter.name}: slow-reader flood: {m['slow_readers'][1]} of {FLOOD_SCRAPES} real scrapes unanswered")
    m["rss_peak"] = exporter.status("VmHWM")
    return m


# -- the report --------------------------------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms" if seconds < 0.01 else f"{seconds * 1000:.1f} ms"


def latency_cell(latencies: list[float], failed: int, total: int | None = None) -> str:
    answered = f"{len(latencies)} answered" if total is None else f"{len(latencies)}/{total} answered"
    if not latencies:
        return f"{answered}, {failed} failed"
    return f"{answered}, {failed} failed; p50 {ms(percentile(latencies, 0.5))}, p99 {ms(percentile(latencies, 0.99))}"


def flood_cell(result: tuple[list[float], int]) -> str:
    """The real scrapes made during a flood: (their latencies, how many failed)."""
    latencies, failed = result
    return latency_cell(latencies, failed, FLOOD_SCRAPES)


def report(before: dict[str, Any], after: dict[str, Any], seconds: float) -> str:
    lines = ["| measure | before (main) | after (aiohttp) | after / before |", "| --- | --- | --- | --- |"]

    def row(measure: str, b: str, a: str, ratio: str = "") -> None:
        lines.append(f"| {measure} | {b} | {a} | {ratio} |")

    for key, what in (("steady", "from the cache"), ("steady_polling", "with a poll and a render each")):
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            b, a = percentile(before[key], q), percentile(after[key], q)
            row(f"steady scrape {what} {name} ({len(after[key])} sequential, taking turns)", ms(b), ms(a),
                f"{a / b:.2f}x")
    for clients in (50, 200):
        b, a = before[f"load{clients}"], after[f"load{clients}"]
        row(f"{clients} keep-alive scrapers for {seconds:g} s: answers, failed requests",
            f"{len(b.latencies)}, **{b.failed} failed**", f"{len(a.latencies)}, **{a.failed} failed**",
            f"{len(a.latencies) / max(1, len(b.latencies)):.2f}x answers")
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            lb = percentile(b.latencies, q) if b.latencies else float("nan")
            la = percentile(a.latencies, q) if a.latencies else float("nan")
            row(f"{clients} keep-alive scrapers: latency {name}", ms(lb), ms(la), f"{la / lb:.2f}x")
        row(f"{clients} keep-alive scrapers: peak threads", str(b.threads), str(a.threads), "")
    row(f"slow-header flood ({SLOW_HEADERS} connections): {FLOOD_SCRAPES} real scrapes",
        flood_cell(before["slow_headers"]), flood_cell(after["slow_headers"]))
    row(f"slow-reader flood ({SLOW_READERS} clients pipelining {PIPELINED} scrapes, never reading): "
        f"{FLOOD_SCRAPES} real scrapes", flood_cell(before["slow_readers"]), flood_cell(after["slow_readers"]))
    for key, name in (("rss_idle", "after the steady scrapes"), ("rss_load200", "after 200 scrapers"),
                      ("rss_slow_headers", "after the slow-header flood"),
                      ("rss_slow_readers", "during the slow-reader flood"), ("rss_peak", "peak (VmHWM)")):
        row(f"RSS {name}", f"{before[key] / 1024:.0f} MB", f"{after[key] / 1024:.0f} MB",
            f"{after[key] / before[key]:.2f}x")
    return "\n".join(lines)


def write_block(block: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text += "\n" + block + "\n"
    path.write_text(text)


async def run(before_dir: Path, quick: bool, log: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    sim, url = start_simulator()
    exporters = [Exporter("before", before_dir, url), Exporter("after", ROOT, url)]
    polling = [Exporter("before", before_dir, url, "--skillable.min-poll-interval=0"),
               Exporter("after", ROOT, url, "--skillable.min-poll-interval=0")]
    try:
        for exporter in exporters + polling:
            await wait_up(exporter)
        latencies = await steady(exporters, QUICK_STEADY_SCRAPES if quick else STEADY_SCRAPES)
        polled = await steady(polling, QUICK_POLLING_SCRAPES if quick else POLLING_SCRAPES)
        for exporter in polling:
            exporter.stop()
        for name, values in latencies.items():
            log(f"{name}: steady p50 {percentile(values, 0.5) * 1000:.2f} ms, "
                f"with a poll each {percentile(polled[name], 0.5) * 1000:.2f} ms")
        results = {}
        for exporter in exporters:
            results[exporter.name] = await under_load(exporter, quick, log) | {
                "steady": latencies[exporter.name], "steady_polling": polled[exporter.name]}
    finally:
        for exporter in polling:
            exporter.stop()
        for exporter in exporters:
            exporter.stop()
        sim.terminate()
        sim.wait(10)
    return results["before"], results["after"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, type=Path,
                        help="the checkout to compare with (e.g. a worktree of main)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_LOAD_SECONDS:g} s loads, fewer steady scrapes")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    if not (args.before / "exporter" / "__main__.py").exists():
        parser.error(f"{args.before} is not a checkout of the exporter")
    started = time.monotonic()
    load_before = os.getloadavg()

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", file=sys.stderr, flush=True)

    before, after = asyncio.run(run(args.before.resolve(), args.quick, log))
    revision = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip() or "?"
    table = report(before, after, QUICK_LOAD_SECONDS if args.quick else LOAD_SECONDS)
    facts = machine_facts(load_before)[:3] + [
        f"- Before: the checkout at {revision} (http.server, a thread per connection, 64 slots); after: this one "
        "(aiohttp). The machine's 2 cores are shared with other work; only ratios within this run count."]
    command = f"python3 bench/server.py --before {args.before}" + (" --quick" if args.quick else "")
    block = "\n".join([BEGIN, f"Last run: `{command}`", "", *facts, "", table, END])
    print(block)
    if not args.no_write:
        write_block(block)
        log("wrote BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
