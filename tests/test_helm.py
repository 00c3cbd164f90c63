"""The Helm chart, deploy/helm/skillable-exporter, rendered and linted offline by Helm's own Go
SDK (helm-python-sdk, no cluster, no helm binary), in the style of helm-unittest: each test sets
values, renders, and asserts on paths of the rendered objects.

Also: every rendered object validates against the Kubernetes schemas (kubernetes-validate) and,
for the Prometheus Operator kinds, against the operator's CRD schema (the pydantic models of
cloudcoil-models-prometheus-operator, generated from those CRDs); the chart carries the shipped
rules and dashboards unchanged; the packaged chart too; the chart and the kustomize base agree;
and the `helm test` hook's script passes against a real exporter and fails against a bad key.
"""

from __future__ import annotations

import base64
import difflib
import functools
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from .harness import ROOT
from .test_deploy import kustomize

# Helm's engine (a Go library the SDK loads into this process) renders the chart in every test;
# some start kubectl or the exporter too.
pytestmark = pytest.mark.integration

CHART = ROOT / "deploy" / "helm" / "skillable-exporter"
RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RELEASE, NAMESPACE = "skillable", "monitoring"
FULLNAME = "skillable-skillable-exporter"  # release name + chart name
SECRET_DIR = "/etc/skillable-exporter/secret"


@functools.cache
def operator_kinds() -> dict[str, Any]:
    """The Prometheus Operator's kinds, as the pydantic models of its CRDs. Imported when first asked:
    building the models takes seconds, which collection would cost every run, the fast lane's too."""
    from cloudcoil.models.prometheus_operator import v1 as operator

    return {"ServiceMonitor": operator.ServiceMonitor, "PrometheusRule": operator.PrometheusRule}


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


@dataclass
class Rendered:
    """One `helm template`: the objects (hooks included) and NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.of(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    @property
    def env(self) -> dict[str, str | None]:
        return {e["name"]: e.get("value") for e in self.container["env"]}

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)


def render(values: dict[str, Any] | None = None, name: str = RELEASE, namespace: str = NAMESPACE) -> Rendered:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name=name, namespace=namespace, is_install=True)
    notes = "".join(text for path, text in manifests.items() if path.endswith("NOTES.txt"))
    objects = [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
               for doc in yaml.safe_load_all(text) if doc]
    return Rendered(objects, notes)


def render_error(values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    return str(failure.value)


def at(obj: Any, path: str) -> Any:
    """helm-unittest's path syntax: spec.template.spec.containers[0].image."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
    return obj


@pytest.fixture(scope="module")
def defaults() -> Rendered:
    return render(values_file("default-values.yaml"))


@pytest.fixture(scope="module")
def every_toggle() -> Rendered:
    return render(values_file("all-toggles-values.yaml"))


# --------------------------------------------------------------------------
# Lint, render, schemas


@pytest.mark.parametrize("values", ["default-values.yaml", "all-toggles-values.yaml"])
def test_chart_passes_helm_lint_strict(values):
    report = helm.lint(CHART, values_file(values), strict=True, namespace=NAMESPACE)
    findings = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not report["errors"] and not findings, report


def test_defaults_render_the_exporter_and_nothing_that_needs_an_operator(defaults):
    kinds = sorted(o["kind"] for o in defaults.objects)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Pod", "Service", "ServiceAccount"]
    for obj in defaults.objects:
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    assert "kubectl -n monitoring create secret generic skillable-skillable-exporter-api-key" in defaults.notes


def test_every_toggle_renders_every_kind(every_toggle):
    counts: dict[str, int] = {}
    for obj in every_toggle.objects:
        counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
    assert counts == {
        "ConfigMap": 1 + len(DASHBOARDS) + 1,  # config, dashboards, the extra manifest
        "Deployment": 1, "PersistentVolumeClaim": 1, "Pod": 1, "Secret": 1, "Service": 1,
        "ServiceAccount": 1,
        "ServiceMonitor": 1 + 2,  # /metrics, and /probe for emea and americas
        "PrometheusRule": len(RULES),
    }


@pytest.mark.parametrize("values", ["default-values.yaml", "all-toggles-values.yaml"])
@pytest.mark.parametrize("version", ["1.28.0", kubernetes_validate.utils.latest_version()])
def test_every_object_validates_against_the_kubernetes_schemas(values, version):
    rendered = render(values_file(values))
    checked = 0
    for obj in rendered.objects:
        if obj["kind"] in operator_kinds():
            continue
        where = f"{obj['kind']} {obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} (Kubernetes {version}): {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked == len([o for o in rendered.objects if o["kind"] not in operator_kinds()])


def operator_problems(obj: dict[str, Any]) -> list[str]:
    """What the operator's CRD schema says of `obj`: type, enum and pattern errors from the
    models, and fields they do not know (pydantic ignores those, so they vanish in a round trip)."""
    try:
        model = operator_kinds()[obj["kind"]].model_validate(obj)
    except ValueError as exc:
        return [str(exc)]
    back = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [] if back == obj else [f"unknown fields: {unknown_paths(obj, back)}"]


def unknown_paths(given: Any, kept: Any, where: str = "") -> list[str]:
    if isinstance(given, dict) and isinstance(kept, dict):
        return [p for k, v in given.items()
                for p in ([f"{where}.{k}"] if k not in kept else unknown_paths(v, kept[k], f"{where}.{k}"))]
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept)) for p in unknown_paths(a, b, f"{where}[{i}]")]
    return [] if given == kept else [f"{where} ({given!r} became {kept!r})"]


def test_operator_objects_validate_against_the_crd_schemas(every_toggle):
    objects = [o for o in every_toggle.objects if o["kind"] in operator_kinds()]
    assert {o["kind"] for o in objects} == set(operator_kinds())
    for obj in objects:
        assert operator_problems(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_the_crd_check_catches_what_the_api_server_would_refuse(every_toggle):
    """The check above is a real one: a misspelt field, a bad duration, a number as a label value."""
    monitor = json.loads(json.dumps(every_toggle.one("ServiceMonitor", FULLNAME)))
    monitor["spec"]["endpoints"][0]["scrapeTimeOut"] = "25s"
    assert operator_problems(monitor) == ["unknown fields: ['.spec.endpoints[0].scrapeTimeOut']"]
    rule = json.loads(json.dumps(every_toggle.of("PrometheusRule")[0]))
    alert = next(r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r)
    alert["for"] = "5 minutes"
    alert.setdefault("labels", {})["weight"] = 0.5
    problems = "\n".join(operator_problems(rule))
    assert "for\n" in problems and "string_pattern_mismatch" in problems
    assert "labels.weight" in problems and "valid string" in problems


@pytest.mark.parametrize("values, message", [
    ({"serviceMonitor": {"enable": True}}, "at '/serviceMonitor': additional properties 'enable' not allowed"),
    ({"persistance": {"enabled": False}}, "additional properties 'persistance' not allowed"),
    ({"serviceMonitor": {"interval": "30 seconds"}}, "at '/serviceMonitor/interval'"),
    ({"replicaCount": "2"}, "at '/replicaCount': got string, want integer"),
    ({"apiKey": {"values": {"api-key": ""}}}, "at '/apiKey/values/api-key'"),
])
def test_values_schema_refuses_what_would_silently_do_nothing(values, message):
    """values.schema.json: a misspelt toggle is an error naming it, not a chart without its
    ServiceMonitor; the exporter's own `config` is left to the exporter's check."""
    assert message in render_error(values)


# --------------------------------------------------------------------------
# The Deployment


def test_the_pod_is_hardened_by_default(defaults):
    pod_sc, sc = defaults.pod["securityContext"], defaults.container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True
    assert pod_sc["runAsUser"] == pod_sc["runAsGroup"] == pod_sc["fsGroup"] == 65532  # Dockerfile's UID
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert defaults.pod["automountServiceAccountToken"] is False
    assert defaults.one("ServiceAccount")["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in defaults.container["volumeMounts"] if not m.get("readOnly")}
    assert mounts == {"/var/lib/skillable-exporter", "/tmp"}, "the only writable places"
    resources = defaults.container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_probes_ask_healthz_on_the_metrics_port(defaults):
    (port,) = defaults.container["ports"]
    assert port == {"name": "http-metrics", "containerPort": 10180, "protocol": "TCP"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert at(defaults.container, f"{probe}.httpGet") == {"path": "/healthz", "port": "http-metrics"}
    assert defaults.env["SKILLABLE_EXPORTER_LISTEN_ADDRESS"] == "0.0.0.0:10180"


def test_image_defaults_to_the_app_version_which_is_the_exporters():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "exporter" / "__init__.py").read_text()).group(1)
    assert chart["appVersion"] == version
    assert render().container["image"] == f"skillable-exporter:{version}"
    custom = render({"image": {"repository": "registry.example.com/skillable-exporter", "tag": "9.9.9"}})
    assert custom.container["image"] == "registry.example.com/skillable-exporter:9.9.9"
    assert custom.deployment["metadata"]["labels"]["app.kubernetes.io/version"] == "9.9.9"


def test_state_is_on_a_claim_and_one_pod_at_a_time_uses_it(defaults):
    claim = defaults.one("PersistentVolumeClaim")
    assert defaults.deployment["spec"]["replicas"] == 1
    assert defaults.deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert defaults.volume("state") == {"name": "state",
                                        "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert defaults.env["SKILLABLE_STATE_FILE"] == "/var/lib/skillable-exporter/state.json"
    assert "storageClassName" not in claim["spec"], "empty storageClass: the cluster's default"


def test_state_claim_options():
    existing = render({"persistence": {"existingClaim": "my-claim"}})
    assert not existing.of("PersistentVolumeClaim")
    assert at(existing.volume("state"), "persistentVolumeClaim.claimName") == "my-claim"
    no_provisioning = render({"persistence": {"storageClass": "-"}})
    assert no_provisioning.one("PersistentVolumeClaim")["spec"]["storageClassName"] == ""
    assert render({"persistence": {"storageClass": "fast"}}).one(
        "PersistentVolumeClaim")["spec"]["storageClassName"] == "fast"


def test_without_persistence_the_state_is_on_an_emptydir():
    rendered = render({"persistence": {"enabled": False}})
    assert not rendered.of("PersistentVolumeClaim")
    assert rendered.volume("state") == {"name": "state", "emptyDir": {"sizeLimit": "64Mi"}}
    assert "strategy" not in rendered.deployment["spec"]


def test_two_replicas_never_share_a_state_file():
    assert "replicaCount > 1 needs persistence.enabled=false" in render_error({"replicaCount": 2})
    two = render({"replicaCount": 2, "persistence": {"enabled": False}})
    assert two.deployment["spec"]["replicas"] == 2
    assert "emptyDir" in two.volume("state"), "one emptyDir per pod"


# --------------------------------------------------------------------------
# The API key


def test_key_comes_from_the_secret_the_user_creates(defaults):
    secret = defaults.volume("api-key")["secret"]
    assert secret == {"secretName": f"{FULLNAME}-api-key", "defaultMode": 0o440,
                      "items": [{"key": "api-key", "path": "api-key"}]}
    assert defaults.env["SKILLABLE_API_KEY_FILE"] == f"{SECRET_DIR}/api-key"
    assert "SKILLABLE_API_KEY" not in defaults.env, "never in the environment"
    mount = next(m for m in defaults.container["volumeMounts"] if m["name"] == "api-key")
    assert mount == {"name": "api-key", "mountPath": SECRET_DIR, "readOnly": True}
    assert not defaults.of("Secret")


def test_key_from_an_existing_secret_and_entry():
    rendered = render({"apiKey": {"existingSecret": "skillable-key", "key": "token"}})
    assert rendered.volume("api-key")["secret"]["secretName"] == "skillable-key"
    assert rendered.volume("api-key")["secret"]["items"] == [{"key": "token", "path": "api-key"}]
    assert not rendered.of("Secret")


def test_chart_made_secret_holds_every_entry_and_rolls_the_pod():
    first = render({"apiKey": {"values": {"api-key": "k-1"}}})
    secret = first.one("Secret")
    assert secret["metadata"]["name"] == first.volume("api-key")["secret"]["secretName"]
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"api-key": "k-1"}
    second = render({"apiKey": {"values": {"api-key": "k-2"}}})
    annotation = "spec.template.metadata.annotations.checksum/secret"
    assert at(first.deployment, annotation) != at(second.deployment, annotation)
    assert "not both" in render_error({"apiKey": {"existingSecret": "x", "values": {"api-key": "k"}}})


def test_several_accounts_mount_the_whole_secret(every_toggle):
    secret = every_toggle.volume("api-key")["secret"]
    assert "items" not in secret and secret["defaultMode"] == 0o440
    assert "SKILLABLE_API_KEY_FILE" not in every_toggle.env, "each account names its own file"
    assert sorted(every_toggle.one("Secret")["data"]) == ["americas", "emea"]


def test_notes_give_the_secret_command_for_the_accounts_listed():
    accounts = values_file("all-toggles-values.yaml")["config"]["accounts"]
    rendered = render({"config": {"accounts": accounts}})
    assert (f"kubectl -n {NAMESPACE} create secret generic {FULLNAME}-api-key"
            " --from-file=emea=./emea.key --from-file=americas=./americas.key\n") in rendered.notes


def test_demo_mode_needs_no_key():
    rendered = render({"demo": True})
    assert "--demo" in rendered.container["args"]
    assert "SKILLABLE_API_KEY_FILE" not in rendered.env
    assert all(v["name"] != "api-key" for v in rendered.pod["volumes"])
    assert all(m["name"] != "api-key" for m in rendered.container["volumeMounts"])
    assert "DEMO MODE" in rendered.notes


# --------------------------------------------------------------------------
# The config


def config_of(rendered: Rendered) -> dict[str, Any]:
    config_map = rendered.one("ConfigMap", rendered.volume("config")["configMap"]["name"])
    return yaml.safe_load(config_map["data"]["config.yaml"])


@pytest.mark.parametrize("values", ["default-values.yaml", "all-toggles-values.yaml"])
def test_config_value_is_the_mounted_file_and_the_exporter_accepts_it(values, tmp_path):
    chosen = values_file(values)
    rendered = render(chosen)
    config = config_of(rendered)
    with helm.Chart.load(CHART) as chart:
        assert config == chart.merge_values(chosen)["config"]
    assert "--config.file=/etc/skillable-exporter/config.yaml" in rendered.container["args"]
    # The key files the Secret would mount, here as local files the exporter may read.
    for account in config.get("accounts", []):
        key = tmp_path / Path(account["api_key_file"]).name
        key.write_text("not-a-real-key")
        key.chmod(0o600)
        account["api_key_file"] = str(key)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env["SKILLABLE_API_KEY"] = "not-a-real-key"
    check = subprocess.run([sys.executable, "-m", "exporter", "--config.check", f"--config.file={path}"],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert check.returncode == 0, check.stderr
    assert f"{max(1, len(config.get('accounts', [])))} account(s)" in check.stdout


def test_a_config_change_rolls_the_pod():
    annotation = "spec.template.metadata.annotations.checksum/config"
    assert at(render().deployment, annotation) != at(
        render({"config": {"skillable": {"window_minutes": 120}}}).deployment, annotation)


# --------------------------------------------------------------------------
# Service and ServiceMonitors


def test_service_selects_the_pods_on_the_named_port(defaults):
    service = defaults.one("Service")
    assert service["spec"]["selector"].items() <= defaults.deployment["spec"]["template"]["metadata"]["labels"].items()
    assert defaults.deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 10180, "targetPort": "http-metrics",
                                         "protocol": "TCP"}]


def rules_jobs() -> set[str]:
    return {job for path in RULES for job in re.findall(r'\bjob="([^"]+)"', path.read_text())}


def test_the_exporter_servicemonitor_scrapes_metrics_as_the_rules_job():
    rendered = render({"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}})
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= rendered.one("Service")["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("30s", "25s")
    assert endpoint["relabelings"] == [{"action": "replace", "targetLabel": "job", "replacement": "skillable"}]
    assert rules_jobs() == {"skillable"}, "the rules select the job the ServiceMonitor produces"
    assert "metricRelabelings" not in endpoint
    min_poll = config_of(rendered)["skillable"]["min_poll_interval"]
    assert 0 < min_poll < 30, "a little below the interval, so an HA pair shares polls"


def test_servicemonitor_follows_the_telemetry_path():
    rendered = render({"serviceMonitor": {"enabled": True}, "config": {"web": {"telemetry_path": "/x/metrics"}}})
    assert at(rendered.one("ServiceMonitor"), "spec.endpoints[0].path") == "/x/metrics"
    test_pod_env = {e["name"]: e["value"] for e in rendered.one("Pod")["spec"]["containers"][0]["env"]}
    assert test_pod_env["METRICS_PATH"] == "/x/metrics"


def test_one_servicemonitor_per_account_on_probe(every_toggle):
    accounts = [a["name"] for a in values_file("all-toggles-values.yaml")["config"]["accounts"]]
    monitors = {m["metadata"]["name"]: m for m in every_toggle.of("ServiceMonitor")}
    assert set(monitors) == {FULLNAME, *(f"{FULLNAME}-{a}" for a in accounts)}
    for account in accounts:
        (endpoint,) = monitors[f"{FULLNAME}-{account}"]["spec"]["endpoints"]
        assert endpoint["path"] == "/probe"
        assert endpoint["params"] == {"account": [account]}
        assert {"action": "replace", "targetLabel": "account", "replacement": account} in endpoint["relabelings"]
        assert {"action": "replace", "targetLabel": "job", "replacement": "skillable"} in endpoint["relabelings"]
    # /metrics then keeps the exporter's own series only: no lab series scraped twice.
    (keep,) = at(monitors[FULLNAME], "spec.endpoints[0].metricRelabelings")
    assert keep["action"] == "keep" and keep["sourceLabels"] == ["__name__"]
    pattern = re.compile(f"^(?:{keep['regex']})$")
    assert pattern.match("skillable_exporter_build_info") and pattern.match("process_resident_memory_bytes")
    assert not pattern.match("skillable_up") and not pattern.match("skillable_lab_instances_started_total")


def test_per_account_monitors_need_accounts_and_names_that_fit_an_object():
    assert "needs config.accounts" in render_error({"serviceMonitor": {"perAccount": {"enabled": True}}})
    clash = {"serviceMonitor": {"perAccount": {"enabled": True}}, "config": {"accounts": [
        {"name": "EMEA_1", "api_key_file": f"{SECRET_DIR}/a"}, {"name": "emea-1", "api_key_file": f"{SECRET_DIR}/b"}]}}
    assert "both name the object" in render_error(clash)
    upper = render({"serviceMonitor": {"perAccount": {"enabled": True}},
                    "config": {"accounts": [{"name": "EMEA.West", "api_key_file": f"{SECRET_DIR}/a"}]}})
    (monitor,) = upper.of("ServiceMonitor")
    assert monitor["metadata"]["name"] == f"{FULLNAME}-emea-west"
    assert at(monitor, "spec.endpoints[0].params") == {"account": ["EMEA.West"]}


# --------------------------------------------------------------------------
# The shipped rules and dashboards, as they are now


def test_chart_reads_the_shipped_rules_and_dashboards_through_links():
    """No copies in the chart: files/ links to the shipped directories, which Helm reads at
    render and package time. A copy committed in their place would go stale."""
    assert os.readlink(CHART / "files" / "rules") == "../../../../prometheus/rules"
    assert os.readlink(CHART / "files" / "dashboards") == "../../../../grafana/dashboards"


def test_prometheusrules_carry_every_rules_file_unchanged(every_toggle):
    rules = {o["metadata"]["name"]: o for o in every_toggle.of("PrometheusRule")}
    expected = {f"{FULLNAME}-{p.stem.removeprefix('skillable-')}": p for p in RULES}
    assert set(rules) == set(expected)
    for name, path in expected.items():
        assert rules[name]["spec"] == yaml.safe_load(path.read_text()), f"{name} differs from {path.name}"
        assert rules[name]["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_dashboard_configmaps_carry_every_dashboard_unchanged(every_toggle):
    maps = [o for o in every_toggle.of("ConfigMap") if "grafana_dashboard" in o["metadata"].get("labels", {})]
    carried = {}
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "Skillable"}
        assert config_map["metadata"]["namespace"] == "grafana"
        (key, text), = config_map["data"].items()
        carried[key] = text
        assert len(json.dumps(config_map).encode()) < 256 * 1024, "client-side kubectl apply limit"
    assert carried == {p.name: p.read_text() for p in DASHBOARDS}


def test_sidecar_label_is_configurable():
    rendered = render({"dashboards": {"enabled": True, "label": "grafana_dashboard_skillable", "labelValue": "yes"}})
    labels = [o["metadata"]["labels"] for o in rendered.of("ConfigMap") if "dashboard" in o["metadata"]["name"]]
    assert len(labels) == len(DASHBOARDS)
    assert all(ls["grafana_dashboard_skillable"] == "yes" and "grafana_dashboard" not in ls for ls in labels)


def test_the_packaged_chart_carries_the_shipped_files(tmp_path, every_toggle):
    archive = Path(helm.package(CHART, destination=tmp_path))
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert not any(m.issym() or m.islnk() for m in members.values()), "links resolved into files"
        for path in [*RULES, *DASHBOARDS]:
            inside = f"skillable-exporter/files/{path.parent.name}/{path.name}"
            assert tar.extractfile(members[inside]).read() == path.read_bytes(), inside
        assert not any("/ci/" in name for name in members), ".helmignore keeps the CI values out"
    with helm.Chart.load(archive) as chart:
        manifests = chart.render(values_file("all-toggles-values.yaml"), name=RELEASE, namespace=NAMESPACE)
    objects = [d for p, t in sorted(manifests.items()) if not p.endswith("NOTES.txt")
               for d in yaml.safe_load_all(t) if d]
    assert objects == every_toggle.objects


# --------------------------------------------------------------------------
# The kustomize base and the chart describe the same exporter


KUSTOMIZE_HASH = re.compile(r"^(skillable-exporter-config)-[a-z0-9]{10}$")


def comparable(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """The objects keyed by kind and name, without what differs by design: Helm's and kustomize's
    labels, selectors and annotations of the pod template (checksums), namespaces, and the hash
    suffix kustomize gives the config map."""
    out: dict[tuple[str, str], Any] = {}
    for obj in json.loads(json.dumps(objects)):
        name = KUSTOMIZE_HASH.sub(r"\1", obj["metadata"]["name"])
        labels = obj["metadata"].get("labels", {})
        meta = {"sidecar": labels.get("grafana_dashboard"), "annotations": obj["metadata"].get("annotations")}
        body = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
        spec = body.get("spec", {})
        if obj["kind"] in ("Deployment", "Service", "ServiceMonitor"):
            spec.pop("selector", None)
            spec.pop("namespaceSelector", None)
            spec.get("template", {}).pop("metadata", None)
        if obj["kind"] == "Deployment":
            pod = spec["template"]["spec"]
            pod["volumes"].sort(key=lambda v: v["name"])  # a kustomize patch reorders them
            for volume in pod["volumes"]:
                if "configMap" in volume:
                    volume["configMap"]["name"] = KUSTOMIZE_HASH.sub(r"\1", volume["configMap"]["name"])
        if "config.yaml" in body.get("data", {}):
            body["data"]["config.yaml"] = yaml.safe_load(body["data"]["config.yaml"])
        out[(obj["kind"], name)] = {"meta": meta, **body}
    return out


PARITY = {"fullnameOverride": "skillable-exporter", "persistence": {"enabled": False},
          "serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
          "dashboards": {"enabled": True}, "testFramework": {"enabled": False}}


@pytest.mark.parametrize("directory, values", [
    ("deploy/kubernetes", {}),
    ("deploy/examples/persistent-state", {"persistence": {"enabled": True}}),
    ("deploy/examples/demo", {"demo": True}),
], ids=["base", "persistent-state", "demo"])
def test_chart_and_kustomize_render_the_same_exporter(directory, values):
    """Either side changing alone fails this: the Deployment's pod (args, env, probes, security,
    resources, volumes), the Service, the ServiceMonitor, the config, the rules and dashboards."""
    base = comparable([d for d in yaml.safe_load_all(kustomize(ROOT / directory)) if d])
    chart = comparable(render({**PARITY, **values}).objects)
    assert sorted(chart) == sorted(base)
    for key in base:
        if chart[key] != base[key]:
            lines = [json.dumps(side[key], indent=1, sort_keys=True).splitlines() for side in (base, chart)]
            diff = "\n".join(difflib.unified_diff(*lines, directory, "chart", lineterm=""))
            pytest.fail(f"{key} differs between {directory} and the chart:\n{diff}")


# --------------------------------------------------------------------------
# The `helm test` hook


def hook_script(rendered: Rendered) -> tuple[list[str], dict[str, str]]:
    pod = rendered.one("Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == rendered.container["image"], "runs in the exporter's own image"
    assert container["securityContext"] == rendered.container["securityContext"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["EXPORTER_URL"] == f"http://{FULLNAME}.{NAMESPACE}.svc:10180"
    return [*container["command"], *container["args"]], env


def test_hook_can_be_turned_off():
    assert not render({"testFramework": {"enabled": False}}).of("Pod")


def test_hook_passes_against_a_running_exporter_and_fails_on_a_bad_key(defaults, run_exporter, fake):
    command, env = hook_script(defaults)
    assert command[:2] == ["python3", "-c"]
    script = [sys.executable, "-c", command[2]]  # the same code, this test's Python
    demo = run_exporter("--demo")
    ok = subprocess.run(script, env={**env, "EXPORTER_URL": demo.url, "TIMEOUT_SECONDS": "20"},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("OK: 1 account(s) up")

    fake.state.api_key = "the-right-key"
    wrong = run_exporter("--skillable.min-poll-interval=0", env={"SKILLABLE_API_URL": fake.url,
                                                                 "SKILLABLE_API_KEY": "a-wrong-key"})
    bad = subprocess.run(script, env={**env, "EXPORTER_URL": wrong.url, "TIMEOUT_SECONDS": "1"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stdout.startswith(f"FAIL: {wrong.url}/metrics: down: (single account)"), bad.stdout
