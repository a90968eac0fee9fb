# Shared by the run_*.sh wrappers: sourced, never run on its own. A wrapper sets SCRIPT (its own
# file name) and defines usage() before it sources this file:
#     SCRIPT=run_x.sh; usage() { ...; }; source "$HERE/scripts/common.sh"
# so that every wrapper checks its arguments the same way and answers a wrong call the same way:
# its usage and one "SCRIPT: error: ..." line on stderr, exit status 2, nothing started.
#
# Environment read here:
#   PYTHON   interpreter that has tau2cl installed (default python3)
#   MODEL    model to train (default Qwen/Qwen2.5-3B-Instruct): a hub id, a folder, a .gguf, or tiny
#   DRY_RUN  1 = print each command (shell-quoted, one line) instead of running it

PYTHON="${PYTHON:-python3}"
DEFAULT_MODEL="Qwen/Qwen2.5-3B-Instruct"
MODEL="${MODEL:-$DEFAULT_MODEL}"
VALID=""  # the registered strategies, filled by load_algorithms
LORA_ONLY=""  # those that train LoRA adapters only (they need --lora_r > 0), filled likewise
SCRIPT_LORA_R=16  # the adapter rank the scripts give such a strategy (extra flags override it)

# die MESSAGE: a wrong call. Usage and the message on stderr, exit 2.
die() {
    usage >&2
    echo "$SCRIPT: error: $1" >&2
    exit 2
}

# load_algorithms: VALID = the strategies that exist now and LORA_ONLY = those that need LoRA,
# from the package's own registry (not a list kept here), space-separated. Without an importable
# tau2cl nothing else can work: exit 2.
load_algorithms() {
    local names
    local code='from tau2cl.cl.strategies.registry import CL_ALGORITHMS as A, NEEDS_LORA as L; print(" ".join(A)); print(" ".join(L))'
    if ! names="$("$PYTHON" -c "$code")"; then
        echo "$SCRIPT: error: cannot import tau2cl with $PYTHON; install it first (see README.md)." >&2
        exit 2
    fi
    VALID="$(sed -n 1p <<< "$names")"
    LORA_ONLY="$(sed -n 2p <<< "$names")"
}

# alg_flags ALG: ALG_FLAGS = --cl_algorithm ALG, plus --lora_r SCRIPT_LORA_R for a strategy that
# trains LoRA adapters only (progressive), so every script can start every strategy.
alg_flags() {
    ALG_FLAGS=(--cl_algorithm "$1")
    if [[ " $LORA_ONLY " == *" $1 "* ]]; then
        ALG_FLAGS+=(--lora_r "$SCRIPT_LORA_R")
    fi
}

# wants_help ARGS...: true when the first two arguments hold -h or --help.
wants_help() {
    local arg
    for arg in "${@:1:2}"; do
        case "$arg" in -h|--help) return 0 ;; esac
    done
    return 1
}

# check_alg ALG: ALG must be a registered strategy (load_algorithms first).
check_alg() {
    [[ -n "$1" ]] || die "ALG is missing."
    [[ " $VALID " == *" $1 "* ]] || die "unknown ALG '$1'; choose one of: $VALID."
}

# check_num_gpus N: N must be a positive integer (processes on this machine, one per GPU).
check_num_gpus() {
    [[ -n "$1" ]] || die "NUM_GPUS is missing."
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, not '$1'."
}

# run_stamp: date and time for run folder names, e.g. 20250101-120000.
run_stamp() {
    date +%Y%m%d-%H%M%S
}

# main_flags ALG LOG_DIR BATCH_SIZE_PER_GPU: TRAIN_FLAGS = the settings of the main 4-GPU command
# (README, "Several GPUs") with this strategy, log_dir and batch size. Extra flags given after
# them override them. No progress-bar flag: the bar is drawn when stdout is a terminal and left out
# of a redirected log (a scheduler's), unless an extra --use_progress_bar asks for it.
main_flags() {
    alg_flags "$1"
    TRAIN_FLAGS=(
        --model_name_or_path "$MODEL"
        --model_dtype bfloat16
        --batch_size_per_gpu "$3"
        --num_steps_per_task 100
        "${ALG_FLAGS[@]}"
        --log_interval 10
        --log_dir "$2"
    )
}

# torchrun_cmd NUM_GPUS: TORCHRUN = torchrun for one machine with NUM_GPUS processes, run by
# $PYTHON (`python -m torch.distributed.run` is what the `torchrun` command runs), so that the
# launcher and the workers use the interpreter that has tau2cl.
torchrun_cmd() {
    TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone "--nproc_per_node=$1")
}

# show_cmd CMD...: the command as one shell-quoted line (what DRY_RUN=1 prints).
show_cmd() {
    local out
    printf -v out '%q ' "$@"
    echo "${out% }"
}

# launch CMD...: replace this shell with CMD (with DRY_RUN=1: print it and exit 0).
launch() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        show_cmd "$@"
        exit 0
    fi
    exec "$@"
}

# run CMD...: run CMD and return its status (with DRY_RUN=1: print it, status 0).
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        show_cmd "$@"
        return 0
    fi
    "$@"
}

# The wrappers' shared front: --help, then NUM_GPUS and ALG checked (sets both; the caller shifts 2).
read_gpus_and_alg() {
    load_algorithms
    if wants_help "$@"; then usage; exit 0; fi
    NUM_GPUS="${1:-}"
    check_num_gpus "$NUM_GPUS"
    ALG="${2:-}"
    check_alg "$ALG"
}
