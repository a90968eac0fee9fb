"""Section (e) of bench.py, on a CUDA device only: a Qwen2.5-3B-shaped model as the trainer runs it.

A random-init Qwen2 with Qwen2.5-3B-Instruct's sizes (its full 151,936-token vocabulary), fp32
master weights with bf16 autocast (the trainer's `--model_dtype bfloat16`), on one GPU's share of
the main 4-GPU run: batch_size_per_gpu 4 x num_samples_per_prompt 4 = 16 sequences.

- decode: the project's Policy.generate on 16 prompts that share a system-prompt-like prefix
  (prefix KV cache, one batch), sampled tokens/s;
- update: the project's accumulate_gradients + AdamW step on 16 sequences of `seq_len` tokens (a
  quarter of them trained, like a tool-use conversation), in 4 micro-batches, for each attention
  implementation available (SDPA always; FlashAttention-2 when `flash_attn` is installed), with and
  without gradient checkpointing: tokens/s and peak memory (torch.cuda.max_memory_allocated, weights,
  gradients and AdamW states included). A configuration that runs out of memory says so;
- multi-turn: 16 episodes sharing a `seq_len`-token prefix, up to 10 turns each, ending at
  different turns (3..10) with tool-result-like appends of unequal length: the rollout with each
  episode's KV cache kept across turns and with re-prefill every turn (decode tokens/s, seconds,
  peak memory), then the update on those episodes with and without the shared prefix (tokens/s,
  peak memory). The decode layout (right-aligned rows, shrinking batch, stop checks every few
  tokens) is the only one the project has, so it is always on.

- vLLM: when the vllm package is installed, the same 16 prompts sampled by tau2cl's vLLM sampler
  beside the own engine's decode (bf16 engine, `--vllm_gpu_memory_utilization`'s default 0.3, random
  weights at start, then the trained model's pushed: the GPU memory the engine takes, seconds per
  weight push, and one sleep + wake as `--vllm_sleep_mode` does around each update). Its FLOPs are
  not counted (the engine's forwards are not the model's modules).

FLOPs are counted from every forward's shapes by bench.py's FlopCounter (the update as 3 x its
forward; recomputation under gradient checkpointing is not counted, as model-FLOPs utilisation
conventionally does not) and compared with a bf16 matmul timed on the same GPU.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from tau2cl.agent.kv_cache import KVSlot
from tau2cl.agent.policy import Policy
from tau2cl.rl.grpo import group_advantages
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    collate,
    micro_batches_by_length,
    split_micro_batches,
)

QWEN3B_SHAPE = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                    intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0)
TASKS_PER_GPU, SAMPLES_PER_TASK = 4, 4  # batch_size_per_gpu x num_samples_per_prompt
MICRO_BATCHES = 4
TRAINED_SHARE = 4  # 1 in 4 tokens of a sequence is the policy's own
MULTI_TURNS = 10  # multi-turn section: the longest episode's turns (episodes end after 3..10)


@dataclass
class GpuRow:
    phase: str  # "decode" or "update"
    attention: str
    checkpointing: bool | None  # None: not applicable (decode)
    tokens: int  # decode: sampled tokens; update: all tokens through forward + backward
    seconds: float
    flops: float
    peak_gib: float
    error: str = ""  # "out of memory" when the configuration did not fit


def attention_implementations() -> list[str]:
    """SDPA always; FlashAttention-2 when the flash_attn package is installed."""
    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def shaped_model(shape: dict, attention: str, device: str) -> Any:
    """Random-init Qwen2 of the given sizes, fp32, built directly on the device."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(max_position_embeddings=32768, attn_implementation=attention, **shape)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(model, tokenizer, attention: str, prompt_len: int, new_tokens: int, device: str,
                 counter) -> GpuRow:
    """16 prompts sharing 3/4 of their tokens, one batch through Policy.generate."""
    gen = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    shared = torch.randint(0, vocab, (prompt_len * 3 // 4,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, vocab, (prompt_len - len(shared),), generator=gen).tolist()
               for _ in range(TASKS_PER_GPU * SAMPLES_PER_TASK)]
    policy = Policy(model, tokenizer, compute_dtype=torch.bfloat16)
    policy.generate(prompts[:2], max_new_tokens=2)  # warm-up (kernels, allocator)
    policy.reset_prefix_cache()
    sampler = torch.Generator(device=device).manual_seed(0)
    counter.reset()
    reset_peak(device)
    t0 = time.perf_counter()
    generations = policy.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, generator=sampler)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in generations)
    return GpuRow("decode", attention, None, tokens, seconds, counter.flops, peak_gib(device))


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def bench_vllm_decode(model, tokenizer, prompt_len: int, new_tokens: int, device: str, pushes: int = 3) -> GpuRow:
    """The decode of bench_decode on a colocated vLLM engine: the shaped model's config in a folder,
    random weights at start (no checkpoint written), the trained model's weights pushed, then the 16
    prompts sampled at temperature 1. Prints the engine's memory, push and sleep/wake seconds."""
    import tempfile

    from tau2cl.agent.vllm_sampler import VLLMSampler, VLLMSettings

    gen = torch.Generator().manual_seed(0)  # bench_decode's prompts
    vocab = len(tokenizer)
    shared = torch.randint(0, vocab, (prompt_len * 3 // 4,), generator=gen).tolist()
    prompts = [shared + torch.randint(0, vocab, (prompt_len - len(shared),), generator=gen).tolist()
               for _ in range(TASKS_PER_GPU * SAMPLES_PER_TASK)]
    stop_ids = Policy(model, tokenizer).stop_ids
    free_before = torch.cuda.mem_get_info()[0]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-vllm-") as folder:
        model.config.save_pretrained(folder)
        settings = VLLMSettings(max_model_len=prompt_len + new_tokens + 64, dtype="bfloat16", sleep_mode=True,
                                load_format="dummy")
        t0 = time.perf_counter()
        sampler = VLLMSampler.start(folder, stop_ids, settings)
        started = time.perf_counter() - t0
    taken = (free_before - torch.cuda.mem_get_info()[0]) / 2**30
    push_seconds = sorted(sampler.load_weights(model.named_parameters()) for _ in range(pushes))[pushes // 2]
    t0 = time.perf_counter()
    sampler.sleep()
    slept = time.perf_counter() - t0
    wake_and_push = sampler.load_weights(model.named_parameters())
    print(f"[e] vLLM: started in {started:.1f}s, took {taken:.1f} GiB of GPU memory; weight push {push_seconds:.2f}s "
          f"(median of {pushes}); sleep {slept:.2f}s, wake + push {wake_and_push:.2f}s", flush=True)
    sampler.sample(prompts[:2], 2, 1.0, 1.0)  # warm-up
    sampler.reset_prefix_cache()
    sync(device)
    t0 = time.perf_counter()
    generations = sampler.sample(prompts, new_tokens, 1.0, 1.0)
    sync(device)
    seconds = time.perf_counter() - t0
    sampler.close()
    tokens = sum(len(g.token_ids) for g in generations)
    return GpuRow("decode", "vLLM (bf16)", None, tokens, seconds, float("nan"), taken)


def multiturn_episodes(model, tokenizer, prefix_len: int, new_tokens: int, device: str, kv_reuse: bool,
                       counter) -> tuple[GpuRow, list[list[int]], list[list[int]]]:
    """16 episodes of up to MULTI_TURNS turns that end at different turns, through Policy.generate.

    Each episode starts from a shared `prefix_len`-token prefix plus its own opening; after every
    sampled turn it gets a row-dependent "tool result" (50-400 tokens) and goes on until its own
    last turn (3..10). With kv_reuse each episode keeps its KV cache across turns (KVSlot), as the
    engine does by default; without, every turn prefills the whole context after the shared prefix.
    Returns the row and each episode's (token ids, loss mask) for the update.
    """
    gen = torch.Generator().manual_seed(2)
    vocab = len(tokenizer)
    rows = TASKS_PER_GPU * SAMPLES_PER_TASK
    shared = torch.randint(0, vocab, (prefix_len,), generator=gen).tolist()
    contexts = [shared + torch.randint(0, vocab, (64 + 16 * i,), generator=gen).tolist() for i in range(rows)]
    masks = [[0] * len(c) for c in contexts]
    last_turn = [3 + (i * 5) % 8 for i in range(rows)]
    slots = [KVSlot() for _ in range(rows)] if kv_reuse else None
    policy = Policy(model, tokenizer, compute_dtype=torch.bfloat16)
    sampler = torch.Generator(device=device).manual_seed(0)
    counter.reset()
    reset_peak(device)
    t0 = time.perf_counter()
    tokens = 0
    for turn in range(MULTI_TURNS):
        live = [i for i in range(rows) if turn < last_turn[i]]
        if not live:
            break
        out = policy.generate([contexts[i] for i in live], max_new_tokens=new_tokens, temperature=1.0,
                              generator=sampler, caches=None if slots is None else [slots[i] for i in live])
        for i, g in zip(live, out, strict=True):
            tokens += len(g.token_ids)
            reply = torch.randint(0, vocab, (50 + (i * 37 + turn * 11) % 350,), generator=gen).tolist()
            contexts[i] += g.token_ids + reply
            masks[i] += [1] * len(g.token_ids) + [0] * len(reply)
            if slots is not None and turn + 1 >= last_turn[i]:
                slots[i].clear()  # the episode ends: its cache goes
    sync(device)
    seconds = time.perf_counter() - t0
    label = "KV kept" if kv_reuse else "re-prefill"
    return GpuRow("multi-turn rollout", label, None, tokens, seconds, counter.flops, peak_gib(device)), contexts, masks


def multiturn_update(model, optimizer, tokenizer, contexts, masks, shared_prefix: bool, device: str,
                     counter) -> GpuRow:
    """The update on the multi-turn episodes (unequal lengths), with or without the shared prefix."""
    model.gradient_checkpointing_disable()  # the shared prefix needs the body's cache
    model.train()
    rows = len(contexts)
    rewards = torch.tensor([float(i % 2) for i in range(rows)])
    advantages = group_advantages(rewards, SAMPLES_PER_TASK, "std").tolist()
    batch = collate(contexts, masks, [[-8.0] * len(c) for c in contexts], advantages, tokenizer.pad_token_id, device)
    micro = micro_batches_by_length([len(c) for c in contexts], MICRO_BATCHES)
    settings = LossSettings(1.0, 0.2, 0.2, 0.0, torch.bfloat16, shared_prefix=shared_prefix)
    total = sum(int(batch.rows(m).attention_mask.sum()) for m in micro)
    label = "shared prefix" if shared_prefix else "rows whole"
    row = GpuRow("multi-turn update", label, False, total, float("nan"), 0.0, float("nan"))
    return timed_update(row, model, optimizer, batch, micro, settings, device, counter)


def timed_update(row: GpuRow, model, optimizer, batch, micro, settings, device: str, counter) -> GpuRow:
    """`row` with the seconds, FLOPs and peak memory of one optimizer step on `batch`, timed after
    a warm-up step (or marked out of memory)."""
    try:
        for _ in range(2):  # a warm-up step, then the timed one
            counter.reset()
            reset_peak(device)
            t0 = time.perf_counter()
            accumulate_gradients(model, batch, micro, settings, max(batch.num_tokens, 1))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            seconds = time.perf_counter() - t0
        return replace(row, seconds=seconds, flops=3 * counter.flops, peak_gib=peak_gib(device))
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return replace(row, peak_gib=peak_gib(device), error="out of memory")


def random_batch(tokenizer, seq_len: int, device: str):
    """16 sequences of seq_len tokens; the last quarter of each is trained, advantages from 0/1 rewards."""
    gen = torch.Generator().manual_seed(1)
    rows = TASKS_PER_GPU * SAMPLES_PER_TASK
    ids = torch.randint(0, len(tokenizer), (rows, seq_len), generator=gen).tolist()
    trained_from = seq_len - seq_len // TRAINED_SHARE
    masks = [[int(i >= trained_from) for i in range(seq_len)] for _ in range(rows)]
    logprobs = [[-8.0] * seq_len for _ in range(rows)]
    rewards = torch.randint(0, 2, (rows,), generator=gen).float()
    advantages = group_advantages(rewards, SAMPLES_PER_TASK, "std").tolist()
    return collate(ids, masks, logprobs, advantages, tokenizer.pad_token_id, device)


def bench_update(model, optimizer, batch, attention: str, checkpointing: bool, device: str, counter) -> GpuRow:
    """One warm-up and one timed optimizer step; peak memory of the timed one."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    micro = split_micro_batches(batch.input_ids.shape[0], MICRO_BATCHES)
    settings = LossSettings(1.0, 0.2, 0.2, 0.0, torch.bfloat16)
    total = int(batch.attention_mask.sum())
    row = GpuRow("update", attention, checkpointing, total, float("nan"), 0.0, float("nan"))
    return timed_update(row, model, optimizer, batch, micro, settings, device, counter)


def run(tokenizer, device: str, seq_len: int, new_tokens: int, flop_counter: Callable[[Any], Any],
        peak_flops: float, table: Callable[..., None], shape: dict = QWEN3B_SHAPE) -> list[GpuRow]:
    """Every configuration of section (e), printed with bench.py's `table`; one model per attention."""
    rows = []
    for attention in attention_implementations():
        print(f"[e] qwen2.5-3b-shape, {attention}", flush=True)
        model = shaped_model(shape, attention, device)
        counter = flop_counter(model)
        rows.append(bench_decode(model, tokenizer, attention, seq_len, new_tokens, device, counter))
        if attention == "sdpa" and vllm_available() and device.startswith("cuda"):
            own = rows[-1]
            rows.append(bench_vllm_decode(model, tokenizer, seq_len, new_tokens, device))
            ratio = (rows[-1].tokens / rows[-1].seconds) / (own.tokens / own.seconds)
            print(f"[e] decode tokens/s, vLLM / own engine: {ratio:.2f}", flush=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        batch = random_batch(tokenizer, seq_len, device)
        for checkpointing in (True, False):
            rows.append(bench_update(model, optimizer, batch, attention, checkpointing, device, counter))
        del batch
        for kv_reuse in (True, False):
            row, contexts, masks = multiturn_episodes(model, tokenizer, seq_len, new_tokens, device, kv_reuse, counter)
            row.attention = f"{attention}, {row.attention}"
            rows.append(row)
        for shared_prefix in (True, False):
            row = multiturn_update(model, optimizer, tokenizer, contexts, masks, shared_prefix, device, counter)
            row.attention = f"{attention}, {row.attention}"
            rows.append(row)
        counter.remove()
        del model, optimizer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print_rows(rows, seq_len, new_tokens, peak_flops, device, table)
    return rows


def print_rows(rows: list[GpuRow], seq_len: int, new_tokens: int, peak_flops: float, device: str, table) -> None:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    out = []
    for r in rows:
        ckpt = "" if r.checkpointing is None else ("on" if r.checkpointing else "off")
        if r.error:
            out.append([r.phase, r.attention, ckpt, r.tokens, r.error, "", "", "", f"{r.peak_gib:.1f}"])
            continue
        counted = r.flops == r.flops  # nan: FLOPs not counted (vLLM's forwards)
        tflops = f"{r.flops / r.seconds / 1e12:.1f}" if counted else "-"
        share = f"{r.flops / r.seconds / peak_flops:.3f}" if counted else "-"
        out.append([r.phase, r.attention, ckpt, r.tokens, f"{r.seconds:.2f}", f"{r.tokens / r.seconds:,.0f}",
                    tflops, share, f"{r.peak_gib:.1f}"])
    table(f"(e) Qwen2.5-3B-shaped model (random init) on {name}: fp32 weights + bf16 autocast, "
          f"{TASKS_PER_GPU}x{SAMPLES_PER_TASK} sequences; decode {seq_len}-token prompts + {new_tokens} new tokens; "
          f"update {seq_len} tokens each, {MICRO_BATCHES} micro-batches, AdamW; bf16 matmul peak "
          f"{peak_flops / 1e12:.1f} TFLOP/s",
          ["phase", "attention", "grad ckpt", "tokens", "s", "tok/s", "TFLOP/s", "achieved/peak", "peak GiB"], out)
