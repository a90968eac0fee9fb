#!/usr/bin/env bash
# Train with a 4x larger batch on NUM_GPUS GPUs of this machine (torchrun, one process per GPU):
#     bash run_large_batch.sh NUM_GPUS ALG [extra 'tau2cl train' flags...]
# The settings of run_multi_gpu.sh (Qwen2.5-3B-Instruct, bfloat16, 100 steps per domain, a progress
# bar on a terminal, a line every 10 steps) with 8 tasks per GPU and step, 8 samples per task, the update split
# into 4 accumulated micro-batches and gradient checkpointing; files in
# runs/<ALG>-large_batch-<date>-<time>. Extra flags are passed through and override these.
#
# What it trades: each step samples 64 episodes per GPU instead of 16 (8 tasks x 8 samples against
# 4 x 4), so a step costs about 4x the rollouts and 4x the update, and gradient checkpointing adds
# about a third to the update (activations are recomputed in the backward pass). In return each
# step's gradient averages 4x the episodes (less noise), and groups of 8 give finer advantages and
# fewer groups whose samples all scored the same (such groups teach nothing). The update's
# activation memory stays at or below run_multi_gpu.sh's (micro-batches of 16 episodes, like its one
# batch, and checkpointed), but sampling holds 4x the episodes at once: if generation runs out of
# memory, lower --batch_size_per_gpu or --max_context_tokens. With the same 100 steps per domain, a domain sees 4x
# the episodes of run_multi_gpu.sh (pass --num_steps_per_task 25 to spend the same rollouts).
# Environment: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3; it also runs
# torchrun), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail

SCRIPT=run_large_batch.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: bash run_large_batch.sh NUM_GPUS ALG [extra 'tau2cl train' flags...]"
    echo "  NUM_GPUS: processes on this machine, one per GPU (a positive integer)"
    echo "  ALG: the continual-learning strategy, one of: ${VALID:-?}"
    echo "  per step and GPU: 8 tasks x 8 samples in 4 micro-batches, gradient checkpointing"
    echo "  env: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3), DRY_RUN=1 (print only)"
    echo "  e.g. bash run_large_batch.sh 4 ewc --num_steps_per_task 50"
}

# shellcheck source=scripts/common.sh
source "$HERE/scripts/common.sh"
read_gpus_and_alg "$@"
shift 2

torchrun_cmd "$NUM_GPUS"
main_flags "$ALG" "runs/${ALG}-large_batch-$(run_stamp)" 8
launch "${TORCHRUN[@]}" -m tau2cl.train "${TRAIN_FLAGS[@]}" \
    --num_samples_per_prompt 8 \
    --gradient_accumulation_steps 4 \
    --gradient_checkpointing \
    "$@"
