"""vLLM's sampled turns against the trainer and the project's engine, after weights are pushed.

For the tiny model and SmolLM2-135M-Instruct: after each of several random weight perturbations
pushed into the engine, the log-prob vLLM reports for each sampled token equals the trainer's
recomputed one (`sequence_logprobs`, same temperature) in fp32, while the previous weights' differ;
greedy turns are the project's engine's greedy turns, stop tokens included.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.vllm_sampler import VLLMSampler
from tau2cl.errors import UserError
from tau2cl.rl.update import sequence_logprobs

pytestmark = pytest.mark.vllm

PUSHES = 3
TEMPERATURE = 0.7
NEW_TOKENS = 16
LOGPROB_TOLERANCE = 1e-4  # fp32, the design's bound
STALE_GAP = 1e-3  # a perturbation moves some sampled token's log-prob by more than this


def _contexts(policy: Policy) -> list[list[int]]:
    """Three chat prompts of different lengths, rendered by the policy's template."""
    asks = ["Hello.", "I need to change my flight to Boston, please.",
            "My order #W1234 arrived damaged. Can you help me return the blue kettle and the two mugs?"]
    return [policy.renderer.prompt_ids("You are a helpful customer service agent.", [], [{"role": "user", "content": a}])
            for a in asks]


def _perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter moves by 5% of its mean magnitude, in random directions."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * p.abs().mean())


@torch.no_grad()
def trainer_logprobs(model, context: list[int], turn: list[int], temperature: float) -> list[float]:
    """The update's log-probs of `turn` after `context` (sequence_logprobs, as the trainer computes them)."""
    ids = torch.tensor([context + turn])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(context):] = True
    out = sequence_logprobs(model, ids, torch.ones_like(ids), mask, temperature=temperature)
    return out[0, len(context):].tolist()


def _max_gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def _push(sampler: VLLMSampler, model) -> float:
    return sampler.load_weights((name, p.detach()) for name, p in model.named_parameters())


def _case(request, name: str):
    """(model, tokenizer, sampler) of the named model; the model is a copy the test may change."""
    if name == "tiny":
        model, tokenizer, sampler = (request.getfixturevalue(f) for f in ("tiny_model", "tiny_tokenizer", "tiny_vllm"))
    else:
        (model, tokenizer), sampler = request.getfixturevalue("smollm2"), request.getfixturevalue("smollm2_vllm")
    return copy.deepcopy(model), tokenizer, sampler


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_sampled_logprobs_equal_the_trainers_after_each_push(request, name, single_torch_thread):
    model, tokenizer, sampler = _case(request, name)
    contexts = _contexts(Policy(model, tokenizer))
    generator = torch.Generator().manual_seed(0)
    for push in range(PUSHES):
        before = copy.deepcopy(model)
        _perturb(model, generator)
        seconds = _push(sampler, model)
        assert seconds > 0
        turns = sampler.sample(contexts, NEW_TOKENS, TEMPERATURE, 1.0)
        stale = 0.0
        for context, turn in zip(contexts, turns, strict=True):
            assert len(turn.logprobs) == len(turn.token_ids) > 0
            assert all(lp <= 0.0 for lp in turn.logprobs)
            expected = trainer_logprobs(model, context, turn.token_ids, TEMPERATURE)
            gap = _max_gap(turn.logprobs, expected)
            assert gap <= LOGPROB_TOLERANCE, f"{name}, push {push}: max |Δ| = {gap:.2e}"
            stale = max(stale, _max_gap(turn.logprobs, trainer_logprobs(before, context, turn.token_ids, TEMPERATURE)))
        assert stale > STALE_GAP  # the pushed weights, not the earlier ones, were sampled from


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_greedy_turns_equal_the_own_engines(request, name, single_torch_thread):
    model, tokenizer, sampler = _case(request, name)
    _perturb(model, torch.Generator().manual_seed(1))
    _push(sampler, model)
    policy = Policy(model, tokenizer)
    contexts = _contexts(policy)
    own = policy.generate(contexts, NEW_TOKENS, temperature=0.0)
    theirs = sampler.sample(contexts, NEW_TOKENS, 0.0, 1.0)
    for a, b in zip(own, theirs, strict=True):
        assert b.token_ids == a.token_ids and b.finished == a.finished
        assert _max_gap(b.logprobs, a.logprobs) <= LOGPROB_TOLERANCE

    # the second token of the longest greedy turn made a stop token: both engines end turns on it, alike
    longest = max(range(len(own)), key=lambda i: len(own[i].token_ids))
    assert len(own[longest].token_ids) > 2
    stop = own[longest].token_ids[1]
    policy.stop_ids = sorted(set(policy.stop_ids) | {stop})
    stopping = VLLMSampler(sampler.llm, policy.stop_ids)
    own = policy.generate(contexts, NEW_TOKENS, temperature=0.0)
    theirs = stopping.sample(contexts, NEW_TOKENS, 0.0, 1.0)
    cut = own[longest]
    assert cut.finished and cut.token_ids[-1] == stop and len(cut.token_ids) <= 2
    for a, b in zip(own, theirs, strict=True):
        assert b == Generation(a.token_ids, b.logprobs, a.finished)
        assert _max_gap(b.logprobs, a.logprobs) <= LOGPROB_TOLERANCE


def test_turns_cut_by_max_new_tokens_are_unfinished(tiny_model, tiny_tokenizer, tiny_vllm):
    _push(tiny_vllm, tiny_model)
    contexts = _contexts(Policy(tiny_model, tiny_tokenizer))
    no_stop = VLLMSampler(tiny_vllm.llm, [])  # nothing ends a turn but its length
    for turn in no_stop.sample(contexts, 5, 1.0, 1.0):
        assert len(turn.token_ids) == 5 and not turn.finished


def test_top_p_below_one_is_refused(tiny_vllm, tiny_model, tiny_tokenizer):
    contexts = _contexts(Policy(tiny_model, tiny_tokenizer))
    with pytest.raises(UserError, match="top_p"):
        tiny_vllm.sample(contexts, 4, 1.0, 0.9)
