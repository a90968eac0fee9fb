"""Rollout sampling on vLLM: an in-process engine colocated with the trainer, behind the sampler seam.

Contexts go to vLLM as token ids every turn (nothing is re-rendered) and vLLM's prefix caching
reuses the shared system prompt and each episode's earlier turns. A turn stops on the policy's own
stop tokens only (vLLM's own end-of-sequence handling is switched off), so `finished` and the final
token are what the project's engine produces. vLLM reports log-probs of the raw logits unless told
otherwise; the engine here is started with `logprobs_mode="processed_logprobs"`, so the log-prob of
each sampled token is taken after temperature scaling: log softmax(logits / T), the quantity
`grpo.token_logprobs` recomputes (T = 1 when greedy). With top_p < 1 vLLM's processed log-probs
are renormalised over the nucleus, which the trainer's are not, so top_p must be 1.

The trainer pushes its weights after every update (`push_weights`: named full tensors, streamed,
then the prefix cache is reset). vllm is imported only when an engine is started, with its own log
lines at ERROR unless VLLM_LOGGING_LEVEL says otherwise (the run's console is tau2cl's).

Under torchrun each rank starts its own engine in the ranks' process group (vLLM's
"external_launcher": one worker, tensor parallel size 1), so every rank samples its own shard of
the episodes. Sampling draws from the process's default torch generator of the engine's device,
which the engine seeds once when it starts (its seed differs per rank).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tau2cl.agent.decode import Generation
from tau2cl.agent.sampler import NamedTensors
from tau2cl.constants import VLLM_INSTALL_HINT
from tau2cl.distributed import own_group_kept
from tau2cl.errors import UserError
from tau2cl.runs.checkpoint import write_plain_model

INSTALL_HINT = VLLM_INSTALL_HINT


def import_vllm() -> Any:
    """The vllm module, or a one-line UserError naming the install command."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # read when vllm is first imported
    try:
        with warnings.catch_warnings():  # its own deprecation notices about torch, not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            import vllm
    except ImportError as exc:
        raise UserError(f"the vLLM rollout backend needs the vllm package ({exc}); install it: {INSTALL_HINT}") from None
    if not hasattr(vllm, "LLM"):  # e.g. a folder named vllm on the path, not the package
        raise UserError(f"the vLLM rollout backend needs the vllm package ('{vllm.__name__}' found is not it); "
                        f"install it: {INSTALL_HINT}")
    return vllm


@dataclass
class VLLMSettings:
    """How the colocated engine is started."""

    max_model_len: int  # longest context + sampled turn (the rollout's max_context_tokens)
    dtype: str = "float32"  # the trainer's weights dtype (bfloat16 on GPUs)
    seed: int = 0  # vLLM seeds its sampling once, per engine (per-request seeds fail on CPU)
    gpu_memory_utilization: float = 0.3  # GPU share vLLM may take (weights + KV cache); ignored on CPU
    cpu_kv_cache_gib: int = 1  # KV cache size on CPU
    enforce_eager: bool = True  # no CUDA graphs (they take memory and time to capture)
    sleep_mode: bool = False  # CUDA only: the engine may free its GPU memory between rollouts
    external_launcher: bool = False  # one engine per torchrun rank, inside the ranks' process group
    load_format: str = "auto"  # "dummy": random weights (a benchmark's shaped model, pushed after)


def start_engine(model_folder: str, settings: VLLMSettings) -> Any:
    """An in-process vLLM `LLM` on a Hugging Face model folder (config + safetensors).

    In-process (no engine core process) so that weights can be pushed as Python tensors; vLLM is
    given token ids only, so its tokenizer is never loaded.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # the trainer's threads stay as they are
    vllm = import_vllm()
    kwargs: dict[str, Any] = {}
    if not torch.cuda.is_available():
        kwargs["kv_cache_memory_bytes"] = settings.cpu_kv_cache_gib << 30
    if settings.sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if settings.external_launcher:  # vLLM then reuses the process group torchrun's ranks started
        kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return vllm.LLM(
                model=model_folder,
                dtype=settings.dtype,
                seed=settings.seed,
                max_model_len=settings.max_model_len,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enforce_eager=settings.enforce_eager,
                enable_prefix_caching=True,
                skip_tokenizer_init=True,
                generation_config="vllm",  # vLLM's neutral defaults, not the model's sampling settings
                logprobs_mode="processed_logprobs",
                load_format=settings.load_format,
                use_tqdm_on_load=False,
                **kwargs,
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"vLLM cannot start on '{model_folder}': {engine_error_reason(exc)}") from None


def engine_error_reason(exc: BaseException) -> str:
    """The first sentence that says why vLLM refused to start (its configuration errors put the
    reason after a 'Value error, ' line and follow it with long lists)."""
    text = str(exc).strip()
    if "Value error, " in text:
        text = text.split("Value error, ", 1)[1]
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    end = first.find(". ")
    return first[: end + 1] if end != -1 else first


def save_model_folder(model: Any, folder: str | Path) -> str:
    """Write a model's config and parameters where vLLM can load them (`write_plain_model`: the
    names `push_weights` takes): e.g. a model read from a GGUF file, which vLLM would load
    quantized. Returns the folder."""
    write_plain_model(model, folder)
    return str(folder)


def push_weights(llm: Any, named_tensors: NamedTensors) -> float:
    """Load (name, full tensor) pairs into the engine's model, then reset its prefix cache.

    Names are the Hugging Face model's own (`model.named_parameters()` of the plain model: no
    DDP/FSDP/PEFT prefixes); vLLM fuses q/k/v and gate/up itself, and a tied lm_head follows its
    embedding. The pairs are consumed one at a time, so a caller can gather and yield one parameter
    at a time; every parameter must be given (a layer given only part of its weights is left
    partly unset). Returns the seconds taken.
    """
    start = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors), "is_checkpoint_format": True})
    llm.collective_rpc(_redo_tied_head)
    llm.reset_prefix_cache()
    return time.perf_counter() - start


@torch.no_grad()
def _redo_tied_head(worker: Any) -> None:
    """A tied lm_head's weight arrives through its embedding, so vLLM's reload skips the head's own
    post-load step and keeps what that step derived from the old weight (on CPUs, the packed matrix
    the logits are computed with). Run it again. Called in the engine's worker."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    method = getattr(head, "quant_method", None)
    if method is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    method.process_weights_after_loading(head)


def to_generation(token_ids: list[int], logprobs: list[float], stop_ids: set[int]) -> Generation:
    """A sampled turn as the project's engine reports it: finished when its last token is a stop token."""
    return Generation(list(token_ids), list(logprobs), bool(token_ids) and token_ids[-1] in stop_ids)


def check_top_p(top_p: float) -> None:
    """vLLM's log-probs under top_p < 1 are over the nucleus; the trainer's are over the vocabulary."""
    if top_p < 1.0:
        raise UserError(f"the vLLM rollout backend samples with top_p 1 only (got {top_p}): "
                        "its log-probs under top_p < 1 are not the trainer's")


class VLLMSampler:
    """Samples turns with a colocated vLLM engine; `llm` is a started `vllm.LLM`."""

    keeps_episode_caches = False  # vLLM's prefix cache does this job

    def __init__(self, llm: Any, stop_ids: list[int]):
        self.llm = llm
        self.stop_ids = sorted(stop_ids)
        self.last_sync_seconds: float | None = None
        self.asleep = False

    @classmethod
    def start(cls, model_folder: str, stop_ids: list[int], settings: VLLMSettings) -> VLLMSampler:
        return cls(start_engine(model_folder, settings), stop_ids)

    def sample(
        self,
        contexts: list[list[int]],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None = None,  # unused: vLLM's sampling is seeded per engine
        *,
        caches: Any = None,  # unused: vLLM keeps its own (prefix) cache
        groups: Any = None,
    ) -> list[Generation]:
        check_top_p(top_p)
        vllm = import_vllm()
        params = vllm.SamplingParams(
            n=1,
            max_tokens=max_new_tokens,
            temperature=max(temperature, 0.0),
            top_p=1.0,
            logprobs=0,  # the sampled token's log-prob only
            stop_token_ids=self.stop_ids,
            ignore_eos=True,  # stop on the policy's stop tokens, nothing else
            detokenize=False,
            skip_special_tokens=False,
        )
        self._wake()
        outputs = self.llm.generate([{"prompt_token_ids": list(c)} for c in contexts], params, use_tqdm=False)
        stops = set(self.stop_ids)
        generations = []
        for output in outputs:
            turn = output.outputs[0]
            ids = list(turn.token_ids)
            logprobs = [step[token].logprob for token, step in zip(ids, turn.logprobs, strict=True)]
            generations.append(to_generation(ids, logprobs, stops))
        return generations

    def reset_prefix_cache(self) -> None:
        self._wake()
        self.llm.reset_prefix_cache()

    def load_weights(self, named_tensors: NamedTensors) -> float:
        """Push the weights (waking the engine first if it sleeps); seconds taken, the wake included."""
        start = time.perf_counter()
        self._wake()
        push_weights(self.llm, named_tensors)
        self.last_sync_seconds = time.perf_counter() - start
        return self.last_sync_seconds

    def sleep(self) -> None:
        """Free the engine's GPU memory until the next push or sample (vLLM's sleep level 1: weights
        copied to CPU memory, KV cache dropped). Level 1, not 2: a push brings the parameters but
        not the buffers the engine derived at load (e.g. rotary tables), which level 2 would lose.
        Needs an engine started with `VLLMSettings.sleep_mode` on CUDA."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Shut the engine down (its worker, model, KV cache and process groups); the sampler cannot
        sample after. vLLM's shutdown also destroys the default process group: the engine's own
        in a single process goes, the ranks' own under torchrun is kept for `compute_cleanup`."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        with own_group_kept():
            llm.llm_engine.engine_core.shutdown()
