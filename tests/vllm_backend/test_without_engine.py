"""The sampler seam's parts that need no vLLM engine (collected with or without vllm installed):
the missing-package error, the top_p guard, how a sampled turn becomes a Generation, the project's
own engine receiving weights, the KV cache's size check and how a refusal of vLLM's is worded."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from tau2cl.agent.policy import Policy
from tau2cl.agent.sampler import PolicySampler
from tau2cl.agent.vllm_sampler import check_top_p, engine_error_reason, import_vllm, to_generation
from tau2cl.errors import UserError
from tau2cl.recipe.engine_sync import check_cpu_kv_cache


@pytest.mark.parametrize("found", [None, types.ModuleType("vllm")], ids=["not importable", "not the package"])
def test_missing_vllm_is_a_one_line_error_naming_the_install(monkeypatch, found):
    monkeypatch.setitem(sys.modules, "vllm", found)  # None: `import vllm` raises ImportError
    with pytest.raises(UserError) as caught:
        import_vllm()
    message = str(caught.value)
    assert "\n" not in message
    assert "scripts/install_vllm_cpu.sh" in message and ".[vllm]" in message


def test_top_p_below_one_is_refused():
    check_top_p(1.0)
    with pytest.raises(UserError, match="top_p 1 only"):
        check_top_p(0.95)


def test_a_turn_is_finished_when_its_last_token_stops_it():
    stops = {7, 9}
    assert to_generation([3, 4, 9], [-0.1, -0.2, -0.3], stops).finished
    cut = to_generation([3, 4, 5], [-0.1, -0.2, -0.3], stops)
    assert not cut.finished and cut.token_ids == [3, 4, 5] and cut.logprobs == [-0.1, -0.2, -0.3]
    assert not to_generation([7, 4], [-0.1, -0.2], stops).finished  # only the last token ends a turn
    assert not to_generation([], [], stops).finished


@torch.no_grad()
def test_policy_sampler_takes_pushed_weights(tiny_model, tiny_tokenizer, single_torch_thread):
    source = copy.deepcopy(tiny_model)
    for p in source.parameters():
        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05 * p.abs().mean())
    target = Policy(copy.deepcopy(tiny_model), tiny_tokenizer)
    sampler = PolicySampler(target)
    prompt = target.renderer.prompt_ids("You are a helpful agent.", [], [{"role": "user", "content": "Hi, I need help."}])
    prompts = [prompt + [5], prompt + [6]]  # two rows sharing a prefix: the policy caches it
    sampler.sample(prompts, 4, 0.0, 1.0)
    assert target.prefix_caches  # filled under the old weights

    seconds = sampler.load_weights(source.named_parameters())
    assert seconds >= 0 and not target.prefix_caches  # stale prefixes are gone
    for (name, a), b in zip(source.named_parameters(), target.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    expected = Policy(source, tiny_tokenizer).generate(prompts, 8, temperature=0.0)
    assert sampler.sample(prompts, 8, 0.0, 1.0) == expected

    with pytest.raises(KeyError, match="no parameter named"):
        sampler.load_weights([("model.not_a_layer.weight", torch.zeros(1))])


def test_the_cpu_kv_cache_must_hold_one_whole_context():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64 dims (576 / 9 heads); fp32 keys and values take
    # 2 x 30 x 3 x 64 x 4 = 46,080 bytes a token, so 1 GiB holds 2**30 // 46,080 = 23,301 tokens
    smollm2 = types.SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9,
                                    hidden_size=576, head_dim=None)
    check_cpu_kv_cache(smollm2, 23301, 1)
    check_cpu_kv_cache(smollm2, 46603, 2)  # 2 GiB: 46,603 tokens
    with pytest.raises(UserError, match=r"cannot hold one --max_context_tokens 23302 context \(1\.00 GiB"):
        check_cpu_kv_cache(smollm2, 23302, 1)


def test_a_refusal_of_vllms_is_its_reason_in_one_sentence():
    validation = ValueError(
        "1 validation error for ModelConfig\n  Value error, Model architectures ['GPTNeoForCausalLM'] are "
        "not supported for now. Supported architectures: dict_keys(['AfmoeForCausalLM', 'BloomForCausalLM'])"
        " [type=value_error]\n    For further information visit https://errors.pydantic.dev"
    )
    assert engine_error_reason(validation) == "Model architectures ['GPTNeoForCausalLM'] are not supported for now."
    assert engine_error_reason(RuntimeError("out of memory\nmore")) == "out of memory"
    assert engine_error_reason(OSError()) == "OSError"
