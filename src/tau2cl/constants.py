"""Names and numbers shared by the config and the packages below it; this module imports nothing."""

DOMAIN_NAMES = ("airline", "retail", "telecom")
USER_API_KEY_ENV = "TAU2CL_USER_API_KEY"  # read when --user_api_key is not given
LITELLM_PREFIX = "litellm:"  # --user_model litellm:<model> selects tau2's litellm user
REFERENCE_USER = "reference"  # --user_model value: the frozen reference model plays the user
ADVANTAGE_NORMALIZATIONS = ("std", "mean")  # --advantage_normalization: (r - mean) / std, or r - mean
VLLM_INSTALL_HINT = "pip install -e '.[vllm]' on a GPU machine, or bash scripts/install_vllm_cpu.sh VENV_DIR on CPUs"
LOG_RATIO_BOUND = 20.0  # the GRPO loss clamps log-ratios to ±this before exp (see rl/grpo.py)
