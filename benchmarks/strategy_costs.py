"""What each continual-learning strategy adds to a run, side by side on the tiny model.

    python benchmarks/strategy_costs.py                 # a few minutes on 2 busy CPU cores
    python benchmarks/strategy_costs.py --steps 4 --strategies sequential ewc_pp

Trains the same two domains (airline → retail, compact setting, custom length reward) with each
strategy and the same seed, timing the strategy's hooks from the outside: `after_rollout` (EWC++'s
Fisher update from the step's episodes), `after_domain` (EWC's and online EWC's Fisher rollouts,
adaptive fusion's α search) and the step's update (`time_update` of the train records, which also
holds `after_rollout` and the penalty). Prints one table, with each strategy's run time as a ratio
to sequential's and the α adaptive fusion kept after each domain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from tau2cl.config import GRPOConfig
from tau2cl.trainer import GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))  # reward_fns


def run(strategy: str, steps: int, extra: dict) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix=f"strategy_costs_{strategy}_"))
    config = GRPOConfig(
        model_name_or_path="tiny", model_dtype="float32", task_order=["airline", "retail"], max_tasks_per_domain=3,
        num_steps_per_task=steps, batch_size_per_gpu=2, num_samples_per_prompt=2, max_new_tokens=16, max_turns=2,
        eval_interval=0, eval_max_tasks=1, kl_coef=0.0, learning_rate=3e-3, compact_domains=True,
        reward_fn="reward_fns:first_reply_length", cl_algorithm=strategy, log_dir=str(log_dir),
        use_progress_bar=False, log_interval=100, seed=5, **extra,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' own console: the table is what counts
        trainer = GRPOTrainer(config)
    spent: dict[str, float] = defaultdict(float)
    for hook in ("after_rollout", "after_domain"):
        original = getattr(trainer.strategy, hook)

        def timed(*args, _original=original, _hook=hook, **kwargs):
            t0 = time.perf_counter()
            _original(*args, **kwargs)
            spent[_hook] += time.perf_counter() - t0

        setattr(trainer.strategy, hook, timed)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    updates = [r["time_update"] for r in records if r["type"] == "train"]
    alphas = [r["fusion_alpha"] for r in records if r["type"] == "strategy"]
    return {
        "alphas": " ".join(f"{a:g}" for a in alphas) or "-",
        "run_s": total,
        "update_s": sum(updates) / len(updates),
        "after_rollout_s": spent["after_rollout"] / len(updates),
        "after_domain_s": spent["after_domain"] / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps per domain")
    parser.add_argument("--strategies", nargs="+", default=["sequential", "online_ewc", "ewc_pp", "adaptive_fusion"])
    args = parser.parse_args()
    extra = {
        "online_ewc": {"ewc_fisher_samples": 4},
        "ewc_pp": {"ewc_pp_interval": 1},
        "adaptive_fusion": {"fusion_alpha_grid": [0.25, 0.5, 0.75, 1.0], "fusion_holdout_tasks": 1},
    }
    rows = {name: run(name, args.steps, extra.get(name, {})) for name in args.strategies}
    base = rows.get("sequential", {}).get("run_s")
    print(f"{'strategy':<16} {'run s':>8} {'× seq':>6} {'update s/step':>14} {'after_rollout s/step':>21} "
          f"{'after_domain s':>15}  α chosen")
    for name, r in rows.items():
        ratio = f"{r['run_s'] / base:.2f}" if base else "-"
        print(f"{name:<16} {r['run_s']:>8.1f} {ratio:>6} {r['update_s']:>14.3f} {r['after_rollout_s']:>21.3f} "
              f"{r['after_domain_s']:>15.2f}  {r['alphas']}")


if __name__ == "__main__":
    main()
