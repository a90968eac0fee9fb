"""Speed benchmark: rollouts, rewards and the GRPO update against naive paths and the hardware's limit.

    python benchmarks/bench.py --quick     # under 5 minutes on 2 CPU cores
    python benchmarks/bench.py             # full: 24-layer model, every naive episode (about an hour on CPU)
    python benchmarks/bench.py --quick --multiturn_only   # section (f) alone

One run measures, side by side:

a. Rollouts. The project's RolloutEngine (every live episode of a domain in one batch, the shared
   system prompt + tools prefix encoded once into a KV cache, only new turns tokenized) against a
   naive loop written here: one episode at a time, the whole conversation re-rendered with the
   chat template and re-encoded every turn, plain `model.generate` (sampling, same max_new_tokens).
   Both use the same scripted user, tau2 environments and tool execution, on 16 episodes (airline +
   retail, 4 tasks x 2 samples each), with the tiny model and with a random-init model of
   Qwen2.5-0.5B's shape (no Qwen tokenizer offline: it is paired with the tiny tokenizer and its
   vocabulary cut to that tokenizer's size; --quick also keeps fewer layers and runs the naive loop
   on fewer episodes, whose rate does not depend on their number since they run one at a time).
b. Rewards. compute_reward (environments copied from memory, each task's gold environment built
   and hashed once: the first of its conversations pays for it, the timing starts with none
   recorded) against tau2's evaluate_simulation called plainly (tau2's registry reads the
   database files for each call), on golden, truncated (last golden action dropped) and
   perturbed (an argument of the last tool call changed, replies replayed) conversations of the
   three domains; the two must give identical RewardInfo (asserted here and in
   tests/integration/test_reward_identity.py).
c. One GRPO step of the tiny model on the rollouts of (a): the split rollout / reward / reference
   log-probs / update, and the update's tokens/s (trained tokens and all tokens through
   forward + backward), using the trainer's own functions.
d. The limit: FLOPs counted from every forward's shapes (2 x linear weights per token, plus
   attention 4 x layers x width x context; the update x3 for the backward) against a large fp32
   matmul timed on this machine, as achieved / peak.
e. On a CUDA device only (skipped, and said so, on a CPU-only machine): a Qwen2.5-3B-shaped model
   in bf16 autocast at batch_size_per_gpu 4 x 4 samples: decode tokens/s, the update's tokens/s
   and peak memory with and without gradient checkpointing, SDPA and FlashAttention-2 when
   installed, and 16 multi-turn episodes of unequal length with and without KV reuse and the
   shared-prefix update (gpu_bench.py).
f. Multi-turn episodes (multiturn.py): 16 episodes of up to 10 turns that end at different turns,
   the engine with and without KV reuse against the naive loop, their tau2 rewards scored in the
   episodes' own environments against tau2 from scratch, and the update with and without the
   shared prefix (tokens/s, largest gradient difference).

Everything is seeded. The last line is `rollout_speedup=<x> reward_speedup=<y> update_tokens_per_s=<z>
multiturn_speedup=<m> episode_reward_speedup=<r>` (m: (f)'s engine over the naive loop, 0.5B shape;
r: (f)'s rewards of the tiny model's episodes over tau2 from scratch):
the rollout speedup of the Qwen2.5-0.5B-shaped model (engine tokens/s / naive tokens/s), the reward
speedup over the whole corpus on its first pass (each task's gold state built on its first
conversation; the table also shows a second pass), and all tokens through the update's forward + backward per second.
Torch runs one intra-op thread by default (--threads): on a shared 2-core machine two threads made
the tiny model 3x slower, and the peak matmul is timed with the same setting.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import multiturn
import torch

from tau2cl.env import tau2_compat  # noqa: F401  (first: quiets tau2's import)

# isort: split
from tau2.config import DEFAULT_MAX_ERRORS as MAX_TOOL_ERRORS
from tau2.data_model.message import AssistantMessage, UserMessage
from tau2.data_model.simulation import SimulationRun, TerminationReason
from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation

from tau2cl.agent.chat import ChatRenderer, assistant_chat_message, chat_dict
from tau2cl.agent.engine import (
    GREETING,
    RolloutEngine,
    RolloutSettings,
    agent_tool_calls,
    run_agent_tools,
)
from tau2cl.agent.episode import Episode, RolloutRequest
from tau2cl.agent.policy import Policy, load_model, load_tokenizer, stop_token_ids
from tau2cl.agent.tool_calls import parse_tool_calls
from tau2cl.agent.users.base import is_stop_message
from tau2cl.agent.users.scripted import ScriptedUser
from tau2cl.env import gold_state
from tau2cl.env.domains import DOMAIN_NAMES, Domain, load_domain
from tau2cl.env.golden import reward_corpus
from tau2cl.env.tau2_compat import as_list
from tau2cl.env.tau2_reward import compute_reward
from tau2cl.rl.grpo import group_advantages
from tau2cl.env.rewards import score_trajectories
from tau2cl.rl.update import (
    LossSettings,
    accumulate_gradients,
    collate,
    micro_batches_by_length,
    reference_logprobs,
    split_micro_batches,
)

ROLLOUT_DOMAINS = ("airline", "retail")
TASKS_PER_DOMAIN = 4
SAMPLES_PER_TASK = 2  # 2 domains x 4 tasks x 2 samples = 16 episodes
QWEN05_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0)


@dataclass
class Settings:
    quick: bool
    multiturn_only: bool
    threads: int
    seed: int
    device: str
    max_turns: int
    max_new_tokens: int
    qwen_layers: int
    naive_episodes_qwen: int  # of the 16; the tiny model's naive loop always runs all
    reward_tasks: int  # per domain
    micro_batches: int  # of the GRPO update (gradient_accumulation_steps)
    matmul_size: int
    gpu_seq_len: int  # (e): tokens of each of the 16 sequences
    gpu_new_tokens: int  # (e): tokens sampled per prompt


def parse_settings(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="under 5 minutes on 2 CPU cores")
    parser.add_argument("--multiturn_only", action="store_true",
                        help="run only section (f), multi-turn episodes (about a third of --quick's time)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--qwen_layers", type=int, default=None, help="layers of the 0.5B-shaped model")
    parser.add_argument("--naive_episodes", type=int, default=None, help="naive episodes of the 0.5B-shaped model")
    parser.add_argument("--gpu_seq_len", type=int, default=None,
                        help="(e, CUDA only) tokens per sequence of the 3B-shaped model (default 1024 quick, 4096 full)")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        quick=quick, multiturn_only=args.multiturn_only, threads=args.threads, seed=args.seed, device=args.device,
        max_turns=3 if quick else 4, max_new_tokens=16 if quick else 32,
        qwen_layers=args.qwen_layers or (2 if quick else QWEN05_SHAPE["num_hidden_layers"]),
        naive_episodes_qwen=args.naive_episodes or (2 if quick else 16),
        reward_tasks=4 if quick else 10, micro_batches=4, matmul_size=2048 if quick else 4096,
        gpu_seq_len=args.gpu_seq_len or (1024 if quick else 4096), gpu_new_tokens=64 if quick else 256,
    )


# ---- machine, seeds, timing ----------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_text() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_machine(s: Settings) -> None:
    import transformers

    print(f"machine: {cpu_model()} | {os.cpu_count()} cores | torch {torch.__version__} "
          f"({torch.get_num_threads()} intra-op threads) | transformers {transformers.__version__} | "
          f"device {s.device}{' ' + torch.cuda.get_device_name() if s.device.startswith('cuda') else ''}")
    print(f"load average at start (1/5/15 min): {load_text()}")


def matmul_peak(s: Settings, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` on this device and thread count."""
    n = s.matmul_size
    a = torch.randn(n, n, device=s.device, dtype=dtype)
    b = torch.randn(n, n, device=s.device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        sync(s.device)
        t0 = time.perf_counter()
        a @ b
        sync(s.device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---- FLOP counting from the shapes of every forward ----------------------------------------------
class FlopCounter:
    """Counts forward FLOPs of a causal LM from hooks: body tokens (with their KV context) and LM-head rows.

    Per token, the body costs 2 x (its linear weights) plus attention 4 x layers x (heads x head_dim)
    x (keys it attends to, causal); the head costs 2 x vocab x hidden per row it projects.
    """

    def __init__(self, model: Any):
        cfg = model.config
        body, head = model.model, model.get_output_embeddings()
        self.body_weights = sum(m.weight.numel() for m in body.modules() if isinstance(m, torch.nn.Linear))
        self.head_weights = head.weight.numel()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attention_width = cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
        self.reset()
        self.handles = [
            body.register_forward_pre_hook(self._body, with_kwargs=True),
            head.register_forward_hook(self._head),
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit),
        ]

    @property
    def weights(self) -> int:
        return self.body_weights + self.head_weights

    def reset(self) -> None:
        self.flops = 0.0
        self.body_tokens = 0  # tokens through the transformer body (prompt re-encoding included)
        self.head_rows = 0  # positions projected to the vocabulary
        self.model_seconds = 0.0  # time inside top-level model calls
        self._t0 = 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _body(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        ids = args[0] if ids is None and args else ids
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        batch, new = ids.shape
        cache = kwargs.get("cache")
        cache = kwargs.get("past_key_values") if cache is None else cache
        positions = kwargs.get("position_ids")
        if positions is not None:  # a token at position p attends to p + 1 keys (a cascade's prefix included)
            attended = float((positions + 1).sum())
        else:
            past = cache.get_seq_length() if cache is not None else 0
            attended = batch * (new * past + new * (new + 1) / 2)  # causal: query i sees past + i + 1 keys
        self.flops += 2 * self.body_weights * new * batch + 4 * self.attention_width * attended
        self.body_tokens += batch * new

    def _head(self, module, args, output) -> None:
        rows = args[0].shape[:-1].numel()
        self.flops += 2 * self.head_weights * rows
        self.head_rows += rows

    def _enter(self, module, args) -> None:
        self._t0 = time.perf_counter()

    def _exit(self, module, args, output) -> None:
        self.model_seconds += time.perf_counter() - self._t0


# ---- models --------------------------------------------------------------------------------------
def qwen05_shaped_model(vocab_size: int, layers: int, device: str) -> Any:
    """Random-init Qwen2 with Qwen2.5-0.5B's sizes, its vocabulary cut to the tiny tokenizer's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(QWEN05_SHAPE, vocab_size=vocab_size, num_hidden_layers=layers)
    config = Qwen2Config(max_position_embeddings=32768, **shape)
    return Qwen2ForCausalLM(config).to(device).eval()


def describe(model: Any) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    return (f"{n / 1e6:.1f}M params, hidden {c.hidden_size}, {c.num_hidden_layers} layers, "
            f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv, ffn {c.intermediate_size}, vocab {c.vocab_size}")


def warm_up(model: Any, device: str) -> None:
    with torch.no_grad():
        model(input_ids=torch.arange(8, device=device)[None])


# ---- (a) rollouts --------------------------------------------------------------------------------
@dataclass
class RolloutResult:
    label: str
    episodes: int
    generated_tokens: int
    turns: int
    seconds: float
    flops: float
    body_tokens: int
    head_rows: int
    model_seconds: float
    trajectories: list = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def episodes_per_s(self) -> float:
        return self.episodes / self.seconds


def rollout_requests(domains: dict[str, Domain]) -> list[RolloutRequest]:
    return [
        RolloutRequest(domains[name], task, group=g)
        for name in ROLLOUT_DOMAINS
        for g, task in enumerate(domains[name].train_tasks[:TASKS_PER_DOMAIN])
        for _ in range(SAMPLES_PER_TASK)
    ]


def run_engine(model, tokenizer, requests, s: Settings, counter: FlopCounter) -> RolloutResult:
    policy = Policy(model, tokenizer)
    settings = RolloutSettings(max_turns=s.max_turns, max_new_tokens=s.max_new_tokens,
                               max_context_tokens=32768, temperature=1.0)
    engine = RolloutEngine(policy, ScriptedUser(), settings)
    generator = torch.Generator(device=s.device)
    generator.manual_seed(s.seed)
    counter.reset()
    sync(s.device)
    t0 = time.perf_counter()
    trajectories = engine.run(requests, generator)
    sync(s.device)
    seconds = time.perf_counter() - t0
    return RolloutResult(
        "engine (batched, prefix KV cache)", len(requests), sum(t.num_generated_tokens for t in trajectories),
        sum(t.assistant_turns for t in trajectories), seconds, counter.flops, counter.body_tokens,
        counter.head_rows, counter.model_seconds, trajectories,
    )


class NaiveRollout:
    """One episode at a time; every turn re-renders and re-encodes the whole conversation and calls generate."""

    def __init__(self, model, tokenizer, s: Settings):
        renderer = ChatRenderer(tokenizer)
        if not (renderer.native_tools and renderer.native_tool_messages):
            raise SystemExit("the naive baseline needs a chat template that renders tools and tool messages")
        self.model, self.tokenizer, self.s = model, tokenizer, s
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.user = ScriptedUser()

    def run(self, requests: list[RolloutRequest], counter: FlopCounter) -> RolloutResult:
        counter.reset()
        tokens = turns = 0
        sync(self.s.device)
        t0 = time.perf_counter()
        for index, request in enumerate(requests):
            torch.manual_seed(self.s.seed * 1000 + index)
            n_tokens, n_turns = self.episode(request)
            tokens, turns = tokens + n_tokens, turns + n_turns
        sync(self.s.device)
        seconds = time.perf_counter() - t0
        return RolloutResult("naive (one by one, re-encode, generate)", len(requests), tokens, turns, seconds,
                             counter.flops, counter.body_tokens, counter.head_rows, counter.model_seconds)

    def episode(self, request: RolloutRequest) -> tuple[int, int]:
        """Run one episode as the engine would; returns (sampled tokens, assistant turns)."""
        domain, task = request.domain, request.task
        history = [m.model_copy(deep=True) for m in as_list(task.initial_state.message_history if task.initial_state else None)]
        episode = Episode(request=request, env=domain.new_environment(task), messages=history)
        episode.messages.append(AssistantMessage(role="assistant", content=GREETING))
        episode.messages.append(UserMessage(role="user", content=self.user.opening(episode)))
        episode.user_turns = 1
        chat = [{"role": "system", "content": domain.system_prompt(task)}] + [chat_dict(m) for m in episode.messages]
        sampled = 0
        for turn in range(1, self.s.max_turns + 1):
            text = self.tokenizer.apply_chat_template(chat, tools=domain.tool_schemas, tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            new = self.generate(ids)
            sampled += len(new)
            body = new[:-1] if new and new[-1] in self.stop_ids else new
            if not self.turn(episode, chat, parse_tool_calls(self.tokenizer.decode(body)), turn):
                return sampled, turn
        return sampled, self.s.max_turns

    def generate(self, ids: list[int]) -> list[int]:
        """Sampled ids up to and including the first stop token."""
        input_ids = torch.tensor([ids], device=self.s.device)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
                top_p=1.0, top_k=0, max_new_tokens=self.s.max_new_tokens, eos_token_id=self.stop_ids,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, len(ids):].tolist()
        end = next((i for i, t in enumerate(new) if t in self.stop_ids), None)
        return new if end is None else new[: end + 1]

    def turn(self, episode: Episode, chat: list[dict], parsed, turn: int) -> bool:
        """Apply one assistant turn; False when the episode ends (the engine's rules)."""
        if parsed.items:
            calls = agent_tool_calls(parsed, turn)
            episode.messages.append(AssistantMessage(role="assistant", content=parsed.content or None,
                                                     tool_calls=calls or None))
            chat.append(assistant_chat_message(parsed.content, [(c.name, c.arguments) for c in parsed.calls]))
            chat += run_agent_tools(episode, parsed, calls)
            return episode.tool_errors < MAX_TOOL_ERRORS and turn < self.s.max_turns
        if not parsed.content:
            return False
        episode.messages.append(AssistantMessage(role="assistant", content=parsed.content))
        chat.append({"role": "assistant", "content": parsed.content})
        if turn >= self.s.max_turns:
            return False
        reply = self.user.respond([episode])[0].content
        episode.user_turns += 1
        episode.messages.append(UserMessage(role="user", content=reply))
        chat.append({"role": "user", "content": reply})
        return not is_stop_message(reply)


def naive_subset(requests: list, count: int) -> list:
    """`count` requests spread evenly over the list (so both domains are in it)."""
    if count >= len(requests):
        return list(requests)
    step = len(requests) / count
    return [requests[int(i * step)] for i in range(count)]


@dataclass
class ModelRollouts:
    name: str
    note: str
    weights: int  # linear weights (FLOPs per token = 2 x this, plus attention)
    engine: RolloutResult
    naive: RolloutResult

    @property
    def speedup(self) -> float:
        return self.engine.tokens_per_s / self.naive.tokens_per_s


def bench_rollouts(name, model, tokenizer, requests, naive_count, s: Settings) -> ModelRollouts:
    print(f"[a] {name}: {describe(model)}", flush=True)
    counter = FlopCounter(model)
    warm_up(model, s.device)
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    engine = run_engine(model, tokenizer, requests, s, counter)
    print(f"    engine: {engine.episodes} episodes in {engine.seconds:.1f}s", flush=True)
    subset = naive_subset(requests, naive_count)
    naive = NaiveRollout(model, tokenizer, s).run(subset, counter)
    print(f"    naive:  {naive.episodes} episodes in {naive.seconds:.1f}s", flush=True)
    counter.remove()
    note = "" if naive.episodes == engine.episodes else f" (naive on {naive.episodes} of {engine.episodes} episodes)"
    return ModelRollouts(name, note, counter.weights, engine, naive)


# ---- (b) rewards ---------------------------------------------------------------------------------
def plain_tau2_reward(domain: Domain, task, messages: list, reason: TerminationReason):
    """tau2's evaluate_simulation from scratch: its registry builds both environments from the files."""
    simulation = SimulationRun(
        id=str(uuid.uuid4()), task_id=task.id, start_time=messages[0].timestamp, end_time=messages[-1].timestamp,
        duration=0.0, termination_reason=reason, messages=list(messages),
    )
    return evaluate_simulation(simulation=simulation, task=task, evaluation_type=EvaluationType.ALL,
                               solo_mode=domain.solo_mode, domain=domain.name)


@dataclass
class RewardRow:
    domain: str
    conversations: int
    kinds: str
    project_s: float
    plain_s: float
    rewards: str
    env_build_ms: float  # one Domain.base_environment(): the predicted side of each scored conversation
    gold_recorded: int  # tasks whose gold environment compute_reward built and hashed (once each)
    recorded_s: float  # compute_reward over the same corpus again, every gold state recorded


def bench_rewards(domains: dict[str, Domain], s: Settings) -> list[RewardRow]:
    rows = []
    for name in DOMAIN_NAMES:
        domain = domains[name]
        items = reward_corpus(domain, domain.train_tasks[: s.reward_tasks])
        gold_state.clear()  # every task's first conversation pays for its gold environment
        t0 = time.perf_counter()
        ours = [compute_reward(domain, task, messages, reason) for _, task, messages, reason in items]
        t1 = time.perf_counter()
        theirs = [plain_tau2_reward(domain, task, messages, reason) for _, task, messages, reason in items]
        t2 = time.perf_counter()
        again = [compute_reward(domain, task, messages, reason) for _, task, messages, reason in items]
        t3 = time.perf_counter()
        for (kind, task, *_), a, b, c in zip(items, ours, theirs, again, strict=True):
            assert a.reward_info.model_dump() == b.model_dump() == c.reward_info.model_dump(), \
                f"{name} task {task.id} ({kind}): rewards differ"
        kinds = "/".join(str(sum(k == kind for k, *_ in items)) for kind in ("golden", "truncated", "perturbed"))
        full = sum(r.reward == 1.0 for r in ours)
        rows.append(RewardRow(name, len(items), kinds, t1 - t0, t2 - t1, f"{full} at 1.0, {len(items) - full} below",
                              env_build_ms(domain), gold_state.recorded_count(), t3 - t2))
        print(f"[b] {name}: {len(items)} conversations, identical rewards", flush=True)
    return rows


def env_build_ms(domain: Domain) -> float:
    """Median milliseconds of one in-memory environment (compute_reward builds one per conversation,
    and one more the first time it scores a task: its gold environment)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        domain.base_environment(solo_mode=domain.solo_mode)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[1]


# ---- (c) one GRPO step ---------------------------------------------------------------------------
@dataclass
class StepResult:
    rollout_s: float
    reward_s: float
    ref_s: float
    backward_s: float  # forward + backward of every micro-batch
    optimizer_s: float
    trained_tokens: int
    total_tokens: int
    ref_flops: float
    update_flops: float  # forward x 3 (backward ~ 2 x forward)
    micro_batches: int
    unscored: int  # episodes tau2 scores 0 without evaluating them (cut by max_turns)
    padded_vs_rows: tuple[float, float, int]  # first micro-batch's forward + backward: padded, row by row; tokens
    grouping: tuple[float, float, int, int]  # update s in batch order, by length; padded token slots of each

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.backward_s


def bench_step(model, tokenizer, rollouts: ModelRollouts, domains, s: Settings) -> StepResult:
    """The trainer's step on the engine's trajectories: reward, reference log-probs, update."""
    trajectories = rollouts.engine.trajectories
    t0 = time.perf_counter()
    score_trajectories(trajectories, domains)
    reward_s = time.perf_counter() - t0
    policy_model = copy.deepcopy(model).train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    rewards = torch.tensor([t.train_reward for t in trajectories])
    advantages = group_advantages(rewards, SAMPLES_PER_TASK, "std")
    batch = collate([t.token_ids for t in trajectories], [t.loss_mask for t in trajectories],
                    [t.sampling_logprobs for t in trajectories], advantages.tolist(), tokenizer.pad_token_id, s.device)
    micro = micro_batches_by_length([len(t.token_ids) for t in trajectories], s.micro_batches)
    ref_counter = FlopCounter(reference)
    t0 = time.perf_counter()
    batch.ref_logprobs = reference_logprobs(reference, batch, micro, 1.0, None)
    sync(s.device)
    ref_s = time.perf_counter() - t0
    ref_counter.remove()
    optimizer = torch.optim.AdamW(policy_model.parameters(), lr=1e-6)
    counter = FlopCounter(policy_model)
    t0 = time.perf_counter()
    accumulate_gradients(policy_model, batch, micro, LossSettings(1.0, 0.2, 0.2, 0.04), max(batch.num_tokens, 1))
    sync(s.device)
    t1 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(policy_model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(s.device)
    optimizer_s = time.perf_counter() - t1
    counter.remove()
    total = sum(int(batch.rows(m).attention_mask.sum()) for m in micro)
    in_order = split_micro_batches(len(trajectories), s.micro_batches)  # the same rows, grouped in batch order
    grouping = (time_update(policy_model, batch, in_order, s), time_update(policy_model, batch, micro, s),
                sum(int(batch.rows(m).attention_mask.numel()) for m in in_order),
                sum(int(batch.rows(m).attention_mask.numel()) for m in micro))
    first = micro[0]  # the same rows once as one padded micro-batch, once one row at a time (no padding)
    padded_vs_rows = (time_update(policy_model, batch, [first], s), time_update(policy_model, batch, [[r] for r in first], s),
                      int(batch.rows(first).attention_mask.sum()))
    unscored = sum(t.termination_reason not in (TerminationReason.AGENT_STOP, TerminationReason.USER_STOP)
                   for t in trajectories)
    return StepResult(rollouts.engine.seconds, reward_s, ref_s, t1 - t0, optimizer_s, batch.num_tokens, total,
                      ref_counter.flops, 3 * counter.flops, len(micro), unscored, padded_vs_rows, grouping)


def time_update(model, batch, micro: list[list[int]], s: Settings) -> float:
    """Seconds of accumulate_gradients over these micro-batches (gradients discarded)."""
    sync(s.device)
    t0 = time.perf_counter()
    accumulate_gradients(model, batch, micro, LossSettings(1.0, 0.2, 0.2, 0.04), max(batch.num_tokens, 1))
    sync(s.device)
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds


# ---- tables --------------------------------------------------------------------------------------
def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    print(f"\n{title}")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def print_rollouts(results: list[ModelRollouts], s: Settings) -> None:
    rows = []
    for m in results:
        for r in (m.engine, m.naive):
            tokens_x = m.speedup if r is m.engine else 1.0
            episodes_x = m.engine.episodes_per_s / m.naive.episodes_per_s if r is m.engine else 1.0
            rows.append([m.name, r.label, r.episodes, r.turns, r.generated_tokens, f"{r.body_tokens / r.episodes:,.0f}",
                         f"{r.seconds:.1f}", f"{r.tokens_per_s:.1f}", f"{r.episodes_per_s:.3f}",
                         f"{tokens_x:.2f}x", f"{episodes_x:.2f}x"])
    table(f"(a) rollouts: max_turns {s.max_turns}, max_new_tokens {s.max_new_tokens}, temperature 1, "
          f"{len(ROLLOUT_DOMAINS)} domains x {TASKS_PER_DOMAIN} tasks x {SAMPLES_PER_TASK} samples",
          ["model", "path", "episodes", "turns", "gen tokens", "model tokens/episode", "s", "gen tok/s",
           "episodes/s", "tok/s vs naive", "ep/s vs naive"], rows)
    for m in results:
        if m.note:
            print(f"{m.name}:{m.note}; one episode at a time, so its rate does not depend on the count")
    for m in results:
        e, n = m.engine, m.naive
        print(f"{m.name}: LM-head rows per episode: engine {e.head_rows / e.episodes:,.0f}, naive "
              f"{n.head_rows / n.episodes:,.0f} (both project only the last position of a prefill)")


def print_rewards(rows: list[RewardRow]) -> float:
    out = [[r.domain, r.conversations, r.kinds, r.rewards, f"{r.project_s:.2f}", f"{r.plain_s:.2f}",
            f"{1000 * r.project_s / r.conversations:.0f}", f"{1000 * r.plain_s / r.conversations:.0f}",
            f"{r.plain_s / r.project_s:.1f}x", f"{r.gold_recorded}", f"{1000 * r.recorded_s / r.conversations:.0f}",
            f"{r.plain_s / r.recorded_s:.1f}x", f"{r.env_build_ms:.0f}"] for r in rows]
    ours, plain = sum(r.project_s for r in rows), sum(r.plain_s for r in rows)
    recorded = sum(r.recorded_s for r in rows)
    n = sum(r.conversations for r in rows)
    out.append(["all", n, "", "", f"{ours:.2f}", f"{plain:.2f}", f"{1000 * ours / n:.0f}", f"{1000 * plain / n:.0f}",
                f"{plain / ours:.1f}x", "", f"{1000 * recorded / n:.0f}", f"{plain / recorded:.1f}x", ""])
    table("(b) rewards: compute_reward vs tau2 evaluate_simulation from scratch (identical RewardInfo asserted)",
          ["domain", "conversations", "golden/trunc/pert", "rewards", "project s", "tau2 s", "project ms/conv",
           "tau2 ms/conv", "speedup", "gold states built", "again ms/conv", "again speedup", "env build ms"], out)
    print("again: the same corpus scored a second time, every task's gold state recorded (a training run scores "
          "each task num_samples_per_prompt times a step, and draws its tasks again on later steps)")
    return plain / ours


def print_step(step: StepResult, reward_rows: list[RewardRow]) -> None:
    parts = [("rollout (engine, 16 episodes)", step.rollout_s), ("reward (compute_reward)", step.reward_s),
             ("reference log-probs", step.ref_s), ("update forward+backward", step.backward_s),
             ("update clip + AdamW step", step.optimizer_s)]
    total = sum(t for _, t in parts)
    rows = [[name, f"{t:.2f}", f"{100 * t / total:.0f}%"] for name, t in parts] + [["step", f"{total:.2f}", "100%"]]
    table(f"(c) one GRPO step of the tiny model (16 episodes, {step.micro_batches} micro-batches, fp32, "
          f"kl_coef 0.04)", ["part", "s", "share"], rows)
    if step.unscored:
        per_conv = {r.domain: r.project_s / r.conversations for r in reward_rows}
        estimate = 16 * sum(per_conv[d] for d in ROLLOUT_DOMAINS) / len(ROLLOUT_DOMAINS)
        print(f"reward: {step.unscored} of 16 episodes were cut by max_turns, which tau2 scores 0 without "
              f"evaluating; 16 finished airline/retail episodes would take ~{estimate:.1f}s at (b)'s rate")
    print(f"update: {step.trained_tokens:,} trained tokens, {step.total_tokens:,} tokens through forward+backward "
          f"in {step.backward_s:.2f}s = {step.trained_tokens / step.backward_s:,.0f} trained tok/s, "
          f"{step.tokens_per_s:,.0f} tok/s")
    in_order, by_length, slots_in_order, slots_by_length = step.grouping
    print(f"update, micro-batches in batch order {in_order:.2f}s ({slots_in_order:,} padded token slots) vs grouped "
          f"by length (the trainer's) {by_length:.2f}s ({slots_by_length:,} slots): {in_order / by_length:.2f}x")
    padded, by_row, tokens = step.padded_vs_rows
    print(f"update, first micro-batch again: padded {tokens / padded:,.0f} tok/s ({padded:.2f}s) vs one row at a time "
          f"(no padding, no attention mask) {tokens / by_row:,.0f} tok/s ({by_row:.2f}s): {padded / by_row:.2f}x")


def print_limit(results: list[ModelRollouts], step: StepResult, tiny_weights: int, peak: float) -> None:
    rows = []
    for m in results:
        for r in (m.engine, m.naive):
            rows.append([m.name, f"rollout {r.label.split(' ')[0]}", f"{2 * m.weights / 1e6:.1f}M (2N)",
                         f"{r.flops / 1e9:,.0f}", f"{r.seconds:.1f}", f"{r.flops / r.seconds / 1e9:.1f}",
                         f"{r.flops / r.seconds / peak:.3f}", f"{r.flops / max(r.model_seconds, 1e-9) / peak:.3f}"])
    rows.append(["tiny", "reference forward", f"{2 * tiny_weights / 1e6:.1f}M (2N)", f"{step.ref_flops / 1e9:,.0f}",
                 f"{step.ref_s:.1f}", f"{step.ref_flops / step.ref_s / 1e9:.1f}", f"{step.ref_flops / step.ref_s / peak:.3f}", ""])
    rows.append(["tiny", "update fwd+bwd", f"{6 * tiny_weights / 1e6:.1f}M (6N)", f"{step.update_flops / 1e9:,.0f}",
                 f"{step.backward_s:.1f}", f"{step.update_flops / step.backward_s / 1e9:.1f}",
                 f"{step.update_flops / step.backward_s / peak:.3f}", ""])
    table(f"(d) the limit: FLOPs counted from every forward's shapes (attention included) vs measured peak "
          f"{peak / 1e9:.1f} GFLOP/s", ["model", "phase", "FLOPs/token", "GFLOP", "s", "GFLOP/s",
                                       "achieved/peak", "in-model/peak"], rows)


# ---- (e) the 3B-shaped model on a GPU ------------------------------------------------------------
def run_gpu_section(tokenizer, s: Settings) -> None:
    """Section (e) when the device is a CUDA GPU; on any other device, say that it was skipped."""
    if not s.device.startswith("cuda"):
        print("\n(e) GPU section skipped: no CUDA device (bf16, SDPA/flash attention, gradient checkpointing, "
              "peak memory and Qwen2.5-3B-shaped tokens/s are measured only on a GPU)")
        return
    import gpu_bench

    peak = matmul_peak(s, torch.bfloat16)
    gpu_bench.run(tokenizer, s.device, s.gpu_seq_len, s.gpu_new_tokens, FlopCounter, peak, table)


# ---- main ----------------------------------------------------------------------------------------
def multiturn_only(tiny, tokenizer, domains, s: Settings, start: float) -> None:
    """Section (f) alone: both models, the same runs as in the whole benchmark."""
    multi = [multiturn.run("tiny", tiny, tokenizer, domains, s, NaiveRollout, FlopCounter, multiturn.EPISODES, True,
                           plain_tau2_reward)]
    seed_everything(s.seed)
    qwen = qwen05_shaped_model(len(tokenizer), s.qwen_layers, s.device)
    multi.append(multiturn.run(f"qwen2.5-0.5b-shape/{s.qwen_layers}L", qwen, tokenizer, domains, s, NaiveRollout,
                               FlopCounter, s.naive_episodes_qwen, False))
    multiturn.print_results(multi, table)
    print(f"\nwall time {time.perf_counter() - start:.0f}s | load average at end: {load_text()}")
    print(f"multiturn_speedup={multi[-1].speedup:.2f} "
          f"episode_reward_speedup={multi[0].reward.tau2_s / multi[0].reward.project_s:.2f}")


def main(argv: list[str] | None = None) -> None:
    s = parse_settings(argv)
    start = time.perf_counter()
    torch.set_num_threads(s.threads)
    seed_everything(s.seed)
    print_machine(s)
    peak = matmul_peak(s)
    print(f"peak: fp32 {s.matmul_size}x{s.matmul_size} matmul, best of 5: {peak / 1e9:.1f} GFLOP/s", flush=True)
    domains = {name: load_domain(name, max_tasks=max(TASKS_PER_DOMAIN, s.reward_tasks)) for name in DOMAIN_NAMES}
    tokenizer = load_tokenizer("tiny")
    requests = rollout_requests(domains)

    tiny = load_model("tiny", "float32", s.device).eval()
    if s.multiturn_only:
        return multiturn_only(tiny, tokenizer, domains, s, start)
    results = [bench_rollouts("tiny", tiny, tokenizer, requests, len(requests), s)]
    multi = [multiturn.run("tiny", tiny, tokenizer, domains, s, NaiveRollout, FlopCounter, multiturn.EPISODES, True,
                           plain_tau2_reward)]
    seed_everything(s.seed)
    qwen = qwen05_shaped_model(len(tokenizer), s.qwen_layers, s.device)
    name = f"qwen2.5-0.5b-shape/{s.qwen_layers}L"
    results.append(bench_rollouts(name, qwen, tokenizer, requests, s.naive_episodes_qwen, s))
    multi.append(multiturn.run(name, qwen, tokenizer, domains, s, NaiveRollout, FlopCounter,
                               s.naive_episodes_qwen, False))
    print(f"    {name}: random init, Qwen2.5-0.5B sizes with {s.qwen_layers} of 24 layers, vocab {len(tokenizer)} "
          f"(tiny tokenizer; Qwen's 151936 is not available offline)")
    del qwen

    reward_rows = bench_rewards(domains, s)
    step = bench_step(tiny, tokenizer, results[0], domains, s)

    print_rollouts(results, s)
    reward_speedup = print_rewards(reward_rows)
    print_step(step, reward_rows)
    print_limit(results, step, results[0].weights, peak)
    multiturn.print_results(multi, table)
    run_gpu_section(tokenizer, s)
    print(f"\nwall time {time.perf_counter() - start:.0f}s | load average at end: {load_text()}")
    print(f"rollout_speedup={results[-1].speedup:.2f} reward_speedup={reward_speedup:.2f} "
          f"update_tokens_per_s={step.tokens_per_s:.0f} multiturn_speedup={multi[-1].speedup:.2f} "
          f"episode_reward_speedup={multi[0].reward.tau2_s / multi[0].reward.project_s:.2f}")


if __name__ == "__main__":
    main()
