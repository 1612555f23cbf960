"""Filter `context_fits`.

Algorithm: keep a candidate only if prompt_tokens(tier) + completion budget
<= the tier's max_model_len. The completion budget is the request's max_tokens,
or `defaults.completion_tokens` from the policy when the request has none; when
the request has no max_tokens, a tier that fits the prompt alone (plus
`min_completion_tokens`) still passes, since vLLM then caps the completion at the
remaining context.
Parameters:
  min_completion_tokens (int, default 16): room a tier must leave for output when
      the request has no max_tokens and the default budget does not fit.
"""

from __future__ import annotations

from policies.types import Candidate, RoutingRequest, completion_budget


class ContextFits:
    name = "context_fits"

    def __init__(self, min_completion_tokens: int = 16) -> None:
        if min_completion_tokens < 1:
            raise ValueError("min_completion_tokens must be >= 1")
        self.min_completion_tokens = min_completion_tokens

    def fits(self, req: RoutingRequest, c: Candidate) -> bool:
        prompt = req.prompt_tokens.get(c.tier)
        if prompt is None:
            return False
        if prompt + completion_budget(req) <= c.max_model_len:
            return True
        return req.max_tokens is None and prompt + self.min_completion_tokens <= c.max_model_len

    def filter(self, req: RoutingRequest, cands: list[Candidate]) -> tuple[list[Candidate], str]:
        memo: dict[tuple[str, int], bool] = {}      # `fits` depends only on the tier and its context length
        keep = []
        for c in cands:
            k = (c.tier, c.max_model_len)
            ok = memo.get(k)
            if ok is None:
                ok = memo[k] = self.fits(req, c)
            if ok:
                keep.append(c)
        return keep, f"{len(keep)}/{len(cands)} fit prompt+completion in context"


