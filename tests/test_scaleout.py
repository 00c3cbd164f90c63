"""Scale-out and HA as docs/scaling.md writes them, run for real: two exporter processes, a fake
Skillable API per account (tests/fakeapi.py, over loopback HTTP), and Debian's Prometheus.

The Prometheus job is the hashmod recipe taken from docs/scaling.md, with the test's account
names and exporter addresses put in and 1-second intervals. Both exporters get every account,
as the recipe says; the only difference between their configs is a path segment in each
account's API URL (via-exporter-0 / via-exporter-1), so each fake can tell which exporter
polled it. Checked against the fakes' truth:

- every account is one Prometheus target, served by the exporter hashmod picks, with the
  account's own values (each account has a different number of labs);
- only that exporter polled the account's API;
- a second job scrapes one account from both exporters (two replicas of one exporter): `sum`
  counts its labs twice, the documented `max without (instance, pod)` once.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import pytest
import requests
import yaml
from cloudcoil.models.prometheus_operator import v1alpha1

from .fakeapi import FakeSkillable, lab
from .harness import ROOT, ExporterProcess, eventually, free_port, stop_process, tool

DOC = ROOT / "docs" / "scaling.md"
# Three accounts hash to each of two exporters (checked below against hashmod's definition).
ACCOUNTS = ("acme", "initech", "contoso", "globex", "umbrella", "fabrikam")
SHARED = "shared"  # on both exporters, scraped from both: the two-replicas case
LABS = {**{account: 2 + i for i, account in enumerate(ACCOUNTS)}, SHARED: 9}
KEY_ENV = "SKILLABLE_API_KEY_SCALEOUT"
DEADLINE = 30  # Prometheus' first samples take ~6 s (real-components.md); two exporters, seven accounts


def doc_yaml_blocks() -> list[Any]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)]


def doc_scrape_job() -> dict[str, Any]:
    (config,) = [b for b in doc_yaml_blocks() if isinstance(b, dict) and "scrape_configs" in b]
    (job,) = config["scrape_configs"]
    return job


def doc_scrape_config_object() -> dict[str, Any]:
    (obj,) = [b for b in doc_yaml_blocks() if isinstance(b, dict) and b.get("kind") == "ScrapeConfig"]
    return obj


def hashmod(value: str, modulus: int) -> int:
    """Prometheus' relabel action hashmod: the MD5 of the value, its last 8 bytes as a big-endian
    integer, modulo the modulus (as docs/scaling.md states it)."""
    return int.from_bytes(hashlib.md5(value.encode()).digest()[8:], "big") % modulus


def exporter_rules(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The relabel rules that set __address__ to an exporter, in the doc's order."""
    return [r for r in job["relabel_configs"] if r.get("target_label") == "__address__" and "regex" in r]


@dataclass
class Stack:
    work: Path
    fakes: dict[str, FakeSkillable] = field(default_factory=dict)
    exporters: list[ExporterProcess] = field(default_factory=list)
    prometheus: subprocess.Popen[bytes] | None = None
    prometheus_url: str = ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=5)
        answer.raise_for_status()
        return answer.json()["data"]["result"]

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1]) for r in self.query(expr)}

    def address(self, shard: int) -> str:
        return self.exporters[shard].url.removeprefix("http://")


def exporter_config(shard: int, fakes: dict[str, FakeSkillable]) -> dict[str, Any]:
    return {
        "collector": {"stats": False, "delivery_regions": False, "catalog": False},
        "accounts": [{"name": name, "api_key_env": KEY_ENV, "api_url": f"{fake.url}/via-exporter-{shard}"}
                     for name, fake in fakes.items()],
    }


def prometheus_config(stack: Stack) -> dict[str, Any]:
    job = doc_scrape_job()
    job.update(scrape_interval="1s", scrape_timeout="1s")  # the test's only change to the doc's settings
    job["static_configs"] = [{"targets": list(ACCOUNTS)}]
    rules = exporter_rules(job)
    assert [r["regex"] for r in rules] == ["0", "1"]
    for shard, rule in enumerate(rules):
        rule["replacement"] = stack.address(shard)
    replicas = {"job_name": "skillable-replicas", "metrics_path": "/probe", "params": {"account": [SHARED]},
                "scrape_interval": "1s", "scrape_timeout": "1s",
                "static_configs": [{"targets": [stack.address(0), stack.address(1)]}]}
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job, replicas]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("scaleout")
    s = Stack(work)
    try:
        for name in (*ACCOUNTS, SHARED):
            fake = FakeSkillable(live=True)
            now = int(fake.clock())
            # All running, in two datacenters, so the doc's per-datacenter queries have two answers.
            fake.add(*(lab(1000 + i, now - 60 * (i + 1), datacenter=3 + i % 2) for i in range(LABS[name])))
            s.fakes[name] = fake
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
        env[KEY_ENV] = next(iter(s.fakes.values())).state.api_key
        for shard in (0, 1):
            config = work / f"exporter-{shard}.yml"
            config.write_text(yaml.safe_dump(exporter_config(shard, s.fakes)))
            s.exporters.append(ExporterProcess([f"--config.file={config}"], env, work / f"exporter-{shard}.log"))
        (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(s), sort_keys=False))
        port = free_port()
        s.prometheus_url = f"http://127.0.0.1:{port}"
        s.prometheus = subprocess.Popen(
            [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'prom'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"))
        yield s
    finally:
        if s.prometheus is not None:
            stop_process(s.prometheus)
        for exporter in s.exporters:
            exporter.stop()
        for fake in s.fakes.values():
            fake.stop()


@pytest.fixture(scope="module")
def scraped(stack: Stack) -> Stack:
    """Wait until Prometheus holds every account's counter and the replicas' (a few scrapes)."""
    started = 'sum by (job, account) (skillable_lab_instances_started_total{job=~"skillable|skillable-replicas"})'

    def complete() -> bool:
        got = stack.values(started, "job", "account")
        return len([k for k in got if k[0] == "skillable"]) == len(ACCOUNTS) and ("skillable-replicas", "") in got

    try:
        eventually(complete, DEADLINE, "every account's lab counter in Prometheus", interval=0.3,
                   ignoring=(requests.ConnectionError,))
    except AssertionError:
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(stack.work.glob("*.log")))
        raise AssertionError(f"not every account was scraped; logs:\n{logs}") from None
    # A few scrapes of every target, so an exporter that would poll what it does not serve has.
    eventually(lambda: stack.values('min(count_over_time(up{job="skillable"}[1m])) >= 3'), DEADLINE,
               "three scrapes of every account", interval=0.3)
    return stack


def test_the_doc_recipe_spreads_the_test_accounts_over_both_exporters():
    """A precondition of the test, from hashmod's definition: not both shards' worth on one exporter."""
    job = doc_scrape_job()
    (hashmod_rule,) = [r for r in job["relabel_configs"] if r.get("action") == "hashmod"]
    assert hashmod_rule["source_labels"] == ["__param_account"] and hashmod_rule["modulus"] == 2
    assert sorted(hashmod(a, 2) for a in ACCOUNTS) == [0, 0, 0, 1, 1, 1]


@pytest.mark.integration
def test_every_account_is_scraped_through_exactly_one_exporter(scraped: Stack) -> None:
    up = scraped.query('up{job="skillable"}')
    assert sorted(r["metric"]["account"] for r in up) == sorted(ACCOUNTS), "one target per account"
    assert all(r["value"][1] == "1" for r in up)
    for result in up:
        account = result["metric"]["account"]
        assert result["metric"]["instance"] == scraped.address(hashmod(account, 2)), account
    # Every series of an account comes from that one exporter, with the account's own numbers.
    started = scraped.values('sum by (account, instance) (skillable_lab_instances_started_total{job="skillable"})',
                             "account", "instance")
    assert started == {(a, scraped.address(hashmod(a, 2))): LABS[a] for a in ACCOUNTS}
    running = scraped.values('sum by (account) (skillable_lab_instances_running{job="skillable"})', "account")
    assert running == {(a,): LABS[a] for a in ACCOUNTS}


@pytest.mark.integration
def test_only_the_serving_exporter_polls_an_account(scraped: Stack) -> None:
    for account in ACCOUNTS:
        via = {s.path.split("/")[-2] for s in scraped.fakes[account].latest_requests()}
        assert via == {f"via-exporter-{hashmod(account, 2)}"}, account
    both = {s.path.split("/")[-2] for s in scraped.fakes[SHARED].latest_requests()}
    assert both == {"via-exporter-0", "via-exporter-1"}, "two replicas each poll the API"


@pytest.mark.integration
def test_two_replicas_count_twice_unless_one_is_taken(scraped: Stack) -> None:
    job = '{job="skillable-replicas"}'
    per_replica = scraped.values(f"sum by (instance) (skillable_lab_instances_started_total{job})", "instance")
    assert per_replica == {(scraped.address(0),): LABS[SHARED], (scraped.address(1),): LABS[SHARED]}
    assert scraped.values(f"sum(skillable_lab_instances_started_total{job})") == {(): 2 * LABS[SHARED]}
    # The queries docs/scaling.md gives, on this job: one replica's worth.
    (gauge_query, counter_query) = re.findall(r"^sum by .*$", DOC.read_text().split("## Two replicas")[1], re.M)[:2]
    by_datacenter = scraped.values(gauge_query.replace('{job="skillable"}', job), "datacenter_id")
    truth = {(str(3 + i % 2),): 0.0 for i in range(2)}
    for i in range(LABS[SHARED]):
        truth[(str(3 + i % 2),)] += 1
    assert by_datacenter == truth
    rates = scraped.values(counter_query.replace('{job="skillable"}', job), "datacenter_id")
    assert set(rates) == set(truth), "one rate per datacenter, not one per replica"


def test_the_operator_scrapeconfig_is_the_plain_job():
    """The ScrapeConfig in the doc passes the operator's CRD schema and relabels as the tested job."""
    obj = doc_scrape_config_object()
    model = v1alpha1.ScrapeConfig.model_validate(obj)
    assert model.model_dump(by_alias=True, exclude_unset=True, mode="json") == obj, "no unknown fields"
    spec, job = obj["spec"], doc_scrape_job()
    assert spec["jobName"] == job["job_name"] and spec["metricsPath"] == job["metrics_path"]
    assert spec["staticConfigs"][0]["targets"] == job["static_configs"][0]["targets"]
    assert (spec["scrapeInterval"], spec["scrapeTimeout"]) == (job["scrape_interval"], job["scrape_timeout"])
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    converted = [{names.get(k, k): (v.lower() if k == "action" else v) for k, v in rule.items()}
                 for rule in spec["relabelings"]]
    assert converted == job["relabel_configs"]
