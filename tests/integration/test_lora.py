"""LoRA through PEFT on the tiny model: adapters train, the base is the reference, files load, resume is exact.

One run trains airline then retail with rank-4 adapters on a bf16 base, the KL to the reference,
EWC and --merge_lora_on_save; a second run resumes from its first domain checkpoint. Every
reference forward of the trainer is recorded to check it ran on the policy's own model with the
adapters off.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tau2cl.recipe.grpo_step as grpo_step_module
from tau2cl.agent.policy import Policy, load_model
from tau2cl.config import RESUME_MAY_CHANGE, GRPOConfig
from tau2cl.errors import UserError
from tau2cl.rl.lora import ADAPTER_WEIGHTS, MERGED_DIR, add_lora
from tau2cl.rl.update import sequence_logprobs
from tau2cl.runs.resume_check import config_differences
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config

R, ALPHA = 4, 32.0
RUN = dict(
    model_dtype="bfloat16", learning_rate=1e-2, kl_coef=0.04, cl_algorithm="ewc", ewc_fisher_samples=2,
    lora_r=R, lora_alpha=ALPHA, merge_lora_on_save=True, seed=5,
)  # over tiny_run.TINY_RUN


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _train(log_dir: Path, **extra) -> tuple[GRPOTrainer, list[dict]]:
    """Train in this process, recording every reference forward the trainer makes."""
    calls: list[dict] = []
    original = grpo_step_module.reference_logprobs

    def recording(model, batch, *args):
        out = original(model, batch, *args)
        disabled = [layer.disable_adapters for layer in _lora_layers(model)]
        calls.append({"model": model, "batch": copy.deepcopy(batch), "out": out.clone(), "disabled": disabled})
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grpo_step_module, "reference_logprobs", recording)
        trainer = GRPOTrainer(tiny_config(**RUN, log_dir=str(log_dir), **extra))
        trainer.train()
    return trainer, calls


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, single_torch_thread):
    log_dir = tmp_path_factory.mktemp("lora")
    trainer, calls = _train(log_dir)
    return trainer, calls, log_dir


def _records(log_dir: Path) -> list[dict]:
    import json

    return [r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


@pytest.mark.slow
def test_lora_trains_two_domains_with_fp32_adapters_on_a_frozen_bf16_base(lora_run):
    trainer, _, log_dir = lora_run
    names = {id(p): n for n, p in trainer.policy.model.named_parameters()}
    trained = [names[id(p)] for p in trainer.models.training.params]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(p.dtype == torch.float32 for p in trainer.models.training.params)
    frozen = [p for p in trainer.policy.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    base = dict(load_model("tiny", "bfloat16", "cpu").named_parameters())
    for name, param in trainer.policy.model.named_parameters():  # the base never moved
        if not param.requires_grad:
            assert torch.equal(param, base[name.replace(".base_layer.", ".")]), name
    # trainable share: tiny = 4 layers, hidden 128, kv 64 (2 of 4 heads of 32), MLP 384; r=4 adds
    # r * (in + out) per module: q, o 4*256; k, v 4*192; gate, up, down 4*512 = 9,728 per layer, x4
    assert sum(p.numel() for p in trainer.models.training.params) == 38_912
    assert "LoRA r=4 alpha=32: 38,912 trainable parameters of" in (log_dir / "train.log").read_text()
    train = _records(log_dir)
    assert [(r["task_idx"], r["step"]) for r in train] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    # B starts at 0, so the first step's policy is the base exactly; then the adapters move away
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0.0


@pytest.mark.slow
def test_the_reference_is_the_same_model_with_the_adapters_off(lora_run, tiny_tokenizer):
    trainer, calls, _ = lora_run
    assert trainer.models.reference is trainer.policy.model  # one model in memory
    assert len(calls) == 4 and all(c["model"] is trainer.policy.model for c in calls)
    assert all(c["disabled"] and all(c["disabled"]) for c in calls)
    assert not any(layer.disable_adapters for layer in _lora_layers(trainer.policy.model))  # back on
    assert all(p.requires_grad for p in trainer.models.training.params)
    base = load_model("tiny", "bfloat16", "cpu")
    last = calls[-1]
    b = last["batch"]
    with torch.no_grad():
        expected = sequence_logprobs(
            base, b.input_ids, b.attention_mask, b.loss_mask, 1.0, torch.bfloat16,
            shared_prefix=trainer.config.shared_prefix_update,
        )
        policy = sequence_logprobs(trainer.policy.model, b.input_ids, b.attention_mask, b.loss_mask, 1.0, torch.bfloat16)
    assert torch.equal(last["out"], expected)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapters matter for the policy
    # the user played by the reference samples from the base too
    prompt = trainer.policy.renderer.prompt_ids("You are a helpful assistant.", [], [{"role": "user", "content": "Hi"}])
    as_user = trainer.models.reference_policy().generate([prompt], 12, temperature=0.0)[0]
    from_base = Policy(base, tiny_tokenizer, compute_dtype=torch.bfloat16).generate([prompt], 12, temperature=0.0)[0]
    assert as_user.token_ids == from_base.token_ids and as_user.logprobs == from_base.logprobs
    assert not any(layer.disable_adapters for layer in _lora_layers(trainer.policy.model))


@pytest.mark.slow
def test_checkpoints_hold_a_peft_adapter_and_a_merged_model(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, _, log_dir = lora_run
    ckpt = log_dir / "checkpoint_task_1"
    loaded = PeftModel.from_pretrained(load_model("tiny", "bfloat16", "cpu"), str(ckpt))
    mine = dict(trainer.policy.model.named_parameters())
    theirs = {n.removeprefix("base_model.model."): p for n, p in loaded.named_parameters()}
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(theirs[n].float(), p.float()) for n, p in mine.items())
    # merged: W + (alpha / r) * B @ A, summed in fp32 and stored in bf16, by hand from the files
    adapter = load_file(str(ckpt / ADAPTER_WEIGHTS))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]  # (r, in), (out, r)
    assert b.abs().max() > 0
    base = load_model("tiny", "bfloat16", "cpu").model.layers[0].self_attn.q_proj.weight
    merged = AutoModelForCausalLM.from_pretrained(ckpt / MERGED_DIR)
    expected = (base.float() + (ALPHA / R) * b @ a).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=0)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(ckpt / MERGED_DIR)


@pytest.mark.slow
def test_ewc_fisher_and_anchors_cover_the_adapters(lora_run):
    trainer, _, log_dir = lora_run
    strategy = trainer.strategy
    assert len(strategy.fishers) == 2  # one per finished domain
    shapes = [p.shape for p in trainer.models.training.params]
    for fisher, anchor in zip(strategy.fishers, strategy.anchors, strict=True):
        assert [f.shape for f in fisher] == [a.shape for a in anchor] == shapes
    # the first anchor is the adapters at the end of airline, as its checkpoint saved them
    saved = load_file(str(log_dir / "checkpoint_task_0" / ADAPTER_WEIGHTS))
    names = {id(p): n for n, p in trainer.policy.model.named_parameters()}
    for param, anchor in zip(trainer.models.training.params, strategy.anchors[0], strict=True):
        key = "base_model.model." + names[id(param)].replace(".default", "")
        assert torch.equal(anchor, saved[key]), key
    assert _records(log_dir)[-1]["ewc_penalty"] > 0


@pytest.mark.slow
def test_resuming_a_lora_run_from_its_domain_checkpoint_is_exact(lora_run, tmp_path):
    _, _, straight = lora_run
    log_dir = tmp_path / "resumed"
    log_dir.mkdir()
    shutil.copytree(straight / "checkpoint_task_0", log_dir / "checkpoint_task_0")
    _train(log_dir, resume_from=str(log_dir))
    resumed = load_file(str(log_dir / "checkpoint_task_1" / ADAPTER_WEIGHTS))
    expected = load_file(str(straight / "checkpoint_task_1" / ADAPTER_WEIGHTS))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    steps = [(r["task_idx"], r["step"], r["loss"], r["reward_mean"]) for r in _records(log_dir)]
    assert steps == [(r["task_idx"], r["step"], r["loss"], r["reward_mean"]) for r in _records(straight)[2:]]


def test_a_checkpoint_resumes_only_with_its_own_lora_rank():
    defaults = GRPOConfig().to_dict()
    changed = config_differences({"lora_r": 4}, GRPOConfig().to_dict(), RESUME_MAY_CHANGE, defaults)
    assert changed == [("lora_r", 4, 0)]
    assert config_differences({"lora_r": 4}, GRPOConfig(lora_r=4).to_dict(), RESUME_MAY_CHANGE, defaults) == []
    # saved before LoRA existed: full fine-tuning, the default
    assert config_differences({}, GRPOConfig().to_dict(), RESUME_MAY_CHANGE, defaults) == []


def test_unknown_target_modules_are_one_clear_error(tiny_model):
    config = GRPOConfig(model_name_or_path="tiny", lora_r=2, lora_target_modules=["qkv_proj"])
    with pytest.raises(UserError, match="cannot add LoRA adapters to 'tiny'") as caught:
        add_lora(copy.deepcopy(tiny_model), config)
    assert "\n" not in str(caught.value)
