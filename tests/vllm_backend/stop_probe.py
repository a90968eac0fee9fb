"""Runs `tau2cl.train` and sends the process SIGTERM from inside a vLLM rollout.

    python stop_probe.py OUT.json DOMAIN_IDX STEP [tau2cl train flags...]

When GRPO step STEP of domain DOMAIN_IDX asks the vLLM sampler for its first turns, the process
signals itself just before the engine generates them, so the signal arrives while vLLM works.
OUT gets {"signalled_at": time.time() of the signal} (nothing when the step never came); the exit
code is the run's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main(out: str, domain_idx: int, step: int, argv: list[str]) -> int:
    import tau2cl.agent.vllm_sampler as vllm_sampler
    import tau2cl.recipe.grpo_step as grpo_step
    from tau2cl.train import main as train

    current: dict = {}
    run, sample = grpo_step.GRPOStep.run, vllm_sampler.VLLMSampler.sample

    def recording_run(self, d, domain, s, *args, **kwargs):
        current["at"] = (d, s)
        return run(self, d, domain, s, *args, **kwargs)

    def signalling_sample(self, *args, **kwargs):
        if current.get("at") == (domain_idx, step) and "sent" not in current:
            current["sent"] = True
            with open(out, "w", encoding="utf-8") as f:
                json.dump({"signalled_at": time.time()}, f)
            os.kill(os.getpid(), signal.SIGTERM)
        return sample(self, *args, **kwargs)

    grpo_step.GRPOStep.run = recording_run
    vllm_sampler.VLLMSampler.sample = signalling_sample
    return train(argv, prog="stop_probe.py")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
