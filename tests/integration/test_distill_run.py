"""distill on the tiny model: the teacher's log-probs with its weights in place, its KL in the
accumulated loss, and in a LoRA run its zero at the domain's start, its growth, its checkpoint and
resume (the full fine-tuning run is the torchrun test's)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tau2cl.config import GRPOConfig
from tau2cl.rl.lora import ADAPTER_WEIGHTS
from tau2cl.rl.teacher import weights_in_place
from tau2cl.rl.update import LossSettings, accumulate_gradients, collate, reference_logprobs
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

RUN = dict(max_new_tokens=12, learning_rate=1e-2, cl_algorithm="distill", seed=3)  # over tiny_run.TINY_RUN


def _batch(pad_id: int):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (70,), generator=g).tolist()  # a shared prefix of 70 tokens
    ids = [prompt + torch.randint(0, 300, (n,), generator=g).tolist() for n in (9, 4, 6)]
    masks = [[0] * 70 + [1] * (len(row) - 70) for row in ids]
    return collate(ids, masks, [[0.0] * len(row) for row in ids], [1.0, -0.5, 0.25], pad_id)


def _moved(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, each moved a little (a teacher that differs from the policy)."""
    g = torch.Generator().manual_seed(1)
    return {n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def test_teacher_logprobs_are_those_of_a_separate_copy_and_leave_the_policy_bit_for_bit(tiny_model, tiny_tokenizer):
    policy = copy.deepcopy(tiny_model).train()
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    weights = _moved(policy)
    kept = {n: w.clone() for n, w in weights.items()}
    batch = _batch(tiny_tokenizer.pad_token_id)
    teacher = copy.deepcopy(tiny_model)
    teacher.load_state_dict(weights, strict=False)
    expected = reference_logprobs(teacher, batch, [[0, 1, 2]], 0.7, None)
    for micro, shared in (([[0, 1, 2]], False), ([[2], [0, 1]], True)):
        with weights_in_place(policy, weights):
            got = reference_logprobs(policy, batch, micro, 0.7, None, shared_prefix=shared)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # float32 sums differ by CPU
    assert policy.training  # its mode is back
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert all(torch.equal(w, kept[n]) for n, w in weights.items())
    own = reference_logprobs(policy, batch, [[0, 1, 2]], 0.7, None)
    assert (own - expected)[batch.loss_mask].abs().max() > 1e-3  # the teacher differs from the policy


def test_the_teacher_kl_is_in_the_accumulated_loss_and_zero_for_the_policy_itself(tiny_model, tiny_tokenizer):
    policy = copy.deepcopy(tiny_model)
    batch = _batch(tiny_tokenizer.pad_token_id)
    batch.old_logprobs = reference_logprobs(policy, batch, [[0, 1, 2]], 1.0, None)  # ratio 1
    settings = LossSettings(1.0, 0.2, 0.2, 0.0, distill_coef=0.5, shared_prefix=True)
    tokens = float(batch.num_tokens)

    own = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with weights_in_place(policy, own):
        batch.teacher_logprobs = reference_logprobs(policy, batch, [[0, 1], [2]], 1.0, None, shared_prefix=True)
    stats = accumulate_gradients(policy, batch, [[0, 1], [2]], settings, tokens)
    assert stats["distill_kl"] == 0.0  # the teacher is the policy: log-probs equal, k3 exactly 0
    plain = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    with weights_in_place(policy, _moved(policy)):
        batch.teacher_logprobs = reference_logprobs(policy, batch, [[0, 1, 2]], 1.0, None)
    one = accumulate_gradients(policy, batch, [[0, 1, 2]], settings, tokens)
    policy.zero_grad(set_to_none=True)
    split = accumulate_gradients(policy, batch, [[0, 1], [2]], settings, tokens)
    assert one["distill_kl"] > 1e-3
    assert split["distill_kl"] == pytest.approx(one["distill_kl"], rel=1e-5)  # micro-batches change nothing
    # the loss is the policy term plus 0.5 × the KL (ratio 1, so the policy term is −mean A per token)
    assert one["loss"] == pytest.approx(one["policy_loss"] + 0.5 * one["distill_kl"], rel=1e-5)
    assert any(not torch.allclose(p.grad, plain[n]) for n, p in policy.named_parameters())
    policy.zero_grad(set_to_none=True)


def _trains(log_dir: Path) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def _adapters(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's adapter weights under the names the live model gives them."""
    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    return {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in saved.items()}


@pytest.mark.slow
def test_distill_kl_starts_at_zero_grows_is_in_the_loss_and_resumes_with_its_teacher(tmp_path, monkeypatch):
    """With LoRA: the teacher is the adapters at the domain's start (the base is shared)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = tiny_config(
        **RUN, num_steps_per_task=3, distill_coef=0.5, lora_r=4, shared_prefix_update=True, save_interval=2,
        log_dir=str(tmp_path),
    )  # fmt: skip
    trainer = GRPOTrainer(config)
    trainer.train()
    trains = _trains(tmp_path)
    assert all("distill_kl" not in r for r in trains if r["task_idx"] == 0)  # no teacher on the first domain
    kl = [r["distill_kl"] for r in trains if r["task_idx"] == 1]
    assert kl[0] == 0.0  # the teacher is the policy at the domain's first step
    assert 0 < kl[1] < kl[2], kl  # and the KL grows as the domain moves the policy
    for r in trains[3:]:  # in the loss: policy term + 0.5 × KL (kl_coef 0, one process)
        assert r["loss"] == pytest.approx(r["policy_loss"] + 0.5 * r["distill_kl"], rel=1e-5, abs=1e-7)

    # the teacher is the adapters alone, exactly as the first domain left them, in retail's checkpoints
    teacher = torch.load(tmp_path / "checkpoint_step_5" / "trainer_state.pt", weights_only=False)["strategy"]["teacher"]
    assert trainer.strategy.teacher is None  # dropped at the domain's end, and from its checkpoint
    assert torch.load(tmp_path / "checkpoint_task_1" / "trainer_state.pt", weights_only=False)["strategy"]["teacher"] is None
    adapters = {n for n, p in trainer.policy.model.named_parameters() if p.requires_grad}
    assert set(teacher) == adapters and all(".lora_" in n for n in teacher)
    airline_end = _adapters(tmp_path / "checkpoint_task_0")
    assert set(airline_end) == adapters and all(torch.equal(teacher[n], airline_end[n]) for n in teacher)

    # resumed mid-domain (after retail's step 2): the same teacher, so the last step's KL is the same
    resumed = GRPOTrainer(GRPOConfig(**{**config.to_dict(), "resume_from": str(tmp_path / "checkpoint_step_5")}))
    assert all(torch.equal(resumed.strategy.teacher[n], teacher[n]) for n in teacher)
    resumed.train()
    assert [r["distill_kl"] for r in _trains(tmp_path) if r["task_idx"] == 1] == kl
