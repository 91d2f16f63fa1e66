"""docker/compose.yaml: the Compose Specification schema and what the stack relies on.

The schema is vendored (tests/deploy/schemas/compose-spec.json, see README.md there): no
network at test time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers import deploy_files as deploy

SCHEMA_PATH = Path(__file__).parent / "schemas" / "compose-spec.json"
SERVER_SERVICES = ["hingeloss", "hingeloss-gpu"]


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_vendored_schema_is_the_recorded_one() -> None:
    """The schema file is a verbatim copy; its hash is recorded with its provenance."""
    readme = (SCHEMA_PATH.parent / "README.md").read_text(encoding="utf-8")
    recorded = re.search(r"sha256\s+([0-9a-f]{64})", readme)
    assert recorded, "schemas/README.md records no sha256"
    assert hashlib.sha256(SCHEMA_PATH.read_bytes()).hexdigest() == recorded.group(1)


def _errors(validator: jsonschema.Draft7Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_file_matches_the_compose_spec(
    compose: dict[str, Any], compose_validator: jsonschema.Draft7Validator
) -> None:
    assert _errors(compose_validator, compose) == []


def test_compose_schema_rejects_a_broken_file(
    compose: dict[str, Any], compose_validator: jsonschema.Draft7Validator
) -> None:
    """The schema is strict enough to matter: a misspelt key and a bad condition fail."""
    broken = copy.deepcopy(compose)
    broken["services"]["hingeloss"]["healthchek"] = broken["services"]["hingeloss"]["healthcheck"]
    broken["services"]["prometheus"]["depends_on"]["hingeloss"]["condition"] = "healthy"
    assert len(_errors(compose_validator, broken)) >= 2


def test_service_healthy_dependencies_have_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    waited_on = 0
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            continue
        for dependency, spec in depends_on.items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            if spec.get("condition") == "service_healthy":
                waited_on += 1
                check = services[dependency].get("healthcheck")
                assert check, f"{name} waits for {dependency} to be healthy: no healthcheck"
                assert not check.get("disable"), f"{dependency}: healthcheck disabled"
                assert check["test"][0] in {"CMD", "CMD-SHELL"}
    assert compose["services"]["prometheus"]["depends_on"]["hingeloss"] == {
        "condition": "service_healthy"
    }
    assert waited_on >= 1


def test_bind_mounts_exist(compose: dict[str, Any]) -> None:
    """Prometheus and Grafana mount folders of this repository: they must be there."""
    mounted = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith((".", "/")):
                path = (deploy.DOCKER_DIR / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                mounted += 1
    assert mounted >= 3


def test_builds_name_existing_dockerfile_stages(compose: dict[str, Any]) -> None:
    for name in SERVER_SERVICES:
        build = compose["services"][name]["build"]
        context = (deploy.DOCKER_DIR / build["context"]).resolve()
        assert context == deploy.REPO_ROOT
        dockerfile = deploy.parse_dockerfile(context / build["dockerfile"])
        assert build["target"] in {stage.name for stage in dockerfile.stages}


@pytest.mark.parametrize("name", SERVER_SERVICES)
def test_server_services(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    # Scale-friendly: no fixed host port (replicas would collide); loopback only.
    for port in service.get("ports", []):
        text = port if isinstance(port, str) else f"{port.get('published', '')}"
        parts = text.split(":")
        message = f"{name}: publish `127.0.0.1::PORT` (random host port), not {text}"
        assert len(parts) == 3, message
        assert parts[0] == "127.0.0.1", message
        assert parts[1] == "", message
    assert {"50051", "9090"} <= {str(p) for p in service["expose"]}
    env = service["environment"]
    assert env["HINGELOSS_PORT"] == "50051"
    assert env["HINGELOSS_METRICS_PORT"] == "9090"
    assert service["healthcheck"]["test"][:2] == ["CMD", "hingeloss-health"]
    assert "127.0.0.1:50051" in service["healthcheck"]["test"]
    grace = _seconds(service["stop_grace_period"])
    shutdown = int(env["HINGELOSS_SHUTDOWN_DELAY_SECONDS"]) + int(env["HINGELOSS_DRAIN_SECONDS"])
    assert grace > shutdown, f"{name}: stop_grace_period {grace}s <= shutdown {shutdown}s"


def test_gpu_service_reserves_an_nvidia_gpu_under_its_profile(compose: dict[str, Any]) -> None:
    service = compose["services"]["hingeloss-gpu"]
    assert service["profiles"] == ["gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count") for d in devices
    )
    assert service["environment"]["HINGELOSS_DEVICES"] == "auto"
    assert "profiles" not in compose["services"]["hingeloss"]


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "grafana"):
        image = compose["services"][name]["image"]
        assert re.search(r":v?\d+\.\d+\.\d+$", image), f"{name}: pin {image} to a version"


def test_prometheus_scrapes_every_server_service(compose: dict[str, Any]) -> None:
    config = deploy.load_yaml(deploy.DOCKER_DIR / "prometheus" / "prometheus.yml")
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                scraped[dns_name] = sd["port"]
    for name in SERVER_SERVICES:
        port = int(compose["services"][name]["environment"]["HINGELOSS_METRICS_PORT"])
        assert scraped.get(name) == port, f"Prometheus does not scrape {name}:{port}"


def test_grafana_provisioning_matches_the_stack(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    provider = deploy.load_yaml(
        deploy.DOCKER_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
    )["providers"][0]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = deploy.load_yaml(
        deploy.DOCKER_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
    )["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` where a Compose binary exists (no engine needed)."""
    compose_binary = deploy.find_tool("docker-compose")
    docker = deploy.find_tool("docker")
    if compose_binary:
        command = [compose_binary]
    elif docker and deploy.run_tool([docker, "compose", "version"]).returncode == 0:
        command = [docker, "compose"]
    else:
        pytest.skip("no Docker Compose binary here; the JSON schema test covers the file")
    for profile in ([], ["--profile", "gpu"]):
        result = deploy.run_tool(
            [*command, "-f", "docker/compose.yaml", *profile, "config", "--quiet"]
        )
        assert result.returncode == 0, result.stderr


def _seconds(duration: str) -> float:
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(value) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total
