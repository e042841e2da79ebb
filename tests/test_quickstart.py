"""`havoc quickstart` (what `make demo` runs), shortened to a few steps."""

import json
import subprocess
import sys


def test_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "quickstart", "--out", str(out), "--max-steps", "3"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4/4 samples" in run.stdout and "bits/byte" in run.stdout and "def fibonacci(n):" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["val_bpb"] > 0
    for path in ("run/loss.png", "run/metrics.jsonl", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "data/manifest.json", "tokenizer/tokenizer.json"):
        assert (out / path).exists(), path
    again = subprocess.run([sys.executable, "-m", "havoc.cli", "quickstart", "--out", str(out), "--max-steps", "3"],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
