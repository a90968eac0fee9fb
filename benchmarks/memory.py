"""Training memory per GPU, computed from parameter counts and dtypes, and checked on CPU.

    python benchmarks/memory.py                      # the tables (markdown) for Qwen2.5-3B and 7B
    python benchmarks/memory.py --check              # also measure a small shape on CPU (about 5 minutes)
    python benchmarks/memory.py [--check] --write-docs docs/memory.md   # and write them into the docs

The model follows what tau2cl holds (src/tau2cl/trainer.py, rl/training_model.py, rl/lora.py):
  - full fine-tuning: fp32 master weights, fp32 gradients and AdamW's two fp32 moments
    (4 + 4 + 8 = 16 bytes per parameter); the reference model is a second copy in --model_dtype;
    DDP adds its gradient buckets (4 bytes per trained parameter: gradient_as_bucket_view is off);
  - LoRA: the base frozen in --model_dtype (2 bytes per parameter in bf16) and the adapters with
    16 bytes per adapter parameter; the reference is the same base with the adapters off (0 bytes);
  - FSDP with N GPUs: the trained module's weights, gradients and optimizer state are sharded 1/N,
    and every GPU also keeps a full, unsharded rollout copy of the weights (fp32 masters for full
    fine-tuning, the bf16 base and fp32 adapters for LoRA), refreshed after every step;
  - the KV cache of the rollout: 2 (K and V) x layers x kv_heads x head_dim x 2 bytes (bf16) per
    token of every live episode.
Left out: activations of the update (they depend on micro-batch size and length; the checkpoint
figure below is what --gradient_checkpointing keeps per sequence), autocast's bf16 copies of
fp32 weights during a forward, all-gathered FSDP blocks in flight, the CUDA context and the
allocator's fragmentation; "fits" therefore asks for 10% headroom.

--check builds a small Qwen2 shape on CPU in a fresh process per configuration, runs one update
with tau2cl's own functions (accumulate_gradients, AdamW, LoRA through rl/lora.py) and reads the
process's resident memory (VmRSS after the step, VmHWM for the peak, from /proc/self/status)
above its level just before the model was built, with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_) so that freed tensors are returned to the system.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from gpu_bench import QWEN3B_SHAPE

from tau2cl.config import LORA_TARGET_MODULES

GB = 1e9
GPUS_GB = (24, 40, 48, 80, 141)  # common cards: RTX 4090/A10, A100-40, A6000/L40S, A100/H100, H200
HEADROOM = 0.9  # a configuration fits when it needs at most 90% of the card
LORA_R = 16
EPISODES, EPISODE_TOKENS = 16, 8192  # the rollout's KV cache: 16 live episodes of 8k tokens
QWEN7B_SHAPE = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                    intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0)
SMALL_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   intermediate_size=1536, vocab_size=32000, tie_word_embeddings=False)
TABLE_MARKS = ("<!-- memory tables: begin -->", "<!-- memory tables: end -->")
CHECK_MARKS = ("<!-- memory check: begin -->", "<!-- memory check: end -->")


@dataclass(frozen=True)
class Shape:
    """The sizes of a Qwen2/Llama-style decoder (Qwen2 has biases on q, k and v)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool = True

    @classmethod
    def from_config(cls, name: str, config: dict) -> Shape:
        return cls(name, config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                   config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"],
                   config["tie_word_embeddings"])

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block, by module name."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def parameter_count(shape: Shape) -> int:
    """Every parameter: embeddings, blocks (linears, q/k/v biases, 2 norms), final norm, LM head."""
    block = sum(a * b for a, b in shape.linears().values()) + 2 * shape.hidden
    if shape.qkv_bias:
        block += shape.hidden + 2 * shape.kv_width
    head = 0 if shape.tied else shape.vocab * shape.hidden
    return shape.vocab * shape.hidden + shape.layers * block + shape.hidden + head


def lora_parameter_count(shape: Shape, r: int, targets=tuple(LORA_TARGET_MODULES)) -> int:
    """A (r x in) and B (out x r) for every targeted linear of every block."""
    return shape.layers * sum(r * (a + b) for name, (a, b) in shape.linears().items() if name in targets)


def kv_cache_bytes(shape: Shape, tokens: int, dtype_bytes: int = 2) -> int:
    return 2 * shape.layers * shape.kv_width * dtype_bytes * tokens


def checkpoint_bytes(shape: Shape, tokens: int, dtype_bytes: int = 2) -> int:
    """What --gradient_checkpointing keeps for backward: each block's input, for every token."""
    return shape.layers * shape.hidden * dtype_bytes * tokens


def per_gpu_bytes(shape: Shape, method: str, reference: bool, gpus: int, parallelism: str,
                  lora_r: int = LORA_R, base_bytes: int = 2) -> dict[str, float]:
    """Bytes one GPU holds for weights and training state, by part (see the module docstring)."""
    p = parameter_count(shape)
    trained = p if method == "full" else lora_parameter_count(shape, lora_r)
    weights = 4 * p if method == "full" else base_bytes * p + 4 * trained
    sharded = parallelism == "fsdp" and gpus > 1
    n = gpus if sharded else 1
    parts = {
        "weights": weights / n,
        "gradients": 4 * trained / n,
        "adamw": 8 * trained / n,
        "ddp_buckets": 4 * trained if parallelism == "ddp" and gpus > 1 else 0,
        "rollout_copy": weights if sharded else 0,
        "reference": base_bytes * p if reference and method == "full" else 0,
    }
    return parts


def smallest_gpu(total_bytes: float) -> str:
    fits = [g for g in GPUS_GB if total_bytes <= HEADROOM * g * GB]
    return f"{fits[0]} GB" if fits else "none"


SETUPS = [("1 GPU", 1, "ddp"), ("DDP, per GPU", 8, "ddp"), ("FSDP x4", 4, "fsdp"), ("FSDP x8", 8, "fsdp")]


def shape_table(shapes: list[Shape]) -> list[str]:
    tokens = EPISODES * EPISODE_TOKENS
    rows = ["| model | parameters | LoRA r=16 adapters (share) | KV cache, 16 x 8k tokens (bf16) | checkpoints per 8k-token sequence |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for s in shapes:
        p, a = parameter_count(s), lora_parameter_count(s, LORA_R)
        rows.append(f"| {s.name} | {p / 1e9:.3f} B | {a / 1e6:.1f} M ({100 * a / p:.2f}%) | "
                    f"{kv_cache_bytes(s, tokens) / GB:.1f} GB | {checkpoint_bytes(s, EPISODE_TOKENS) / GB:.2f} GB |")
    return rows


def memory_table(shapes: list[Shape]) -> list[str]:
    head = " | ".join(name for name, _, _ in SETUPS)
    rows = [f"| model | training | reference | {head} |", "| --- | --- | --- |" + " ---: |" * len(SETUPS)]
    for s in shapes:
        kv = kv_cache_bytes(s, EPISODES * EPISODE_TOKENS)
        for method, label in (("full", "full fine-tuning (fp32 masters)"), ("lora", f"LoRA r={LORA_R} (bf16 base)")):
            for reference in (False, True):
                cells = []
                for _, gpus, parallelism in SETUPS:
                    state = sum(per_gpu_bytes(s, method, reference, gpus, parallelism).values())
                    total = state + kv
                    cells.append(f"{state / GB:.1f} + {kv / GB:.1f} = **{total / GB:.1f}** → {smallest_gpu(total)}")
                ref = ("a bf16 copy" if method == "full" else "the base, adapters off") if reference else "none (kl_coef 0)"
                rows.append(f"| {s.name} | {label} | {ref} | " + " | ".join(cells) + " |")
    return rows


def tables() -> str:
    shapes = [Shape.from_config("Qwen2.5-3B", QWEN3B_SHAPE), Shape.from_config("Qwen2.5-7B", QWEN7B_SHAPE)]
    return "\n".join(shape_table(shapes) + [""] + memory_table(shapes))


def write_between(path: Path, marks: tuple[str, str], body: str) -> None:
    """Replace what lies between the two marker lines of a docs file."""
    text = path.read_text()
    start, end = text.index(marks[0]) + len(marks[0]), text.index(marks[1])
    path.write_text(text[:start] + "\n" + body + "\n" + text[end:])


# ----------------------------------------------------------------------------- the CPU check
CHECKS = [("full", False), ("full", True), ("lora", False), ("lora", True)]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(method: str, reference: bool, layers: int) -> dict:
    """In this (fresh) process: build the small shape as tau2cl would, take one update, read RSS."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tau2cl.config import GRPOConfig
    from tau2cl.rl.lora import adapters_disabled, add_lora
    from tau2cl.rl.update import LossSettings, accumulate_gradients, collate, reference_logprobs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(**dict(SMALL_SHAPE, num_hidden_layers=layers))
    ids = torch.randint(0, SMALL_SHAPE["vocab_size"], (1, 64)).tolist()
    batch = collate(ids, [[1] * 64], [[-5.0] * 64], [1.0], pad_id=0)
    import peft  # noqa: F401  (imported before the baseline, as the trainer has it loaded)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # warm up kernels before the baseline
        torch.ones(8, 8) @ torch.ones(8, 8)
    baseline = _status_kib("VmRSS")
    dtype = torch.float32 if method == "full" else torch.bfloat16
    torch.set_default_dtype(dtype)  # built directly in its dtype, as from_pretrained loads it
    model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    lora = add_lora(model, GRPOConfig(model_name_or_path="small", lora_r=LORA_R)) if method == "lora" else None
    ref_model = model
    if reference and lora is None:
        torch.set_default_dtype(torch.bfloat16)
        ref_model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
        torch.set_default_dtype(torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    if reference:
        with adapters_disabled(lora):
            batch.ref_logprobs = reference_logprobs(ref_model, batch, [[0]], 1.0, torch.bfloat16)
    settings = LossSettings(1.0, 0.2, 0.2, 0.04 if reference else 0.0, compute_dtype=torch.bfloat16)
    accumulate_gradients(model, batch, [[0]], settings, float(batch.num_tokens))
    optimizer.step()
    after = _status_kib("VmRSS")
    return {"after_step": (after - baseline) * 1024, "peak": (_status_kib("VmHWM") - baseline) * 1024,
            "params": sum(p.numel() for p in model.parameters() if lora is None or not p.requires_grad),
            "trained": sum(p.numel() for p in params)}


CHECK_DEPTHS = (8, 16)  # layers of the two small shapes; their difference cancels fixed overheads


def check() -> list[str]:
    """Each configuration at two depths: absolute figures, and the increment from 8 to 16 layers
    (the process's fixed costs, such as kernels' workspaces and the one short batch's activations,
    cancel in the increment, which is then the weights and state of 8 blocks alone)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = ["| training | reference | layers | model | measured after the step | measured peak |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    increments = ["| training | reference | model: 8 more layers | measured: 8 more layers | measured / model |",
                  "| --- | --- | ---: | ---: | ---: |"]
    for method, reference in CHECKS:
        results = []
        for layers in CHECK_DEPTHS:
            shape = Shape.from_config("small", dict(SMALL_SHAPE, num_hidden_layers=layers))
            out = subprocess.run([sys.executable, __file__, "--measure", method, str(reference), str(layers)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            expected = sum(per_gpu_bytes(shape, method, reference, 1, "ddp").values())
            assert got["params"] == parameter_count(shape), (got["params"], parameter_count(shape))
            assert method == "full" or got["trained"] == lora_parameter_count(shape, LORA_R)
            rows.append(f"| {method} | {reference} | {layers} | {expected / 1e6:.1f} MB | "
                        f"{got['after_step'] / 1e6:.1f} MB | {got['peak'] / 1e6:.1f} MB |")
            results.append((expected, got["after_step"]))
        (e0, m0), (e1, m1) = results
        increments.append(f"| {method} | {reference} | {(e1 - e0) / 1e6:.1f} MB | {(m1 - m0) / 1e6:.1f} MB | "
                          f"{(m1 - m0) / (e1 - e0):.3f} |")
    return rows + [""] + increments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-docs", type=Path, help="replace the tables between the markers in this file")
    parser.add_argument("--check", action="store_true", help="measure the small shape on CPU")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # one configuration, in a child
    args = parser.parse_args()
    if args.measure:
        method, reference, layers = args.measure
        print(json.dumps(measure(method, reference == "True", int(layers))))
        return
    print(tables())
    if args.write_docs:
        write_between(args.write_docs, TABLE_MARKS, tables())
    if args.check:
        intro = (f"Measured on {platform.processor() or platform.machine()} ({os.cpu_count()} cores, load average "
                 f"{os.getloadavg()[0]:.1f} at the start), torch {_version('torch')}, Qwen2 shape {SMALL_SHAPE} "
                 f"at {' and '.join(map(str, CHECK_DEPTHS))} layers, LoRA r={LORA_R}:")
        body = "\n".join([intro, ""] + check())
        print("\n" + body)
        if args.write_docs:
            write_between(args.write_docs, CHECK_MARKS, body)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
