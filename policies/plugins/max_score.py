"""Picker `max_score`.

Algorithm: rank candidates by weighted total score, highest first. Totals within
`epsilon` are ties; ties are broken by a stable hash of (request id, candidate
key), so the choice is deterministic for a request yet spreads equal candidates
across instances.
Parameters:
  epsilon (float, default 1e-9): totals closer than this are equal.
"""

from __future__ import annotations

import zlib

from policies.types import Candidate, RoutingRequest


class MaxScore:
    name = "max_score"

    def __init__(self, epsilon: float = 1e-9) -> None:
        if epsilon < 0:
            raise ValueError("epsilon must be >= 0")
        self.epsilon = epsilon

    def pick(self, req: RoutingRequest, cands: list[Candidate], totals: list[float]) -> tuple[list[int], str]:
        if not cands:
            return [], "no candidates"
        eps = self.epsilon
        # Quantize totals so near-equal scores tie, then break ties by a stable hash.
        order = sorted(
            range(len(cands)),
            key=lambda i: (-round(totals[i] / eps) if eps > 0 else -totals[i],
                           zlib.crc32(f"{req.request_id}/{cands[i].key}".encode())),
        )
        return order, f"best {cands[order[0]].key} total {totals[order[0]]:.4f}"
