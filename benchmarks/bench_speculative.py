"""Speculative decoding beside plain decoding, CPU: tokens/s and acceptance rate, both proposers, a
code-completion and a code-editing prompt, in one process.

The models are trained on `make demo`'s tokenizer and data (runs/quickstart, made first if
absent): a target of the small preset and a draft of the tiny preset, both with the quickstart's
trainer settings. They are cached under --out, and --retrain trains them again. Decoding is greedy,
batch 1, with compiled engines, as `havoc serve --compile [--speculate K] [--draft MODEL]` runs it.
The three engines take turns for every repeat, and the table gives medians.

    python benchmarks/bench_speculative.py [--speculate 5] [--repeats 5] [--target-steps 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer
from havoc_eval.bench import cpu_model
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams
from havoc_training.checkpoint import export_checkpoint
from havoc_training.quickstart import recipe
from havoc_training.trainer import Trainer

QUICKSTART = Path("runs/quickstart")
CODE = '''def merge_sorted(left, right):
    """Merge two sorted lists into one sorted list."""
    result = []
    i = j = 0
    while i < len(left) and j < len(right):
        if left[i] <= right[j]:
            result.append(left[i])
            i += 1
        else:
            result.append(right[j])
            j += 1
    result.extend(left[i:])
    result.extend(right[j:])
    return result
'''
PROMPTS = {
    "code completion": "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n",
    # The answer repeats most of the prompt: the function again, with its docstring changed.
    "code editing": f"{CODE}\n\n# The same function, with a better docstring:\n\n{CODE.splitlines()[0]}\n",
}


def _train(out: Path, preset: str, steps: int, retrain: bool, **overrides) -> Path:
    model_dir = out / "model"
    if model_dir.exists() and not retrain:
        return model_dir
    shutil.rmtree(out, ignore_errors=True)
    config = recipe(QUICKSTART, out / "run", steps, model=preset, model_overrides=overrides, eval_every=steps,
                    save_every=steps, log_every=50)
    summary = Trainer(config).train()
    print(f"trained {preset}: {steps} steps in {summary['seconds']:.0f}s, validation {summary['val_bpb']:.3f} bits/byte")
    return export_checkpoint(summary["checkpoint"], model_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speculate", type=int, default=5, help="K: tokens guessed per step")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target-steps", type=int, default=300, help="training steps of the small-preset target")
    parser.add_argument("--draft-steps", type=int, default=600, help="training steps of the tiny-preset draft")
    parser.add_argument("--out", default="runs/bench-speculative")
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()
    if not (QUICKSTART / "data").exists():
        subprocess.run([sys.executable, "-m", "havoc.cli", "quickstart", "--out", str(QUICKSTART)], check=True)
    out = Path(args.out)
    target_dir = _train(out / "target", "small", args.target_steps, args.retrain)
    # The tiny preset's positions stop at 256: the draft needs the target's 1024.
    draft_dir = _train(out / "draft", "tiny", args.draft_steps, args.retrain, max_seq_len=1024)
    tok = HavocTokenizer.load(QUICKSTART / "tokenizer")
    target, draft = HavocModel.load_pretrained(target_dir), HavocModel.load_pretrained(draft_dir)
    engines = {"plain": Engine(target, tok, slots=1, compile=True),
               "prompt lookup": Engine(target, tok, slots=1, compile=True, speculate=args.speculate),
               "draft model": Engine(target, tok, slots=1, compile=True, speculate=args.speculate, draft=draft)}
    for engine in engines.values():
        engine.warm_up()
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    print(f"\nCPU: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; target {target.num_parameters() / 1e6:.1f}M parameters (small preset), "
          f"draft {draft.num_parameters() / 1e6:.2f}M (tiny preset); K = {args.speculate}, {args.tokens} greedy "
          f"tokens, batch 1, median of {args.repeats}")
    print("| prompt | decoding | tok/s | vs plain | accepted / guessed | tokens per target pass |")
    print("|---|---|---:|---:|---:|---:|")
    results = {}
    for name, text in PROMPTS.items():
        prompt = tok.encode(text)
        speeds: dict[str, list[float]] = {key: [] for key in engines}
        outputs, counts = {}, {}
        for _ in range(args.repeats + 1):  # the first round warms caches and is not counted
            for key, engine in engines.items():
                drafted, accepted = engine.draft_tokens, engine.accepted_tokens
                start = time.perf_counter()
                completion, = engine.complete([prompt], params)
                speeds[key].append(args.tokens / (time.perf_counter() - start))
                outputs[key] = completion.tokens
                counts[key] = (engine.draft_tokens - drafted, engine.accepted_tokens - accepted)
        assert outputs["prompt lookup"] == outputs["plain"] == outputs["draft model"], "greedy outputs differ"
        plain = statistics.median(speeds["plain"][1:])
        for key in engines:
            speed = statistics.median(speeds[key][1:])
            drafted, accepted = counts[key]
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            passes = args.tokens - accepted  # each target pass yields one token beyond the accepted guesses
            print(f"| {name} | {key} | {speed:.1f} | {speed / plain:.2f}x | {rate} | {args.tokens / passes:.2f} |")
            results[f"{name}/{key}"] = {"tok_s": speed, "drafted": drafted, "accepted": accepted}
        print(f"<!-- {name}: {tok.decode(outputs['plain'])!r} -->")
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
