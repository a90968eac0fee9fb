"""A tiny, random-init Qwen2-style chat model with tools, built offline from tau2's own text.

Tests and the quick start need a real `transformers` causal LM with a real tokenizer and a chat
template that knows tools, but nothing can be downloaded. This module builds one: a few-million-
parameter `Qwen2ForCausalLM` (random weights, fixed by the seed) and a byte-level BPE tokenizer
trained on tau2 domain text, with Qwen2.5's special tokens and a Qwen2.5-style tool chat template.
The same code that loads `Qwen/Qwen2.5-3B-Instruct` loads this folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tau2cl.env import tau2_compat  # noqa: F401  (quiet tau2 import before any tau2 import)
from tau2cl.errors import UserError

TINY_MODEL_NAME = "tiny"
TINY_MODEL_VERSION = "v1"  # bump when the recipe below changes, so stale caches are not reused
CACHE_ENV_VAR = "TAU2CL_CACHE"
CHAT_TEMPLATE_FILE = "qwen2_tools.jinja"

# Special tokens as in Qwen2.5: the first three are control tokens (dropped by
# skip_special_tokens); the tool tags are plain added tokens so they survive any decode.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TOOL_TAG_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Upper bound on BPE vocabulary + added tokens; with min_frequency 2, tau2's text stops near 4.4k.
VOCAB_SIZE = 6144
# telecom's tasks.json holds 2285 near-duplicate scenarios; a subset is enough.
TELECOM_TASK_LIMIT = 300
MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32768,
)

# JSON fragments the policy writes in every tool call, so they become few tokens.
_JSON_PUNCTUATION = (
    '{"name": "", "arguments": {}}\n{"name": "get_user_details", "arguments": {"user_id": ""}}\n'
    '[{}], {"": ""}, {"": 0}, {"": null}, {"": true}, {"": false}, [""], ["", ""], [0, 1]\n'
    '": "',
    '", "',
    '": {"',
    '"}}',
    '"}, {"',
    '": [',
    "], ",
    "0123456789 -0.5 1e3 100.00",
)


# ---------------------------------------------------------------- corpus (tau2's own text)


def _tau2_data_dir() -> Path:
    from tau2.utils.utils import DATA_DIR

    return Path(DATA_DIR) / "tau2"


def _document_texts(data_dir: Path) -> list[str]:
    """Domain policies, telecom manuals and the user simulator guidelines."""
    domains = data_dir / "domains"
    paths = [domains / "airline" / "policy.md", domains / "retail" / "policy.md"]
    paths += sorted((domains / "telecom").glob("main_policy*.md"))
    paths += sorted((domains / "telecom").glob("tech_support*.md"))
    paths += sorted((data_dir / "user_simulator").glob("*.md"))
    return [p.read_text(encoding="utf-8") for p in paths if p.is_file()]


def _prompt_texts() -> list[str]:
    """tau2's agent instructions, which open every system prompt the policy reads."""
    from tau2.agent import llm_agent

    names = ("AGENT_INSTRUCTION", "SYSTEM_PROMPT", "AGENT_SOLO_INSTRUCTION", "SYSTEM_PROMPT_SOLO")
    return [getattr(llm_agent, n) for n in names if isinstance(getattr(llm_agent, n, None), str)]


def _tool_texts() -> list[str]:
    """The OpenAI schemas of every domain's tools, as the chat template writes them."""
    from tau2.registry import registry

    texts = []
    for domain in ("airline", "retail", "telecom"):
        env = registry.get_env_constructor(domain)()
        tools = tau2_compat.as_list(env.get_tools())
        if domain == "telecom":
            tools += tau2_compat.as_list(env.get_user_tools())
        texts += [json.dumps(t.openai_schema, ensure_ascii=False) for t in tools]
    return texts


def _task_texts(data_dir: Path) -> list[str]:
    """User scenarios, tickets and golden tool calls (as tool-call JSON) of the tasks."""
    texts = []
    for domain in ("airline", "retail", "telecom"):
        path = data_dir / "domains" / domain / "tasks.json"
        tasks = json.loads(path.read_text(encoding="utf-8"))
        if domain == "telecom":
            tasks = tasks[:TELECOM_TASK_LIMIT]
        for task in tasks:
            texts += _one_task_texts(task)
    return texts


def _one_task_texts(task: dict) -> list[str]:
    texts = []
    instructions = (task.get("user_scenario") or {}).get("instructions") or {}
    if isinstance(instructions, str):
        texts.append(instructions)
    else:
        texts += [v for v in instructions.values() if isinstance(v, str)]
    if isinstance(task.get("ticket"), str):
        texts.append(task["ticket"])
    criteria = task.get("evaluation_criteria") or {}
    for action in criteria.get("actions") or []:
        call = {"name": action.get("name"), "arguments": action.get("arguments") or {}}
        texts.append(json.dumps(call, ensure_ascii=False))
    texts += [s for s in criteria.get("communicate_info") or [] if isinstance(s, str)]
    return texts


def tau2_corpus() -> list[str]:
    """All the text the tokenizer is trained on, in a fixed order."""
    data_dir = _tau2_data_dir()
    texts = _document_texts(data_dir) + _prompt_texts() + _tool_texts()
    texts += _task_texts(data_dir) + list(_JSON_PUNCTUATION)
    return texts


# ---------------------------------------------------------------- tokenizer


def chat_template() -> str:
    """The Qwen2.5-style tool chat template shipped in tau2cl/templates."""
    return (Path(__file__).parent / "templates" / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")


def train_tokenizer(texts: list[str]):
    """Byte-level BPE as Qwen2 does it (NFC, Qwen's split regex, byte-level), with Qwen's added tokens.

    Returns a `transformers` fast tokenizer whose eos is `<|im_end|>` (end of a chat turn) and pad
    is `<|endoftext|>`.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    num_added = len(CONTROL_TOKENS) + len(TOOL_TAG_TOKENS)
    trainer = BpeTrainer(
        vocab_size=VOCAB_SIZE - num_added,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Added after training so, as in Qwen2.5, they follow the BPE vocabulary in id order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
        chat_template=chat_template(),
    )


# ---------------------------------------------------------------- model


def build_model(tokenizer, seed: int):
    """A random-init Qwen2ForCausalLM sized for CPU tests; weights depend only on `seed`."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **MODEL_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):  # seed the init without moving the caller's RNG
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def make_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model, tokenizer, chat template and generation config into `out_dir`.

    Deterministic: the same seed gives bit-identical weights and identical tokenizer files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(tau2_corpus())
    model = build_model(tokenizer, seed)
    _write_model(model, out)
    tokenizer.save_pretrained(out)
    _set_tokenizer_class(out, "Qwen2Tokenizer")
    return out


def _write_model(model, out: Path) -> None:
    """Config, generation config and weights as `from_pretrained` reads them, written by this
    process whatever its rank: under torchrun, transformers' `save_pretrained` writes nothing on a
    rank other than 0, and the rank that builds the cache may be any of them."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    # named_parameters lists the tied head once, under the embeddings' name, as save_pretrained does
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _set_tokenizer_class(out: Path, name: str) -> None:
    """Name the tokenizer class as Qwen2.5 does, so the tiny model loads like the real one.

    transformers 5 would write "TokenizersBackend", a name transformers 4 does not know. Under
    "Qwen2Tokenizer", transformers 5 rebuilds the same BPE from tokenizer.json's vocab and merges
    with the same normaliser and pre-tokeniser, and transformers 4 loads tokenizer.json as is.
    """
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where built models are kept: $TAU2CL_CACHE, else ~/.cache/tau2cl."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "tau2cl").expanduser()


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Serialise builds across processes (torchrun ranks) where the OS offers file locks."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename below still keeps the cache whole
        yield
        return
    with open(directory / ".build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str) -> str:
    """Map "tiny" to a cached build of the tiny model (built once); return anything else as is.

    The build goes to a temporary folder that is renamed into place, so no process ever sees a
    half-written model folder.
    """
    if name_or_path != TINY_MODEL_NAME:
        return name_or_path
    root = cache_dir()
    target = root / f"tiny-model-{TINY_MODEL_VERSION}-seed0"
    if target.is_dir():
        return str(target)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write the model cache '{root}' ({exc.strerror or exc}); set {CACHE_ENV_VAR} to a writable folder."
        ) from None
    with _build_lock(root):
        if not target.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tiny-model-", dir=root))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
            try:
                make_tiny_model(tmp, seed=0)
                os.replace(tmp, target)
            except OSError:
                # Lost a race with a process that took no lock (no fcntl): reuse its build.
                if not target.is_dir():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
