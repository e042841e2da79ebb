"""Muon beside AdamW on the quickstart's recipe: validation loss against steps, same everything else.

Both runs use `make demo`'s data and tokenizer (runs/quickstart, made first if absent), its model
shape, batch and seed, and the AdamW recipe's schedule (lr 2e-3 to 2e-4; the quickstart now runs
Muon at 6e-3, see RESULTS.md). The only difference is `optimizer`. Validation runs every
--eval-every steps. The table gives both curves and the first step at which Muon reaches AdamW's
final validation loss.

    python benchmarks/bench_muon.py [--steps 250] [--eval-every 25]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from havoc_eval.bench import cpu_model
from havoc_training.metrics import read_metrics
from havoc_training.quickstart import recipe
from havoc_training.trainer import Trainer

QUICKSTART = Path("runs/quickstart")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="the quickstart's own count")
    parser.add_argument("--eval-every", type=int, default=25)
    args = parser.parse_args()
    if not (QUICKSTART / "data").exists():
        subprocess.run([sys.executable, "-m", "havoc.cli", "quickstart", "--out", str(QUICKSTART)], check=True)
    out = Path(tempfile.mkdtemp())
    curves, seconds = {}, {}
    for optimizer in ("adamw", "muon"):
        # The quickstart's recipe, but for the optimizer.
        config = recipe(QUICKSTART, out / optimizer, args.steps, eval_every=args.eval_every, save_every=args.steps,
                        optimizer=optimizer, lr=2e-3, min_lr=2e-4)
        summary = Trainer(config).train()
        seconds[optimizer] = summary["seconds"]
        curves[optimizer] = {r["step"]: r["val_bpb"] for r in read_metrics(out / optimizer / "metrics.jsonl")
                             if "val_bpb" in r}
    target = curves["adamw"][args.steps]
    reached = next((step for step, bpb in sorted(curves["muon"].items()) if bpb <= target), None)
    print(f"\nCPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; quickstart recipe, {args.steps} steps")
    print("| step | AdamW val bits/byte | Muon val bits/byte |")
    print("|---:|---:|---:|")
    for step in sorted(curves["adamw"]):
        print(f"| {step} | {curves['adamw'][step]:.3f} | {curves['muon'][step]:.3f} |")
    print(f"\nwall time: AdamW {seconds['adamw']:.0f}s, Muon {seconds['muon']:.0f}s. Muon reaches AdamW's final "
          f"{target:.3f} bits/byte at step {reached if reached is not None else 'never (within the run)'}"
          + (f" ({reached / args.steps:.0%} of the steps)" if reached else ""))


if __name__ == "__main__":
    main()
