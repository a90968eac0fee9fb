"""The learning-rate schedule: linear warmup to the peak, then constant.

Pure: the rate of a step follows from how many steps were done before it, counted over the whole
run or within the current domain (--domain_restart), so a resumed run needs no scheduler state.
"""

from __future__ import annotations


def learning_rate(peak: float, warmup_steps: int, steps_done: int) -> float:
    """The rate of the step after `steps_done` steps: peak * min(1, (steps_done + 1) / warmup_steps)."""
    if warmup_steps <= 0:
        return peak
    return peak * min(1.0, (steps_done + 1) / warmup_steps)
