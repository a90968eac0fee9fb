"""Training entry point: `tau2cl train ...`, `python -m tau2cl.train ...` or `torchrun -m tau2cl.train ...`.

Parsing comes first, then the checks that the flags, the files and a network probe decide (the
log_dir, a resume's checkpoint, the model's source, an installed vllm when asked for), and only then is the trainer (torch,
transformers, tau2) imported, so that `--help`, a bad flag and every such refusal answer at once.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from tau2cl.agent.model_source import check_model_source
from tau2cl.agent.tiny_model import TINY_MODEL_NAME
from tau2cl.config import RESUME_MAY_CHANGE, GRPOConfig, parse_config
from tau2cl.constants import VLLM_INSTALL_HINT
from tau2cl.errors import UserError, run_guarded
from tau2cl.runs.preflight import check_log_dir, check_resume, nothing_left, saved_run


def main(argv: list[str] | None = None, prog: str = "tau2cl train") -> int:
    """Parse the flags and train; a UserError ends with one line on stderr and exit code 2."""

    def train() -> int:
        config = parse_config(argv, prog=prog)
        done = preflight(config)
        if done is not None:
            if _is_rank_zero():
                print(f"tau2cl: {done}", file=sys.stderr)
            return 0
        from tau2cl.runs.interrupt import StoppedWithCheckpoint
        from tau2cl.trainer import GRPOTrainer

        try:
            GRPOTrainer(config).train()
        except StoppedWithCheckpoint as stop:
            if _is_rank_zero():
                print(
                    f"tau2cl: {stop}; checkpoint saved to {stop.checkpoint}. Resume with the same flags "
                    f"plus --resume_from {stop.checkpoint}",
                    file=sys.stderr,
                )
            return stop.exit_code
        return 0

    return run_guarded(train)


def preflight(config: GRPOConfig) -> str | None:
    """Refuse (a UserError) what needs no heavy import to decide: a log_dir held by a live run or
    holding another run's files, a resume under flags its checkpoint refuses, a model that cannot
    be had. Returns the line to print instead of training when a resume has nothing left to do.

    The log_dir is rank 0's to check, and only when every process is on this machine: torchrun
    then ends the other ranks as soon as rank 0 exits; across machines they would wait for it, so
    the trainer's check, agreed by all ranks, decides there.
    """
    if config.rollout_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError(f"the vLLM rollout backend needs the vllm package, which is not installed; install it: "
                        f"{VLLM_INSTALL_HINT}")
    if _is_rank_zero() and os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1"):
        check_log_dir(config.log_dir, config.resume_from, config.overwrite_log_dir)
    if config.resume_from:
        saved = saved_run(config.resume_from)
        if saved is not None:
            check_resume(saved, config.to_dict(), RESUME_MAY_CHANGE, GRPOConfig().to_dict())
            done = nothing_left(saved)
            if done is not None:
                return done
    if config.model_name_or_path != TINY_MODEL_NAME:  # the tiny model is built when first loaded
        check_model_source(config.model_name_or_path)
    return None


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main(prog="python -m tau2cl.train"))
