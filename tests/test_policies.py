"""Policy file validation, the CLI around it, and a conformance test over every plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.engine import Profile, build_profiles
from policies.registry import KNOWN_FILTERS, KNOWN_PICKERS, KNOWN_SCORERS
from policies.schema import PolicyError, load_policy, parse_policy
from policies.types import Candidate, RoutingRequest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "policies" / "examples" / "demo.yaml"
DEMO_TEXT = DEMO.read_text()


def test_demo_policy_loads() -> None:
    p = load_policy(DEMO)
    assert list(p.tiers) == ["fast", "balanced", "long"]
    assert [p.tiers[t].max_model_len for t in p.tiers] == [40960, 32768, 262144]
    prices = [p.tiers[t].prices.input for t in p.tiers]
    assert prices == sorted(prices) and len(set(prices)) == 3
    assert p.routes["qwen3-4b"].tiers == ["balanced", "long"]
    build_profiles(p)


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("max_model_len: 32768", "max_model_len: lots", "$.tiers.balanced.max_model_len"),
        ("    profile: money\n  qwen3-1.7b", "    profile: nope\n  qwen3-1.7b", "$.routes.auto.profile"),
        ("{type: load, weight: 1.0", "{type: lod, weight: 1.0", "$.profiles.weighted.scorers[2].type"),
        ("tiers: [fast, balanced, long]", "tiers: [fast, turbo, long]", "$.routes.auto.tiers[1]"),
        ("  relaxed: {ttft_ms: 10000,", "  relaxed: {ttfb_ms: 10000,", "$.slo_classes.relaxed.ttfb_ms"),
    ],
)
def test_errors_name_field_path_and_line(old: str, new: str, path: str) -> None:
    assert DEMO_TEXT.count(old) == 1
    line = DEMO_TEXT[: DEMO_TEXT.index(old)].count("\n") + 1   # the line the edited text starts on
    with pytest.raises(PolicyError) as info:
        parse_policy(DEMO_TEXT.replace(old, new, 1), "demo.yaml")
    assert info.value.path == path
    assert info.value.line == line
    assert f"demo.yaml:{line}: {path}" in str(info.value)


def test_cli_policy_check(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "router.cli", "policy", "check", str(DEMO)], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0 and "3 tiers" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEMO_TEXT.replace("max_model_len: 40960", "max_model_len: -1"))
    r = subprocess.run([sys.executable, "-m", "router.cli", "policy", "check", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode != 0
    assert "$.tiers.fast.max_model_len" in r.stderr and f"{bad}:18" in r.stderr


def test_cli_keys_new_prints_key_and_matching_hash() -> None:
    import hashlib

    r = subprocess.run([sys.executable, "-m", "router.cli", "keys", "new", "--tenant", "acme"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0
    lines = dict(line.split(":", 1) for line in r.stdout.splitlines() if line.startswith(("key", "sha256")))
    key, digest = lines["key"].strip(), lines["sha256"].strip()
    assert hashlib.sha256(key.encode()).hexdigest() == digest and key.startswith("sk-")


# --- conformance over every plugin -------------------------------------------------
cand_st = st.builds(
    Candidate, tier=st.sampled_from(["fast", "balanced", "long"]), instance_id=st.text("abc", min_size=1, max_size=3),
    max_model_len=st.integers(1, 300_000), price_input=st.floats(0, 10), price_cached_input=st.floats(0, 10),
    price_output=st.floats(0, 10), healthy=st.booleans(), in_flight=st.integers(0, 500),
    cached_tokens=st.integers(0, 1000))
req_st = st.builds(
    RoutingRequest, request_id=st.text(min_size=1, max_size=8), tenant=st.just("t"), virtual_model=st.just("auto"),
    route_tiers=st.just(("fast", "balanced", "long")), tenant_tiers=st.none() | st.just(frozenset({"fast"})),
    prompt_tokens=st.fixed_dictionaries({"fast": st.integers(0, 300_000), "balanced": st.integers(0, 300_000),
                                         "long": st.integers(0, 300_000)}),
    max_tokens=st.none() | st.integers(1, 50_000), default_completion_tokens=st.integers(1, 4096))


@pytest.mark.parametrize("name", sorted(KNOWN_FILTERS))
@settings(max_examples=60, deadline=None)
@given(req=req_st, cands=st.lists(cand_st, max_size=8))
def test_filter_conformance(name: str, req: RoutingRequest, cands: list[Candidate]) -> None:
    f = KNOWN_FILTERS[name]()
    kept, reason = f.filter(req, cands)
    assert all(any(k is c for c in cands) for k in kept) and isinstance(reason, str) and f.name == name
    assert f.filter(req, cands)[0] == kept  # pure: same input, same output


@pytest.mark.parametrize("name", sorted(KNOWN_SCORERS))
@settings(max_examples=60, deadline=None)
@given(req=req_st, cands=st.lists(cand_st, max_size=8))
def test_scorer_conformance(name: str, req: RoutingRequest, cands: list[Candidate]) -> None:
    s = KNOWN_SCORERS[name]()
    scores, _reason = s.score(req, cands)
    assert len(scores) == len(cands) and all(0.0 <= x <= 1.0 for x in scores) and s.name == name
    assert s.score(req, cands)[0] == scores


@pytest.mark.parametrize("name", sorted(KNOWN_PICKERS))
@settings(max_examples=60, deadline=None)
@given(req=req_st, cands=st.lists(cand_st, max_size=8), data=st.data())
def test_picker_conformance(name: str, req: RoutingRequest, cands: list[Candidate], data: st.DataObject) -> None:
    p = KNOWN_PICKERS[name]()
    totals = data.draw(st.lists(st.floats(0, 20), min_size=len(cands), max_size=len(cands)))
    order, _ = p.pick(req, cands, totals)
    assert sorted(order) == list(range(len(cands)))
    if cands:
        assert totals[order[0]] >= max(totals) - 1e-6
    assert p.pick(req, cands, totals)[0] == order


def test_cost_and_load_choose_cheapest_then_least_loaded() -> None:
    policy = load_policy(DEMO)
    prof = Profile.from_spec("weighted", policy.profiles["weighted"])
    req = RoutingRequest(request_id="r", tenant="demo", virtual_model="auto", route_tiers=("fast", "balanced", "long"),
                         tenant_tiers=None, prompt_tokens={"fast": 100, "balanced": 100, "long": 100}, max_tokens=64,
                         default_completion_tokens=1024)

    def cand(tier: str, iid: str, in_flight: int = 0, healthy: bool = True) -> Candidate:
        t = policy.tiers[tier]
        return Candidate(tier=tier, instance_id=iid, max_model_len=t.max_model_len, price_input=t.prices.input,
                         price_cached_input=t.prices.cached_input, price_output=t.prices.output,
                         in_flight=in_flight, healthy=healthy)

    d = prof.decide(req, [cand("long", "l0"), cand("balanced", "b0"), cand("fast", "f0", 5), cand("fast", "f1", 1)])
    assert d.chosen is not None and d.chosen.key == "fast/f1"
    assert [c.tier for c in d.ranked] == ["fast", "fast", "balanced", "long"]
    d = prof.decide(req, [cand("fast", "f0", healthy=False), cand("balanced", "b0")])
    assert d.chosen is not None and d.chosen.tier == "balanced" and d.rejected == {"fast/f0": "healthy"}


def test_deploy_policy_is_valid() -> None:
    p = load_policy(ROOT / "deploy" / "policy.compose.yaml")
    assert all(t.instances for t in p.tiers.values())


def test_list_price_and_ordered_ties_pick_the_first_cheapest_instance_as_litellm_does() -> None:
    def cand(tier: str, iid: str, pin: float, pout: float, cached: int = 0) -> Candidate:
        return Candidate(tier=tier, instance_id=iid, max_model_len=40960, price_input=pin, price_cached_input=pin / 5,
                         price_output=pout, cached_tokens=cached)

    req = RoutingRequest(request_id="r", tenant="t", virtual_model="auto", route_tiers=("fast", "balanced"),
                         tenant_tiers=None, prompt_tokens={"fast": 1000, "balanced": 1000}, max_tokens=64,
                         default_completion_tokens=1024)
    # the cache on balanced/b2 would make it cheaper per request; the list price ignores it
    cands = [cand("balanced", "b1", 0.15, 0.6), cand("fast", "f1", 0.05, 0.2), cand("fast", "f2", 0.05, 0.2),
             cand("balanced", "b2", 0.15, 0.6, cached=1000)]
    scores, why = KNOWN_SCORERS["list_price"]().score(req, cands)
    assert scores == [pytest.approx(0.25 / 0.75), 1.0, 1.0, pytest.approx(0.25 / 0.75)] and "0.25" in why
    ordered = KNOWN_PICKERS["max_score"](ties="order")
    for rid in ("a", "b", "c", "d"):      # every request: the first listed of the equally cheap
        order, _ = ordered.pick(msgspec.structs.replace(req, request_id=rid), cands, scores)
        assert order == [1, 2, 0, 3]
    hashed = KNOWN_PICKERS["max_score"]()
    firsts = {hashed.pick(msgspec.structs.replace(req, request_id=str(i)), cands, scores)[0][0] for i in range(40)}
    assert firsts == {1, 2}               # the default spreads ties
    with pytest.raises(ValueError, match="ties"):
        KNOWN_PICKERS["max_score"](ties="first")
