"""Worker script for tests/distributed/test_torchrun.py, launched by `torch.distributed.run`.

It runs tau2cl's own code in-process so that a test can look inside each rank, which the
`python -m tau2cl.train` entry point alone cannot show (rank 1 writes nothing):

    dist_probe.py train PLAN.json
        PLAN.json lists runs as {"out": OUT.json, "argv": [tau2cl train flags...]}; the ranks train
        them one after another in one process group (one launch: the imports and the group's start
        are paid once). Each is tau2cl.train.main(flags) with two recorders patched into
        tau2cl.trainer: every training step's per-episode train rewards and task ids, a digest of the
        parameter bytes before and after training, and one of the tensors in the strategy's state
        at the end. The process group is kept alive past each train() (compute_cleanup patched out)
        so the digests can be gathered; rank 0 writes every rank's record to OUT and its final
        parameters to OUT with the suffix .pt. A run that fails ends the launch.
    dist_probe.py evaluate OUT.json [tau2cl train flags...]
        GRPOTrainer(config).evaluate_task(d, label="probe") for every domain of task_order;
        rank 0 writes the summaries (EvalSummary.to_dict()) and the world size to OUT, and the
        trainer writes the episodes to LOG_DIR/eval_results/probe_<domain>.json (tau2 Results).
    dist_probe.py lora_step OUT.json
        The tiny model with LoRA adapters (bf16 base, fp32 adapters) takes three GRPO steps with
        the KL to the reference (the rollout model with the adapters off) on a rank-specific
        synthetic batch, once under DDP and once under FSDP2, through tau2cl's TrainingModel;
        rank 0 writes every rank's digests of the rollout model's weights to OUT
        and its adapters after each parallelism to OUT with the suffix .pt.
    dist_probe.py skip_collective TIMEOUT_S
        compute_init(timeout=TIMEOUT_S), then only rank 0 enters all_gather_objects while the
        other ranks sleep: rank 0 must fail once the collective timeout runs out.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import before anything imports tau2)


def parameter_digest(model) -> str:
    """sha256 of every parameter's bytes, in name order: equal digests = bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()


def tensors_digest(state) -> str:
    """sha256 of every tensor in a nested state (dicts in key order, lists in order): a strategy's state."""
    digest = hashlib.sha256()

    def visit(node, path: str) -> None:
        if isinstance(node, torch.Tensor):
            digest.update(path.encode())
            digest.update(node.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(node, dict):
            for key in sorted(node, key=str):
                visit(node[key], f"{path}/{key}")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, f"{path}/{i}")

    visit(state, "")
    return digest.hexdigest()


def _write(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def probe_train(plan_path: str) -> int:
    from tau2cl import distributed

    for run in json.loads(Path(plan_path).read_text()):
        code = _train_one(run["out"], run["argv"])
        if code != 0:
            print(f"dist_probe.py: the run writing {run['out']} ended with {code}", file=sys.stderr, flush=True)
            return code
    distributed.compute_cleanup()
    return 0


def _train_one(out: str, argv: list[str]) -> int:
    import tau2cl.recipe.rollouts as rollouts_module
    import tau2cl.trainer as trainer_module
    from tau2cl import distributed
    from tau2cl.train import main

    record: dict = {"steps": []}  # steps: one entry per training step of this rank
    trainers: list = []
    original_train = trainer_module.GRPOTrainer.train
    original_score = rollouts_module.score_trajectories
    original_cleanup = trainer_module.compute_cleanup

    def recording_train(self):
        trainers.append(self)
        record["initial_digest"] = parameter_digest(self.policy.model)
        return original_train(self)

    def recording_score(trajectories, *args, **kwargs):
        # The training rollouts' own name for the scorer: training steps only (evaluation imports its own).
        original_score(trajectories, *args, **kwargs)
        record["steps"].append(
            {
                "rewards": [t.train_reward for t in trajectories],
                "tasks": [f"{t.domain}/{t.task_id}" for t in trajectories],
            }
        )

    trainer_module.GRPOTrainer.train = recording_train
    rollouts_module.score_trajectories = recording_score
    trainer_module.compute_cleanup = lambda: None  # keep the group for the gather below and the next run
    try:
        code = main(argv, prog="dist_probe.py train")
    finally:
        trainer_module.GRPOTrainer.train = original_train
        rollouts_module.score_trajectories = original_score
        trainer_module.compute_cleanup = original_cleanup
    if code != 0 or not trainers:
        return code or 1
    info = trainers[0].dist
    record.update(rank=info.rank, world_size=info.world_size)
    record["final_digest"] = parameter_digest(trainers[0].policy.model)
    record["strategy_digest"] = tensors_digest(trainers[0].strategy.state_dict())
    records = distributed.all_gather_objects(record)
    if info.is_main:
        _write(out, {"ranks": records})
        state = {k: v.detach().cpu() for k, v in trainers[0].policy.model.named_parameters()}
        torch.save(state, str(Path(out).with_suffix(".pt")))
    return 0


def probe_evaluate(out: str, argv: list[str]) -> int:
    from tau2cl import distributed
    from tau2cl.config import parse_config
    from tau2cl.trainer import GRPOTrainer

    config = parse_config(argv, prog="dist_probe.py evaluate")
    trainer = GRPOTrainer(config)
    summaries = {
        name: trainer.evaluation.evaluate_domain(name, "probe").to_dict() for name in config.task_order
    }
    if trainer.dist.is_main:
        _write(out, {"world_size": trainer.dist.world_size, "summaries": summaries})
    trainer.tracker.close()
    distributed.compute_cleanup()
    return 0


def _synthetic_batch(rank: int, pad_id: int):
    from tau2cl.rl.update import collate

    g = torch.Generator().manual_seed(100 + rank)
    lengths = [24, 17]
    ids = [torch.randint(0, 300, (n,), generator=g).tolist() for n in lengths]
    masks = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    logprobs = [[-3.0] * n for n in lengths]
    return collate(ids, masks, logprobs, [1.0, -1.0], pad_id)


def probe_lora_step(out: str) -> int:
    from tau2cl import distributed
    from tau2cl.agent.policy import load_model
    from tau2cl.config import GRPOConfig
    from tau2cl.rl.lora import add_lora
    from tau2cl.rl.training_model import TrainingModel
    from tau2cl.rl.update import LossSettings, accumulate_gradients, reference_logprobs

    info = distributed.compute_init()
    config = GRPOConfig(model_name_or_path="tiny", model_dtype="bfloat16", lora_r=4)
    settings = LossSettings(1.0, 0.2, 0.2, 0.5, compute_dtype=torch.bfloat16)  # with the KL
    record: dict = {"rank": info.rank}
    adapters = {}
    for parallelism in ("ddp", "fsdp"):
        torch.manual_seed(0)  # the same adapters' initialisation on every rank
        lora = add_lora(load_model("tiny", "bfloat16", info.device), config)
        base = {k: v.clone() for k, v in lora.lm.named_parameters() if not v.requires_grad}
        initial = parameter_digest(lora.lm)
        training = TrainingModel(lora.lm, info, parallelism)
        optimizer = torch.optim.AdamW(training.params, lr=1e-2)
        batch = _synthetic_batch(info.rank, pad_id=0)
        tokens = batch.num_tokens * info.world_size  # both ranks' batches have the same count
        kl = []
        for _ in range(3):  # the reference is the rollout model with the adapters off, as in the trainer
            with lora.reference():
                batch.ref_logprobs = reference_logprobs(lora.lm, batch, [[0, 1]], 1.0, torch.bfloat16)
            stats = accumulate_gradients(training.module, batch, [[0], [1]], settings, tokens / info.world_size)
            kl.append(stats["kl"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            training.refresh_rollout_model()
        weights = dict(lora.lm.named_parameters())
        record[parallelism] = {
            "initial_digest": initial,
            "kl": kl,
            "digest": parameter_digest(lora.lm),
            "trained": len(training.params),
            "base_unchanged": all(torch.equal(weights[k], v) for k, v in base.items()),
            "dtypes": sorted({f"{p.dtype}:{p.requires_grad}" for p in lora.lm.parameters()}),
        }
        adapters[parallelism] = {k: v.detach().clone() for k, v in weights.items() if v.requires_grad}
    records = distributed.all_gather_objects(record)
    if info.is_main:
        _write(out, {"ranks": records})
        torch.save(adapters, str(Path(out).with_suffix(".pt")))
    distributed.compute_cleanup()
    return 0


def probe_skip_collective(timeout_s: float) -> int:
    from tau2cl import distributed

    info = distributed.compute_init(timeout=timedelta(seconds=timeout_s))
    if info.rank == 0:
        print(f"rank 0: entering all_gather_objects alone (timeout {timeout_s:g} s)", flush=True)
        distributed.all_gather_objects("only rank 0 sends this")
        print("rank 0: all_gather_objects returned although rank 1 never joined", flush=True)
        return 3
    time.sleep(600)  # rank 1 skips the collective but stays alive: only a timeout can end rank 0
    return 0


def main(args: list[str]) -> int:
    mode, rest = args[0], args[1:]
    if mode == "train":
        return probe_train(rest[0])
    if mode == "evaluate":
        return probe_evaluate(rest[0], rest[1:])
    if mode == "lora_step":
        return probe_lora_step(rest[0])
    if mode == "skip_collective":
        return probe_skip_collective(float(rest[0]))
    raise SystemExit(f"dist_probe.py: unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
