"""`--rollout_backend vllm` where the vllm package cannot be imported: one line naming the install
command, before any training, and nothing in the log_dir but the run's lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tau2cl.runs.files import LOCK_FILE
from tiny_run import tiny_flags

HERE = Path(__file__).parent


@pytest.mark.slow  # ~15 s: a `python -m tau2cl.train` process that loads the tiny model, then stops
def test_a_missing_vllm_is_one_line_naming_the_install_command(tmp_path):
    blocker = tmp_path / "path" / "vllm"  # first on the path: `import vllm` fails here even where it is installed
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'vllm'\")\n")
    log_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(blocker.parent), str(HERE)])}
    result = subprocess.run(
        [sys.executable, "-m", "tau2cl.train", *tiny_flags(), "--rollout_backend", "vllm", "--log_dir", str(log_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tau2cl: error:")]
    assert len(lines) == 1, result.stderr
    assert "needs the vllm package" in lines[0]
    assert "pip install -e '.[vllm]'" in lines[0] and "bash scripts/install_vllm_cpu.sh" in lines[0]
    left = {p.name for p in log_dir.iterdir()} if log_dir.exists() else set()
    assert left <= {LOCK_FILE}, left
