"""`make gpu-check`: what only a CUDA GPU can confirm, in one command (at most ~10 minutes on one H100).

1. The tests marked `cuda` (tests/test_cuda.py): bf16 training from scratch, killed and resumed;
   fine-tuning a bf16 folder with fp32 master weights; the engine's greedy and sampled decoding on
   the device; the compiled step replayed by CUDA graphs, not re-recorded; the server through the
   openai client; HF parity in bf16.
2. `havoc bench` on the 7B shape beside HF transformers: prefill 1x2048, decode batch 1 and 8.
3. Training throughput and MFU of the 1B shape: bf16 autocast, fp32 master weights, fused AdamW,
   compiled blocks, as the trainer builds them.

Writes gpu-check.json and gpu-check.md into OUT. Without CUDA it says so and exits 2. On the CPU,
`--device cpu --dry-run` runs the same logic on tiny shapes (the tests with HAVOC_TEST_DEVICE=cpu).

    .venv/bin/python benchmarks/gpu_check.py OUT [--device cuda] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path

import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_eval.bench import bench, cpu_model, markdown_table, table
from havoc_training.config import TrainConfig
from havoc_training.distributed import autocast, materialize, parallelize
from havoc_training.trainer import build_optimizers, flops_per_token, peak_flops

ROOT = Path(__file__).resolve().parents[1]


def run_tests(device: str, out: Path) -> dict:
    report = out / "cuda-tests.xml"
    env = {**os.environ, "HAVOC_TEST_DEVICE": device}
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider",
                          f"--junitxml={report}", "tests/test_cuda.py"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    (out / "cuda-tests.log").write_text(run.stdout + run.stderr)
    cases = []
    for case in ET.parse(report).getroot().iter("testcase"):
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        status = "failed" if failure is not None else "skipped" if case.find("skipped") is not None else "passed"
        cases.append({"test": case.get("name"), "status": status, "seconds": float(case.get("time", 0)),
                      "message": (failure.get("message") or "")[:300] if failure is not None else ""})
    return {"returncode": run.returncode, "cases": cases}


def train_throughput(preset: str, device: str, micro_batch: int, seq_len: int, steps: int, compile: bool) -> dict:
    """Tokens/s and MFU of one process training `preset` on random tokens, built as the trainer builds it."""
    torch.manual_seed(0)
    device_ = torch.device(device)
    dtype = torch.bfloat16 if device_.type == "cuda" else torch.float32
    with torch.device("meta"):
        model = HavocModel(HavocConfig.preset(preset))
    materialize(model, device_)
    model = parallelize(model, "none", device_, dtype, activation_checkpointing=False, compile=compile).train()
    config = TrainConfig(data="-", tokenizer="-", micro_batch=micro_batch, seq_len=seq_len, lr=1e-4)
    optimizer, = build_optimizers(model, config, fused=device_.type == "cuda")
    ids = torch.randint(3, model.config.vocab_size, (micro_batch, seq_len + 1), device=device_)

    def step() -> None:
        with autocast(device_, dtype, "none"):
            logits = model(ids[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 3):  # three warm-up steps: compilation, allocator, fused Adam's state
        if device_.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device_.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    tokens_per_s = micro_batch * seq_len / statistics.median(times)
    peak = peak_flops(device_)
    per_token = flops_per_token(model.config, model.num_parameters(), seq_len)
    result = {"model": preset, "parameters": model.num_parameters(), "micro_batch": micro_batch, "seq_len": seq_len,
              "dtype": str(dtype).removeprefix("torch."), "steps": steps, "tokens_per_s": tokens_per_s,
              "mfu": tokens_per_s * per_token / peak if peak else None}
    if device_.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device_) / 2**30
    return result


def markdown(result: dict) -> str:
    lines = [f"# make gpu-check, {result['date']}", "",
             f"{result['machine']} | torch {result['torch']} | CUDA {result['cuda']} | python {result['python']}", ""]
    tests = result["tests"]["cases"]
    lines += [f"## Tests marked cuda: {sum(c['status'] == 'passed' for c in tests)} passed, "
              f"{sum(c['status'] == 'failed' for c in tests)} failed, {sum(c['status'] == 'skipped' for c in tests)} "
              "skipped", "", markdown_table(["test", "result", "seconds"],
                                            [(c["test"], c["status"] + (f": {c['message']}" if c["message"] else ""),
                                              f"{c['seconds']:.1f}") for c in tests]), ""]
    lines += ["## Inference beside HF transformers", "", "```", table(result["bench"]), "```", ""]
    for scheme, quantized in result["quantized"].items():
        lines += [f"## {scheme} weights (torchao) beside HF transformers in bf16", "", "```", table(quantized), "```", ""]
    train = result["train"]
    mfu = f"{train['mfu']:.1%}" if train["mfu"] is not None else "n/a (unknown peak)"
    lines += ["## Training throughput", "", markdown_table(
        ["model", "parameters", "batch", "dtype", "tokens/s", "MFU", "peak memory"],
        [(train["model"], f"{train['parameters'] / 1e9:.2f}B", f"{train['micro_batch']}x{train['seq_len']}",
          train["dtype"], f"{train['tokens_per_s']:,.0f}", mfu,
          f"{train['peak_memory_gb']:.1f} GB" if "peak_memory_gb" in train else "n/a")]), ""]
    return "\n".join(lines)


# What the check imports besides torch; a GPU machine's own torch (and triton) is used as it is.
NEEDS = ["safetensors", "tokenizers", "numpy", "tqdm", "yaml", "tensorboard", "matplotlib", "fastapi", "uvicorn",
         "prometheus_client", "transformers", "pytest", "openai", "httpx"]


def missing_packages() -> list[str]:
    import importlib.util

    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for gpu-check.json, gpu-check.md and the test log")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and few repeats: checks the logic")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"make gpu-check needs a CUDA GPU and this machine has none (torch {torch.__version__}, "
              f"CUDA build: {torch.version.cuda}); run it on a GPU machine, or `--device cpu --dry-run` here",
              file=sys.stderr)
        return 2
    missing = missing_packages()
    if missing:
        print(f"make gpu-check needs these Python packages beside torch: {', '.join(missing)}; install them "
              "without touching torch (pip install NAME...), e.g. from wheels on a machine without a network",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if args.device == "cuda" else "cpu"
    small = args.dry_run
    result = {"date": str(date.today()), "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(),
              "machine": torch.cuda.get_device_name() if device == "cuda" else
              f"{cpu_model()}, {torch.get_num_threads()} threads"}
    print("1/3 tests marked cuda ...", flush=True)
    result["tests"] = run_tests(device, out)
    print("2/3 inference beside HF ...", flush=True)
    shapes = dict(prefill_tokens=32 if small else 2048, new_tokens=8 if small else 128, decode_batches=(1, 8),
                  train_batch=0, repeats=1 if small else 3)
    result["bench"] = bench("tiny" if small else "7b", device=device, dtype="bfloat16", **shapes)
    # torchao's int8 and int4 weights on the device (HF beside them in bf16): the CUDA kernels' path.
    result["quantized"] = {scheme: bench("tiny" if small else "7b", device=device, quantize=scheme, **shapes)
                           for scheme in ("int8", "int4")}
    print("3/3 training throughput ...", flush=True)
    result["train"] = train_throughput("tiny" if small else "1b", device, micro_batch=2 if small else 4,
                                       seq_len=64 if small else 2048, steps=2 if small else 10, compile=not small)
    (out / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu-check.md").write_text(markdown(result))
    print(markdown(result))
    failed = [c["test"] for c in result["tests"]["cases"] if c["status"] == "failed"]
    if failed or result["tests"]["returncode"] not in (0, 5):
        print(f"gpu-check: {len(failed)} cuda test(s) failed: {', '.join(failed)} (see {out / 'cuda-tests.log'})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
