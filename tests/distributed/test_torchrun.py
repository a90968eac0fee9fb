"""tau2cl under torchrun: two gloo processes on CPU with the tiny model.

The ranks must agree (bit-identical parameters after training), report once (rank 0 prints and
writes, the others stay silent), reduce metrics over all episodes, evaluate to the same figures as
one process, and fail in bounded time when one rank skips a collective. Each test launches
`python -m torch.distributed.run` (what the `torchrun` command runs) on dist_probe.py, a worker that
runs tau2cl's own code and records what only the inside of each rank can show.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_run import tiny_flags

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("dist_probe.py")
WORLD = 2
BATCH, SAMPLES, STEPS = 1, 2, 2
DOMAINS = ("airline", "retail")
# The tiny run (tiny_run.TINY_RUN) with 2 micro-batches per step and 2 evaluated tasks; the
# evaluation interval and the progress bar are GRPOConfig's (most runs below turn the bar off).
TORCHRUN = dict(
    task_order=list(DOMAINS), batch_size_per_gpu=BATCH, num_samples_per_prompt=SAMPLES, eval_max_tasks=2,
    gradient_accumulation_steps=2, eval_interval=50, use_progress_bar=True,
)
TINY = tiny_flags(**TORCHRUN)


@dataclass
class Launch:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


def _env() -> dict[str, str]:
    """The child's environment: CPU only (gloo), one thread per process, offline, reward_fns."""
    path = [str(ROOT / "tests" / "integration"), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHON": sys.executable,  # the interpreter the wrapper scripts use
    }


def _run(args: list[str], timeout: float, cwd: Path = ROOT) -> Launch:
    """Run a command in its own process group; on timeout kill the whole group (no stray ranks)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{args[:6]}... still running after {timeout} s:\n{stderr[-3000:]}")
    return Launch(proc.returncode, stdout, stderr, time.monotonic() - start)


def _torchrun(*args: str, nproc: int = WORLD) -> list[str]:
    # --standalone: a free local port for the rendezvous, so parallel test runs cannot collide.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]


def _records(log_dir: Path, kind: str) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


# ----------------------------------------------------------------------------- training


def _train_with_probe(tmp: Path, runs: dict[str, tuple[str, ...]]) -> tuple[Launch, dict[str, tuple[dict, Path]], dict]:
    """One launch of 2 processes that trains each run in turn, 2 steps on each of 2 domains unless
    its flags say otherwise: (launch, {name: (probe record, log_dir)}, rank logs)."""
    plan = [
        {"out": str(tmp / f"{name}.json"),
         "argv": [*TINY, "--num_steps_per_task", str(STEPS), "--log_dir", str(tmp / name), "--no-use_progress_bar",
                  "--log_interval", "1", *extra]}
        for name, extra in runs.items()
    ]  # fmt: skip
    (tmp / "plan.json").write_text(json.dumps(plan))
    rank_logs = tmp / "rank_logs"
    launch = _run(
        _torchrun("--tee", "3", "--log-dir", str(rank_logs), str(PROBE), "train", str(tmp / "plan.json")),
        timeout=300 + 150 * len(runs),
    )  # console and one file per rank
    assert launch.returncode == 0, launch.stderr[-4000:]
    logs = {}
    for rank in range(WORLD):
        (folder,) = rank_logs.glob(f"*/attempt_0/{rank}")
        logs[rank] = {s: (folder / f"{s}.log").read_text() for s in ("stdout", "stderr")}
    results = {name: (json.loads((tmp / f"{name}.json").read_text()), tmp / name) for name in runs}
    return launch, results, logs


# WiSE-FT fusion at each domain's end: the merge of the domain's start and end weights, on every rank
FUSION = ("--cl_algorithm", "fusion", "--fusion_mode", "wise", "--fusion_alpha", "0.5")
# The runs that share one launch, FSDP's and DDP's first (the two are compared bit for bit)
SHARED_LAUNCH = {
    # the DDP run's flags with the policy sharded by FSDP2
    "fsdp": (*FUSION, "--parallelism", "fsdp"),
    # DDP (the default), with 2 micro-batches per step: gradients sync on the last one only
    "ddp": FUSION,
    # warm start (2 supervised steps, 2 micro-batches) and dynamic sampling, under DDP, with EWC++
    # (its Fisher from every step's episodes, its penalty in retail's supervised and GRPO steps)
    "sft_ds": (
        "--sft_steps_per_task", "2", "--sft_learning_rate", "1e-3", "--dynamic_sampling", "--max_resample_rounds", "1",
        "--reward_fn", "reward_fns:constant_on_task_zero", "--cl_algorithm", "ewc_pp", "--ewc_pp_interval", "1",
        "--ewc_lambda", "100",
    ),
    "adaptive_replay": ("--cl_algorithm", "adaptive_replay"),
    "online_ewc": ("--cl_algorithm", "online_ewc", "--ewc_fisher_samples", "4", "--ewc_lambda", "1000"),
    "distill_fsdp": (
        "--cl_algorithm", "distill", "--distill_coef", "1.0", "--parallelism", "fsdp", "--learning_rate", "1e-2",
        "--eval_max_tasks", "1",
    ),
    "progressive_fsdp": (
        "--cl_algorithm", "progressive", "--lora_r", "4", "--parallelism", "fsdp", "--learning_rate", "1e-2",
        "--num_steps_per_task", "1", "--eval_max_tasks", "1",
    ),
    # one domain of 3 train tasks, the last held out for the search over alpha
    "adaptive_fusion": (
        "--cl_algorithm", "adaptive_fusion", "--task_order", "airline", "--max_tasks_per_domain", "3",
        "--num_steps_per_task", "1", "--eval_max_tasks", "1", "--fusion_alpha_grid", "0.5", "1",
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """SHARED_LAUNCH's runs: (launch, {name: (probe record, log_dir)}, rank logs)."""
    return _train_with_probe(tmp_path_factory.mktemp("torchrun_shared"), SHARED_LAUNCH)


@pytest.fixture(scope="module")
def trained(shared):
    """The DDP run of the shared launch: (launch, probe record, log_dir, rank logs)."""
    launch, results, logs = shared
    probe, log_dir = results["ddp"]
    return launch, probe, log_dir, logs


def test_warm_start_dynamic_sampling_and_ewc_pp_keep_the_ranks_bit_identical(shared):
    probe, log_dir = shared[1]["sft_ds"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"
    sft = _records(log_dir, "sft")
    assert [(r["task_idx"], r["step"]) for r in sft] == [(i, s) for i in range(len(DOMAINS)) for s in (1, 2)]
    assert all(r["num_tokens"] > 0 and 0 <= r["token_accuracy"] <= 1 for r in sft)
    # EWC++: no penalty before airline's end; retail's second supervised step pays for the first's move
    assert [r.get("ewc_penalty") for r in sft[:3]] == [None, None, 0.0] and sft[3]["ewc_penalty"] > 0
    train = _records(log_dir, "train")
    assert len(train) == STEPS * len(DOMAINS)
    for r in train:  # at most one round; after it no more zero-variance groups than before
        assert r["resample_rounds"] in (0.0, 1.0)
        assert r["frac_reward_zero_std_after_resample"] <= r["frac_reward_zero_std_before_resample"]
        assert r["resample_extra_episodes"] > 0 if r["resample_rounds"] else r["resample_extra_episodes"] == 0
    # task "0" is in every domain's 2-task train split, and its group never varies: some step resamples
    assert any(r["resample_rounds"] == 1.0 and r["resample_extra_episodes"] > 0 for r in train)


def _final_parameters(log_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(log_dir.with_suffix(".pt"), weights_only=True)


def test_two_processes_train_two_domains_and_end_with_bit_identical_parameters(trained):
    _, probe, _, _ = trained
    ranks = probe["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == WORLD for r in ranks)
    assert len({r["initial_digest"] for r in ranks}) == 1  # same start
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"], (
        "training did not change the weights"
    )
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"


def test_adaptive_replay_keeps_the_ranks_identical(shared):
    """Its shares come from the matrix every rank holds, its buffers from gathered tasks."""
    probe, log_dir = shared[1]["adaptive_replay"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"
    trains = _records(log_dir, "train")
    # retail's steps replay airline, the only earlier domain, with its whole share
    assert [r["replay_share/airline"] for r in trains if r["domain"] == "retail"] == [1.0] * STEPS
    assert all(r["replay_frac"] > 0 for r in trains if r["domain"] == "retail")


def test_online_ewc_estimates_one_fisher_on_both_ranks_and_retail_pays_its_penalty(shared):
    """Each rank rolls out its own share of the Fisher's episodes; the all-reduced Fisher is the same."""
    probe, log_dir = shared[1]["online_ewc"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"
    penalties = [(r["domain"], r.get("ewc_penalty")) for r in _records(log_dir, "train")]
    # airline's steps have no earlier domain; retail's first step starts at the anchor, its second has moved
    assert [p for d, p in penalties if d == "airline"] == [None] * STEPS
    retail = [p for d, p in penalties if d == "retail"]
    assert retail[0] == 0.0 and retail[1] > 0


def test_distill_under_fsdp_keeps_the_ranks_identical_and_its_kl_grows_from_zero(shared):
    """The teacher's forward runs on each rank's whole rollout copy; the policy's on the shards."""
    probe, log_dir = shared[1]["distill_fsdp"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' parameters diverged"
    trains = _records(log_dir, "train")
    assert all("distill_kl" not in r for r in trains if r["domain"] == "airline")
    kl = [r["distill_kl"] for r in trains if r["domain"] == "retail"]
    assert kl[0] < 1e-6 < kl[1], kl  # the teacher is the policy at retail's start, then it moves away


def test_progressive_under_fsdp_keeps_the_ranks_and_every_adapter_identical(shared):
    """Fresh adapters loaded into the sharded copy, and earlier ones swapped into the rollout copy."""
    probe, log_dir = shared[1]["progressive_fsdp"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' live adapters diverged"
    assert ranks[1]["strategy_digest"] == ranks[0]["strategy_digest"], "the ranks' frozen adapters diverged"
    state = torch.load(log_dir / "checkpoint_task_1" / "trainer_state.pt", weights_only=False)["strategy"]
    airline, retail = (state["adapters"][d] for d in DOMAINS)
    assert any(not torch.equal(airline[k], retail[k]) for k in airline)  # retail trained an adapter of its own
    # airline's greedy episodes, evaluated with its own adapter, are the same after retail trained
    episodes = [
        [m["content"] for s in json.loads((log_dir / "eval_results" / f"{label}_airline.json").read_text())["simulations"]
         for m in s["messages"]]
        for label in ("after_task0", "after_task1")
    ]  # fmt: skip
    assert episodes[0] == episodes[1] and len(episodes[0]) > 0


def test_adaptive_fusion_chooses_the_same_alpha_on_both_ranks_and_never_trains_on_held_out_tasks(shared):
    """Both ranks evaluate their share of the held-out episodes, gather the same figures and load
    rank 0's choice; the held-out task (the last of 3 train tasks) is in no rank's training step."""
    probe, log_dir = shared[1]["adaptive_fusion"]
    ranks = probe["ranks"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"]
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks loaded different merges"
    (search,) = _records(log_dir, "strategy")
    assert (search["task_idx"], search["strategy"]) == (0, "adaptive_fusion")
    scores = {0.5: search["fusion_reward/alpha_0.5"], 1.0: search["fusion_reward/alpha_1"]}
    assert search["fusion_alpha"] == max(scores, key=lambda a: (scores[a], a))
    assert search["held_out_tasks"] == {"airline": [search["held_out_tasks"]["airline"][0]]}
    held = f"airline/{search['held_out_tasks']['airline'][0]}"
    trained = {task for rank in ranks for step in rank["steps"] for task in step["tasks"]}
    assert len(trained) == 2 and held not in trained  # the 2 other train tasks, one per rank


def test_each_rank_trains_its_own_shard_of_each_step(trained):
    _, probe, _, _ = trained
    rank0, rank1 = (r["steps"] for r in probe["ranks"])
    assert len(rank0) == len(rank1) == STEPS * len(DOMAINS)
    for step, (mine, theirs) in enumerate(zip(rank0, rank1, strict=True)):
        domain = DOMAINS[step // STEPS]
        for tasks in (mine["tasks"], theirs["tasks"]):
            assert len(tasks) == BATCH * SAMPLES and all(t.startswith(f"{domain}/") for t in tasks)
        assert not set(mine["tasks"]) & set(theirs["tasks"]), f"step {step}: the ranks share tasks"


def test_only_rank_0_prints_and_writes(trained):
    launch, _, log_dir, logs = trained
    consoles = [(log_dir.parent / name / "train.log").read_text() for name in SHARED_LAUNCH]
    for banner in (
        "Task 0: AIRLINE",
        "Task 1: RETAIL",
        "Evaluation before training",
        "Final Summary",
    ):
        assert (log_dir / "train.log").read_text().count(banner) == 1, banner  # rank 0's lines, once
        # the launch's console carries both ranks' output: each banner as often as the runs' own logs have it
        assert launch.stdout.count(banner) == sum(c.count(banner) for c in consoles) >= len(SHARED_LAUNCH) - 1, banner
        assert banner in logs[0]["stdout"]
    assert logs[1] == {"stdout": "", "stderr": ""}, f"rank 1 printed: {logs[1]}"
    written = sorted(p.relative_to(log_dir.parent) for p in log_dir.parent.rglob("metrics.jsonl"))
    assert written == sorted(Path(name, "metrics.jsonl") for name in SHARED_LAUNCH)
    train = _records(log_dir, "train")
    assert [(r["task_idx"], r["step"]) for r in train] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert len(_records(log_dir, "eval")) == 3 * len(DOMAINS)  # 3 stages x 2 domains, written once
    assert len(_records(log_dir, "transfer")) == len(DOMAINS)


def test_logged_train_reward_is_the_mean_over_all_episodes_of_both_ranks(trained):
    _, probe, log_dir, _ = trained
    per_rank = [r["steps"] for r in probe["ranks"]]
    train = _records(log_dir, "train")
    assert len(train) == STEPS * len(DOMAINS)
    for step, record in enumerate(train):
        episodes = [reward for steps in per_rank for reward in steps[step]["rewards"]]
        assert record["num_episodes"] == len(episodes) == WORLD * BATCH * SAMPLES
        assert len(set(episodes)) > 1, "a constant reward cannot tell a mean of means from the mean"
        assert record["reward_mean"] == pytest.approx(
            statistics.fmean(episodes), rel=1e-12, abs=1e-12
        )
        assert record["reward_std"] == pytest.approx(
            statistics.pstdev(episodes), rel=1e-9, abs=1e-12
        )


# ----------------------------------------------------------------------------- FSDP


def test_fsdp_trains_the_same_weights_as_ddp_and_its_ranks_agree(trained, shared):
    _, ddp_probe, ddp_dir, _ = trained
    _, runs, logs = shared
    probe, fsdp_dir = runs["fsdp"]
    ranks = probe["ranks"]
    assert ranks[0]["initial_digest"] == ddp_probe["ranks"][0]["initial_digest"]
    assert ranks[0]["final_digest"] != ranks[0]["initial_digest"], "FSDP did not train"
    assert ranks[1]["final_digest"] == ranks[0]["final_digest"], "the ranks' rollout weights differ"
    for mine, theirs in zip(ranks, ddp_probe["ranks"], strict=True):  # same seed and N: same episodes
        assert mine["steps"] == theirs["steps"]
    ddp, fsdp = _final_parameters(ddp_dir), _final_parameters(fsdp_dir)
    assert ddp.keys() == fsdp.keys()
    for name in ddp:  # same maths; only the reduction order of the gradients may differ
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-6, msg=name)
    assert (fsdp_dir / "train.log").read_text().count("Task 1: RETAIL") == 1
    assert logs[1] == {"stdout": "", "stderr": ""}, f"rank 1 printed: {logs[1]}"  # in any of the launch's runs


def test_fsdp_resumes_from_a_domain_checkpoint_to_the_same_weights(shared, tmp_path):
    """The sharded optimizer state is saved whole and re-sharded, fusion takes retail's start from the
    resumed weights: resuming is exact."""
    _, fsdp_dir = shared[1]["fsdp"]
    log_dir = tmp_path / "resumed"
    log_dir.mkdir()
    shutil.copytree(fsdp_dir / "checkpoint_task_0", log_dir / "checkpoint_task_0")
    launch = _run(
        _torchrun(
            "-m", "tau2cl.train", *TINY, *FUSION, "--num_steps_per_task", str(STEPS), "--parallelism", "fsdp",
            "--log_dir", str(log_dir), "--resume_from", str(log_dir), "--no-use_progress_bar",
        ),
        timeout=400,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-4000:]
    assert "Task 0: AIRLINE" not in launch.stdout and launch.stdout.count("Task 1: RETAIL") == 1
    resumed = load_file(log_dir / "checkpoint_task_1" / "model.safetensors")
    straight = load_file(fsdp_dir / "checkpoint_task_1" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


# ----------------------------------------------------------------------------- LoRA


def test_lora_steps_under_ddp_and_fsdp_agree_across_ranks_and_with_each_other(tmp_path):
    """bf16 frozen base + fp32 adapters, the KL to the base computed with the adapters off between
    steps: FSDP2 shards the mixed-dtype blocks, and three steps give bit-identical rollout weights
    on both ranks and the same adapters as DDP (the whole LoRA run is tests/integration/test_lora.py)."""
    out = tmp_path / "lora.json"
    launch = _run(_torchrun(str(PROBE), "lora_step", str(out)), timeout=300)
    assert launch.returncode == 0, launch.stderr[-4000:]
    ranks = json.loads(out.read_text())["ranks"]
    for mode in ("ddp", "fsdp"):
        mine, theirs = ranks[0][mode], ranks[1][mode]
        assert mine["digest"] != mine["initial_digest"], f"{mode}: the adapters did not move"
        assert theirs["digest"] == mine["digest"], f"{mode}: the ranks diverged"
        assert mine["base_unchanged"] and mine["trained"] == 56  # 4 layers x 7 modules x (A, B)
        assert mine["dtypes"] == ["torch.bfloat16:False", "torch.float32:True"]
        # B starts at 0: the first step's policy is the reference exactly, then it moves away
        assert mine["kl"][0] == theirs["kl"][0] == 0.0 and min(mine["kl"][-1], theirs["kl"][-1]) > 0.0
    adapters = torch.load(out.with_suffix(".pt"), weights_only=True)
    for name, tensor in adapters["ddp"].items():
        torch.testing.assert_close(adapters["fsdp"][name], tensor, rtol=0, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- evaluation


def _episodes(log_dir: Path, domain: str) -> list[tuple]:
    """Each evaluated episode as (task, trial, [(role, content, tool calls)]), in file order."""
    results = json.loads((log_dir / "eval_results" / f"probe_{domain}.json").read_text())
    return [
        (
            s["task_id"],
            s["trial"],
            [(m["role"], m["content"], m["tool_calls"]) for m in s["messages"]],
        )
        for s in results["simulations"]
    ]


def test_evaluation_with_one_and_two_processes_gives_the_same_figures(tmp_path):
    """Greedy evaluation (the default) of the untrained tiny model, 2 tasks x 2 samples per domain."""
    flags = [*TINY, "--eval_samples_per_task", "2"]
    runs = {}
    for nproc in (1, 2):
        out, log_dir = tmp_path / f"eval{nproc}.json", tmp_path / f"run{nproc}"
        args = [str(PROBE), "evaluate", str(out), *flags, "--log_dir", str(log_dir)]
        launch = _run([sys.executable, *args] if nproc == 1 else _torchrun(*args), timeout=300)
        assert launch.returncode == 0, launch.stderr[-4000:]
        runs[nproc] = json.loads(out.read_text()), log_dir
    (one, one_dir), (two, two_dir) = runs[1], runs[2]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert set(one["summaries"]) == set(DOMAINS)
    for domain in DOMAINS:
        assert one["summaries"][domain]["num_episodes"] == 4
        assert two["summaries"][domain] == one["summaries"][domain]  # same episodes, same order
        assert _episodes(two_dir, domain) == _episodes(one_dir, domain)


# ----------------------------------------------------------------------------- timeouts


def test_a_skipped_collective_fails_within_the_timeout_instead_of_hanging():
    """Rank 0 gathers alone while rank 1 sleeps: the 10 s collective timeout must end the job."""
    launch = _run(_torchrun(str(PROBE), "skip_collective", "10"), timeout=120)
    assert launch.returncode != 0
    assert "all_gather_objects returned" not in launch.stdout
    assert "entering all_gather_objects alone" in launch.stdout  # it did reach the collective
    assert "timed out" in launch.stderr.lower(), launch.stderr[-3000:]
    assert launch.elapsed < 90


# ----------------------------------------------------------------------------- the wrapper


def test_run_multi_gpu_script_trains_with_two_processes(tmp_path):
    """run_multi_gpu.sh as a user runs it, its defaults overridden for the tiny model on CPU."""
    log_dir = tmp_path / "run"
    launch = _run(
        [
            "bash", str(ROOT / "run_multi_gpu.sh"), "2", "sequential", *TINY,
            "--task_order", "airline", "--num_steps_per_task", "1", "--log_dir", str(log_dir),
        ],
        timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stderr[-4000:]
    assert launch.stdout.count("Task 0: AIRLINE") == 1
    assert "Task 0 (airline): 100%" in launch.stdout + launch.stderr  # the bar is on
    (record,) = _records(log_dir, "train")
    assert record["num_episodes"] == WORLD * BATCH * SAMPLES
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["config"]["cl_algorithm"] == "sequential" and summary["stages_completed"] == 1
    assert not (tmp_path / "runs").exists()  # --log_dir given last overrode the script's default


# ----------------------------------------------------------------------------- stops


def test_sigterm_during_the_first_evaluation_stops_both_ranks_together_and_resumes(tmp_path):
    """torchrun forwards SIGTERM to both ranks mid-evaluation; they agree, save one checkpoint, exit;
    the resumed run redoes that evaluation once and trains every step once."""
    log_dir = tmp_path / "run"
    args = _torchrun(
        "-m", "tau2cl.train", *tiny_flags(**{**TORCHRUN, "task_order": ["airline"]}), "--num_steps_per_task", "2",
        "--log_dir", str(log_dir), "--no-use_progress_bar",
        "--eval_samples_per_task", "64",  # seconds of evaluation, so the signal lands inside it on a fast CPU
    )  # fmt: skip
    proc = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        log = log_dir / "train.log"
        deadline = time.monotonic() + 300
        while not (log.exists() and "(before_training): 0/" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the agent only: it forwards the signal to each rank once
        signalled = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - signalled < 30, stderr[-3000:]
    assert stderr.count("stopped by SIGTERM during the evaluation before training") == 1, stderr[-3000:]
    assert stderr.count("SIGTERM received: stopping within seconds") == 1  # rank 0 only
    assert sorted(p.name for p in log_dir.glob("checkpoint_*")) == ["checkpoint_step_0"]

    resumed = _run([*args, "--resume_from", str(log_dir)], timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    evals = [(r["stage"], r["eval_domain"]) for r in _records(log_dir, "eval")]
    assert evals == [(0, "airline"), (1, "airline")]  # the interrupted evaluation once, then the final one
    assert [r["step"] for r in _records(log_dir, "train")] == [1, 2]
