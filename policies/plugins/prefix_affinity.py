"""Scorer `prefix_affinity`.

Algorithm: score = (1 - shared_weight) * (match - common) / (prompt_tokens - common)
+ shared_weight * match / prompt_tokens on each candidate: mostly the share of the
prompt's not-everywhere part that is cached there, plus a small pull towards any
cached prefix (so a new conversation prefers an instance that holds its system
prompt when load is equal; the load scorer outweighs it). match
is the prefix the shared Redis index expects that instance to hold
(Candidate.cached_tokens, filled by one batched lookup before routing) and common is
the longest match held by more than `common_share` of the tier's candidates and by
at least two (4 instances: the 2nd longest; 8: the 3rd). A prefix that several
instances already hold (a hot shared system prompt) is no reason to prefer any of
them, so it never pins traffic; a conversation's history, held by one, is. Guards:
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
  common_share (float in (0, 1), default 0.25): a prefix held by more than this
      share of a tier's candidates, and by two at least, is common (0.99: only what
      every candidate holds).
  shared_weight (float in [0, 1], default 0.0): weight of the plain match ratio (it
      pulls a hot shared prompt back onto the instances that hold it: keep it small).
  min_match_tokens (int, default 256): shortest distinguishing match that counts.
  min_match_ratio (float in [0, 1], default 0.0): smallest matched/prompt that counts.
  balance_abs_threshold (int, default 32): in-flight gap that may signal imbalance.
  balance_rel_threshold (float >= 1, default 1.5): max/min ratio that confirms it.
"""

from __future__ import annotations

import math

from policies.types import Candidate, RoutingRequest, by_tier


class PrefixAffinity:
    name = "prefix_affinity"

    def __init__(self, min_match_tokens: int = 256, min_match_ratio: float = 0.0, balance_abs_threshold: int = 32,
                 balance_rel_threshold: float = 1.5, common_share: float = 0.25, shared_weight: float = 0.0) -> None:
        if not 0.0 <= shared_weight <= 1.0:
            raise ValueError("shared_weight must be in [0, 1]")
        self.shared_weight = shared_weight
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
        """Per tier: the longest match held by more than `common_share` of its candidates (2 at least)."""
        out = {}
        for tier, group in by_tier(cands).items():
            ms = sorted((min(c.cached_tokens, req.prompt_tokens.get(tier, 0)) for c in group), reverse=True)
            k = max(1, math.floor(self.common_share * len(ms)))  # ms[k]: held by k + 1 candidates or more
            out[tier] = ms[k] if len(ms) > 1 and k < len(ms) else 0
        return out

    def imbalanced_tiers(self, cands: list[Candidate]) -> set[str]:
        out = set()
        for t, group in by_tier(cands).items():
            hi, lo = max(c.in_flight for c in group), min(c.in_flight for c in group)
            if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
                out.add(t)
        return out

    def score(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[float], str]:
        if not cands:
            return [], "no candidates"
        imbalanced = self.imbalanced_tiers(cands)
        common = self.common_matches(req, cands)
        scores: list[float] = []
        best = 0
        for c in cands:
            prompt = req.prompt_tokens.get(c.tier, 0)
            raw = min(c.cached_tokens, prompt)
            match = max(0, raw - common[c.tier])
            best = max(best, match)
            if c.tier in imbalanced or prompt <= 0 or raw < self.min_match_tokens:
                scores.append(0.0)
                continue
            dist = 0.0 if match < self.min_match_tokens or match < self.min_match_ratio * prompt \
                else match / (prompt - common[c.tier])
            scores.append((1.0 - self.shared_weight) * dist + self.shared_weight * raw / prompt)
        if imbalanced:
            return scores, f"imbalanced {sorted(imbalanced)}: least-loaded; best distinguishing match {best}"
        hits = sum(1 for s in scores if s > 0)
        return scores, f"best distinguishing match {best} tokens; {hits}/{len(cands)} above the minimum"
