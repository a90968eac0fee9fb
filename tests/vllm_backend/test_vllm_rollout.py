"""Multi-turn tau2 episodes through the rollout engine with the vLLM sampler (tiny model).

The engine's token-in, token-out properties hold with vLLM sampling: each trajectory's prompt is
the renderer's opening, every turn's context is the previous context + its sample + rendered
glue, the loss mask covers exactly the sampled tokens, and the trainer's log-probs recomputed on
the saved ids equal vLLM's sampling log-probs (temperature 0.7, fp32).
"""

from __future__ import annotations

import pytest
import torch

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage

from tau2cl.agent.engine import GREETING, RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Generation, Policy
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.rl.update import collate, sequence_logprobs

pytestmark = pytest.mark.vllm

MAX_TURNS = 3
MAX_NEW_TOKENS = 16
TEMPERATURE = 0.7
LOGPROB_TOLERANCE = 1e-4  # fp32, the design's bound


class RecordingSampler:
    """Another sampler's turns, each kept with the context it was sampled for."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.keeps_episode_caches = sampler.keeps_episode_caches
        self.calls: list[tuple[list[int], Generation]] = []

    def sample(self, contexts, *args, **kwargs):
        turns = self.sampler.sample(contexts, *args, **kwargs)
        self.calls += [(list(c), t) for c, t in zip(contexts, turns, strict=True)]  # copies: contexts grow
        return turns

    def reset_prefix_cache(self):
        self.sampler.reset_prefix_cache()

    def load_weights(self, named_tensors):
        return self.sampler.load_weights(named_tensors)


@pytest.fixture(scope="module")
def rollout(tiny_model, tiny_tokenizer, tiny_vllm, domains, single_torch_thread):
    """(policy, sampler, requests, trajectories): 7 episodes of airline, retail and solo telecom."""
    tiny_vllm.load_weights(tiny_model.named_parameters())
    policy = Policy(tiny_model, tiny_tokenizer)
    sampler = RecordingSampler(tiny_vllm)
    requests = []
    for name in ("airline", "retail"):
        for task in domains[name].train_tasks[:2] + domains[name].test_tasks[:1]:
            requests.append(RolloutRequest(domains[name], task, group=len(requests)))
    requests.append(RolloutRequest(domains["telecom"], domains["telecom"].train_tasks[0], group=len(requests)))
    settings = RolloutSettings(max_turns=MAX_TURNS, max_new_tokens=MAX_NEW_TOKENS, max_context_tokens=16384,
                               temperature=TEMPERATURE)
    trajectories = RolloutEngine(policy, ScriptedUser(), settings, sampler=sampler).run(requests)
    return policy, sampler, requests, trajectories


def _turns(sampler: RecordingSampler, ids: list[int]) -> list[tuple[list[int], Generation]]:
    found = [(c, g) for c, g in sampler.calls if ids[: len(c) + len(g.token_ids)] == c + g.token_ids]
    return sorted(found, key=lambda cg: len(cg[0]))


def test_prompts_are_the_renderers_opening(rollout):
    policy, _, requests, trajectories = rollout
    for req, traj in zip(requests, trajectories, strict=True):
        chat = []
        if not req.domain.solo_mode:
            greeting, opening = traj.messages[0], traj.messages[1]
            assert isinstance(greeting, AssistantMessage) and greeting.content == GREETING
            chat = [{"role": "assistant", "content": GREETING}, {"role": "user", "content": opening.content}]
        expected = policy.renderer.prompt_ids(req.domain.system_prompt(req.task), req.domain.tool_schemas, chat)
        assert traj.token_ids[: traj.prompt_length] == expected


def test_token_ids_and_loss_masks_are_exactly_the_samples(rollout):
    policy, sampler, _, trajectories = rollout
    eos = policy.tokenizer.eos_token_id
    used = set()
    for traj in trajectories:
        n = len(traj.token_ids)
        assert len(traj.loss_mask) == len(traj.sampling_logprobs) == n
        turns = _turns(sampler, traj.token_ids)
        assert len(turns) == traj.assistant_turns >= 1
        assert turns[0][0] == traj.token_ids[: traj.prompt_length]
        expected_mask = [0] * n
        for k, (context, turn) in enumerate(turns):
            used.add(id(turn))
            end = len(context) + len(turn.token_ids)
            expected_mask[len(context) : end] = [1] * len(turn.token_ids)
            assert traj.sampling_logprobs[len(context) : end] == turn.logprobs
            if turn.finished:
                assert traj.token_ids[end - 1] in policy.stop_ids
            else:
                assert len(turn.token_ids) == MAX_NEW_TOKENS
                if k + 1 < len(turns):  # cut by max_new_tokens: closed with eos outside the loss
                    assert traj.token_ids[end] == eos
            if k + 1 < len(turns):  # the next context extends this one, its sample and rendered glue
                assert len(turns[k + 1][0]) > end
        assert n == len(turns[-1][0]) + len(turns[-1][1].token_ids)  # nothing after the last turn
        assert traj.loss_mask == expected_mask
    assert len(used) == len(sampler.calls)  # every sample is in some trajectory
    assert any(t.assistant_turns > 1 for t in trajectories)  # multi-turn contexts were sampled


@torch.no_grad()
def test_recomputed_logprobs_equal_vllms(rollout, tiny_model):
    policy, _, _, trajectories = rollout
    worst = 0.0
    for traj in trajectories:
        batch = collate([traj.token_ids], [traj.loss_mask], [traj.sampling_logprobs], [0.0],
                        pad_id=policy.tokenizer.pad_token_id)
        recomputed = sequence_logprobs(tiny_model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                       temperature=TEMPERATURE)
        mask = batch.loss_mask
        assert int(mask.sum()) == sum(traj.loss_mask) > 0
        worst = max(worst, (recomputed - batch.old_logprobs).abs()[mask].max().item())
    assert worst <= LOGPROB_TOLERANCE, f"max |Δ| = {worst:.2e}"
