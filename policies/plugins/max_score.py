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
        by_order = self.ties == "order"
        # Quantize totals so near-equal scores tie, then break ties by a stable hash (or the order).
        order = sorted(
            range(len(cands)),
            key=lambda i: (-round(totals[i] / eps) if eps > 0 else -totals[i],
                           i if by_order else zlib.crc32(f"{req.request_id}/{cands[i].key}".encode())),
        )
        return order, f"best {cands[order[0]].key} total {totals[order[0]]:.4f}"
