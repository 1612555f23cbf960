"""deploy/k8s: each overlay renders (`kubectl kustomize`), every object is valid Kubernetes 1.32 (strict
schemas: unknown fields fail), and the properties the router depends on hold."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from policies.schema import parse_policy

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("sim", "vllm")
K8S_VERSION = "1.32.0"          # the kubectl on CI; the schemas come with kubernetes-validate
NAMESPACE = "tiergate"
KV_EVENTS = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557", "topic": "kv-events"}
CLUSTER_SCOPED = {"Namespace"}
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with kustomize) is not installed")

Obj = dict[str, Any]


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def objects(overlay: str, kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in render(overlay) if o["kind"] == kind}


def one(overlay: str, kind: str, name: str) -> Obj:
    found = objects(overlay, kind)
    assert name in found, f"{overlay}: no {kind} {name}; have {sorted(found)}"
    return found[name]


def containers(workload: Obj) -> list[Obj]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def flags(args: list[str]) -> dict[str, str | None]:
    """`--a=b`, `--a b` and `--a` (then None) into {"--a": "b" | None}; positionals under their index."""
    out: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--"):
            nxt = args[i + 1] if i + 1 < len(args) else None
            out[arg] = None if nxt is None or nxt.startswith("--") else nxt
            i += out[arg] is not None
        else:
            out[str(i)] = arg
        i += 1
    return out


def env(container: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in container.get("env", [])}


def policy(overlay: str) -> Obj:
    data = one(overlay, "ConfigMap", "tiergate-policy")["data"]
    assert set(data) == {"policy.yaml"}
    loaded: Obj = yaml.safe_load(data["policy.yaml"])
    return loaded


def tier_workloads(overlay: str) -> dict[str, Obj]:
    """Tier name -> its Deployment (labelled tiergate.dev/tier)."""
    return {d["metadata"]["labels"]["tiergate.dev/tier"]: d for d in objects(overlay, "Deployment").values()
            if "tiergate.dev/tier" in d["metadata"]["labels"]}


def selects(selector: dict[str, str], workload: Obj) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_kubernetes(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Namespace", "PodDisruptionBudget",
                     "Secret", "Service", "ServiceAccount", "StatefulSet"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)   # raises with the failing path
        meta = doc["metadata"]
        assert meta["labels"]["app.kubernetes.io/part-of"] == "tiergate", (doc["kind"], meta["name"])
        if doc["kind"] not in CLUSTER_SCOPED:
            assert meta.get("namespace") == NAMESPACE, (doc["kind"], meta["name"])


def test_strict_validation_catches_an_unknown_field() -> None:
    """The validation above is strict: a misspelt field in a pod spec fails it."""
    router = json.loads(json.dumps(one("sim", "Deployment", "tiergate")))
    containers(router)[0]["readinesProbe"] = containers(router)[0].pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(router, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secret_and_configmap_references_resolve(overlay: str) -> None:
    """Every non-optional secretKeyRef names a rendered Secret holding that key (kustomize renames generated
    Secrets with a hash; a reference outside the generator's namespace would keep the bare name)."""
    secrets = objects(overlay, "Secret")
    refs = 0
    for workload in [*objects(overlay, "Deployment").values(), *objects(overlay, "StatefulSet").values()]:
        for c in containers(workload):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and not ref.get("optional"):
                    refs += 1
                    assert ref["name"] in secrets, (workload["metadata"]["name"], ref)
                    assert ref["key"] in secrets[ref["name"]]["data"]
    assert refs == {"sim": 1, "vllm": 4}[overlay]   # the router, and each vLLM tier
    assert list(objects(overlay, "ConfigMap")) == ["tiergate-policy"]   # stable name: updated in place


def test_vllm_tiers() -> None:
    tiers = tier_workloads("vllm")
    assert sorted(tiers) == ["balanced", "fast", "long"]
    (secret,) = objects("vllm", "Secret")
    models = {}
    for tier, deploy in tiers.items():
        (c,) = containers(deploy)
        image, _, tag = c["image"].rpartition(":")
        assert image == "vllm/vllm-openai" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), c["image"]
        assert c["command"] == ["vllm", "serve"]
        f = flags(c["args"])
        models[tier] = f["0"]
        kv = f["--kv-events-config"]
        assert kv is not None and json.loads(kv) == KV_EVENTS, tier
        assert f["--api-key"] == "$(VLLM_API_KEY)", tier
        assert env(c)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "VLLM_API_KEY"}
        assert "--enable-prefix-caching" in f, tier
        res = c["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == 1, tier
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}, tier
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"http": 8000, "kv-events": 5557}
        assert f["--port"] == "8000"
    assert models == {"fast": "Qwen/Qwen3-1.7B-FP8", "balanced": "Qwen/Qwen3-4B-Instruct-2507",
                      "long": "Qwen/Qwen3-4B-Instruct-2507"}
    balanced = flags(containers(tiers["balanced"])[0]["args"])
    assert (balanced["--dtype"], balanced["--quantization"], balanced["--kv-cache-dtype"]) == \
        ("bfloat16", "fp8", "fp8")
    long = flags(containers(tiers["long"])[0]["args"])
    assert long["--max-model-len"] == "262144" and "--enable-chunked-prefill" in long
    assert long["--gpu-memory-utilization"] == "0.9"
    assert long["--max-num-batched-tokens"] is not None and int(long["--max-num-batched-tokens"]) > 0


def test_sim_tiers() -> None:
    tiers = tier_workloads("sim")
    profiles = {}
    for tier, deploy in tiers.items():
        (c,) = containers(deploy)
        assert c["args"][:2] == ["tiergate", "sim"]
        f = flags(c["args"][2:])
        profiles[tier] = f["--profile"]
        kv = f["--kv-events-config"]
        assert kv is not None and json.loads(kv) == KV_EVENTS, tier
        assert f["--served-model-name"] == policy("sim")["tiers"][tier]["model"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert "nvidia.com/gpu" not in c["resources"].get("requests", {})
    assert profiles == {"fast": "qwen3-1.7b-fp8", "balanced": "qwen3-4b-mixed", "long": "qwen3-4b-256k"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_policy_tier_discovers_its_headless_service(overlay: str) -> None:
    pol = policy(overlay)
    services = objects(overlay, "Service")
    tiers = tier_workloads(overlay)
    assert sorted(pol["tiers"]) == sorted(tiers)
    for tier, spec in pol["tiers"].items():
        d = spec["discover"]
        assert set(d) == {"dns", "record", "port", "interval_s", "kv_events_port"}
        name, ns, rest = d["dns"].split(".", 2)
        assert (ns, rest, d["record"], d["port"], d["kv_events_port"]) == \
            (NAMESPACE, "svc.cluster.local", "A", 8000, 5557), tier
        assert spec["api_key_env"] == "VLLM_API_KEY"
        svc = services[name]["spec"]
        assert svc["clusterIP"] == "None", f"{name} must be headless: one A record per pod"
        assert selects(svc["selector"], tiers[tier]), f"{name} does not select the {tier} pods"
        assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["ports"]} == \
            {"http": (8000, "http"), "kv-events": (5557, "kv-events")}
        if overlay == "vllm":           # the router's view of each engine matches the engine
            f = flags(containers(tiers[tier])[0]["args"])
            assert f["--max-model-len"] == str(spec["max_model_len"]), tier
            assert f["--block-size"] == str(spec["block_size"]), tier
            assert spec["model"] == f["0"]
    for tenant in pol["tenants"].values():   # hashes only: raw keys never enter the cluster's config
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in tenant["key_sha256"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_policy_is_valid_as_shipped(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ConfigMap's policy parses with tiergate's own schema as it is (`discover`, `api_key_env`, the
    Secret's variable set as the router's env would set it), so tenants, routes and profiles are checked."""
    monkeypatch.setenv("VLLM_API_KEY", "from-the-secret")
    parsed = parse_policy(yaml.safe_dump(policy(overlay)), overlay)
    assert sorted(parsed.tiers) == ["balanced", "fast", "long"]
    for tier in parsed.tiers.values():
        assert tier.discover is not None and tier.api_key_env == "VLLM_API_KEY" and not tier.instances


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_router(overlay: str) -> None:
    deploy = one(overlay, "Deployment", "tiergate")
    pod = deploy["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    e = {k: v.get("value") for k, v in env(c).items()}
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    # the whole drain fits before SIGKILL: preStop, then the drain timeout and the 5 s for cut streams'
    # error events (router/drain.py, cut_wait_s)
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain_timeout = float(e["TIERGATE_DRAIN_TIMEOUT_S"])
    assert float(e["TIERGATE_DRAIN_GRACE_S"]) < drain_timeout
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain_timeout + 5
    # the policy: a ConfigMap mounted as a directory (no subPath), the path inside it
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    policy_path = Path(e["TIERGATE_POLICY_PATH"])
    mount = mounts[str(policy_path.parent)]
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert all("subPath" not in m for m in c["volumeMounts"])
    assert volumes[mount["name"]]["configMap"]["name"] == "tiergate-policy"
    assert policy_path.name in one(overlay, "ConfigMap", "tiergate-policy")["data"]
    # Redis: the Service in this namespace
    url = re.fullmatch(r"redis://([^.:/]+)\.([^.:/]+)\.svc\.cluster\.local:(\d+)/\d+", e["TIERGATE_REDIS_URL"])
    assert url is not None and url[2] == NAMESPACE
    redis_svc = one(overlay, "Service", url[1])["spec"]
    assert int(url[3]) in {p["port"] for p in redis_svc["ports"]}
    assert selects(redis_svc["selector"], one(overlay, "StatefulSet", "redis"))
    # security: non-root, read-only root, the data dir on an emptyDir
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert "emptyDir" in volumes[mounts[e["TIERGATE_DATA_DIR"]]["name"]]
    assert env(c)["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "VLLM_API_KEY"
    ann = deploy["spec"]["template"]["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == \
        ("true", "8000", "/metrics")
    # scaling and disruption
    hpa = one(overlay, "HorizontalPodAutoscaler", "tiergate")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tiergate"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["minReplicas"] >= 2
    assert "cpu" in c["resources"]["requests"]   # CPU utilization is relative to the request
    pdb = one(overlay, "PodDisruptionBudget", "tiergate")["spec"]
    assert selects(pdb["selector"]["matchLabels"], deploy) and pdb["minAvailable"] < hpa["minReplicas"]
    image, _, tag = c["image"].rpartition(":")
    assert image and tag and tag != "latest"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_an_append_only_file_on_its_volume(overlay: str) -> None:
    sts = one(overlay, "StatefulSet", "redis")
    (c,) = containers(sts)
    f = flags(c["args"][1:])
    assert c["args"][0] == "redis-server"
    assert f["--appendonly"] == "yes"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    (data,) = (m for m in c["volumeMounts"] if m["mountPath"] == f["--dir"])
    assert data["name"] in claims
    assert one(overlay, "Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
