"""Cross-turn KV reuse: an episode's cache is exactly that of its token ids.

Three turns of four airline rows with unequal contexts (one row gets a long tool result, so the
prefill runs in two buckets and one row recomputes cached tokens): greedy turns with each row's
cache kept across turns equal the turns of the re-prefill path, token for token, with the same
log-probs, and so do the turns with the shared prompt prefix copied into every row instead of
attended once for the batch (cascade attention); a row's cache after a turn (the shared prefix,
then its own tokens) equals a fresh prefill of its saved ids; and an engine run with reuse frees
every episode's cache when the episode ends. One batch mixing two domains' rows (each domain's
prefix held once) samples what each domain's rows sample in a batch of their own.
"""

from __future__ import annotations

import pytest
import torch

from tau2cl.agent.decode import prefill_buckets
from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.kv_cache import KVSlot
from tau2cl.agent.policy import Policy
from tau2cl.agent.users.scripted import ScriptedUser

TOLERANCE = 1e-4  # fp32
MAX_NEW_TOKENS = 12


def _prompts(policy: Policy, domain) -> list[list[int]]:
    """Four openings of one domain: a shared system prefix and user messages of unequal length."""
    task = domain.train_tasks[0]
    words = ["Hi.", "I need to change my flight please.", "Hello " * 20, "Cancel my booking " * 6]
    return [
        policy.renderer.prompt_ids(domain.system_prompt(task), domain.tool_schemas, [{"role": "user", "content": w}])
        for w in words
    ]


def _tool_reply(policy: Policy, generation, k: int) -> list[int]:
    """What an engine appends after a turn: end of turn if cut, then a tool result of row-dependent size."""
    text = "result " * (3 + 300 * (k == 1))  # row 1 gets a long result: its own prefill bucket
    ids = [] if generation.finished else policy.renderer.encode(policy.end_of_turn_text)
    turn = {"role": "assistant", "content": policy.decode(generation.token_ids)}
    return ids + policy.renderer.continuation_ids(turn, [{"role": "tool", "content": text}], policy.end_of_turn_text)


def _three_turns(policy: Policy, prompts: list[list[int]], slots):
    contexts = [list(p) for p in prompts]
    turns = []
    for _ in range(3):
        generations = policy.generate(contexts, MAX_NEW_TOKENS, temperature=0.0, caches=slots)
        turns.append(generations)
        for k, (context, gen) in enumerate(zip(contexts, generations, strict=True)):
            if slots is not None:
                assert slots[k].ids == context + gen.token_ids[:-1]  # prompt + turn, last token aside
            context += gen.token_ids + _tool_reply(policy, gen, k)
    return turns, contexts


def test_prefill_buckets_bound_the_padded_work():
    # sorted 3, 5, 200: 2 x 5 = 10 <= max(1.5 x 8, 8 + 64 x 2); 3 x 200 = 600 > max(312, 208 + 192)
    assert prefill_buckets([200, 3, 5]) == [[1, 2], [0]]
    assert prefill_buckets([7, 7, 7]) == [[0, 1, 2]]


@pytest.mark.slow  # ~9 s: three greedy turns of four 2k-token rows, three times
@torch.no_grad()
def test_greedy_turns_with_kv_reuse_equal_the_reprefill_path(tiny_model, tiny_tokenizer, domains, single_torch_thread):
    policy = Policy(tiny_model, tiny_tokenizer)
    prompts = _prompts(policy, domains["airline"])
    slots = [KVSlot() for _ in prompts]
    reused, contexts = _three_turns(policy, prompts, slots)
    policy.reset_prefix_cache()
    again, contexts_again = _three_turns(policy, prompts, None)
    # without cascade attention: the shared prefix copied into every row, as plain SDPA reads it
    policy.reset_prefix_cache()
    policy.cascade = False
    copied, contexts_copied = _three_turns(policy, prompts, [KVSlot() for _ in prompts])
    assert contexts == contexts_again == contexts_copied
    for turn_a, turn_b, turn_c in zip(reused, again, copied, strict=True):
        for a, b, c in zip(turn_a, turn_b, turn_c, strict=True):
            assert a.token_ids == b.token_ids == c.token_ids and a.finished == b.finished == c.finished
            for other in (b, c):
                gap = max(abs(x - y) for x, y in zip(a.logprobs, other.logprobs, strict=True))
                assert gap < TOLERANCE
    # the kept cache is the cache of the saved ids: compare with a fresh forward of row 1 (bucketed);
    # the slot holds the tokens after the shared prefix, which it refers to (held once for all rows)
    prefix = slots[1].prefix
    assert prefix is not None and all(s.prefix is prefix for s in slots)
    assert slots[1].ids[: prefix.length] == prefix.ids == prompts[0][: prefix.length]
    ids = torch.tensor([slots[1].ids])
    fresh = tiny_model(input_ids=ids, use_cache=True).past_key_values
    for layer, (keys, values) in enumerate(slots[1].layers):
        expected_k, expected_v = (t[:, :, prefix.length :] for t in (fresh.layers[layer].keys, fresh.layers[layer].values))
        assert keys.shape == expected_k.shape
        assert (keys - expected_k).abs().max().item() < TOLERANCE
        assert (values - expected_v).abs().max().item() < TOLERANCE
        assert (prefix.layers[layer][0] - fresh.layers[layer].keys[:, :, : prefix.length]).abs().max().item() < TOLERANCE


class SlotWatchingPolicy(Policy):
    """The real policy, keeping every slot it was handed and the largest cache it held."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.slots: list[KVSlot] = []
        self.largest = 0

    def generate(self, prompts, *args, caches=None, **kwargs):
        generations = super().generate(prompts, *args, caches=caches, **kwargs)
        self.slots += [s for s in caches if all(s is not t for t in self.slots)]
        self.largest = max([self.largest] + [s.num_bytes for s in caches])
        return generations


@pytest.mark.slow  # ~5 s: one sampled batch of three episodes
def test_ended_episodes_free_their_cache(tiny_model, tiny_tokenizer, domains, single_torch_thread):
    policy = SlotWatchingPolicy(tiny_model, tiny_tokenizer)
    settings = RolloutSettings(max_turns=3, max_new_tokens=8, max_context_tokens=32768, temperature=1.0)
    requests = [RolloutRequest(domains[n], t, group=i) for i, (n, t) in enumerate(
        [("airline", domains["airline"].train_tasks[0]), ("airline", domains["airline"].train_tasks[1]),
         ("retail", domains["retail"].train_tasks[0])])]
    trajectories = RolloutEngine(policy, ScriptedUser(), settings).run(requests, torch.Generator().manual_seed(0))
    assert len(trajectories) == 3 and len(policy.slots) == 3
    assert policy.largest > 0  # caches were kept between turns
    assert all(s.num_bytes == 0 and not s.ids for s in policy.slots)  # and freed at the end


class PrefixCountingPolicy(Policy):
    """The real policy, noting how many distinct shared prefixes each batch's rows started from."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer)
        self.prefixes_per_batch: list[int] = []

    def generate(self, prompts, *args, caches=None, **kwargs):
        generations = super().generate(prompts, *args, caches=caches, **kwargs)
        self.prefixes_per_batch.append(len({id(s.prefix) for s in caches if s.prefix is not None}))
        return generations


@pytest.mark.slow  # ~10 s: two greedy turns of four 2k-token rows, four times
@torch.no_grad()
def test_a_batch_mixing_two_domains_samples_what_each_domains_batch_samples(
    tiny_model, tiny_tokenizer, domains, single_torch_thread
):
    policy = PrefixCountingPolicy(tiny_model, tiny_tokenizer)
    airline, retail = _prompts(policy, domains["airline"])[:2], _prompts(policy, domains["retail"])[2:]
    mixed = [airline[0], retail[0], airline[1], retail[1]]  # rows of one prefix not contiguous
    groups = ["airline", "retail", "airline", "retail"]

    def turns(prompts, group_keys, rows=(0, 1, 2, 3), cascade=True):
        policy.reset_prefix_cache()
        policy.cascade = cascade
        slots = [KVSlot() for _ in prompts]
        contexts, out = [list(p) for p in prompts], []
        for _ in range(2):
            generations = policy.generate(contexts, MAX_NEW_TOKENS, temperature=0.0, caches=slots, groups=group_keys)
            out.append(generations)
            for k, (context, gen) in enumerate(zip(contexts, generations, strict=True)):
                context += gen.token_ids + _tool_reply(policy, gen, rows[k])  # row 1's long reply: 2 buckets
        return [[turn[k] for turn in out] for k in range(len(prompts))]  # per row: its turns

    together = turns(mixed, groups)
    assert policy.prefixes_per_batch[-2:] == [2, 2]  # both domains' prefixes, each held once, in one batch
    alone = {"airline": turns(airline, ["airline"] * 2, (0, 2)), "retail": turns(retail, ["retail"] * 2, (1, 3))}
    copied = turns(mixed, groups, cascade=False)  # each row's prefix copied in front of its keys
    expected = [alone["airline"][0], alone["retail"][0], alone["airline"][1], alone["retail"][1]]
    for row_turns, row_expected, row_copied in zip(together, expected, copied, strict=True):
        for a, b, c in zip(row_turns, row_expected, row_copied, strict=True):
            assert a.token_ids == b.token_ids == c.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < TOLERANCE
            assert max(abs(x - y) for x, y in zip(a.logprobs, c.logprobs, strict=True)) < TOLERANCE
