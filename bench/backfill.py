"""Memory of `skillable-exporter backfill` over 30 days against 3 days, in the same run; and, with
--disk, the disk and time a demo backfill takes a day (the figures in docs/backfill.md).

    python3 bench/backfill.py             # 3 and 30 days at 5-minute steps; writes BENCHMARKS.md
    python3 bench/backfill.py --no-write  # print only
    python3 bench/backfill.py --disk      # 7 days of the demo with promtool, as a user runs it: print only

--disk runs `skillable-exporter backfill --demo` with its defaults (1-minute steps, 6h blocks, the
files deleted once their blocks exist; promtool from the PATH) over the 7 whole days before the
last midnight, samples the output folder's disk use every 0.2 s (allocated blocks, so promtool's
preallocated chunk file counts), and prints each day's time, file and blocks from its progress
line, the estimate the backfill printed, the peak and what is left.

The simulator (exporter.demo, a process of its own) serves /Results at 10 labs a minute, about
100,000 lab instances a week (each gives a start and an end). The backfill runs as a process of its
own, writing the OpenMetrics files only (no promtool on its PATH: promtool's memory is promtool's,
and it reads one day's file at a time), and its peak RSS comes from wait4(). Bounded memory means
the 30-day peak is about the 3-day peak: neither the range nor the files are held, only one day of
/Results and the state. The step changes the work per day, not what is held; 5 minutes keeps the
run short.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LABS_PER_MINUTE = 10  # 100,800 labs a week
BEGIN, END = "<!-- backfill:begin -->", "<!-- backfill:end -->"


def run_backfill(url: str, days: int, step: str, out: Path) -> tuple[float, int, int]:
    """(seconds, peak RSS in KiB, bytes written) of one backfill ending at the last midnight."""
    today = int(time.time()) // 86400 * 86400
    start = time.strftime("%Y-%m-%d", time.gmtime(today - days * 86400))
    end = time.strftime("%Y-%m-%d", time.gmtime(today))
    # Without the launch history (docs/backfill.md says what it adds): what the measurements there are of.
    env = {"PATH": "/nonexistent", "SKILLABLE_API_URL": url, "SKILLABLE_API_KEY": "bench",
           "HOME": os.environ.get("HOME", "/tmp"), "SKILLABLE_COLLECTOR_LAUNCH": "false"}
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "backfill", f"--from={start}", f"--to={end}", f"--output={out}",
         f"--step={step}", "--label=job=skillable", "--label=instance=bench:10180", "--prometheus.retention=60d"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - began
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"backfill of {days} days failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    size = sum(f.stat().st_size for f in (out / "openmetrics").glob("*.om"))
    return seconds, usage.ru_maxrss, size


def allocated(folder: Path) -> int:
    """Bytes allocated to the files under `folder` (0 for what vanished while walking it)."""
    total = 0
    for parent, _, names in os.walk(folder):  # a folder that vanishes while walked is skipped
        for name in names:
            try:
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


_DAY_LINE = re.compile(r"^(day \d+ of \d+) \((\S+)\): .* samples, ([\d.]+ [kMG]?B) of OpenMetrics, ([\d.]+ [kMG]?B) "
                       r"in (\d+) blocks, .*\(([\d.]+)s")


def disk_run(days: int, out: Path) -> int:
    """A demo backfill of `days` whole days with promtool, its disk and time (see the module docstring)."""
    import threading

    today = int(time.time()) // 86400 * 86400
    start = time.strftime("%Y-%m-%d", time.gmtime(today - days * 86400))
    end = time.strftime("%Y-%m-%d", time.gmtime(today))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env["SKILLABLE_COLLECTOR_LAUNCH"] = "false"  # as measured in docs/backfill.md (which says what launches add)
    peak = [0]
    running = threading.Event()
    running.set()

    def sample() -> None:
        while running.is_set():
            peak[0] = max(peak[0], allocated(out) if out.exists() else 0)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "backfill", "--demo", f"--from={start}", f"--to={end}", f"--output={out}",
         "--label=job=skillable", "--label=instance=bench:10180", "--prometheus.retention=60d"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    seconds = time.monotonic() - began
    running.clear()
    sampler.join()
    if done.returncode != 0:
        raise SystemExit(f"backfill failed: {done.stderr}")
    print(f"{days} days of the demo, {start} to {end}, default settings (1m steps, 6h blocks, files deleted):")
    print(next(line for line in done.stdout.splitlines() if line.startswith("disk: ")))
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("day ")))
    print("| Day | Time | OpenMetrics | Blocks |\n|---|---|---|---|")
    for line in done.stdout.splitlines():
        match = _DAY_LINE.match(line)
        if match:
            day, date, om, blocks, count, took = match.groups()
            print(f"| {day} ({date}) | {float(took):.1f} s | {om} | {blocks} ({count}) |")
    left = allocated(out)
    blocks = allocated(out / "blocks")
    print(f"wall time {seconds:.0f} s ({seconds / days:.1f} s a day); peak disk {peak[0] / 1e6:.0f} MB "
          f"(with promtool's preallocation); left {left / 1e6:.1f} MB, of which blocks {blocks / 1e6:.1f} MB; "
          f"OpenMetrics files left: {len(list(out.rglob('*.om')))}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", default="5m")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--disk", action="store_true", help="disk and time a day of a demo backfill (print only)")
    parser.add_argument("--days", type=int, default=7, help="with --disk: how many days")
    args = parser.parse_args()
    if args.disk:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            return disk_run(args.days, Path(tmp) / "out")
    sim = subprocess.Popen([sys.executable, "-m", "exporter.demo", f"--labs-per-minute={LABS_PER_MINUTE}"],
                           cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = (sim.stdout.readline().strip() if sim.stdout else "") + "/api/v3"
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for days in (3, 30):
                seconds, rss, size = run_backfill(url, days, args.step, Path(tmp) / f"d{days}")
                rows.append((days, seconds, rss, size))
                print(f"{days} days: {seconds:.0f} s, peak RSS {rss / 1024:.0f} MiB, {size / 1e6:.0f} MB written",
                      flush=True)
    finally:
        sim.terminate()
        sim.wait(10)
    ratio = rows[1][2] / rows[0][2]
    table = "\n".join(
        [f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} with `python3 bench/backfill.py` (step {args.step}, "
         f"{LABS_PER_MINUTE} labs a minute, about 100,000 a week; files only).", "",
         "| History | Wall time | Peak RSS | OpenMetrics written |", "|---|---|---|---|"]
        + [f"| {d} days | {s:.0f} s | {r / 1024:.0f} MiB | {z / 1e6:.0f} MB |" for d, s, r, z in rows]
        + ["", f"Peak RSS of 30 days / 3 days: **{ratio:.2f}** (bounded: the range is streamed a day at a time)."]
    )
    print(table)
    if not args.no_write:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        block = f"{BEGIN}\n{table}\n{END}"
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
        path.write_text(text)
    return 0 if ratio < 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
