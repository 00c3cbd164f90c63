"""Memory of `skillable-exporter backfill` over 30 days against 3 days, in the same run.

    python bench/backfill.py             # 3 and 30 days at 5-minute steps; writes BENCHMARKS.md
    python bench/backfill.py --no-write  # print only

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
    env = {"PATH": "/nonexistent", "SKILLABLE_API_URL": url, "SKILLABLE_API_KEY": "bench",
           "HOME": os.environ.get("HOME", "/tmp")}
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", default="5m")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
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
        [f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} with `python bench/backfill.py` (step {args.step}, "
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
