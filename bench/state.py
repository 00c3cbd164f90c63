"""The state model alone, in this process: a cold FleetState.apply of one window, spread vs tied.

    python3 bench/state.py                      # 2,000 hosts x 500 profiles x ~100k results, both placements
    python3 bench/state.py --minutes 400        # a smaller window while iterating

No HTTP, no decode timing: the window's results are decoded once, then folded into a fresh
FleetState a few times; the median and the memory the state holds (tracemalloc, a separate pass)
are printed for each placement. bench/run.py measures the whole exporter; this isolates apply().
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.simulator import PLACEMENTS, FleetTraffic
from exporter.demo import latest_results_body
from exporter.model import decode_latest_results
from exporter.state import FleetState

NOW = 1_800_000_000.0


def window(placement: str, minutes: int, hosts: int, profiles: int, labs_per_minute: float) -> list:
    traffic = FleetTraffic(labs_per_minute, 7, hosts, profiles, placement)
    return decode_latest_results(latest_results_body(traffic, NOW, minutes)).results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=3950)
    parser.add_argument("--hosts", type=int, default=2000)
    parser.add_argument("--profiles", type=int, default=500)
    parser.add_argument("--labs-per-minute", type=float, default=25)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    for placement in PLACEMENTS:
        results = window(placement, args.minutes, args.hosts, args.profiles, args.labs_per_minute)
        pairs = len({(r.lab_host_id, r.lab_profile_id) for r in results})
        times = []
        for _ in range(args.reps):
            state = FleetState(args.hosts, args.profiles)
            gc.collect()
            start = time.perf_counter()
            state.apply(results, NOW - args.minutes * 60, seen_at=NOW)
            state.evict(NOW - args.minutes * 60, NOW - args.minutes * 60)
            times.append(time.perf_counter() - start)
            del state
        gc.collect()
        tracemalloc.start()
        state = FleetState(args.hosts, args.profiles)
        state.apply(results, NOW - args.minutes * 60, seen_at=NOW)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{placement}: {len(results)} results, {pairs} (host, profile) pairs: cold apply median "
              f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}); state holds "
              f"{held / 2**20:.1f} MiB (peak {peak / 2**20:.1f})", flush=True)
        del state, results
    return 0


if __name__ == "__main__":
    sys.exit(main())
