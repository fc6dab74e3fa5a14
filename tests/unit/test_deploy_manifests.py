"""The deployment files stay valid without a cluster, a Docker engine or the network.

- Every Kubernetes manifest under `deploy/k8s` validates against the Kubernetes API schemas that
  `kubernetes-validate` bundles (strict: an unknown field is an error), for the oldest Kubernetes
  version we support and the newest one it knows.
- `kustomize` is not a Python package, so the kustomizations are not rendered; instead every
  file they name exists, every patch, image and replica count targets a resource of the tree it
  builds on, and the overlay's JSON 6902 patches applied to those resources still validate.
- The pods keep their security and operability settings; every setting is a `CQRS_*` field.
- The Grafana dashboard and the Prometheus alerts use only the metrics the services export.
- docker-compose mounts files that exist; the image's health check matches the probes.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from command_service.settings import CommandServiceSettings
from cqrs_runtime.settings import CommonSettings
from query_service.settings import QueryServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATION_DIRS = [BASE, *OVERLAYS]

# The oldest Kubernetes minor version the manifests promise to work on, and the newest the
# validator knows (policy/v1 and autoscaling/v2 are GA in both).
OLDEST_KUBERNETES = "1.28"
KUBERNETES_VERSIONS = [OLDEST_KUBERNETES, kubernetes_validate.utils.latest_version()]

# Manifests no kustomization names on purpose.
UNREFERENCED = {BASE / "secret.example.yaml", BASE / "rabbitmq.example.yaml"}

UID = 10001  # the image's USER (scripts/docker/Dockerfile)
HTTP_PORT = 8000


Resource = dict[str, Any]


def _load_all(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _load_one(path: Path) -> Any:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _kustomization(directory: Path) -> dict[str, Any]:
    data = _load_one(directory / "kustomization.yaml")
    assert isinstance(data, dict)
    return data


def _patch_files() -> set[Path]:
    return {
        (directory / patch["path"]).resolve()
        for directory in KUSTOMIZATION_DIRS
        for patch in _kustomization(directory).get("patches", [])
        if "path" in patch
    }


def _manifest_files() -> list[Path]:
    patches = _patch_files()
    return sorted(
        path
        for path in K8S.rglob("*.yaml")
        if path.name != "kustomization.yaml" and path.resolve() not in patches
    )


def _resources(directory: Path) -> list[Resource]:
    """The resources a kustomization directory builds on, before any transformation."""
    found: list[Resource] = []
    for entry in _kustomization(directory).get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            found.extend(_resources(target))
        else:
            found.extend(_load_all(target))
    return found


def _key(resource: Resource) -> tuple[str, str, str]:
    return (resource["apiVersion"], resource["kind"], resource["metadata"]["name"])


def _by_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _validate(resource: Resource, version: str) -> None:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} at {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(e.message)


# --- Kubernetes schemas ---------------------------------------------------------------------


def test_the_validator_knows_the_oldest_supported_version() -> None:
    known = kubernetes_validate.utils.all_versions()
    assert any(v.startswith(OLDEST_KUBERNETES + ".") for v in known), known


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=_rel)
def test_manifest_is_valid_kubernetes(path: Path, version: str) -> None:
    documents = _load_all(path)
    assert documents, f"{_rel(path)} is empty"
    for resource in documents:
        assert {"apiVersion", "kind", "metadata"} <= resource.keys(), _rel(path)
        _validate(resource, version)


def test_every_manifest_is_part_of_a_kustomization() -> None:
    referenced = {
        (directory / entry).resolve()
        for directory in KUSTOMIZATION_DIRS
        for entry in _kustomization(directory).get("resources", [])
    }
    orphans = [_rel(p) for p in _manifest_files() if p.resolve() not in referenced | UNREFERENCED]
    assert not orphans, f"manifests no kustomization.yaml lists: {orphans}"


# --- kustomizations --------------------------------------------------------------------------

KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "labels",
    "images",
    "replicas",
    "patches",
}


@pytest.mark.parametrize("directory", KUSTOMIZATION_DIRS, ids=_rel)
def test_kustomization_names_existing_files(directory: Path) -> None:
    data = _kustomization(directory)
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    # Only the fields this test understands; a new one needs a check here too.
    assert set(data) <= KUSTOMIZATION_FIELDS, set(data) - KUSTOMIZATION_FIELDS
    for entry in data.get("resources", []):
        target = directory / entry
        assert target.is_file() or (target / "kustomization.yaml").is_file(), (
            f"{_rel(directory)}: resource {entry} does not exist"
        )
    for patch in data.get("patches", []):
        assert (directory / patch["path"]).is_file(), f"{_rel(directory)}: {patch['path']}"


@pytest.mark.parametrize("directory", KUSTOMIZATION_DIRS, ids=_rel)
def test_kustomization_targets_existing_resources(directory: Path) -> None:
    data = _kustomization(directory)
    resources = _resources(directory)
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for patch in data.get("patches", []):
        target = patch["target"]
        assert len(_targets(target, resources)) == 1, f"{_rel(directory)}: no target {target}"
    for replicas in data.get("replicas", []):
        assert ("Deployment", replicas["name"]) in names, replicas
        # The HPA owns the query service's count; a fixed one would fight it.
        hpa_targets = {
            h["spec"]["scaleTargetRef"]["name"]
            for h in resources
            if h["kind"] == "HorizontalPodAutoscaler"
        }
        assert replicas["name"] not in hpa_targets, replicas
    images = {c["image"].split(":")[0] for c in _containers(resources)}
    for image in data.get("images", []):
        assert image["name"] in images, f"{_rel(directory)}: no container uses {image['name']}"


def _targets(target: dict[str, str], resources: list[Resource]) -> list[Resource]:
    def matches(r: Resource) -> bool:
        group, _, version = str(r["apiVersion"]).rpartition("/")
        return (
            (r["kind"], r["metadata"]["name"]) == (target["kind"], target["name"])
            and group == target.get("group", group)
            and version == target.get("version", version)
        )

    return [r for r in resources if matches(r)]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _apply_json_patch(document: Any, operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add, replace and remove: what the overlays use."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node = document
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        index: int | str = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] in ("replace", "remove"):
            # Both need the target to exist: a typo in the path must not pass.
            assert index in node if isinstance(node, dict) else int(index) < len(node), op
        if op["op"] == "remove":
            del node[index]
        elif op["op"] == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(len(node) if index == "-" else int(index), copy.deepcopy(op["value"]))
        elif op["op"] == "add":
            node[index] = copy.deepcopy(op["value"])
        else:
            pytest.fail(f"unsupported patch operation {op['op']}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("directory", OVERLAYS, ids=_rel)
def test_overlay_patches_apply_and_stay_valid(directory: Path, version: str) -> None:
    data = _kustomization(directory)
    resources = copy.deepcopy(_resources(directory))
    for patch in data.get("patches", []):
        operations = _load_one(directory / patch["path"])
        assert isinstance(operations, list), f"{patch['path']}: expected JSON 6902 operations"
        for resource in _targets(patch["target"], resources):
            _apply_json_patch(resource, operations)
    for replicas in data.get("replicas", []):
        _by_kind(resources, "Deployment")[replicas["name"]]["spec"]["replicas"] = replicas["count"]
    for resource in resources:
        _validate(resource, version)


# --- what the pods must keep -----------------------------------------------------------------


def _base() -> list[Resource]:
    return _resources(BASE)


def _containers(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for deployment in _by_kind(resources, "Deployment").values():
        yield from deployment["spec"]["template"]["spec"]["containers"]


DEPLOYMENTS = {"command-service": "command_service", "query-service": "query_service"}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_runs_its_service_locked_down(name: str) -> None:
    deployment = _by_kind(_base(), "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == UID
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", DEPLOYMENTS[name]]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][kind].keys()
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": HTTP_PORT}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(HTTP_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_has_a_budget_and_a_service_that_select_its_pods(name: str) -> None:
    resources = _base()
    labels = _by_kind(resources, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    budget = _by_kind(resources, "PodDisruptionBudget")[name]
    assert selects(budget["spec"]["selector"]["matchLabels"])
    assert selects(_by_kind(resources, "Service")[name]["spec"]["selector"])


def test_query_api_is_autoscaled() -> None:
    resources = _base()
    hpa = _by_kind(resources, "HorizontalPodAutoscaler")["query-service"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "query-service")
    assert "replicas" not in _by_kind(resources, "Deployment")["query-service"]["spec"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def _setting_names(settings: type[CommonSettings]) -> set[str]:
    return {f"CQRS_{field.upper()}" for field in settings.model_fields}


def test_settings_are_cqrs_fields_and_secrets_exist() -> None:
    resources = _base()
    all_settings = _setting_names(CommandServiceSettings) | _setting_names(QueryServiceSettings)
    config_maps = _by_kind(resources, "ConfigMap")
    secrets = _by_kind(_load_all(BASE / "secret.example.yaml"), "Secret")
    for name, module in DEPLOYMENTS.items():
        settings = CommandServiceSettings if module == "command_service" else QueryServiceSettings
        (container,) = _by_kind(resources, "Deployment")[name]["spec"]["template"]["spec"][
            "containers"
        ]
        for source in container["envFrom"]:
            config_map = config_maps[source["configMapRef"]["name"]]
            # One ConfigMap serves both services: each reads its own keys and ignores the rest.
            assert set(config_map["data"]) <= all_settings, set(config_map["data"]) - all_settings
        for variable in container["env"]:
            assert variable["name"] in _setting_names(settings), variable["name"]
            ref = variable["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    for secret in secrets.values():
        assert set(secret["stringData"]) <= all_settings
        assert all("REPLACE_ME" in value for value in secret["stringData"].values())
    assert "CQRS_POSTGRES_MIGRATION_DSN" in secrets["cqrs-command-secrets"]["stringData"]
    assert config_maps["cqrs-config"]["data"]["CQRS_HTTP_PORT"] == str(HTTP_PORT)


# --- metrics: dashboard and alerts -----------------------------------------------------------

# The metrics the services export, with their labels. The dashboard and the alerts may use no
# other, so that a renamed metric fails here instead of leaving an empty panel.
COUNTERS = {
    "cqrs_commands_total": {"type", "outcome"},
    "cqrs_events_published_total": set(),
    "cqrs_events_projected_total": {"event_type"},
    "cqrs_duplicates_suppressed_total": set(),
    "cqrs_parked_events_total": set(),
    "cqrs_park_refused_total": set(),
}
GAUGES: dict[str, set[str]] = {
    "cqrs_relay_backlog_events": set(),
    "cqrs_partitions_owned": set(),
    "cqrs_projection_lag_events": set(),
    "cqrs_projection_lag_seconds": set(),
}
HISTOGRAMS = {
    "cqrs_command_handling_seconds": {"type"},
    "cqrs_event_append_seconds": set(),
    "cqrs_relay_publish_seconds": set(),
    "cqrs_http_request_seconds": {"method", "route", "status"},
}
OUTCOMES = {"accepted", "rejected", "duplicate", "dead_lettered", "requeued"}
# Labels Prometheus adds to every series, and a histogram's bucket bound.
TARGET_LABELS = {"instance", "job"}

SERIES: dict[str, tuple[str, set[str]]] = {
    **{name: (name, labels) for name, labels in {**COUNTERS, **GAUGES}.items()},
    **{
        f"{name}{suffix}": (name, labels | ({"le"} if suffix == "_bucket" else set()))
        for name, labels in HISTOGRAMS.items()
        for suffix in ("_bucket", "_sum", "_count")
    },
}

PROMQL_CALLS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "topk",
    "bottomk",
    "rate",
    "irate",
    "increase",
    "delta",
    "deriv",
    "histogram_quantile",
    "clamp_min",
    "clamp_max",
    "abs",
    "absent",
    "max_over_time",
    "min_over_time",
    "avg_over_time",
    "vector",
    "time",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def _metric_names(expr: str) -> set[str]:
    """The series names an expression reads; fails on anything it cannot account for."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, [$__rate_interval] included
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers, checked by _check_labels
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names: set[str] = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call:
            assert word in PROMQL_CALLS, f"unknown function {word} in: {expr}"
        elif word not in PROMQL_KEYWORDS:
            assert word in SERIES, f"unknown metric {word} in: {expr}"
            names.add(word)
    return names


def _check_labels(expr: str) -> None:
    used = _metric_names(expr)
    assert used, f"reads no cqrs metric: {expr}"
    for match in re.finditer(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
        series, matchers = match.groups()
        allowed = SERIES[series][1]
        for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', matchers):
            assert label in allowed | TARGET_LABELS, f"{series} has no label {label}: {expr}"
            if label == "outcome":
                assert set(value.split("|")) <= OUTCOMES, f"unknown outcome {value}: {expr}"
    labels = set().union(*(SERIES[name][1] for name in used)) | TARGET_LABELS
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in filter(None, (g.strip() for g in grouping.split(","))):
            assert label in labels, f"grouping by {label}, which no metric has: {expr}"


def _dashboard() -> dict[str, Any]:
    with (DEPLOY / "grafana" / "dashboards" / "cqrs.json").open(encoding="utf-8") as f:
        data = json.load(f)
    assert isinstance(data, dict)
    return data


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]


def _alert_rules() -> list[dict[str, Any]]:
    data = _load_one(DEPLOY / "prometheus" / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_promql_checker_catches_unknown_names() -> None:
    _check_labels('sum by (outcome) (rate(cqrs_commands_total{outcome="accepted"}[5m]))')
    with pytest.raises(AssertionError, match="unknown metric"):
        _metric_names("rate(cqrs_command_total[5m])")
    with pytest.raises(AssertionError, match="no label"):
        _check_labels('rate(cqrs_commands_total{result="accepted"}[5m])')
    with pytest.raises(AssertionError, match="unknown outcome"):
        _check_labels('rate(cqrs_commands_total{outcome=~"accepted|refused"}[5m])')
    with pytest.raises(AssertionError, match="grouping by"):
        _check_labels("sum by (route) (rate(cqrs_commands_total[5m]))")


def test_dashboard_uses_only_exported_metrics() -> None:
    exprs = _dashboard_exprs()
    assert exprs
    for expr in exprs:
        _check_labels(expr)
    used = {SERIES[name][0] for expr in exprs for name in _metric_names(expr)}
    missing = (set(COUNTERS) | set(GAUGES) | set(HISTOGRAMS)) - used
    assert not missing, f"metrics no panel shows: {sorted(missing)}"


def test_dashboard_reads_the_provisioned_datasource() -> None:
    provisioned = _load_one(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = provisioned["datasources"]
    uids = {
        target["datasource"]["uid"]
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    }
    assert uids == {datasource["uid"]}
    provider = _load_one(DEPLOY / "grafana" / "provisioning" / "dashboards" / "cqrs.yml")
    mounts = dict(
        volume.split(":")[:2]
        for volume in _load_one(ROOT / "docker-compose.yml")["services"]["grafana"]["volumes"]
    )
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    ids = [panel["id"] for panel in _panels(_dashboard()["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_alerts_use_only_exported_metrics() -> None:
    rules = _alert_rules()
    assert rules
    for rule in rules:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
        _check_labels(rule["expr"])


def test_prometheus_scrapes_both_services() -> None:
    config = _load_one(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for service in DEPLOYMENTS:
        job = jobs[service]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service]
        assert sd["port"] == HTTP_PORT
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / Path(rule_file).name).is_file(), rule_file


# --- docker-compose and the image ------------------------------------------------------------


def test_compose_observability_profile_mounts_existing_files() -> None:
    compose = _load_one(ROOT / "docker-compose.yml")
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
    for name in DEPLOYMENTS:
        service = services[name]
        assert service["environment"]["CQRS_HTTP_PORT"] == str(HTTP_PORT)
        assert f"http://127.0.0.1:{HTTP_PORT}/healthz" in " ".join(service["healthcheck"]["test"])


def test_image_health_check_and_user_match_the_pods() -> None:
    dockerfile = (ROOT / "scripts" / "docker" / "Dockerfile").read_text(encoding="utf-8")
    (healthcheck,) = re.findall(r"^HEALTHCHECK (?:.*\\\n)*.*", dockerfile, re.MULTILINE)
    assert "/healthz" in healthcheck
    assert "CQRS_HTTP_PORT" in healthcheck
    assert re.search(rf"^USER {UID}:{UID}$", dockerfile, re.MULTILINE)
