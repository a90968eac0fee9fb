"""Replay whose share per earlier domain follows the forgetting in the accuracy matrix.

After every stage evaluation the shares are recomputed from the reward matrix R: an earlier domain
j's forgetting is max over the rows since it was learned of R[l][j], minus its score now; each
domain's share is (forgetting + `--adaptive_replay_floor`) normalised over the earlier domains, so
a domain that lost more since its own stage is replayed more, and one that lost nothing keeps a
small share. The number of replayed tasks per batch is replay's (`--replay_ratio`); only the
choice of their domain changes. The shares are logged in every train record
(`replay_share/<domain>`). Cost: replay's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tau2cl.agent.episode import Trajectory
from tau2cl.cl.context import CLContext
from tau2cl.cl.strategies.replay import Replay

Matrix = Sequence[Sequence[float | None]]


def forgetting_per_domain(matrix: Matrix, stage: int) -> list[float]:
    """For each column j < stage (the domains learned by stage `stage`):
    max_{l ∈ [j+1, stage]} R[l][j] − R[stage][j] (≥ 0); missing entries count as no forgetting.
    Rows are 0 = before training, l = after the l-th domain (1-based)."""
    out = []
    for j in range(stage):
        seen = [matrix[row][j] for row in range(j + 1, stage + 1) if matrix[row][j] is not None]
        now = matrix[stage][j]
        out.append(max(0.0, max(seen) - now) if seen and now is not None else 0.0)
    return out


def replay_shares(matrix: Matrix, stage: int, floor: float) -> list[float]:
    """Share of replayed tasks per domain learned by stage `stage` (columns 0..stage-1), summing to 1."""
    weights = [f + floor for f in forgetting_per_domain(matrix, stage)]
    total = sum(weights)
    if total <= 0:
        return [1.0 / len(weights)] * len(weights) if weights else []
    return [w / total for w in weights]


class AdaptiveReplay(Replay):
    name = "adaptive_replay"

    def _domain_weights(self, ctx: CLContext, earlier: list[str]) -> list[float]:
        """Shares of the earlier domains in the last completed stage (the current domain's start)."""
        stage = ctx.progress.domain_idx  # rows 0..domain_idx are filled while domain domain_idx trains
        shares = replay_shares(ctx.accuracy_matrix(), stage, self.config.adaptive_replay_floor)
        by_name = dict(zip(ctx.order[:stage], shares, strict=True))
        return [by_name.get(name, 0.0) for name in earlier]

    def _pick_domain(self, ctx: CLContext, earlier: list[str], rng: random.Random) -> str:
        weights = self._domain_weights(ctx, earlier)
        if sum(weights) <= 0:
            return rng.choice(earlier)
        return rng.choices(earlier, weights=weights)[0]

    def step_metrics(self, ctx: CLContext, trajectories: list[Trajectory]) -> dict[str, Any]:
        stats = super().step_metrics(ctx, trajectories)
        earlier = ctx.earlier_domains
        for name, share in zip(earlier, self._domain_weights(ctx, earlier), strict=True):
            stats[f"replay_share/{name}"] = share
        return stats
