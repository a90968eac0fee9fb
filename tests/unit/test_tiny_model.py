"""The tiny model: loadable like a hub model, deterministic, Qwen2.5-style tool chat template."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from tau2cl.agent import tiny_model
from tau2cl.agent.tiny_model import (
    CONTROL_TOKENS,
    IM_END,
    TOOL_TAG_TOKENS,
    make_tiny_model,
    resolve_model_path,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_user_details",
            "description": "Get the details of a user.",
            "parameters": {
                "type": "object",
                "properties": {"user_id": {"type": "string"}},
                "required": ["user_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "cancel_reservation",
            "description": "Cancel a reservation.",
            "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}}},
        },
    },
]

CONVERSATION = [
    {"role": "system", "content": "You are an airline agent."},
    {"role": "user", "content": "Cancel my trip, I am mia_li_3668."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}},
            },
            {
                "type": "function",
                "function": {
                    "name": "cancel_reservation",
                    "arguments": '{"reservation_id": "EHGLP3"}',
                },
            },
        ],
    },
    {"role": "tool", "content": '{"name": "Mia Li"}'},
    {"role": "tool", "content": "Reservation cancelled."},
    {"role": "assistant", "content": "Your trip is cancelled."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


# ---------------------------------------------------------------- the built folder


def test_build_loads_with_auto_classes(tiny_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = model.config
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer)
    assert 4000 <= len(tokenizer) <= 8000
    assert config.max_position_embeddings >= 8192
    assert (
        model.get_output_embeddings().weight.data_ptr()
        == model.get_input_embeddings().weight.data_ptr()
    )
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 10_000_000
    assert tokenizer.eos_token == IM_END and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([tokenizer("Hello, I want to book a flight.")["input_ids"]])  # (1, T)
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tiny_dir, tmp_path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights, weights_again, weights_other = (
        load_file(d / "model.safetensors") for d in (tiny_dir, again, other)
    )
    assert weights.keys() == weights_again.keys() == weights_other.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    random_init = [
        k for k in weights if k.endswith("proj.weight") or "embed" in k
    ]  # not norms, biases
    assert random_init and all(not torch.equal(weights[k], weights_other[k]) for k in random_init)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        assert (
            (tiny_dir / name).read_bytes()
            == (again / name).read_bytes()
            == (other / name).read_bytes()
        )


def test_loaded_tokenizer_encodes_as_the_trained_bpe(tiny_dir, tokenizer):
    """transformers 5 rebuilds a Qwen2Tokenizer from the saved files; it must equal what was trained."""
    trained = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    texts = tiny_model.tau2_corpus()[::50] + [
        "  tabs\tand ünïcödé 日本 😀 <tool_call>\n{}\n</tool_call>"
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == trained.encode(text).ids
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = {t: tokenizer.encode(t) for t in CONTROL_TOKENS + TOOL_TAG_TOKENS}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(ids)
    text = "<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>"
    # Control tokens go with skip_special_tokens; tool tags stay, so a parser can find them either way.
    assert (
        tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
        == "assistant\n<tool_call>\n{}\n</tool_call>"
    )
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tau2_tool_call_json_is_compact(tokenizer):
    """The tokenizer was trained on tau2 text, so a tool call costs far fewer tokens than bytes."""
    call = '{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}'
    assert len(tokenizer.encode(call)) < len(call) / 2.5


# ---------------------------------------------------------------- chat template


def test_tools_are_listed_in_the_system_block(tokenizer):
    text = render(tokenizer, CONVERSATION[:2], tools=TOOLS)
    system = text.split(IM_END)[0]
    assert system.startswith("<|im_start|>system\nYou are an airline agent.\n\n# Tools")
    tools_block = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in tools_block.split("\n")] == TOOLS
    assert (
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        in system
    )


def test_default_system_without_tools(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tool_calls_and_grouped_tool_responses(tokenizer):
    text = render(tokenizer, CONVERSATION, tools=TOOLS)
    expected = (
        "<|im_start|>user\nCancel my trip, I am mia_li_3668.<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_user_details", "arguments": {"user_id": "mia_li_3668"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "cancel_reservation", "arguments": {"reservation_id": "EHGLP3"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n"
        '<tool_response>\n{"name": "Mia Li"}\n</tool_response>\n'
        "<tool_response>\nReservation cancelled.\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nYour trip is cancelled.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n"
    )
    assert text.endswith(expected)
    assert text.count("<|im_start|>user") == 3  # two tool messages share one user block


def test_assistant_text_with_tool_call(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"function": {"name": "get_user_details", "arguments": {"user_id": "u1"}}}
            ],
        },
    ]
    assert render(tokenizer, messages).endswith(
        '<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "get_user_details", '
        '"arguments": {"user_id": "u1"}}\n</tool_call><|im_end|>\n'
    )


@pytest.mark.parametrize("cut", [3, 6])
def test_rendering_ending_in_assistant_turn_is_a_prefix(tokenizer, cut):
    """The rollout engine renders only the new suffix; earlier text must never change."""
    assert CONVERSATION[cut - 1]["role"] == "assistant"
    short = render(tokenizer, CONVERSATION[:cut], tools=TOOLS)
    long = render(tokenizer, CONVERSATION, tools=TOOLS, add_generation_prompt=True)
    assert short.endswith("<|im_end|>\n")
    assert long.startswith(short)
    # The generation prompt is the start of the assistant turn it prompts for.
    prompt = render(tokenizer, CONVERSATION[: cut - 1], tools=TOOLS, add_generation_prompt=True)
    assert short.startswith(prompt)


# ---------------------------------------------------------------- cache


def test_resolve_model_path_builds_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("TAU2CL_CACHE", str(tmp_path))
    calls = []
    real_make = tiny_model.make_tiny_model

    def counting_make(out_dir, seed=0):
        calls.append(seed)
        return real_make(out_dir, seed)

    monkeypatch.setattr(tiny_model, "make_tiny_model", counting_make)
    first = resolve_model_path("tiny")
    second = resolve_model_path("tiny")
    assert first == second == str(tmp_path / "tiny-model-v1-seed0")
    assert calls == [0]
    assert (tmp_path / "tiny-model-v1-seed0" / "model.safetensors").is_file()
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny-model-")
    ] == []  # no temp left


def test_resolve_model_path_passes_other_names_through():
    assert resolve_model_path("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_model_path("/models/my-model") == "/models/my-model"


def test_a_torchrun_rank_other_than_0_builds_the_whole_model(tmp_path, monkeypatch, tiny_dir):
    """Whichever rank takes the build lock writes every file (transformers' save_pretrained
    writes no weights or config on a rank other than 0 of an initialised process group)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *args, **kwargs: 1)
    monkeypatch.setenv("TAU2CL_CACHE", str(tmp_path))
    folder = resolve_model_path("tiny")
    monkeypatch.undo()
    names = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"}
    assert names <= {p.name for p in (tmp_path / "tiny-model-v1-seed0").iterdir()}
    built, reference = load_file(f"{folder}/model.safetensors"), load_file(f"{tiny_dir}/model.safetensors")
    assert built.keys() == reference.keys() and all(torch.equal(built[k], reference[k]) for k in built)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.architectures == ["Qwen2ForCausalLM"] and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
