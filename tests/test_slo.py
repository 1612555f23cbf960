"""Live signals and SLO: the /metrics parser, the TTFT predictor, the slo_feasible filter, SLO headers."""

from __future__ import annotations

import httpx
import pytest

from backends.registry import Ewma
from backends.sim.run import running_sim
from backends.vllm_metrics import next_interval, parse_vllm_metrics, quiet
from policies.plugins.slo_feasible import SloFeasible, predicted_ttft_s
from policies.schema import load_policy
from policies.types import Candidate, RoutingRequest
from router.errors import ApiError
from router.slo import resolve_slo
from tests.conftest import DEMO_KEY, Stack
from tests.test_policies import DEMO

VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 7.0
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
vllm:prefix_cache_queries_total{model_name="m"} 1000.0
vllm:prefix_cache_hits_total{model_name="m"} 600.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 1.5
vllm:time_to_first_token_seconds_count{model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 1.0
vllm:cache_config_info{block_size="16",num_gpu_blocks="4096",enable_prefix_caching="True"} 1.0
vllm:num_requests_waiting{model_name="m"} NaN
vllm:num_requests_running garbage
not_vllm_metric 5
"""


def test_parser_sums_label_sets_and_skips_garbage() -> None:
    sig = parse_vllm_metrics(VLLM_TEXT)
    assert (sig.running, sig.waiting, sig.kv_usage) == (5.0, 7.0, 0.25)
    assert (sig.prefix_queries, sig.prefix_hits, sig.ttft_sum, sig.ttft_count) == (1000.0, 600.0, 1.5, 3.0)
    assert sig.num_gpu_blocks == 4096
    assert parse_vllm_metrics("") == parse_vllm_metrics("# only comments\n")


async def test_parser_reads_the_simulators_real_metrics_page() -> None:
    async with running_sim("qwen3-1.7b-fp8", time_scale=0.05, num_gpu_blocks=2048) as sim, \
            httpx.AsyncClient(base_url=sim.url) as c:
        body = {"model": "Qwen/Qwen3-1.7B-FP8", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            assert (await c.post("/v1/chat/completions", json=body)).status_code == 200
        sig = parse_vllm_metrics((await c.get("/metrics")).text)
    assert sig.num_gpu_blocks == 2048 and sig.ttft_count == 2 and sig.prefix_queries > 0
    assert sig.running == 0 and sig.waiting == 0


def cand(iid: str = "a", *, tps: float = 10_000, waiting: int = 0, running: int = 0, in_flight: int = 0,
         cached: int = 0, mean: float = 1000, tier: str = "fast", pending: int = 0,
         pending_tokens: int = 0) -> Candidate:
    return Candidate(tier=tier, instance_id=iid, max_model_len=40960, price_input=0.05, price_cached_input=0.01,
                     price_output=0.2, waiting=waiting, running=running, in_flight=in_flight, cached_tokens=cached,
                     prefill_tps=tps, mean_uncached_tokens=mean, pending_requests=pending,
                     pending_tokens=pending_tokens)


def rreq(prompt: int, ttft_s: float | None = 1.0) -> RoutingRequest:
    return RoutingRequest(request_id="r", tenant="t", virtual_model="m", route_tiers=("fast",), tenant_tiers=None,
                          prompt_tokens={"fast": prompt}, max_tokens=16, default_completion_tokens=256,
                          ttft_target_s=ttft_s)


@pytest.mark.parametrize(("c", "prompt", "want"), [
    (cand(), 5000, 0.5),                                   # 5000 uncached tokens at 10K tok/s
    (cand(cached=4000), 5000, 0.1),                        # only the uncached part is prefilled
    (cand(waiting=3), 5000, 0.8),                          # 3 queued (other replicas') x 1000 mean tokens
    (cand(pending=2, pending_tokens=4000), 5000, 0.9),     # our own 2 requests still prefilling: exact tokens
    (cand(waiting=3, pending=2, pending_tokens=4000), 5000, 1.0),  # 1 queued beyond ours, at the mean
    (cand(running=8, in_flight=6), 5000, 0.5),             # running (decoding) requests are not prefill work
    (cand(tps=0), 5000, None),                             # unknown rate: no prediction
])
def test_ttft_predictor(c: Candidate, prompt: int, want: float | None) -> None:
    got = predicted_ttft_s(rreq(prompt), c)
    assert got == (None if want is None else pytest.approx(want))


def test_slo_filter_keeps_feasible_then_least_late_or_rejects() -> None:
    fast, slow, unknown = cand("a"), cand("b", waiting=20), cand("c", tps=0)
    kept, _ = SloFeasible().filter(rreq(5000, 1.0), [fast, slow, unknown])
    assert [c.instance_id for c in kept] == ["a", "c"]
    assert SloFeasible().filter(rreq(5000, None), [slow])[0] == [slow]          # no target: untouched
    kept, why = SloFeasible(margin=0.4, fallback="least_late").filter(rreq(5000, 1.0), [fast, slow])
    assert kept == [fast] and "least late" in why
    assert SloFeasible(fallback="reject").filter(rreq(5000, 0.1), [fast, slow])[0] == []
    with pytest.raises(ValueError):
        SloFeasible(fallback="maybe")


def test_margin_below_one_without_fallback_keeps_the_least_late() -> None:
    # (the default fallback is least_late: a request is served as well as possible)
    kept, _ = SloFeasible(margin=0.4).filter(rreq(5000, 1.0), [cand("a"), cand("b", waiting=1)])
    assert [c.instance_id for c in kept] == ["a"]


def test_resolve_slo_headers_tenant_default_and_errors() -> None:
    policy = load_policy(DEMO)
    assert resolve_slo(policy, "demo", {}) == ("interactive", 1.0, 0.05)
    assert resolve_slo(policy, "fast-only", {}) == ("relaxed", 10.0, 0.2)
    assert resolve_slo(policy, "demo", {"x-tiergate-slo-class": "relaxed"})[:2] == ("relaxed", 10.0)
    assert resolve_slo(policy, "demo", {"x-slo-ttft-ms": "250"}) == ("interactive", 0.25, 0.05)
    for headers, param in (({"x-slo-ttft-ms": "fast"}, "x-slo-ttft-ms"), ({"x-slo-tpot-ms": "-3"}, "x-slo-tpot-ms"),
                           ({"x-tiergate-slo-class": "gold"}, "x-tiergate-slo-class")):
        with pytest.raises(ApiError) as exc:
            resolve_slo(policy, "demo", headers)
        assert exc.value.status == 400 and exc.value.param == param


def test_bad_slo_header_through_the_router_is_a_400_naming_it(stack: Stack) -> None:
    r = httpx.post(stack.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEMO_KEY}",
                                                               "x-slo-ttft-ms": "soon"},
                   json={"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-slo-ttft-ms"


def test_ewma_starts_at_the_first_sample_then_moves_by_alpha() -> None:
    e = Ewma(alpha=0.5)
    assert e.value is None
    e.add(10.0)
    e.add(20.0)
    assert e.value == 15.0 and e.samples == 2


def test_expected_cost_prices_cache_route_mean_output_and_gpu_seconds() -> None:
    from policies.plugins.expected_cost import ExpectedCost, expected_cost_usd

    base = dict(tier="fast", instance_id="a", max_model_len=40960, price_input=1.0, price_cached_input=0.1,
                price_output=2.0)
    req = RoutingRequest(request_id="r", tenant="t", virtual_model="m", route_tiers=("fast",), tenant_tiers=None,
                         prompt_tokens={"fast": 1_000_000}, max_tokens=1_000_000, default_completion_tokens=256)
    assert expected_cost_usd(req, Candidate(**base)) == pytest.approx(1.0 + 2.0)  # type: ignore[arg-type]
    warm = Candidate(**base, cached_tokens=600_000)  # type: ignore[arg-type]
    assert expected_cost_usd(req, warm) == pytest.approx(0.4 + 0.06 + 2.0)
    capped = RoutingRequest(**{**{f: getattr(req, f) for f in req.__struct_fields__},
                               "expected_output_tokens": 250_000.0})
    assert expected_cost_usd(capped, Candidate(**base)) == pytest.approx(1.0 + 0.5)  # type: ignore[arg-type]
    # $36/hour = $0.01/s; 1M uncached tokens at 100K tok/s = 10 s; 1M output x 1 ms shared by a batch of 4
    gpu = Candidate(**base, gpu_cost_per_hour=36.0, prefill_tps=100_000, tpot_s=0.001,  # type: ignore[arg-type]
                    running=3)
    assert expected_cost_usd(req, gpu) == pytest.approx(3.0 + 0.01 * (10.0 + 1000.0 / 4))
    scores, _ = ExpectedCost().score(req, [Candidate(**base), warm])  # type: ignore[arg-type]
    assert scores[1] == 1.0 and scores[0] == pytest.approx(2.46 / 3.0)


async def test_slo_attainment_is_counted_per_class_and_logged() -> None:
    from backends.sim.run import start_sim
    from tests.conftest import serve_router

    sim = await start_sim("qwen3-1.7b-fp8", time_scale=0.05)
    try:
        async with serve_router(load_policy(DEMO), {"fast": [("f", sim.url)]}) as url, \
                httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {DEMO_KEY}"}) as c:
            body = {"model": "qwen3-1.7b", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            assert (await c.post("/v1/chat/completions", json=body, headers={"x-slo-ttft-ms": "60000"})).status_code \
                == 200
            assert (await c.post("/v1/chat/completions", json=body, headers={"x-slo-ttft-ms": "0.001"})).status_code \
                == 200
            text = (await c.get("/metrics")).text
        lines = [ln for ln in text.splitlines() if ln.startswith("tiergate_slo_requests_total{")]
        assert any('result="met"' in ln and ln.endswith(" 1.0") for ln in lines), lines
        assert any('result="missed"' in ln and ln.endswith(" 1.0") for ln in lines), lines
    finally:
        await sim.close()


def test_budget_degrade_prefers_cheaper_tiers_only_where_they_meet_the_slo() -> None:
    from policies.plugins.budget_degrade import BudgetDegrade
    from policies.types import Candidate, RoutingRequest

    def cand(tier: str, pending: int) -> Candidate:
        return Candidate(tier=tier, instance_id="i", max_model_len=40960, price_input=0.1, price_cached_input=0.01,
                         price_output=0.2, pending_tokens=pending, prefill_tps=10_000.0)

    def req(degrade: frozenset[str] | None, target: float | None = 1.0) -> RoutingRequest:
        return RoutingRequest(request_id="r", tenant="t", virtual_model="m", route_tiers=("fast", "balanced"),
                              tenant_tiers=None, prompt_tokens={"fast": 1000, "balanced": 1000}, max_tokens=10,
                              default_completion_tokens=10, ttft_target_s=target, degrade_tiers=degrade)

    f = BudgetDegrade()
    idle, busy, bal = cand("fast", 0), cand("fast", 50_000), cand("balanced", 0)
    assert f.filter(req(None), [idle, bal])[0] == [idle, bal]                 # not near budget: untouched
    assert f.filter(req(frozenset({"fast"})), [idle, bal])[0] == [idle]      # near budget: the cheap tier
    kept, why = f.filter(req(frozenset({"fast"})), [busy, bal])              # fast would miss the 1 s target
    assert kept == [busy, bal] and "not degraded" in why
    assert f.filter(req(frozenset({"fast"}), None), [busy, bal])[0] == [busy]  # no target: cheaper wins


def test_scrapes_back_off_while_the_fleet_is_quiet_and_return_to_pace_when_it_is_not() -> None:
    from backends.registry import Registry
    from policies.schema import InstanceSpec

    reg = Registry(load_policy(DEMO), {"fast": [InstanceSpec(id="f0", url="http://127.0.0.1:9")]})
    assert quiet(reg)
    waits, wait = [], 1.0
    for _ in range(5):
        wait = next_interval(wait, 1.0, 5.0, quiet(reg))
        waits.append(wait)
    assert waits == [2.0, 4.0, 5.0, 5.0, 5.0]
    inst = reg.all_instances()[0]
    for field in ("running", "waiting", "in_flight", "peer_in_flight"):
        setattr(inst, field, 1)
        assert not quiet(reg)
        assert next_interval(5.0, 1.0, 5.0, quiet(reg)) == 1.0
        setattr(inst, field, 0)
    assert next_interval(1.0, 1.0, 0.0, True) == 1.0        # idle_max below the base: never slower than base
