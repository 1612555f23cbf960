"""The profile engine: filters, then weighted scorers, then a picker. Pure: no I/O."""

from __future__ import annotations

from policies.registry import KNOWN_FILTERS, KNOWN_PICKERS, KNOWN_SCORERS, build
from policies.schema import Policy, ProfileSpec
from policies.types import (
    Candidate,
    EstimatingScorer,
    Filter,
    Picker,
    PluginResult,
    RoutingDecision,
    RoutingRequest,
    Scorer,
)


class Profile:
    def __init__(self, name: str, filters: list[Filter], scorers: list[tuple[Scorer, float]],
                 picker: Picker) -> None:
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        # which scorers also estimate: checked once here, not per request (a runtime Protocol check is slow)
        self._plan = [(s, w, s if isinstance(s, EstimatingScorer) else None) for s, w in scorers]

    @classmethod
    def from_spec(cls, name: str, spec: ProfileSpec) -> Profile:
        filters = [build(KNOWN_FILTERS, f.type, dict(f.params)) for f in spec.filters]
        scorers = [(build(KNOWN_SCORERS, s.type, dict(s.params)), s.weight) for s in spec.scorers]
        picker = build(KNOWN_PICKERS, spec.picker.type, dict(spec.picker.params))
        return cls(name, filters, scorers, picker)

    def decide(self, req: RoutingRequest, candidates: list[Candidate]) -> RoutingDecision:
        reasons: list[PluginResult] = []
        rejected: dict[str, str] = {}
        cands = list(candidates)
        for f in self.filters:
            kept, why = f.filter(req, cands)
            if len(kept) != len(cands):
                kept_keys = {c.key for c in kept}
                for c in cands:
                    if c.key not in kept_keys:
                        rejected[c.key] = f.name
            cands = kept
            reasons.append(PluginResult(f.name, why))
        scores: dict[str, dict[str, float]] = {c.key: {} for c in cands}
        per_cand = [scores[c.key] for c in cands]      # each candidate's score dict, in order
        estimates: dict[str, dict[str, float]] = {}
        totals = [0.0] * len(cands)
        if cands:
            for scorer, weight, est in self._plan:
                if est is not None:
                    vals, why, ests = est.score_estimates(req, cands)
                    for c, e in zip(cands, ests, strict=True):
                        cur = estimates.get(c.key)
                        if cur is None:
                            estimates[c.key] = dict(e)
                        else:
                            cur.update(e)
                else:
                    vals, why = scorer.score(req, cands)
                name = scorer.name
                for d, v in zip(per_cand, vals, strict=True):
                    d[name] = v
                totals = [t + weight * v for t, v in zip(totals, vals, strict=True)]
                reasons.append(PluginResult(scorer.name, why))
        order, why = self.picker.pick(req, cands, totals)
        reasons.append(PluginResult(self.picker.name, why))
        ranked = [cands[i] for i in order]
        return RoutingDecision(chosen=ranked[0] if ranked else None, ranked=ranked, scores=scores,
                               totals={cands[i].key: totals[i] for i in range(len(cands))},
                               reasons=reasons, rejected=rejected, estimates=estimates)


def build_profiles(policy: Policy) -> dict[str, Profile]:
    return {name: Profile.from_spec(name, spec) for name, spec in policy.profiles.items()}
