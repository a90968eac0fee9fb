#!/usr/bin/env bash
# Quick smoke test: the tiny offline model on CPU through airline -> retail -> telecom, with every
# part of a real run's output (banner, progress bar on a terminal or [SFT]/[TRAIN] lines in a
# redirected log, [EVAL] lines, transfer blocks, final summary) in a few minutes on 2 CPU cores.
# No network, no GPU.
#     bash run_quick_test.sh [ALG] [extra 'tau2cl train' flags...]
# ALG defaults to sequential; extra flags override configs/quick_test.yaml (e.g. --log_dir DIR,
# --verbose --no-use_progress_bar). Environment: PYTHON (default python3), DRY_RUN=1 (print the
# command instead of running it).
set -euo pipefail

SCRIPT=run_quick_test.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    echo "usage: bash run_quick_test.sh [ALG] [extra 'tau2cl train' flags...]"
    echo "  ALG: the continual-learning strategy (default sequential), one of: ${VALID:-?}"
}

# shellcheck source=scripts/common.sh
source "$HERE/scripts/common.sh"
load_algorithms

ALG=sequential
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    ""|-*) ;;  # no ALG given: only flags (or nothing) follow
    *) ALG="$1"; shift; check_alg "$ALG" ;;
esac

# Offline: the tiny model is built locally on first use (into $TAU2CL_CACHE, default
# ~/.cache/tau2cl); nothing is fetched from the Hugging Face hub.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
# CPU, so the smoke test runs the same on every machine.
export CUDA_VISIBLE_DEVICES=""
# One intra-op thread: the tiny model's ops are too small to gain from more, and on a busy 2-core
# machine competing threads made the run about twice as slow. Set OMP_NUM_THREADS to override.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

alg_flags "$ALG"
launch "$PYTHON" -m tau2cl.train --config "$HERE/configs/quick_test.yaml" "${ALG_FLAGS[@]}" "$@"
