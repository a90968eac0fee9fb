#!/usr/bin/env bash
# The experiment grid: every registered continual-learning strategy, one after another, each a
# run with run_multi_gpu.sh's settings on NUM_GPUS GPUs of this machine, then one comparison table:
#     bash run_experiments.sh NUM_GPUS [extra 'tau2cl train' flags...]
# Each strategy's run goes to EXPERIMENT_DIR/<strategy> (default EXPERIMENT_DIR:
# runs/experiments-<date>-<time>); extra flags are passed to every run (so every strategy is
# trained and evaluated the same way) and may not set --log_dir or --cl_algorithm, which the grid
# sets. A run that fails does not stop the grid: the others still run, the comparison covers every
# run that logged anything (`tau2cl report`: EXPERIMENT_DIR/comparison.md, and report.txt and plots
# in each run's folder), and the script exits 1 naming the failed ones.
# Environment: ALGS (strategies to run, space-separated; default all registered), EXPERIMENT_DIR,
# MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3), DRY_RUN=1 (print the
# commands instead of running them).
set -euo pipefail

SCRIPT=run_experiments.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: bash run_experiments.sh NUM_GPUS [extra 'tau2cl train' flags...]"
    echo "  NUM_GPUS: processes on this machine, one per GPU (a positive integer)"
    echo "  runs, one after another, every strategy: ${VALID:-?}"
    echo "  env: ALGS (a subset, space-separated), EXPERIMENT_DIR (default runs/experiments-<date>-<time>),"
    echo "       MODEL (default Qwen/Qwen2.5-3B-Instruct), PYTHON (default python3), DRY_RUN=1 (print only)"
    echo "  e.g. bash run_experiments.sh 4 --num_steps_per_task 50"
}

# shellcheck source=scripts/common.sh
source "$HERE/scripts/common.sh"
load_algorithms
if wants_help "${1:-}"; then usage; exit 0; fi
NUM_GPUS="${1:-}"
check_num_gpus "$NUM_GPUS"
shift
for arg in "$@"; do
    case "$arg" in
        --log_dir|--log_dir=*|--cl_algorithm|--cl_algorithm=*)
            die "${arg%%=*} is set by the grid for each run; use EXPERIMENT_DIR or ALGS instead." ;;
    esac
done
read -r -a ALG_LIST <<< "${ALGS:-$VALID}"
[[ ${#ALG_LIST[@]} -gt 0 ]] || die "ALGS is empty; name at least one strategy."
for alg in "${ALG_LIST[@]}"; do
    check_alg "$alg"
done
EXPERIMENT_DIR="${EXPERIMENT_DIR:-runs/experiments-$(run_stamp)}"
torchrun_cmd "$NUM_GPUS"

# Ctrl-C stops the grid, not just the run in progress (torchrun exits with 1 on a signal, which
# would otherwise read as a failed run and start the next one).
trap 'echo "$SCRIPT: interrupted" >&2; exit 130' INT TERM

failed=()
logged=()
for i in "${!ALG_LIST[@]}"; do
    alg="${ALG_LIST[$i]}"
    echo "==== $SCRIPT: $alg ($((i + 1))/${#ALG_LIST[@]}) -> $EXPERIMENT_DIR/$alg ===="
    main_flags "$alg" "$EXPERIMENT_DIR/$alg" 4  # run_multi_gpu.sh's settings
    if ! run "${TORCHRUN[@]}" -m tau2cl.train "${TRAIN_FLAGS[@]}" "$@"; then
        failed+=("$alg")
    fi
    if [[ "${DRY_RUN:-0}" == 1 || -s "$EXPERIMENT_DIR/$alg/metrics.jsonl" ]]; then
        logged+=("$EXPERIMENT_DIR/$alg")
    fi
done

if [[ ${#logged[@]} -gt 1 ]]; then
    echo "==== $SCRIPT: comparison of ${#logged[@]} runs -> $EXPERIMENT_DIR/comparison.md ===="
    run "$PYTHON" -m tau2cl report "${logged[@]}" --out "$EXPERIMENT_DIR" || failed+=("report")
elif [[ ${#logged[@]} -eq 1 ]]; then
    echo "==== $SCRIPT: report of the one run -> ${logged[0]} ===="
    run "$PYTHON" -m tau2cl report "${logged[0]}" || failed+=("report")
fi
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "$SCRIPT: error: failed: ${failed[*]} (see their output above)." >&2
    exit 1
fi
