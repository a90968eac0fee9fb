#!/usr/bin/env bash
# Train on one GPU (one process) with a real model:
#     bash run_single_gpu.sh ALG [extra 'tau2cl train' flags...]
# ALG is a continual-learning strategy (--cl_algorithm). Extra flags are passed through and, coming
# last, override the defaults below (e.g. --num_steps_per_task 20 or --log_dir runs/mine).
# Environment: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3),
# DRY_RUN=1 (print the command instead of running it).
set -euo pipefail

SCRIPT=run_single_gpu.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: bash run_single_gpu.sh ALG [extra 'tau2cl train' flags...]"
    echo "  ALG: the continual-learning strategy, one of: ${VALID:-?}"
    echo "  env: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3), DRY_RUN=1 (print only)"
    echo "  e.g. bash run_single_gpu.sh sequential --num_steps_per_task 20"
}

# shellcheck source=scripts/common.sh
source "$HERE/scripts/common.sh"
load_algorithms
if wants_help "${1:-}"; then usage; exit 0; fi
ALG="${1:-}"
check_alg "$ALG"
shift

main_flags "$ALG" "runs/${ALG}-$(run_stamp)" 4
launch "$PYTHON" -m tau2cl.train "${TRAIN_FLAGS[@]}" "$@"
