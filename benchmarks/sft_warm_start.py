"""Warm start then GRPO on the tiny model: pass rates, SFT time and the zero-variance share.

    python benchmarks/sft_warm_start.py                      # about 5 minutes on 2 busy CPU cores
    python benchmarks/sft_warm_start.py --tasks 27,9,15,11 --sft_steps 200

Runs the real GRPOTrainer on airline train tasks that need a write (tau2's do-nothing reward 0),
with the tiny random-init model: greedy evaluation on those tasks before training, supervised
steps on their golden demonstrations, greedy evaluation right after SFT, then GRPO steps at
temperature 1 with dynamic sampling on, whose records give the share of groups with equal
rewards before resampling (what plain GRPO would train on) and after, and the extra episodes.
To fit a CPU it runs the compact setting on the chosen tasks (`--compact_domains --task_ids`: a
one-line system prompt and only the tools the loaded tasks' golden actions call; tau2's evaluator
does not read the prompt, so rewards are tau2's). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tau2cl.config import GRPOConfig
from tau2cl.trainer import GRPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="27,9", help="airline train task ids (comma-separated)")
    parser.add_argument("--sft_steps", type=int, default=100)
    parser.add_argument("--sft_lr", type=float, default=3e-3)
    parser.add_argument("--grpo_steps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="max_resample_rounds")
    args = parser.parse_args()
    task_ids = args.tasks.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="sft_warm_start_"))
    config = GRPOConfig(
        model_name_or_path="tiny", model_dtype="float32", task_order=["airline"],
        sft_steps_per_task=args.sft_steps, sft_learning_rate=args.sft_lr, num_steps_per_task=args.grpo_steps,
        learning_rate=1e-4, warmup_steps=0, batch_size_per_gpu=len(task_ids), num_samples_per_prompt=args.samples,
        temperature=1.0, kl_coef=0.0, max_new_tokens=64, max_turns=6, max_context_tokens=4096,
        eval_split="train", eval_interval=0, dynamic_sampling=True, max_resample_rounds=args.rounds,
        compact_domains=True, task_ids=[f"airline:{t}" for t in task_ids], max_tasks_per_domain=1,
        log_dir=str(log_dir), use_progress_bar=False, log_interval=20, seed=1,
    )
    trainer = GRPOTrainer(config)
    timing: dict = {}
    run_sft = trainer.sft.run

    def timed_sft(*a, **k):
        t0 = time.perf_counter()
        run_sft(*a, **k)
        timing["sft_s"] = time.perf_counter() - t0
        timing["after_sft"] = trainer.evaluation.evaluate_domain("airline", "after_sft")

    trainer.sft.run = timed_sft
    start = time.perf_counter()
    summary = trainer.train()
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in records if r["type"] == "sft"]
    train = [r for r in records if r["type"] == "train"]
    print("\n=== warm start then GRPO (tiny model, airline tasks " + ", ".join(task_ids) + ") ===")
    print(f"do-nothing floor                     {summary['do_nothing_floor']['airline']:.3f}")
    print(f"greedy pass rate before training     {summary['pass_rate_matrix'][0][0]:.3f}")
    print(f"greedy pass rate after SFT           {timing['after_sft'].pass_rate:.3f}")
    print(f"greedy pass rate after GRPO          {summary['pass_rate_matrix'][1][0]:.3f}")
    print(f"SFT: {len(sft)} steps in {timing['sft_s']:.1f}s; loss {sft[0]['loss']:.3f} -> {sft[-1]['loss']:.3f}; "
          f"token accuracy {sft[0]['token_accuracy']:.3f} -> {sft[-1]['token_accuracy']:.3f}")
    for r in train:
        print(f"GRPO step {r['step']}: zero-variance groups {r['frac_reward_zero_std_before_resample']:.2f} before "
              f"resampling, {r['frac_reward_zero_std_after_resample']:.2f} after ({r['resample_rounds']:.0f} rounds, "
              f"{r['resample_extra_episodes']:.0f} extra episodes); tau2 reward {r['tau2_reward_mean']:.3f}; "
              f"loss {r['loss']:.4f}")
    print(f"total {total:.1f}s; log dir {log_dir}")


if __name__ == "__main__":
    main()
