"""Rollout backends side by side: the project's own engine and vLLM, on the multi-turn tau2 workload.

    OMP_NUM_THREADS=1 VENV_DIR/bin/python benchmarks/vllm_rollouts.py   # VENV_DIR: scripts/install_vllm_cpu.sh

The workload is multiturn.py's: 16 episodes (airline + retail) of up to 10 agent turns, a scripted
user that stops each episode after 3 to 10 replies, the tiny model, temperature 1. Both backends
run the same RolloutEngine (tools, users, termination, token-exact contexts); only the sampler
differs. Each runs a two-episode warm-up first, then the 16 episodes once, timed.

Weight sync is what each backend needs after an optimizer step: the own engine samples from the
trained parameters themselves (its sync forgets cached prefixes); vLLM gets every parameter pushed
(reload_weights) and its prefix cache reset. Each is timed over several pushes.

Printed per backend: episodes/s, sampled tokens/s and seconds per weight sync; then the machine's
load, and as the last line `vllm_vs_own=<x>`: vLLM's sampled tokens/s over the own engine's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

import torch

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
import multiturn

from tau2cl.agent.engine import RolloutEngine, RolloutSettings
from tau2cl.agent.policy import Policy, load_model, load_tokenizer
from tau2cl.agent.sampler import PolicySampler
from tau2cl.agent.tiny_model import resolve_model_path
from tau2cl.agent.vllm_sampler import VLLMSampler, VLLMSettings, import_vllm
from tau2cl.env.domains import load_domain

MAX_CONTEXT_TOKENS = 32768
TASKS_PER_DOMAIN = multiturn.EPISODES // len(multiturn.DOMAINS) // 2  # multiturn.requests runs each twice


@dataclass
class Result:
    backend: str
    episodes: int
    turns: int
    tokens: int
    seconds: float
    sync_seconds: float  # per push, median

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def load_text() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_backend(name: str, engine: RolloutEngine, reqs, seed: int, sync) -> Result:
    """Warm-up on two episodes, then all of them, timed; `sync()` timed over `pushes` calls."""
    engine.run(reqs[:2], torch.Generator().manual_seed(seed + 1))
    start = time.perf_counter()
    out = engine.run(reqs, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    tokens = sum(t.num_generated_tokens for t in out)
    print(f"  {name}: {len(out)} episodes, {sum(t.assistant_turns for t in out)} turns, {tokens} sampled tokens "
          f"in {seconds:.1f}s", flush=True)
    return Result(name, len(out), sum(t.assistant_turns for t in out), tokens, seconds, sync)


def timed_syncs(push, pushes: int) -> float:
    return statistics.median(push() for _ in range(pushes))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_new_tokens", type=int, default=32, help="tokens per agent turn at most (default 32)")
    parser.add_argument("--pushes", type=int, default=5, help="weight syncs timed per backend (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    import transformers

    print(f"machine: {os.cpu_count()} cores | torch {torch.__version__} ({torch.get_num_threads()} thread) | "
          f"transformers {transformers.__version__} | vllm {import_vllm().__version__}")
    print(f"load average at start (1/5/15 min): {load_text()}", flush=True)
    domains = {name: load_domain(name, max_tasks=TASKS_PER_DOMAIN) for name in multiturn.DOMAINS}
    reqs = multiturn.requests(domains)
    tokenizer = load_tokenizer("tiny")
    model = load_model("tiny", "float32", "cpu").eval()
    settings = RolloutSettings(max_turns=multiturn.MAX_TURNS, max_new_tokens=args.max_new_tokens,
                               max_context_tokens=MAX_CONTEXT_TOKENS, temperature=1.0)
    policy = Policy(model, tokenizer)
    print(f"{multiturn.EPISODES} episodes ({' + '.join(multiturn.DOMAINS)}), up to {multiturn.MAX_TURNS} turns, "
          f"max_new_tokens {args.max_new_tokens}, temperature 1, tiny model", flush=True)

    own = PolicySampler(policy)
    own_sync = timed_syncs(lambda: own.load_weights(model.named_parameters()), args.pushes)
    results = [run_backend("own engine", RolloutEngine(policy, multiturn.TurnLimitUser(), settings), reqs,
                           args.seed, own_sync)]

    start = time.perf_counter()
    sampler = VLLMSampler.start(resolve_model_path("tiny"), policy.stop_ids,
                                VLLMSettings(max_model_len=MAX_CONTEXT_TOKENS, seed=args.seed))
    print(f"  vLLM engine started in {time.perf_counter() - start:.1f}s", flush=True)
    vllm_sync = timed_syncs(lambda: sampler.load_weights(model.named_parameters()), args.pushes)
    engine = RolloutEngine(policy, multiturn.TurnLimitUser(), settings, sampler=sampler)
    results.append(run_backend("vLLM", engine, reqs, args.seed, vllm_sync))
    sampler.close()

    print(f"\n{'backend':<12} {'episodes':>8} {'turns':>6} {'tokens':>7} {'s':>7} {'episodes/s':>11} "
          f"{'tokens/s':>9} {'sync s/push':>12}")
    for r in results:
        print(f"{r.backend:<12} {r.episodes:>8} {r.turns:>6} {r.tokens:>7} {r.seconds:>7.1f} {r.episodes_per_s:>11.3f} "
              f"{r.tokens_per_s:>9.1f} {r.sync_seconds:>12.4f}")
    own_r, vllm_r = results
    print(f"episodes/s vLLM / own: {vllm_r.episodes_per_s / own_r.episodes_per_s:.2f}")
    print(f"load average at end (1/5/15 min): {load_text()}")
    print(f"vllm_vs_own={vllm_r.tokens_per_s / own_r.tokens_per_s:.2f}")


if __name__ == "__main__":
    main()
