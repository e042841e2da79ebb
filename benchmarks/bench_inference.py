"""Inference throughput on the CPU: the engine beside HF transformers, and the server under load.

1. Engine decode vs HF `generate`: havoc_small shape, batch 1, greedy, fp32 (tokens checked
   identical), 16-token prompt, 128 new tokens; the engine's decode step compiled; timed A B / B A.
2. `havoc serve --slots 64 --kv-cache-tokens 65536 --compile` on the same weights, in a process
   of its own, in float32 and in bfloat16: aggregate tokens/s of 1, 16 and 64 concurrent streaming
   clients (128 sampled tokens each) and their time to first token p50/p99.
3. The float32 server's prefix cache: time to first token of a 2,000-token system prompt plus a
   20-token question, cold and warm, and the warm requests' hit rate from /metrics.

    .venv/bin/python benchmarks/bench_inference.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import socket
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


@contextlib.contextmanager
def served(model_dir: Path, *flags: str):
    """An OpenAI client of `havoc serve` in a process of its own (the clients stay in this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "havoc.cli", "serve", str(model_dir), "--port", str(port),
                             "--model-name", "m", *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stream(client, prompt, max_tokens: int, seed: int) -> tuple[float, int, float]:
    """Time to the first streamed token, tokens, and the whole request's seconds."""
    start = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                           seed=seed, stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if first is None and chunk.choices:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first, tokens, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def server_load(client, repeats: int) -> list[tuple]:
    """Aggregate tokens/s and time to first token of 1, 16 and 64 concurrent streaming clients."""
    def wave(clients: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            done = list(pool.map(lambda i: stream(client, f"def handler_{i}(request):", NEW, i), range(clients)))
        return sum(t for _, t, _ in done) / (time.perf_counter() - start), [f for f, _, _ in done]

    for _ in range(2):
        wave(16)  # warm-up
    rows, single = [], None
    for clients in (1, 16, 64):
        runs = [wave(clients) for _ in range(repeats if clients == 1 else max(1, repeats // 2))]
        tps = statistics.median(r[0] for r in runs)
        ttft = [f for r in runs for f in r[1]]
        single = single or tps
        rows.append((f"server, {clients} streaming client{'s' if clients > 1 else ''}: aggregate tok/s",
                     f"{tps:.1f}", "", f"{tps / single:.2f}x one client" if clients > 1 else ""))
        rows.append((f"server, {clients} client{'s' if clients > 1 else ''}: time to first token p50 / p99 (ms)",
                     f"{1e3 * statistics.median(ttft):.0f} / {1e3 * percentile(ttft, 0.99):.0f}", "", ""))
    return rows


def prefix_cache(url: str, client, tokenizer, repeats: int) -> list[tuple]:
    """Time to first token of a 2,000-token system prompt plus a 20-token question: cold (a system
    prompt the cache has never seen) and warm (the one every request shares)."""
    text = "".join(d.text for d in Corpus(stdlib_corpus()[:40]))
    ids = tokenizer.encode(text)
    system, questions = ids[:2000], [ids[3000 + 20 * i : 3020 + 20 * i] for i in range(2 * repeats + 1)]
    metric = lambda name: next(float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                               if line.startswith(name + " "))
    cold = [stream(client, [7 + i] + system[1:] + q, 1, 0)[0] for i, q in enumerate(questions[:repeats])]
    stream(client, system + questions[-1], 1, 0)  # the shared prompt's first request
    hits, queries = metric("havoc_prefix_cache_hits_total"), metric("havoc_prefix_cache_queries_total")
    warm = [stream(client, system + q, 1, 0)[0] for q in questions[repeats:2 * repeats]]
    rate = (metric("havoc_prefix_cache_hits_total") - hits) / (metric("havoc_prefix_cache_queries_total") - queries)
    cold_ms, warm_ms = 1e3 * statistics.median(cold), 1e3 * statistics.median(warm)
    return [("prefix cache: time to first token, 2,000 + 20 tokens, cold (ms)", f"{cold_ms:.0f}", "", ""),
            ("prefix cache: same, warm (ms)", f"{warm_ms:.0f}", "", f"{cold_ms / warm_ms:.1f}x faster"),
            ("prefix cache: hit rate of the warm requests (/metrics)", f"{rate:.1%}", "", "")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    tokenizer = HavocTokenizer.train((d.text for d in Corpus(stdlib_corpus())), vocab_size=8192)
    torch.manual_seed(0)
    # A context of 4096 for the prefix-cache prompt; the engine-vs-HF row uses 512 of it.
    config = dataclasses.replace(HavocConfig.havoc_small(), vocab_size=tokenizer.vocab_size, max_seq_len=4096)
    model = HavocModel(config).eval()
    model.save_pretrained(tmp / "model")
    tokenizer.save(tmp / "model")
    havoc_to_hf(tmp / "model", tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa").eval()
    rows = engine_vs_hf(model, tokenizer, hf, args.repeats)
    del hf
    # 64 slots in the pool 16 slots x 4096 positions would take: the paged cache holds them all.
    flags = ["--slots", "64", "--kv-cache-tokens", "65536", "--compile"]
    for dtype in ("float32", "bfloat16"):
        with served(tmp / "model", *flags, "--dtype", dtype) as (url, client):
            rows += [(f"{name} [{dtype}]", *rest) for name, *rest in server_load(client, args.repeats)]
            if dtype == "float32":
                rows += prefix_cache(url, client, tokenizer, args.repeats)
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__}")
    print(markdown_table(["benchmark", "HAVOC", "HF transformers", "ratio"], rows))


if __name__ == "__main__":
    main()
