"""The strict policy loader (policies/yaml_loader.py): duplicate keys, YAML 1.1 booleans, unknown
fields, anchors and aliases, and the size cap, each refused with its field path, line(s) and a hint."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from policies.schema import Policy, PolicyError, load_policy, parse_policy
from policies.yaml_loader import MAX_POLICY_BYTES, load_yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "policies" / "examples" / "demo.yaml"
DEMO_TEXT = DEMO.read_text()
BUDGETS = "    budgets: {daily_usd: 5.0, monthly_usd: 100.0}\n"   # the `capped` tenant's
FAST_ONLY = "    default_slo: relaxed\n"                           # the `fast-only` tenant's last line


def line_of(text: str, needle: str, start: int = 0) -> int:
    at = text.index(needle, start)
    return text.count("\n", 0, at) + 1


def edited(old: str, new: str) -> str:
    assert DEMO_TEXT.count(old) == 1, old
    return DEMO_TEXT.replace(old, new)


def refused(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.yaml")
    return info.value


def test_demo_and_deploy_policies_load() -> None:
    demo = load_policy(DEMO)
    assert "capped" in demo.tenants and demo.slo_classes["batch"].batchable is True
    assert not demo.slo_classes["relaxed"].batchable
    deploy = load_policy(ROOT / "deploy" / "policy.compose.yaml")
    assert deploy.tiers and all(t.instances for t in deploy.tiers.values())


def test_loader_data_matches_safe_load_on_the_demo() -> None:
    raw, _root = load_yaml(DEMO_TEXT, Policy, "demo.yaml")
    assert raw == yaml.safe_load(DEMO_TEXT)


def test_scalars_read_as_yaml_safe_load_reads_them() -> None:
    params = ("{a: 0x1F, b: 017, c: 1_000, d: -12, e: 1.5, f: .inf, g: 1.5e+3, h: ~, i: null, j: '', "
              "k: 2024-01-02, l: '017', m: +7, n: -.5, o: 1_0.25, p: [1, x, 2.0]}")
    text = edited("{type: load, weight: 1.0, params: {scale: 8}}", f"{{type: load, weight: 1.0, params: {params}}}")
    raw, _root = load_yaml(text, Policy, "p.yaml")
    assert raw == yaml.safe_load(text)
    got = raw["profiles"]["weighted"]["scorers"][2]["params"]
    assert (got["a"], got["b"], got["c"], got["l"], got["h"]) == (31, 15, 1000, "017", None)
    assert math.isinf(got["f"]) and got["g"] == 1500.0


# --- duplicate keys ------------------------------------------------------------------
def test_duplicate_nested_key_names_path_and_both_lines() -> None:
    # issue #11: a second `budgets:` raised the daily cap and dropped the monthly one, silently
    text = edited(BUDGETS, BUDGETS + "    budgets: {daily_usd: 500.0}\n")
    err = refused(text)
    first = line_of(text, BUDGETS)
    assert err.path == "$.tenants.capped.budgets" and err.line == first + 1
    assert str(err) == (f"policy.yaml:{first + 1}: $.tenants.capped.budgets: duplicate key 'budgets' "
                        f"(first at line {first})")


def test_duplicate_top_level_key() -> None:
    text = edited("version: 1\n", "version: 1\nversion: 2\n")
    err = refused(text)
    first = line_of(text, "version: 1")
    assert err.path == "$.version" and err.line == first + 1
    assert f"duplicate key 'version' (first at line {first})" in str(err)


def test_duplicate_key_in_a_flow_mapping_names_the_columns() -> None:
    text = edited("interactive: {ttft_ms: 1000, tpot_ms: 50,", "interactive: {ttft_ms: 1000, tpot_ms: 50, ttft_ms: 2,")
    err = refused(text)
    line = line_of(text, "interactive: {ttft_ms")
    assert err.path == "$.slo_classes.interactive.ttft_ms" and err.line == line
    assert f"policy.yaml:{line}: " in str(err) and f"(first at line {line}, column " in str(err)


def test_duplicate_key_in_list_items_flow_and_block() -> None:
    text = edited("{type: load, weight: 1.0,", "{type: load, weight: 1.0, weight: 3.0,")
    err = refused(text)
    line = line_of(text, "{type: load, weight")
    assert err.path == "$.profiles.weighted.scorers[2].weight" and err.line == line
    assert "duplicate key 'weight'" in str(err)

    weighted = "  weighted:\n    filters:\n      - {type: tier_allowed}\n"     # both profiles open with it
    text = edited(weighted, weighted.replace("- {type: tier_allowed}", "- type: tier_allowed\n        type: healthy"))
    err = refused(text)
    first = line_of(text, "- type: tier_allowed")
    assert err.path == "$.profiles.weighted.filters[0].type" and err.line == first + 1
    assert f"duplicate key 'type' (first at line {first})" in str(err)


def test_duplicate_map_entry_names() -> None:
    text = edited("  qwen3-1.7b:\n", "  auto:\n")
    routes = text.index("\nroutes:")
    first, second = line_of(text, "  auto:", routes), line_of(text, "  auto:", text.index("  auto:", routes) + 1)
    err = refused(text)
    assert err.path == "$.routes.auto" and err.line == second
    assert f"duplicate key 'auto' (first at line {first})" in str(err)


# --- booleans ------------------------------------------------------------------------
@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "On", "OFF", "Yes", "NO"])
def test_yaml11_booleans_are_refused_with_a_hint(word: str) -> None:
    text = edited("batchable: true", f"batchable: {word}")
    err = refused(text)
    line = line_of(text, f"batchable: {word}")
    assert err.path == "$.slo_classes.batch.batchable" and err.line == line
    assert f"policy.yaml:{line}: $.slo_classes.batch.batchable: {word!r} is not a boolean" in str(err)
    assert "write true or false" in str(err) and f'quote it ("{word}")' in str(err)


@pytest.mark.parametrize("word", ["no", "yes", "off"])
def test_yaml11_boolean_word_in_a_string_field(word: str) -> None:
    # `default_slo: no` used to become False and fail with msgspec's "Expected `str`, got `bool`"
    text = edited("default_slo: relaxed", f"default_slo: {word}")
    err = refused(text)
    assert err.path == "$.tenants.fast-only.default_slo" and err.line == line_of(text, f"default_slo: {word}")
    assert "reads as a boolean in YAML 1.1" in str(err) and f'this field is a string: quote it ("{word}")' in str(err)


@pytest.mark.parametrize(("word", "value"), [("true", True), ("True", True), ("TRUE", True), ("false", False),
                                             ("False", False), ("FALSE", False)])
def test_yaml12_booleans_load(word: str, value: bool) -> None:
    policy = parse_policy(edited("batchable: true", f"batchable: {word}"), "p.yaml")
    assert policy.slo_classes["batch"].batchable is value


def test_quoted_words_and_y_n_stay_strings() -> None:
    text = edited("description: every tier; the cheapest feasible one wins", 'description: "on"')
    text = text.replace("description: balanced, then long when the prompt does not fit", "description: 'no'")
    text = text.replace("description: Qwen3-1.7B FP8 weights, short context, cheapest", "description: n")
    text = text.replace("description: Qwen3-4B-Instruct-2507, 256K context, chunked prefill", "description: y")
    policy = parse_policy(text, "p.yaml")
    assert policy.routes["auto"].description == "on" and policy.routes["qwen3-4b"].description == "no"
    assert policy.tiers["fast"].description == "n" and policy.tiers["long"].description == "y"


# --- unknown fields ------------------------------------------------------------------
def test_unknown_field_suggests_the_close_one() -> None:
    text = edited("daily_usd: 5.0", "dialy_usd: 5.0")
    err = refused(text)
    line = line_of(text, "dialy_usd")
    assert err.path == "$.tenants.capped.budgets.dialy_usd" and err.line == line
    assert str(err) == (f"policy.yaml:{line}: $.tenants.capped.budgets.dialy_usd: unknown field 'dialy_usd'; "
                        "did you mean 'daily_usd'?")


def test_unknown_top_level_field_and_one_without_a_close_match() -> None:
    text = edited("accounting:\n", "acounting:\n")
    err = refused(text)
    assert err.path == "$.acounting" and err.line == line_of(text, "acounting:")
    assert "did you mean 'accounting'?" in str(err)
    err = refused(edited("daily_usd: 5.0", "zzz: 5.0"))
    assert err.path == "$.tenants.capped.budgets.zzz" and "the fields here are: daily_usd, monthly_usd" in str(err)


# --- anchors, aliases, merge keys, tags ------------------------------------------------
def test_anchor_is_refused_where_it_is_defined() -> None:
    text = edited('    allowed_tiers: ["*"]\n', '    allowed_tiers: &all ["*"]\n')
    text = text.replace(BUDGETS, BUDGETS + "    allowed_tiers: *all\n")
    err = refused(text)
    line = line_of(text, "&all")
    assert err.path == "$.tenants.demo.allowed_tiers" and err.line == line
    assert "YAML anchors (&all) are not allowed" in str(err) and "write the value out" in str(err)


def test_alias_is_refused_with_path_and_line() -> None:
    text = edited(FAST_ONLY, FAST_ONLY + "    budgets: *caps\n")
    err = refused(text)
    assert err.path == "$.tenants.fast-only.budgets" and err.line == line_of(text, "*caps")
    assert "YAML aliases (*caps) are not allowed" in str(err)


def test_alias_bomb_is_refused_without_expanding() -> None:
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]   # 10**12 leaves
    text = edited("{type: load, weight: 1.0, params: {scale: 8}}",
                  "{type: load, weight: 1.0, params: {" + ", ".join(rows) + "}}")
    err = refused(text)    # params is free-form (dict[str, Any]): only the anchor rule stops it
    assert err.path == "$.profiles.weighted.scorers[2].params.a0" and err.line == line_of(text, "&a0")
    assert "YAML anchors (&a0) are not allowed" in str(err)


def test_merge_keys_and_foreign_tags_are_refused() -> None:
    err = refused(edited(FAST_ONLY, FAST_ONLY + "    budgets: {<<: {daily_usd: 1.0}}\n"))
    assert err.path == "$.tenants.fast-only.budgets.<<" and "merge keys (<<) are not allowed" in str(err)
    err = refused(edited(FAST_ONLY, FAST_ONLY + "    budgets: !!python/object:os.system {}\n"))
    assert err.path == "$.tenants.fast-only.budgets" and "unsupported YAML tag !!python/object:os.system" in str(err)


# --- size --------------------------------------------------------------------------
def test_over_size_text_and_file_are_refused(tmp_path: Path) -> None:
    big = DEMO_TEXT + "#" * (MAX_POLICY_BYTES - len(DEMO_TEXT.encode()) + 1)
    err = refused(big)
    assert err.path == "$" and err.line is None
    assert f"{MAX_POLICY_BYTES + 1:,} bytes" in str(err) and "MAX_POLICY_BYTES" in str(err)
    wide = DEMO_TEXT + "#" + "€" * (MAX_POLICY_BYTES // 3)    # fewer characters than the cap, more bytes
    assert len(wide) < MAX_POLICY_BYTES
    assert "MAX_POLICY_BYTES" in str(refused(wide))
    path = tmp_path / "big.yaml"
    path.write_text(big)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}: $: the policy file is") and "MAX_POLICY_BYTES" in str(info.value)
    path.write_text(DEMO_TEXT + "#" * (MAX_POLICY_BYTES - len(DEMO_TEXT.encode())))
    assert load_policy(path).tiers    # exactly at the cap loads


# --- the CLI prints them -------------------------------------------------------------
def test_cli_policy_check_prints_the_duplicate(tmp_path: Path) -> None:
    bad = tmp_path / "policy.yaml"
    text = edited(BUDGETS, BUDGETS + "    budgets: {daily_usd: 500.0}\n")
    bad.write_text(text)
    r = subprocess.run([sys.executable, "-m", "router.cli", "policy", "check", str(bad)], capture_output=True,
                       text=True, cwd=ROOT)
    first = line_of(text, BUDGETS)
    assert r.returncode == 1
    assert (f"{bad}:{first + 1}: $.tenants.capped.budgets: duplicate key 'budgets' (first at line {first})"
            in r.stderr)


def test_empty_and_comment_only_files_are_refused() -> None:
    for text in ("", "# nothing yet\n"):
        err = refused(text)
        assert err.path == "$" and str(err) == "policy.yaml: $: the policy file is empty"


@pytest.mark.parametrize(("old", "new", "path"), [
    ("\naccounting:\n", "\nadmission: {windows: true, window_ms: 5, min_window_ms: 10}\naccounting:\n",
     "$.admission.window_ms"),
    ("\naccounting:\n", "\nadmission: {kv_high: 1.5}\naccounting:\n", "$.admission.kv_high"),
    ("\naccounting:\n", "\nadmission: {max_queued: 0}\naccounting:\n", "$.admission.max_queued"),
    ("\naccounting:\n", "\nadmission: {windows: true, windoe_ms: 20}\naccounting:\n", "$.admission.windoe_ms"),
    ("price_factor: 0.5,", "price_factor: 0,", "$.slo_classes.batch.price_factor"),
    ("max_queue_ms: 30000}", "max_queue_ms: -1}", "$.slo_classes.batch.max_queue_ms"),
    ("\naccounting:\n", "\nadmission: {batch_size: 0}\naccounting:\n", "$.admission.batch_size"),
    ("\naccounting:\n", "\nadmission: {batch_kv: 0}\naccounting:\n", "$.admission.batch_kv"),
    ("\naccounting:\n", "\nadmission: {batch_max_wait_ms: -1}\naccounting:\n", "$.admission.batch_max_wait_ms"),
    (FAST_ONLY, FAST_ONLY + "    weight: 0\n", "$.tenants.fast-only.weight"),
])
def test_admission_fields_are_validated_with_path_and_line(old: str, new: str, path: str) -> None:
    text = edited(old, new)
    err = refused(text)
    assert err.path == path
    field = path.rsplit(".", 1)[1]
    want = "admission" if path.startswith("$.admission") and field != "weight" else field
    assert err.line is not None and want in text.splitlines()[err.line - 1]


def test_admission_defaults_keep_every_request_dispatched_at_once() -> None:
    pol = load_policy(DEMO)
    assert not pol.admission.windows and pol.admission.coalesce and pol.admission.max_queued == 1024
    assert pol.tenants["demo"].weight == 1.0 and pol.slo_classes["relaxed"].price_factor == 1.0
