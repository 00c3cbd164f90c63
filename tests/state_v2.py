"""A state file of version 2, written by the exporter at commit 5737f51 (before the dimensions were
declared), and what that exporter served: the fixture of the migration test (tests/test_state.py).

The scenario is plain data (LabResult, the same at that commit and now): two accounts, each with
running and ended labs of every status, run times, task completions, exams with scores, lab
profiles (a null one among them), more hosts and profiles than the caps allow, a lab that expires
and a record refused by rule 9; polls() before the file is written, after() the poll that follows.

Made again, with the code of that commit in DIR (`git archive 5737f51 | tar -x -C DIR`), by:

    python3 -m tests.state_v2 --code DIR

which writes tests/fixtures/state_v2.json (the state file, through that commit's encoder) and
tests/fixtures/state_v2.prom (that commit's exposition of both accounts right after the save, and
after the next poll, separated by a line `# after`).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
T0 = 1_800_000_000
WINDOW_MINUTES = 60
MAX_LAB_HOSTS = 4
MAX_LAB_PROFILES = 3
MAX_RUNNING_SECONDS = 40 * 60
ACCOUNTS = {"emea": 1, "americas": 2}  # name -> seed
STATUS_CODES = (1, 2, 3, 4, 10, 20, 30, 40, 50, 60, 70)  # 70: undocumented, counted as unknown

Poll = tuple[list[Any], float, float]  # results, horizon, seen_at


def _lab(rng: random.Random, i: int, start: int, ended: bool) -> Any:
    from exporter.model import LabResult

    status = STATUS_CODES[i % len(STATUS_CODES)]
    exam = i % 5 == 0
    end = start + rng.randrange(60, 1800) if ended else None
    return LabResult(
        lab_instance_id=i, start=start, end=end, completion_status=status if ended else 3,
        total_run_time_seconds=(end - start) if end is not None else None,
        task_complete_percent=float(rng.randrange(0, 101)) if ended else None,
        is_exam=exam, exam_passed=(i % 10 == 0) if exam and ended else None,
        exam_score=float(rng.randrange(0, 101)) if exam and ended else None,
        exam_max_possible_score=100.0 if exam and ended else None,
        lab_host_id=101 + rng.randrange(6), datacenter_id=1 + i % 2, delivery_region_id=1 + i % 2,
        lab_profile_id=None if i % 13 == 1 else 5000 + rng.randrange(5),
    )


def polls(seed: int) -> list[Poll]:
    """The polls made before the state file is written."""
    rng = random.Random(seed)
    first = [_lab(rng, i, T0 - 3300 + i * 60, ended=i % 3 != 0) for i in range(1, 50)]
    first.append(_lab(rng, 900, T0 - 3000, ended=False))  # still running at the next poll: it expires
    first.append(_lab(rng, 901, 32_503_680_000, ended=False))  # a Start in the year 3000: refused (rule 9)
    second = [_lab(rng, i, T0 - 3300 + i * 60, ended=True) for i in range(3, 30, 3)]  # running labs end
    second += [_lab(rng, i, T0 + 100 + i, ended=i % 2 == 0) for i in range(50, 60)]
    return [(first, T0 - WINDOW_MINUTES * 60, T0), (second, T0 - 120, T0 + 300)]


def after(seed: int) -> Poll:
    """The poll after the save: restored running labs end, restored ended ones come again (counted once)."""
    rng = random.Random(seed + 100)
    again = [_lab(rng, i, T0 - 3300 + i * 60, ended=True) for i in range(30, 49, 3)]
    again += [_lab(rng, i, T0 + 100 + i, ended=True) for i in range(50, 60)]
    return again, T0 + 300 - 120, T0 + 600


def evict(state: Any, now: float) -> None:
    state.evict(now - WINDOW_MINUTES * 60, now - MAX_RUNNING_SECONDS)


def generate(code: Path) -> None:
    """Write the fixtures with the code in `code` (that of commit 5737f51)."""
    sys.path.insert(0, str(code))
    import msgspec
    from prometheus_client import CollectorRegistry, generate_latest

    import exporter
    from exporter import persistence
    from exporter.collector import SkillableCollector
    from exporter.config import Names
    from exporter.poller import Health, PollView
    from exporter.state import FleetState

    assert Path(exporter.__file__).resolve().is_relative_to(code.resolve()), exporter.__file__
    assert persistence.VERSION == 2

    states = {name: FleetState(MAX_LAB_HOSTS, MAX_LAB_PROFILES, MAX_RUNNING_SECONDS) for name in ACCOUNTS}
    health = {name: Health(up=True, last_success=float(T0 + 300)) for name in ACCOUNTS}
    for name, seed in ACCOUNTS.items():
        for results, horizon, seen_at in polls(seed):
            states[name].apply(results, horizon, seen_at=seen_at)
            evict(states[name], seen_at)

    class Stub:
        window_minutes = WINDOW_MINUTES

        def __init__(self, name: str) -> None:
            self.name = name

        def view(self) -> Any:
            return PollView(states[self.name].snapshot(), health[self.name])

    def exposition() -> str:
        registry = CollectorRegistry(auto_describe=False)
        # 5737f51's collector takes Pollers, and reads only their name, window_minutes and view().
        accounts = [(n, Stub(n)) for n in ACCOUNTS]
        collector = SkillableCollector(accounts, Names(), WINDOW_MINUTES, MAX_LAB_PROFILES)  # type: ignore[arg-type]
        registry.register(collector)
        return generate_latest(registry).decode()

    accounts = {name: msgspec.Raw(persistence.encode_account(SimpleNamespace(health=health[name], state=states[name])))
                for name in sorted(ACCOUNTS)}
    data = msgspec.json.encode({"format": persistence.FORMAT, "version": persistence.VERSION, "saved_at": T0 + 300,
                                "api_urls": {name: f"https://{name}.example/api/v3" for name in sorted(ACCOUNTS)},
                                "accounts": accounts})
    saved = exposition()
    for name, seed in ACCOUNTS.items():
        results, horizon, seen_at = after(seed)
        states[name].apply(results, horizon, seen_at=seen_at)
        evict(states[name], seen_at)
    FIXTURES.joinpath("state_v2.json").write_bytes(data)
    FIXTURES.joinpath("state_v2.prom").write_text(saved + "# after\n" + exposition())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", type=Path, required=True, help="a checkout of commit 5737f51")
    generate(parser.parse_args().code)
