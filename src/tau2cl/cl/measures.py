"""Continual-learning measures from the accuracy matrix R (Chaudhry et al. 2018; Lopez-Paz & Ranzato 2017).

R is a list of rows: R[0] is the model before any training, R[i] the model after training stage i;
R[i][j] is the score on domain column j (0-based here, while the usual
formulas number domains from 1, so their domain j is column j - 1 here). Stage k (1-based) has learned the domains of columns 0..k-1, and the row right after
column c was learned is row c + 1.

An entry may be None when it was not evaluated (e.g. an interrupted run). A measure that needs a missing
entry returns None instead of guessing; after the first stage (k == 1) BWT, forgetting and FWT are 0.0
by convention and need no entries.

A run whose every stage trains on all domains mixed (multi-task training, the upper bound) has no
domain order: its rows are points along one mixed stream, so of the four only average performance
means something; `reported_measures` is the one place that says so.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def _check_stage(R: Matrix, k: int) -> None:
    """k must name a trained stage whose row exists: 1 <= k <= T and k < len(R)."""
    num_domains = len(R[0]) if len(R) else 0
    if not 1 <= k <= num_domains or k >= len(R):
        raise ValueError(
            f"stage k={k} is not in 1..{min(num_domains, len(R) - 1)} for a matrix with "
            f"{len(R)} rows and {num_domains} domains"
        )


def _mean(values: list[float | None]) -> float | None:
    """Mean of the values, or None if any is missing."""
    if any(v is None for v in values):
        return None
    return float(sum(values) / len(values))


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def average_performance(R: Matrix, k: int) -> float | None:
    """A_k = (1/k) Σ_{j≤k} R[k][j]: mean score over the domains learned so far, after stage k."""
    _check_stage(R, k)
    return _mean([R[k][c] for c in range(k)])


def backward_transfer(R: Matrix, k: int) -> float | None:
    """BWT_k = 1/(k−1) Σ_{j<k} (R[k][j] − R[j][j]): change on old domains since each was learned.

    Negative means forgetting. Column c was learned at stage c + 1, so R[j][j] is R[c + 1][c] here.
    """
    _check_stage(R, k)
    if k == 1:
        return 0.0
    return _mean([_diff(R[k][c], R[c + 1][c]) for c in range(k - 1)])


def forgetting(R: Matrix, k: int) -> float | None:
    """F_k = 1/(k−1) Σ_{j<k} (max_{l∈[j, k−1]} R[l][j] − R[k][j])  (Chaudhry et al. 2018).

    Drop from the best score a domain had since it was learned (rows c+1..k-1 for column c) to now.
    """
    _check_stage(R, k)
    if k == 1:
        return 0.0
    drops = []
    for c in range(k - 1):
        seen = [R[row][c] for row in range(c + 1, k)]
        best = None if any(v is None for v in seen) else max(seen)
        drops.append(_diff(best, R[k][c]))
    return _mean(drops)


def forward_transfer(R: Matrix, k: int) -> float | None:
    """FWT_k = 1/(k−1) Σ_{2≤j≤k} (R[j−1][j] − R[0][j]): gain on a domain before training on it.

    Compares the stage just before column c was trained (row c) with the base model (row 0).
    """
    _check_stage(R, k)
    if k == 1:
        return 0.0
    return _mean([_diff(R[c][c], R[0][c]) for c in range(1, k)])


def transfer_metrics(R: Matrix, k: int) -> dict[str, float | None]:
    """All four measures after stage k, keyed by name (values None where an entry is missing)."""
    return {
        "average_performance": average_performance(R, k),
        "backward_transfer": backward_transfer(R, k),
        "forgetting": forgetting(R, k),
        "forward_transfer": forward_transfer(R, k),
    }


# The measures that compare a domain before and after its own stage: undefined without a domain order.
ORDER_MEASURES = ("backward_transfer", "forgetting", "forward_transfer")


def reported_measures(R: Matrix, k: int, mixes_domains: bool = False) -> dict[str, float | None]:
    """The measures a run reports after stage k: all four (transfer_metrics) for a run that learns
    the domains in order; for one whose stages mix all domains (`mixes_domains`), average performance
    as usual and None for the three that need a domain order."""
    measures = transfer_metrics(R, k)
    if mixes_domains:
        measures.update(dict.fromkeys(ORDER_MEASURES))
    return measures
