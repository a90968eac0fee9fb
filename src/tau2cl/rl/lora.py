"""LoRA through PEFT: trained adapters on a frozen base, the base as the reference, and their files.

With `--lora_r` > 0 the policy's causal LM is loaded in `--model_dtype` and frozen, and PEFT
injects rank-r adapters, kept and trained in fp32, into the `--lora_target_modules` linears. The
one module then plays every role:
  - the policy (adapters on): rollouts, the update, evaluation;
  - the reference model (adapters off, inside `reference()`): the KL penalty's log-probs and the
    user with `--user_model reference`, with no second copy of the weights;
  - its trainable parameters are the adapters alone, so gradients, AdamW state, EWC's Fisher and
    anchors and DDP/FSDP's gradient traffic are all the adapters' size.
A checkpoint holds the adapter (adapter_config.json and adapter_model.safetensors, which
`PeftModel.from_pretrained(base, folder)` loads) and, with `--merge_lora_on_save`, a `merged/`
folder with the adapters folded into the base weights that `AutoModelForCausalLM.from_pretrained`
loads (plain safetensors for a model read from GGUF, as its checkpoints are).

A model that ties its head to its input embeddings (SmolLM2, the tiny model) keeps them tied: the
adapters go on other modules, a merged model and the sampler's pushed weights hold the shared
matrix once, and a target that reaches the embeddings or the head is refused.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tau2cl.errors import UserError
from tau2cl.runs.checkpoint import non_finite_count, read_from_gguf, write_plain_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's file names in a saved adapter folder
MERGED_DIR = "merged"  # the merged model's folder inside a checkpoint


def base_dtype(config: Any) -> str:
    """The dtype the policy's weights are loaded in: fp32 masters for full fine-tuning, else
    the frozen base in --model_dtype (auto: the checkpoint's own)."""
    return config.model_dtype if config.lora_r > 0 else "float32"


def add_lora(model: torch.nn.Module, config: Any, tokenizer: Any = None) -> LoraPolicy | None:
    """`model` with LoRA adapters injected (in place) when `config.lora_r` > 0, else None."""
    return LoraPolicy(model, config, tokenizer) if config.lora_r > 0 else None


class LoraPolicy:
    """The PEFT wrapper around the policy's LM; `lm` is the LM itself, adapters injected."""

    def __init__(self, model: torch.nn.Module, config: Any, tokenizer: Any = None):
        from peft import LoraConfig, get_peft_model

        refuse_tied_targets(model, config)
        lora_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                self.peft = get_peft_model(model, lora_config)
        except ValueError as exc:  # e.g. no module of the model has a target name
            first = str(exc).strip().splitlines()[0]
            raise UserError(f"cannot add LoRA adapters to '{config.model_name_or_path}': {first}") from None
        for param in self.trainable_parameters():
            param.data = param.data.float()  # fp32 adapters over a bf16/fp16 base
        self.merge_on_save = config.merge_lora_on_save
        self.tokenizer = tokenizer

    @property
    def lm(self) -> torch.nn.Module:
        """The causal LM with the adapters inside: what the policy, rollouts and update use."""
        return self.peft.get_base_model()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def reference(self) -> contextlib.AbstractContextManager:
        """Inside this context the LM is the frozen base: the reference model."""
        return self.peft.disable_adapter()

    def describe(self) -> str:
        """One line: the trainable share of the parameters."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.peft.parameters())
        config = self.peft.peft_config["default"]
        return (
            f"LoRA r={config.r} alpha={config.lora_alpha:g}: {trainable:,} trainable parameters of "
            f"{total:,} ({100 * trainable / total:.2f}%), base frozen in {_base_dtype_name(self.peft)}"
        )

    # ---- checkpoint files ----------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        """The adapter (PEFT's format) and, with --merge_lora_on_save, the merged model."""
        # the adapters alone, never the base's embedding matrices (tau2cl never resizes them;
        # PEFT's "auto" would look the base model up on the hub to decide)
        self.peft.save_pretrained(str(folder), save_embedding_layers=False, **kwargs)
        if self.merge_on_save:
            merged = Path(folder) / MERGED_DIR
            if read_from_gguf(self.lm):  # transformers refuses to save a model read from GGUF
                write_plain_model(self.lm, merged, merged_weights(self.peft))
            else:
                self.lm.save_pretrained(merged, state_dict=merged_state_dict(self.peft), **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(merged)

    def load_weights(self, folder: str | Path) -> None:
        """Load a checkpoint's adapter weights into these adapters (resume)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(folder) / ADAPTER_WEIGHTS
        if not path.exists():
            raise UserError(
                f"checkpoint '{folder}' holds no LoRA adapter ({ADAPTER_WEIGHTS}); resume it with "
                "--lora_r 0, the setting it was trained with."
            )
        state = load_file(str(path))
        bad = non_finite_count(state)
        if bad:
            raise UserError(f"checkpoint '{folder}' holds {bad} non-finite adapter weights; resume from an earlier checkpoint.")
        result = set_peft_model_state_dict(self.peft, state)
        missing = [k for k in result.missing_keys if ".lora_" in k]
        if missing or result.unexpected_keys:
            raise UserError(
                f"the LoRA adapter in '{folder}' does not match --lora_target_modules "
                f"(missing {missing[:2]}, unexpected {list(result.unexpected_keys)[:2]}); resume "
                "with the LoRA settings it was trained with."
            )


def tied_embeddings(model: torch.nn.Module) -> tuple[str, str] | None:
    """(input embeddings, head) module names when the model ties them to one matrix, else None."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embed is None or head is None or embed.weight is not head.weight:
        return None
    names = {id(module): name for name, module in model.named_modules()}
    return names[id(embed)], names[id(head)]


def refuse_tied_targets(model: torch.nn.Module, config: Any) -> None:
    """Refuse an adapter on a tied embedding or head. The two share one matrix, and an adapter on
    one of them changes that use alone: no merged checkpoint or pushed weight of the tied model
    can hold it (the other use would take the delta too, or the delta would be lost)."""
    tied = tied_embeddings(model)
    for name, partner in ([tied, tied[::-1]] if tied else []):
        if any(name == t or name.endswith("." + t) for t in config.lora_target_modules):  # PEFT's matching
            raise UserError(
                f"--lora_target_modules reaches '{name}', which shares its weight matrix with '{partner}' "
                f"in '{config.model_name_or_path}' (tied embeddings); leave it out of --lora_target_modules."
            )


def adapters_disabled(lora: LoraPolicy | None) -> contextlib.AbstractContextManager:
    """The reference model's context: the base alone with LoRA, nothing to do without it."""
    return lora.reference() if lora is not None else contextlib.nullcontext()


@torch.no_grad()
def merged_weights(peft_model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the plain model with the adapters folded in, W + (alpha / r) B A, under
    the plain model's names, one at a time (an adapted weight is summed in fp32 and stored in its
    own dtype; the others are the live tensors). The live weights stay untouched. A tied head is
    its embedding's matrix and comes once, under the embedding's name, as `named_parameters` gives it."""
    lm, layers = peft_model.get_base_model(), _adapted_layers(peft_model)
    for key, param in lm.named_parameters():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        layer = layers.get(plain.removesuffix(".weight"))
        yield plain, param if layer is None else _merged(layer, peft_model.active_adapter)


@torch.no_grad()
def merged_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict (buffers too) with every adapter folded in, on CPU; adapter
    tensors are left out."""
    lm, layers = peft_model.get_base_model(), _adapted_layers(peft_model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in lm.state_dict().items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        layer = layers.get(plain.removesuffix(".weight")) if plain.endswith(".weight") else None
        state[plain] = (tensor if layer is None else _merged(layer, peft_model.active_adapter)).detach().cpu()
    return state


def _adapted_layers(peft_model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def _merged(layer: Any, adapter: str) -> torch.Tensor:
    weight = layer.base_layer.weight
    return (weight.float() + layer.get_delta_weight(adapter).float()).to(weight.dtype)


def _base_dtype_name(peft_model: Any) -> str:
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in frozen)) or "no frozen weights"
