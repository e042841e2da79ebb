"""HumanEval, all 164 problems: the benchmark's canonical solutions through the sandbox (pass@1 must be
1.0, empty completions 0.0), then a model's pass@k with the time per problem.

    .venv/bin/python benchmarks/bench_humaneval.py [MODEL] [--samples-per-task N --temperature T]

MODEL defaults to the `make demo` model (runs/quickstart/model).
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import torch

from havoc_core.pretrained import load_model_and_tokenizer
from havoc_eval import humaneval
from havoc_eval.bench import cpu_model, markdown_table


def reference_checks() -> list[tuple]:
    problems = humaneval.problems()
    rows = []
    for name, completions in (("canonical solutions", [p["canonical_solution"] for p in problems]),
                              ("empty completions", [""] * len(problems))):
        start = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            outcomes = list(pool.map(humaneval.check, problems, completions))
        seconds = time.perf_counter() - start
        rows.append((name, len(problems), f"{sum(o.passed for o in outcomes) / len(problems):.3f}",
                     f"{seconds / len(problems) * 1000:.0f} ms"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="runs/quickstart/model")
    parser.add_argument("--samples-per-task", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    print(f"# {date.today()} | {cpu_model()}, {os.cpu_count()} cores, "
          f"torch {torch.get_num_threads()} threads")
    print(markdown_table(["the benchmark's own completions", "problems", "pass@1", "execution per problem"],
                         reference_checks()))
    model, tokenizer = load_model_and_tokenizer(args.model)
    max_tokens = min(humaneval.MAX_TOKENS, model.config.max_seq_len // 2)
    ks = tuple(k for k in (1, 10, 100) if k <= args.samples_per_task)
    result = humaneval.evaluate(model, tokenizer, samples_per_task=args.samples_per_task,
                                temperature=args.temperature, ks=ks, max_tokens=max_tokens)
    print()
    print(markdown_table(
        ["model", "parameters", "samples x temperature", *[f"pass@{k}" for k in ks], "max tokens",
         "generation", "execution", "per problem"],
        [(args.model, f"{model.num_parameters() / 1e6:.1f}M", f"{args.samples_per_task} x {args.temperature}",
          *[f"{result[f'pass@{k}']:.3f}" for k in ks], max_tokens, f"{result['seconds_generating']:.0f} s",
          f"{result['seconds_executing']:.0f} s", f"{result['seconds_per_problem']:.2f} s")]))


if __name__ == "__main__":
    main()
