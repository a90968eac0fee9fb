#!/usr/bin/env bash
# Train on NUM_GPUS GPUs of this machine, one process per GPU, launched by torchrun:
#     bash run_multi_gpu.sh NUM_GPUS ALG [extra 'tau2cl train' flags...]
# The main command: Qwen2.5-3B-Instruct in bfloat16, 4 tasks per GPU and step (a step trains
# on NUM_GPUS x 4 tasks, each sampled num_samples_per_prompt times), 100 steps per domain, a progress
# bar on a terminal, a compact line every 10 steps, files in runs/<ALG>-<date>-<time>. Extra flags are passed
# through and, coming last, override these. Ranks, world size and devices come from torchrun; on a
# machine without CUDA the NUM_GPUS processes run on CPU (gloo). Several machines: see README.md,
# "Several machines".
# Environment: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3; it also runs
# torchrun, as `python -m torch.distributed.run`), DRY_RUN=1 (print the command instead of running it).
set -euo pipefail

SCRIPT=run_multi_gpu.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: bash run_multi_gpu.sh NUM_GPUS ALG [extra 'tau2cl train' flags...]"
    echo "  NUM_GPUS: processes on this machine, one per GPU (a positive integer)"
    echo "  ALG: the continual-learning strategy, one of: ${VALID:-?}"
    echo "  env: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3), DRY_RUN=1 (print only)"
    echo "  e.g. bash run_multi_gpu.sh 4 replay --num_steps_per_task 20"
}

# shellcheck source=scripts/common.sh
source "$HERE/scripts/common.sh"
read_gpus_and_alg "$@"
shift 2

torchrun_cmd "$NUM_GPUS"
main_flags "$ALG" "runs/${ALG}-$(run_stamp)" 4
launch "${TORCHRUN[@]}" -m tau2cl.train "${TRAIN_FLAGS[@]}" "$@"
