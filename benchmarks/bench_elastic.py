"""Elastic resume on the quickstart's recipe: one process, then two (DDP and FSDP2), then one again.

A run of --steps steps in one process is the reference. Its checkpoint at step --steps / 3 is
resumed by two processes under torchrun, and theirs at 2 x --steps / 3 by one process again. The
table gives each step's training loss and the largest relative difference from the reference.

    python benchmarks/bench_elastic.py [--steps 12]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from havoc_eval.bench import cpu_model, markdown_table
from havoc_training.checkpoint import checkpoints
from havoc_training.metrics import read_metrics
from havoc_training.quickstart import recipe

QUICKSTART = Path("runs/quickstart")


def train(config, processes: int, resume: bool) -> None:
    path = Path(config.out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(dataclasses.asdict(config)))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else []
    subprocess.run([sys.executable, *launch, "-m", "havoc.cli", "train", str(path), *["--resume"] * resume],
                   check=True, stdout=subprocess.DEVNULL)


def back_to(out: Path, step: int, into: Path) -> Path:
    """A copy of the run in `out` as it was when checkpoint `step` was its newest."""
    shutil.copytree(out, into)
    for later in checkpoints(into / "checkpoints"):
        if int(later.name.removeprefix("step-")) > step:
            shutil.rmtree(later)
    return into


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="a multiple of 3")
    args = parser.parse_args()
    if not (QUICKSTART / "data").exists():
        subprocess.run([sys.executable, "-m", "havoc.cli", "quickstart", "--out", str(QUICKSTART)], check=True)
    tmp, third = Path(tempfile.mkdtemp()), args.steps // 3
    # micro_batch 4: one process accumulates 4 micro-batches a step, each of two processes 2. AdamW:
    # FSDP2 shards the matrices that Muon needs whole.
    straight = recipe(QUICKSTART, tmp / "straight", args.steps, micro_batch=4, save_every=third, keep_last=3,
                      eval_every=args.steps, log_every=1, optimizer="adamw", lr=2e-3, min_lr=2e-4)
    train(straight, 1, resume=False)
    reference, columns = losses(tmp / "straight"), {}
    for parallel in ("ddp", "fsdp"):
        grown = dataclasses.replace(straight, out=str(back_to(tmp / "straight", third, tmp / f"{parallel}-grown")),
                                    parallel=parallel)
        train(grown, 2, resume=True)
        shrunk = dataclasses.replace(straight, out=str(back_to(Path(grown.out), 2 * third, tmp / f"{parallel}-shrunk")))
        train(shrunk, 1, resume=True)
        columns[parallel] = losses(Path(shrunk.out))
    rows = []
    for step in sorted(reference):
        layout = "1" if step <= third else "2" if step <= 2 * third else "1"
        rows.append((step, layout, f"{reference[step]:.6f}",
                     *(f"{columns[p][step]:.6f}" for p in columns)))
    worst = {p: max(abs(columns[p][s] - reference[s]) / reference[s] for s in reference) for p in columns}
    print(f"\nCPU: {cpu_model()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; quickstart recipe, "
          f"{args.steps} steps, checkpoints every {third}")
    print(markdown_table(["step", "processes (elastic runs)", "one process throughout", "DDP 1 -> 2 -> 1",
                          "FSDP2 1 -> 2 -> 1"], rows))
    print("\nlargest relative difference from one process: "
          + ", ".join(f"{p} {worst[p]:.1e}" for p in columns))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
