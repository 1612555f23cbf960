"""Picker `max_score`.

Algorithm: rank candidates by weighted total score, highest first. Totals within
`epsilon` are ties; ties are broken by `ties`.
Parameters:
  epsilon (float, default 1e-9): totals closer than this are equal.
  ties ("hash" | "order", default "hash"):
    hash: a stable hash of (request id, candidate key), so the choice is deterministic for a request
      yet spreads equal candidates across instances;
    order: the candidates' order (the route's tiers, then each tier's instances as the policy lists
      them): the first listed wins every tie, as LiteLLM picks the first of its equally cheap
      deployments. A priority order, not a spread.
"""

from __future__ import annotations

import zlib

from policies.types import Candidate, RoutingRequest


class MaxScore:
    name = "max_score"

    def __init__(self, epsilon: float = 1e-9, ties: str = "hash") -> None:
        if epsilon < 0:
            raise ValueError("epsilon must be >= 0")
        if ties not in ("hash", "order"):
            raise ValueError("ties must be 'hash' or 'order'")
        self.epsilon = epsilon
        self.ties = ties

    def pick(self, req: RoutingRequest, cands: list[Candidate], totals: list[float]) -> tuple[list[int], str]:
        if not cands:
            return [], "no candidates"
        eps = self.epsilon
        primary = [-round(t / eps) for t in totals] if eps > 0 else [-t for t in totals]
        order = sorted(range(len(cands)), key=primary.__getitem__)
        if self.ties == "hash":    # the same order as sorting by (primary, hash): re-sort each run of equals
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and primary[order[j]] == primary[order[i]]:
                    j += 1
                if j - i > 1:
                    order[i:j] = sorted(order[i:j],
                                        key=lambda k: zlib.crc32(f"{req.request_id}/{cands[k].key}".encode()))
                i = j
        return order, f"best {cands[order[0]].key} total {totals[order[0]]:.4f}"
