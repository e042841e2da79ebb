"""`make gpu-check`'s logic, on the CPU: without CUDA it says so and exits 2; `--device cpu --dry-run`
runs every part (the cuda-marked tests on the CPU, the bench beside HF, the training throughput) on
tiny shapes and writes its JSON and table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env)


def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real check runs instead")
    run = _run(str(tmp_path / "out"))
    assert run.returncode == 2
    assert "needs a CUDA GPU and this machine has none" in run.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_on_the_cpu_runs_every_part(tmp_path):
    run = _run(str(tmp_path / "out"), "--device", "cpu", "--dry-run")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    statuses = {case["test"]: case["status"] for case in result["tests"]["cases"]}
    assert len(statuses) == 8 and set(statuses.values()) == {"passed"}, statuses
    assert [row["benchmark"] for row in result["bench"]["rows"]] == [
        "prefill 1x32 (tok/s)", "decode b=1, 8 new (tok/s)", "decode b=8, 8 new (tok/s)"]
    assert all(row["havoc"] > 0 and row["hf"] > 0 for row in result["bench"]["rows"])
    for scheme in ("int8", "int4"):
        quantized = result["quantized"][scheme]
        assert quantized["dtype"] == f"bfloat16, {scheme} weights" and len(quantized["rows"]) == 3
    assert result["train"]["tokens_per_s"] > 0 and result["train"]["mfu"] is None  # no known peak on a CPU
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "## Tests marked cuda: 8 passed, 0 failed, 0 skipped" in table
    assert "## int4 weights (torchao) beside HF transformers in bf16" in table and "| tiny |" in table
