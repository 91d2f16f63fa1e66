"""docker/k8s: offline schema validation of the base and the rendered overlays, plus the
invariants the schemas cannot see (probe ports, shutdown timing, GPU requests = limits).

There is no kustomize here, so `render` below implements the few Kustomization fields these
files use (resources, namespace, labels without selectors, images, strategic-merge patches by
path) and refuses any other, so that a new field cannot be silently ignored. Where `kustomize`
or `kubectl` is installed, the real renderer's output is validated too.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helpers import deploy_files as deploy

K8S_DIR = Path(__file__).resolve().parents[2] / "docker" / "k8s"
KUBERNETES_VERSION = "1.30"
OVERLAYS = ["cpu", "gpu"]
BASE_FILES = sorted(p.name for p in (K8S_DIR / "base").glob("*.yaml"))
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
SUPPORTED_KUSTOMIZATION = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "patches",
}
# Strategic-merge keys of the lists these patches touch; other lists are replaced, as
# kustomize does for lists without a merge key (tolerations, HPA metrics).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for name, value in patch.items():
            assert not str(name).startswith("$"), f"patch directive {name} is not supported"
            if value is None:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = _merge(merged[name], value, name)
            else:
                merged[name] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged_list = copy.deepcopy(base)
        for item in patch:
            index = next(
                (i for i, old in enumerate(merged_list) if old[merge_key] == item[merge_key]),
                None,
            )
            if index is None:
                merged_list.append(copy.deepcopy(item))
            else:
                merged_list[index] = _merge(merged_list[index], item)
        return merged_list
    return copy.deepcopy(patch)


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    template = obj.get("spec", {}).get("template")
    return [template["spec"]] if template else []


def render(directory: Path) -> list[dict[str, Any]]:
    """Renders a Kustomization directory (the subset of kustomize these files use)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - SUPPORTED_KUSTOMIZATION
    assert not unsupported, f"{directory}: the test renderer does not know {unsupported}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = directory / resource
        objects.extend(render(path) if path.is_dir() else _load_all(path))
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, f"only `patches: - path:` is supported: {patch_ref}"
        for patch in _load_all(directory / patch_ref["path"]):
            targets = [
                i
                for i, obj in enumerate(objects)
                if (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
                == (patch["apiVersion"], patch["kind"], patch["metadata"]["name"])
            ]
            assert len(targets) == 1, f"patch {patch_ref['path']} matches {len(targets)} objects"
            objects[targets[0]] = _merge(objects[targets[0]], patch)
    for label in kustomization.get("labels", []):
        assert not label.get("includeSelectors"), "selector labels are not supported"
        assert not label.get("includeTemplates"), "template labels are not supported"
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for obj in objects:
            for spec in _pod_specs(obj):
                for container in spec["containers"]:
                    name = re.split(r"[:@]", container["image"])[0]
                    if name == image["name"]:
                        new = image.get("newName", name)
                        container["image"] = f"{new}:{image['newTag']}"
    if "namespace" in kustomization:
        for obj in objects:
            assert obj["kind"] != "Namespace", "kustomize renames a Namespace: not supported"
            obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S_DIR / "base")


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="module")
def monitoring() -> list[dict[str, Any]]:
    return render(K8S_DIR / "monitoring")


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objects if obj["kind"] == kind]
    return found


def _validate(obj: dict[str, Any]) -> None:
    """Strict (unknown fields rejected) offline validation against Kubernetes' schemas."""
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")


@pytest.mark.parametrize("filename", BASE_FILES)
def test_base_file_validates(filename: str) -> None:
    for obj in _load_all(K8S_DIR / "base" / filename):
        if obj["kind"] == "Kustomization" or (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no schema offline: rendered and checked by the tests below
        _validate(obj)


def test_prometheus_adapter_config_map_validates() -> None:
    for obj in _load_all(K8S_DIR / "prometheus-adapter" / "prometheus-adapter-rules.yaml"):
        _validate(obj)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates(
    overlays: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    kinds = [obj["kind"] for obj in overlays[overlay]]
    # No custom resource: the overlays apply to a cluster without any operator's CRDs.
    # No Namespace either: `kubectl delete -k` would delete everything else in it.
    assert sorted(kinds) == sorted(
        [
            "Deployment",
            "Service",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
        ]
    )
    for obj in overlays[overlay]:
        assert obj["metadata"]["namespace"] == "hingeloss"
        _validate(obj)


def test_the_monitoring_kustomization_holds_the_pod_monitor_alone(
    monitoring: list[dict[str, Any]],
) -> None:
    assert [(obj["kind"], obj["metadata"]["namespace"]) for obj in monitoring] == [
        ("PodMonitor", "hingeloss")
    ]


def test_strict_validation_rejects_unknown_fields(base: list[dict[str, Any]]) -> None:
    """The validator is really strict: a misplaced field fails."""
    deployment = copy.deepcopy(_one(base, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 50051}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_are_grpc_on_the_grpc_port(
    overlays: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    container = _container(_one(overlays[overlay], "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9090}
    env = _env(container)
    assert int(env["HINGELOSS_PORT"]) == ports["grpc"]
    assert int(env["HINGELOSS_METRICS_PORT"]) == ports["metrics"]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe_name
        assert probe["grpc"]["port"] == ports["grpc"], f"{probe_name} probes another port"
        assert isinstance(probe["grpc"]["port"], int)
    assert container["livenessProbe"]["grpc"].get("service", "") == ""
    assert container["readinessProbe"]["grpc"]["service"] == "hingeloss.v1.LossService"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "warm-up budget"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_shutdown_delay_and_drain(
    overlays: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    deployment = _one(overlays[overlay], "Deployment")
    env = _env(_container(deployment))
    shutdown = int(env["HINGELOSS_SHUTDOWN_DELAY_SECONDS"]) + int(env["HINGELOSS_DRAIN_SECONDS"])
    assert int(env["HINGELOSS_SHUTDOWN_DELAY_SECONDS"]) >= 1, "let endpoints drop the pod first"
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > shutdown


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_security(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    spec = _one(overlays[overlay], "Deployment")["spec"]["template"]["spec"]
    container = _container(_one(overlays[overlay], "Deployment"))
    security = container["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    # The pod's uid is the image's USER, so file ownership inside the image matches.
    dockerfile = deploy.parse_dockerfile(deploy.DOCKER_DIR / "Dockerfile", overlay)
    image_uid = int(dockerfile.final.all("USER")[-1].args.split(":")[0])
    assert spec["securityContext"]["runAsUser"] == image_uid
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "a writable /tmp on a read-only root"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_overlay_images(overlays: dict[str, list[dict[str, Any]]]) -> None:
    assert _container(_one(overlays["cpu"], "Deployment"))["image"] == "hingeloss:cpu"
    assert _container(_one(overlays["gpu"], "Deployment"))["image"] == "hingeloss:cuda"


def test_gpu_overlay_requests_a_whole_gpu(overlays: dict[str, list[dict[str, Any]]]) -> None:
    deployment = _one(overlays["gpu"], "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    resources = _container(deployment)["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    assert resources["requests"]["nvidia.com/gpu"] == gpus
    assert isinstance(gpus, int)
    assert gpus >= 1
    assert spec["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert _env(_container(deployment))["HINGELOSS_DEVICES"] == "auto"
    cpu = _container(_one(overlays["cpu"], "Deployment"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert _env(cpu)["HINGELOSS_DEVICES"] == "cpu"


def test_services_select_the_server_pods(base: list[dict[str, Any]]) -> None:
    deployment = _one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    services = {s["metadata"]["name"]: s for s in base if s["kind"] == "Service"}
    headless = services["hingeloss-headless"]["spec"]
    assert headless["clusterIP"] == "None"
    assert [(p["port"], p["targetPort"]) for p in headless["ports"]] == [(50051, 50051)]
    service = services["hingeloss"]
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {50051, 9090}
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9090"
    for spec in (headless, service["spec"]):
        assert spec["selector"].items() <= pod_labels.items()
    pdb = _one(base, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_pod_monitor_scrapes_the_metrics_port(
    base: list[dict[str, Any]], monitoring: list[dict[str, Any]]
) -> None:
    """kubernetes-validate has no PodMonitor schema: check what matters by hand."""
    monitor = _one(monitoring, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    deployment = _one(base, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container(deployment)["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_hpa_metric_is_served_by_the_adapter_rule(
    overlays: dict[str, list[dict[str, Any]]],
    metric_names_file: list[str],
) -> None:
    (adapter,) = _load_all(K8S_DIR / "prometheus-adapter" / "prometheus-adapter-rules.yaml")
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {}
    for rule in rules:
        query = re.match(r"\s*([a-zA-Z_:][\w:]*)", rule["seriesQuery"])
        assert query, f"no series in {rule['seriesQuery']!r}"
        series = query.group(1)
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for overlay in OVERLAYS:
        hpa = _one(overlays[overlay], "HorizontalPodAutoscaler")
        deployment = _one(overlays[overlay], "Deployment")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "Pods"
            name = metric["pods"]["metric"]["name"]
            assert name in served, f"no prometheus-adapter rule serves {name}"
            assert served[name] in metric_names_file


def _normalized(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects in a stable order, with merge-keyed lists sorted (their order is not meaning)."""

    def walk(value: Any, key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            items = [walk(v) for v in value]
            if key in MERGE_KEYS:
                items.sort(key=lambda item: item[MERGE_KEYS[key]])
            return items
        return value

    return sorted((walk(o) for o in objects), key=lambda o: (o["kind"], o["metadata"]["name"]))


def test_kustomize_agrees_with_the_test_renderer(
    overlays: dict[str, list[dict[str, Any]]],
    monitoring: list[dict[str, Any]],
) -> None:
    """Where kustomize (or kubectl) is installed, its output equals the renderer's above."""
    kustomize, kubectl = deploy.find_tool("kustomize"), deploy.find_tool("kubectl")
    if not (kustomize or kubectl):
        pytest.skip("neither kustomize nor kubectl installed; the test renderer covers overlays")
    ours = {f"overlays/{name}": objects for name, objects in overlays.items()}
    ours["monitoring"] = monitoring
    for folder, objects in ours.items():
        path = str(K8S_DIR / folder)
        if kustomize:
            command = [kustomize, "build", path]
        elif kubectl:  # one of the two, or the test has skipped
            command = [kubectl, "kustomize", path]
        result = deploy.run_tool(command)
        assert result.returncode == 0, result.stderr
        rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        assert _normalized(rendered) == _normalized(objects), folder
