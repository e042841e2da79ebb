"""Inference throughput on the CPU: the engine beside HF transformers, and the server under load.

1. Engine decode vs HF `generate`: havoc_small shape, batch 1, greedy, fp32 (tokens checked
   identical), 16-token prompt, 128 new tokens; the engine's decode step compiled; timed A B / B A.
2. `havoc serve --slots 16 --compile` on the same weights: tokens/s of 1 streaming client and the
   aggregate of 16 concurrent ones (128 tokens each), time to first token p50/p99 under load.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import httpx
import openai
import torch
from transformers import LlamaForCausalLM

from havoc_core.config import HavocConfig
from havoc_core.interop import havoc_to_hf
from havoc_core.model import HavocModel
from havoc_core.tokenizer import Corpus, HavocTokenizer, stdlib_corpus
from havoc_eval.bench import cpu_model, markdown_table
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams

NEW = 128


def engine_vs_hf(model, tokenizer, hf, repeats: int) -> list[tuple]:
    prompt = tokenizer.encode("def parse_arguments(argv):\n    parser = argparse.")[:16]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    engine = Engine(model, tokenizer, slots=1, context=512, compile=True)

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()

    ours = engine.generate(prompt, params)[0].tokens  # also compiles
    assert ours == hf_generate(), "engine and HF greedy tokens differ"
    runs = {"engine": lambda: engine.generate(prompt, params), "hf": hf_generate}
    times = {k: [] for k in runs}
    for i in range(repeats):
        for name in list(runs)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    engine_tps, hf_tps = (NEW / statistics.median(times[k]) for k in ("engine", "hf"))
    return [("decode b=1, 128 new, greedy fp32 (tok/s)", f"{engine_tps:.1f}", f"{hf_tps:.1f}", f"{engine_tps / hf_tps:.2f}x")]


def server_load(model_dir: Path) -> list[tuple]:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "havoc.cli", "serve", str(model_dir), "--port", str(port),
                             "--slots", "16", "--compile", "--model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

        def one(i: int) -> tuple[float, int]:
            start = time.perf_counter()
            first, tokens = None, 0
            for chunk in client.completions.create(model="m", prompt=f"def handler_{i}(request):", max_tokens=NEW,
                                                   temperature=0.8, seed=i, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}):
                if first is None and chunk.choices:
                    first = time.perf_counter() - start
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            return first, tokens

        for _ in range(2):
            with ThreadPoolExecutor(16) as pool:  # warm-up (compiles the decode step)
                list(pool.map(one, range(16)))
        start = time.perf_counter()
        single = [one(i) for i in range(3)]
        single_tps = sum(t for _, t in single) / (time.perf_counter() - start)
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            loaded = list(pool.map(one, range(16)))
        aggregate = sum(t for _, t in loaded) / (time.perf_counter() - start)
        ttft = sorted(f for f, _ in loaded)
        p99 = ttft[min(len(ttft) - 1, int(round(0.99 * (len(ttft) - 1))))]
        return [
            ("server, 1 streaming client (tok/s)", f"{single_tps:.1f}", "", ""),
            ("server, 16 concurrent clients, aggregate (tok/s)", f"{aggregate:.1f}", "",
             f"{aggregate / single_tps:.2f}x one client"),
            ("server, time to first token under 16 clients p50 / p99 (ms)",
             f"{1e3 * statistics.median(ttft):.0f} / {1e3 * p99:.0f}", "", ""),
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tokenizer = HavocTokenizer.train((d.text for d in Corpus(stdlib_corpus())), vocab_size=8192)
    torch.manual_seed(0)
    import dataclasses

    model = HavocModel(dataclasses.replace(HavocConfig.havoc_small(), vocab_size=tokenizer.vocab_size)).eval()
    model.save_pretrained(tmp / "model")
    tokenizer.save(tmp / "model")
    havoc_to_hf(tmp / "model", tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = engine_vs_hf(model, tokenizer, hf, args.repeats)
    del hf
    rows += server_load(tmp / "model")
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__}")
    print(markdown_table(["benchmark", "HAVOC", "HF transformers", "ratio"], rows))


if __name__ == "__main__":
    main()
