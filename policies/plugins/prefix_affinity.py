"""Scorer `prefix_affinity`.

Algorithm: score = (match - common) / prompt_tokens on each candidate, where match
is the prefix the shared Redis index expects that instance to hold
(Candidate.cached_tokens, filled by one batched lookup before routing) and common is
the match that more than `common_share` of the tier's candidates reach (with 4
instances and 0.5: the 3rd longest; with 2: the shorter). A prefix most instances already hold (a hot
shared system prompt) is no reason to prefer any of them, so it never pins traffic;
a conversation's history, held by one instance, is. Guards:
  * minimum match: a distinguishing match (match - common) shorter than
    `min_match_tokens`, or covering less than `min_match_ratio` of the prompt,
    scores 0;
  * imbalance: within a tier, if the most and least loaded candidates differ by more
    than `balance_abs_threshold` in-flight requests AND the most loaded carries more
    than `balance_rel_threshold` x the least loaded, every candidate of that tier
    scores 0, so the load scorer alone picks the least loaded (SGLang's cache_aware
    guard);
  * a miss (all scores 0) leaves the choice to the other scorers: with `load`, the
    least-loaded instance, ties broken by the picker's per-request hash.
Pair it with the `bounded_load` filter so no instance exceeds c x the mean load.
Parameters:
  common_share (float in (0, 1), default 0.5): a prefix held by more than this share
      of a tier's candidates is common (0.99: only what every candidate holds).
  min_match_tokens (int, default 256): shortest distinguishing match that counts.
  min_match_ratio (float in [0, 1], default 0.0): smallest matched/prompt that counts.
  balance_abs_threshold (int, default 16): in-flight gap that may signal imbalance.
  balance_rel_threshold (float >= 1, default 1.5): max/min ratio that confirms it.
"""

from __future__ import annotations

import math

from policies.types import Candidate, RoutingRequest


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, min_match_tokens: int = 256, min_match_ratio: float = 0.0, balance_abs_threshold: int = 16,
                 balance_rel_threshold: float = 1.5, common_share: float = 0.5) -> None:
        if not 0.0 < common_share < 1.0:
            raise ValueError("common_share must be in (0, 1)")
        self.common_share = common_share
        if min_match_tokens < 0:
            raise ValueError("min_match_tokens must be >= 0")
        if not 0.0 <= min_match_ratio <= 1.0:
            raise ValueError("min_match_ratio must be in [0, 1]")
        if balance_abs_threshold < 0:
            raise ValueError("balance_abs_threshold must be >= 0")
        if balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1")
        self.min_match_tokens = min_match_tokens
        self.min_match_ratio = min_match_ratio
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def common_matches(self, req: RoutingRequest, cands: list[Candidate]) -> dict[str, int]:
        """Per tier: the longest match held by more than `common_share` of its candidates."""
        matches: dict[str, list[int]] = {}
        for c in cands:
            matches.setdefault(c.tier, []).append(min(c.cached_tokens, req.prompt_tokens.get(c.tier, 0)))
        out = {}
        for tier, ms in matches.items():
            ms.sort(reverse=True)
            k = math.floor(self.common_share * len(ms))   # ms[k] is held by at least k + 1 candidates
            out[tier] = ms[k] if len(ms) > 1 and k < len(ms) else 0
        return out

    def imbalanced_tiers(self, cands: list[Candidate]) -> set[str]:
        loads: dict[str, list[int]] = {}
        for c in cands:
            loads.setdefault(c.tier, []).append(c.in_flight)
        return {t for t, ls in loads.items()
                if max(ls) - min(ls) > self.balance_abs_threshold and max(ls) > self.balance_rel_threshold * min(ls)}

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        if not cands:
            return [], "no candidates"
        imbalanced = self.imbalanced_tiers(cands)
        common = self.common_matches(req, cands)
        scores: list[float] = []
        best = 0
        for c in cands:
            prompt = req.prompt_tokens.get(c.tier, 0)
            match = max(0, min(c.cached_tokens, prompt) - common[c.tier])
            best = max(best, match)
            if (c.tier in imbalanced or prompt <= 0 or match < self.min_match_tokens or match == 0
                    or match < self.min_match_ratio * prompt):
                scores.append(0.0)
            else:
                scores.append(match / prompt)
        if imbalanced:
            return scores, f"imbalanced {sorted(imbalanced)}: least-loaded; best distinguishing match {best}"
        hits = sum(1 for s in scores if s > 0)
        return scores, f"best distinguishing match {best} tokens; {hits}/{len(cands)} above the minimum"
