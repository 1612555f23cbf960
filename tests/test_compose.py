"""deploy/compose.yaml, checked for structure (no Docker engine here; with one, `docker compose config`
checks it too): persistence, healthchecks, KV events end to end, and Grafana provisioned with every
dashboard under deploy/grafana/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from policies.schema import load_policy

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KV_EVENTS = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv-events"}
SIMS = {"fast-0": "fast", "balanced-0": "balanced", "long-0": "long"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a named volume, or a path resolved against deploy/)."""
    out = {}
    for spec in service.get("volumes", []):
        src, dst = spec.split(":")[:2]
        out[dst] = str((DEPLOY / src).resolve()) if src.startswith((".", "/")) else src
    return out


def test_every_service_has_a_healthcheck() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "tiergate", "prometheus", "grafana", *SIMS}
    for name, svc in services.items():
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD" and len(test) > 1, name
    router = services["tiergate"]
    assert "/ready" in router["healthcheck"]["test"][-1]
    assert all(router["depends_on"][dep] == {"condition": "service_healthy"} for dep in ("redis", *SIMS))


def test_redis_appends_to_a_volume_and_the_router_journal_has_one() -> None:
    doc = compose()
    redis, router = doc["services"]["redis"], doc["services"]["tiergate"]
    assert flag(redis["command"], "--appendonly") == "yes"
    assert mounts(redis)[flag(redis["command"], "--dir")] in doc["volumes"]
    assert mounts(router)[router["environment"]["TIERGATE_DATA_DIR"]] in doc["volumes"]
    assert router["environment"]["TIERGATE_REDIS_URL"].startswith("redis://redis:6379/")
    # SIGTERM drains for TIERGATE_DRAIN_TIMEOUT_S (30 s by default) + up to 5 s for cut streams' events
    assert int(router["stop_grace_period"].removesuffix("s")) > 30 + 5


def test_simulators_publish_kv_events_the_policy_subscribes_to() -> None:
    doc = compose()
    router = doc["services"]["tiergate"]
    policy_path = Path(router["environment"]["TIERGATE_POLICY_PATH"])
    source = Path(mounts(router)[str(policy_path.parent)])
    policy = load_policy(source / policy_path.name)          # the router's own validation
    for service, tier in SIMS.items():
        command = doc["services"][service]["command"]
        assert command[:2] == ["tiergate", "sim"]
        assert json.loads(flag(command, "--kv-events-config")) == KV_EVENTS
        assert flag(command, "--served-model-name") == policy.tiers[tier].model
        (inst,) = policy.tiers[tier].instances
        assert inst.url == f"http://{service}:{flag(command, '--port')}"
        assert inst.kv_events == f"tcp://{service}:5557"


def test_grafana_is_provisioned_with_every_dashboard_json() -> None:
    grafana = compose()["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning = Path(volumes["/etc/grafana/provisioning"])
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert (datasource["type"], datasource["url"]) == ("prometheus", "http://prometheus:9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tiergate.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    # the provider reads the whole deploy/grafana/ folder, so a dashboard added there is loaded too
    assert Path(volumes[provider["options"]["path"]]) == (DEPLOY / "grafana").resolve()
    dashboards = sorted((DEPLOY / "grafana").rglob("*.json"))
    assert dashboards
    # Grafana loads one dashboard per uid: two files with the same uid would hide one of them
    uids = [json.loads(p.read_text())["uid"] for p in dashboards]
    assert len(set(uids)) == len(uids), uids


def has_docker_compose() -> bool:
    docker = shutil.which("docker")
    return docker is not None and subprocess.run([docker, "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0


@pytest.mark.skipif(not has_docker_compose(), reason="no `docker compose` here: the structure is checked above")
def test_docker_compose_accepts_the_file() -> None:
    subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], check=True, timeout=60)
