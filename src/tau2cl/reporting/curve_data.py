"""What learning_curves.png draws, as numbers: every series on one step axis that runs through each
domain's supervised warm-start steps and then its GRPO steps.

Domain i owns the steps (start_i, end_i]: first its warm-start steps, up to switch_i, then its GRPO
steps; the next domain starts at end_i. x = 0 is the model before any training. A record's x comes
from its domain and its step within the domain (metrics.jsonl's global_step counts GRPO steps only,
so the warm start has none of its own). Without a warm start x is the global step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tau2cl.reporting.run_data import RunData

Series = tuple[list[int], list[float]]  # (x, y)


@dataclass(frozen=True)
class DomainSpan:
    """One domain's place on the step axis."""

    domain_idx: int
    domain: str
    start: int  # x before its first step
    sft_steps: int
    grpo_steps: int
    finished: bool  # its stage evaluation was recorded, or a later domain trained

    @property
    def switch(self) -> int:
        """x of its last warm-start step: its GRPO steps follow."""
        return self.start + self.sft_steps

    @property
    def end(self) -> int:
        return self.switch + self.grpo_steps


@dataclass
class CurveData:
    """Every series of the plot, keyed by domain name."""

    spans: list[DomainSpan]
    sft_loss: dict[str, Series]  # trained domain → its warm-start steps' loss
    sft_token_accuracy: dict[str, Series]
    train_reward: dict[str, Series]  # trained domain → its GRPO steps' mean reward
    eval_reward: dict[str, Series]  # evaluated domain → every evaluation's mean reward
    stage_reward: dict[str, Series]  # evaluated domain → the stage evaluations' (the matrix entries)

    @property
    def has_warm_start(self) -> bool:
        return any(xs for xs, _ in self.sft_loss.values())


def _max_step(records: list[dict], domain_idx: int) -> int:
    steps = [r.get("step") for r in records if r.get("task_idx") == domain_idx]
    return max((s for s in steps if isinstance(s, int)), default=0)


def domain_spans(run: RunData) -> list[DomainSpan]:
    """The spans of the domains that started training, in order.

    Their lengths are the configured step counts (from summary.json) or, without them, the steps
    recorded; never fewer than recorded.
    """
    stages = {r.get("stage") for r in run.evals if isinstance(r.get("stage"), int)}
    trained = {r.get("task_idx") for r in [*run.sfts, *run.trains] if isinstance(r.get("task_idx"), int)}
    spans: list[DomainSpan] = []
    start = 0
    for i, name in enumerate(run.domains):
        sft_seen, grpo_seen = _max_step(run.sfts, i), _max_step(run.trains, i)
        finished = (i + 1) in stages or any(t > i for t in trained) or any(k > i + 1 for k in stages)
        if not (sft_seen or grpo_seen or finished):
            break
        sft_steps = max(sft_seen, run.sft_steps_per_task or 0)
        grpo_steps = max(grpo_seen, run.num_steps_per_task or 0)
        spans.append(DomainSpan(i, name, start, sft_steps, grpo_steps, finished))
        start = spans[-1].end
    return spans


def _series(records: list[dict], key: str, x_of: Callable[[dict], int | None]) -> Series:
    """(x, y) of every record with an x and a number under `key`, in the order of x."""
    points = []
    for r in records:
        x, y = x_of(r), r.get(key)
        if x is not None and isinstance(y, (int, float)) and not isinstance(y, bool):
            points.append((x, float(y)))
    points.sort(key=lambda point: point[0])
    return [x for x, _ in points], [y for _, y in points]


def _by_domain(records: list[dict], field: str) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for r in records:
        if isinstance(r.get(field), str):
            grouped.setdefault(r[field], []).append(r)
    return grouped


def curve_data(run: RunData) -> CurveData:
    """The plot's series, each point at its x on the step axis (see the module's doc)."""
    spans = domain_spans(run)

    def span_of(r: dict) -> DomainSpan | None:
        i = r.get("task_idx")
        return spans[i] if isinstance(i, int) and 0 <= i < len(spans) else None

    def sft_x(r: dict) -> int | None:
        span, step = span_of(r), r.get("step")
        return span.start + step if span and isinstance(step, int) else None

    def grpo_x(r: dict) -> int | None:  # a GRPO step, or an evaluation after one
        if r.get("stage") == 0:
            return 0  # before any training
        span, step = span_of(r), r.get("step")
        return span.switch + step if span and isinstance(step, int) else None

    sfts, trains = _by_domain(run.sfts, "domain"), _by_domain(run.trains, "domain")
    evals = _by_domain(run.evals, "eval_domain")
    return CurveData(
        spans=spans,
        sft_loss={d: _series(rs, "loss", sft_x) for d, rs in sfts.items()},
        sft_token_accuracy={d: _series(rs, "token_accuracy", sft_x) for d, rs in sfts.items()},
        train_reward={d: _series(rs, "reward_mean", grpo_x) for d, rs in trains.items()},
        eval_reward={d: _series(rs, "reward_mean", grpo_x) for d, rs in evals.items()},
        stage_reward={
            d: _series([r for r in rs if r.get("stage") is not None], "reward_mean", grpo_x)
            for d, rs in evals.items()
        },
    )
