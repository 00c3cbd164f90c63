"""A dimension is one declaration (docs/design-notes.md, "The state model"): a test declares one more,
and gets its families, its counts, its overflow and its part of the state file, with nothing else
edited; a state saved with or without it restores into the other."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import SkillableCollector
from exporter.config import Names
from exporter.families import all_families
from exporter.model import STATUS_NAMES
from exporter.poller import Health, PollView
from exporter.state import DIMENSIONS, Dimension, FleetExport, FleetState, named_families

from .harness import NOW, result
from .test_exposition import promtool_check

# The whole declaration of a dimension by datacenter alone, its keys capped at two.
DATACENTER = Dimension(
    name="datacenter", labels=("datacenter_id",), fields=("datacenter_id",),
    cap_setting="skillable.max-datacenters", default_cap=2, observer_labels=("datacenter_id",), histogram=False,
    families=named_families("skillable_lab_datacenter_"), overflow_family="skillable_lab_datacenter_overflow_total",
    noun="datacenter", by=", by datacenter",
)
WITH_DATACENTER = (*DIMENSIONS, DATACENTER)


def labs() -> list[Any]:
    """Ended and running labs over datacenters 1-3 (one more than the cap), exams among them."""
    return [result(i, NOW - 3000 + i * 10, None if i % 4 == 0 else NOW - 1000 + i * 10,
                   status=(4, 20, 40, 1)[i % 4], datacenter=1 + (i - 1) % 3, region=1, host=10 + i % 5,
                   lab_profile_id=7 + i % 2, total_run_time_seconds=600 + i, task_complete_percent=50.0,
                   exam_score=70.0 if i % 5 == 0 else None, exam_max_possible_score=100.0,
                   exam_passed=i % 10 == 0 if i % 5 == 0 else None)
            for i in range(1, 41)]


def exposition(state: FleetState, dimensions: tuple[Dimension, ...]) -> str:
    class Stub:
        window_minutes = 60

        def view(self) -> PollView:
            return PollView(state.snapshot(), Health(up=True))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SkillableCollector([("", Stub())], Names(), 60, dimensions=dimensions))  # type: ignore[list-item]
    return generate_latest(registry).decode()


def values(text: str, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples}


def test_a_declared_dimension_counts_by_the_rules_and_leaves_the_others_alone() -> None:
    state, plain = FleetState(dimensions=WITH_DATACENTER), FleetState()
    for s in (state, plain):
        s.apply(labs(), NOW - 3600, seen_at=NOW)
    snap = state.snapshot()
    dc = snap["datacenter"]
    # The cap: the first two datacenters seen keep their own key, the third is "other", each instance counted.
    assert dc.keys == [("1",), ("2",), ("other",)]
    assert dc.overflow_total == sum(1 for r in labs() if r.datacenter_id == 3)
    truth = Counter(((str(r.datacenter_id) if r.datacenter_id < 3 else "other",), STATUS_NAMES[r.completion_status])
                    for r in labs() if r.end is not None)
    assert {k: v for k, v in dc.ended.items() if v} == dict(truth)
    assert {k: v for k, v in dc.closed.items() if v} == dict(truth)  # every ended one is still in the window
    assert sum(dc.running.values()) == sum(1 for r in labs() if r.end is None) == sum(snap["place"].running.values())
    assert sum(dc.started.values()) == 40 and sum(dc.exams.values()) == 8 and sum(dc.exams_passed.values()) == 4
    assert sum(s.count for s in dc.run_time.values()) == 30 and sum(s.count for s in dc.exam_score.values()) == 8
    # The other dimensions count as they do without it.
    assert snap["place"] == plain.snapshot()["place"] and snap["profile"] == plain.snapshot()["profile"]


@pytest.mark.integration
def test_a_declared_dimension_gets_its_families_in_the_table_and_the_exposition() -> None:
    state = FleetState(dimensions=WITH_DATACENTER)
    state.apply(labs(), NOW - 3600, seen_at=NOW)
    text = exposition(state, WITH_DATACENTER)
    promtool_check(text)
    table = {f.name: f for f in all_families(WITH_DATACENTER)}
    served = {f.name: f for f in text_string_to_metric_families(text)}
    for name, table_type in (("skillable_lab_datacenter_instances", "gauge"),
                             ("skillable_lab_datacenter_instances_running", "gauge"),
                             ("skillable_lab_datacenter_instances_started", "counter"),
                             ("skillable_lab_datacenter_instances_ended", "counter"),
                             ("skillable_lab_datacenter_run_time_seconds", "summary"),
                             ("skillable_lab_datacenter_exam_score_ratio", "summary"),
                             ("skillable_lab_datacenter_exams_passed", "counter"),
                             ("skillable_lab_datacenter_overflow", "counter")):
        assert served[name].type == table_type, name
        assert table[name + ("_total" if table_type == "counter" else "")].type == table_type
    ended = values(text, "skillable_lab_datacenter_instances_ended")
    assert ended[(("completion_status", "save_failed"), ("datacenter_id", "other"))] == \
        sum(1 for r in labs() if r.datacenter_id == 3 and r.completion_status == 40 and r.end is not None)
    assert len(ended) == 3 * 11  # every status at 0 for every key
    assert values(text, "skillable_lab_datacenter_overflow")[()] == 13
    # Only the new families are new: without the declaration the exposition is what it was.
    without = exposition(FleetState(), DIMENSIONS)
    assert "skillable_lab_datacenter_" not in without


def test_a_declared_dimension_round_trips_through_the_state_file_and_restores_across_versions() -> None:
    state = FleetState(dimensions=WITH_DATACENTER)
    state.apply(labs(), NOW - 3600, seen_at=NOW)
    saved = msgspec.json.decode(msgspec.json.encode(state.export()), type=FleetExport)
    assert saved.order == ("place", "profile", "datacenter") and "datacenter" in saved.dimensions
    restored = FleetState.restore(saved, dimensions=WITH_DATACENTER)
    assert restored.snapshot() == state.snapshot()
    # A version without the dimension keeps the counters of the others.
    older = FleetState.restore(saved)
    assert older.snapshot()["place"] == state.snapshot()["place"]
    assert older.snapshot()["profile"] == state.snapshot()["profile"]
    # A file from before the dimension existed: it starts empty, its restored instances under its unknown
    # key, so its gauges hold every instance as the other dimensions' do; its counters count from now on.
    plain = FleetState()
    plain.apply(labs(), NOW - 3600, seen_at=NOW)
    newer = FleetState.restore(msgspec.json.decode(msgspec.json.encode(plain.export()), type=FleetExport),
                               dimensions=WITH_DATACENTER)
    dc = newer.snapshot()["datacenter"]
    assert dc.keys == [("unknown",)] and sum(dc.started.values()) == 0 and sum(dc.ended.values()) == 0
    assert dc.running[("unknown",)] == sum(newer.snapshot()["place"].running.values()) == 10
    assert sum(dc.closed.values()) == 30
    assert newer.snapshot()["place"] == plain.snapshot()["place"]
    empty = FleetState.restore(FleetState().export(), dimensions=WITH_DATACENTER)
    assert empty.snapshot()["datacenter"].keys == []  # the unknown key only for instances that need it
    newer.apply([result(100, NOW - 10, None, datacenter=1)], NOW - 60, seen_at=NOW)
    assert newer.snapshot()["datacenter"].started == {("1",): 1, ("unknown",): 0}
    newer.apply([result(4, NOW - 3000 + 40, NOW - 5, status=4)], NOW - 60, seen_at=NOW)  # a restored lab ends
    dc = newer.snapshot()["datacenter"]
    assert dc.running[("unknown",)] == 9 and dc.ended[(("unknown",), "complete")] == 1
