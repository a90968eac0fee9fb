#!/usr/bin/env bash
# Train on one GPU (one process) with a real model:
#     bash run_single_gpu.sh ALG [extra 'tau2cl train' flags...]
# ALG is a continual-learning strategy (--cl_algorithm). Extra flags are passed through and, coming
# last, override the defaults below (e.g. --num_steps_per_task 20 or --log_dir runs/mine).
# Environment: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3).
set -euo pipefail

PYTHON="${PYTHON:-python3}"
MODEL="${MODEL:-Qwen/Qwen2.5-3B-Instruct}"

usage() {
    echo "usage: bash run_single_gpu.sh ALG [extra 'tau2cl train' flags...]"
    echo "  ALG: the continual-learning strategy, one of: ${VALID:-?}"
    echo "  env: MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3)"
    echo "  e.g. bash run_single_gpu.sh sequential --num_steps_per_task 20"
}

# The strategies that exist now come from the package's own registry, not from a list kept here.
if ! VALID="$("$PYTHON" -c 'from tau2cl.strategies import registered_names; print(" ".join(registered_names()))')"; then
    echo "run_single_gpu.sh: error: cannot import tau2cl with $PYTHON; install it first (see README.md)." >&2
    exit 2
fi

ALG="${1:-}"
case "$ALG" in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; echo "run_single_gpu.sh: error: ALG is missing." >&2; exit 2 ;;
esac
if [[ " $VALID " != *" $ALG "* ]]; then
    usage >&2
    echo "run_single_gpu.sh: error: unknown ALG '$ALG'; choose one of: $VALID." >&2
    exit 2
fi
shift

exec "$PYTHON" -m tau2cl.train \
    --model_name_or_path "$MODEL" \
    --model_dtype bfloat16 \
    --cl_algorithm "$ALG" \
    --batch_size_per_gpu 4 \
    --num_steps_per_task 100 \
    --use_progress_bar \
    --log_interval 10 \
    --log_dir "runs/${ALG}-$(date +%Y%m%d-%H%M%S)" \
    "$@"
