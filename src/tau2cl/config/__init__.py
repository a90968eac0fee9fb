"""GRPOConfig: the one source of every training flag, its default, its help text and its checks.

schema.py holds the fields; coercion.py turns a value from any source into a field's type;
validation.py rejects bad values and combinations with one sentence; arguments.py builds the command
line and reads `--config` files. Only light stdlib modules are imported, so `tau2cl train --help` is
instant.
"""

from tau2cl.cl.strategies.registry import CL_ALGORITHMS, NEEDS_LORA
from tau2cl.config.arguments import build_parser, load_config_file, parse_config
from tau2cl.config.schema import (
    DOMAIN_RESTARTS,
    EVAL_SPLITS,
    FISHER_NORMALIZATIONS,
    FUSION_MODES,
    GROUPS,
    LORA_TARGET_MODULES,
    MODEL_DTYPES,
    PARALLELISMS,
    PROGRESSIVE_INITS,
    REPLAY_SELECTIONS,
    RESUME_MAY_CHANGE,
    GRPOConfig,
    cl_algorithm_help,
    field_names,
    field_type,
    list_item_type,
)
from tau2cl.config.validation import parse_task_ids
from tau2cl.constants import (
    ADVANTAGE_NORMALIZATIONS,
    DOMAIN_NAMES,
    LITELLM_PREFIX,
    LOG_RATIO_BOUND,
    REFERENCE_USER,
    USER_API_KEY_ENV,
)

__all__ = [
    "ADVANTAGE_NORMALIZATIONS",
    "CL_ALGORITHMS",
    "DOMAIN_NAMES",
    "DOMAIN_RESTARTS",
    "EVAL_SPLITS",
    "FISHER_NORMALIZATIONS",
    "FUSION_MODES",
    "GROUPS",
    "GRPOConfig",
    "LITELLM_PREFIX",
    "LOG_RATIO_BOUND",
    "LORA_TARGET_MODULES",
    "MODEL_DTYPES",
    "NEEDS_LORA",
    "PARALLELISMS",
    "PROGRESSIVE_INITS",
    "REFERENCE_USER",
    "REPLAY_SELECTIONS",
    "RESUME_MAY_CHANGE",
    "USER_API_KEY_ENV",
    "build_parser",
    "cl_algorithm_help",
    "field_names",
    "field_type",
    "list_item_type",
    "load_config_file",
    "parse_config",
    "parse_task_ids",
]
