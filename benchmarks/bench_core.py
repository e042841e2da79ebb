"""HAVOC vs HF transformers on the same weights, CPU fp32, small preset, in one process.

Prefill tokens/s (1x512), greedy decode tokens/s (batch 1, 128 new tokens) and training
tokens/s (4x256, AdamW). The two sides are timed alternately (A B A B ...) and medians are
reported, since shared machines are noisy.

    .venv/bin/python benchmarks/bench_core.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date

import torch
import transformers
from transformers import LlamaForCausalLM

from havoc_core.config import HavocConfig
from havoc_core.interop import havoc_to_hf
from havoc_core.model import HavocModel


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = HavocConfig.havoc_small()
    ours = HavocModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(f"{tmp}/havoc")
        havoc_to_hf(f"{tmp}/havoc", f"{tmp}/hf")
        theirs = LlamaForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.float32, attn_implementation="sdpa").eval()

    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(3, config.vocab_size, (1, 512), generator=g)
    prompt = torch.randint(3, config.vocab_size, (1, 16), generator=g)
    train_ids = torch.randint(3, config.vocab_size, (4, 256), generator=g)
    new_tokens = 128

    # Same greedy tokens first: the comparison is of the same computation.
    with torch.inference_mode():
        a = ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
        b = theirs.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b), "HAVOC and HF greedy outputs differ"

    def prefill(model):
        with torch.inference_mode():
            model(prefill_ids)

    def decode(model):
        with torch.inference_mode():
            if model is ours:
                ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
            else:
                theirs.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                do_sample=False, eos_token_id=None, pad_token_id=0)

    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, theirs)}

    def train_step(model):
        model.train()
        opt = optimizers[id(model)]
        if model is ours:
            loss, _ = ours.compute_loss(train_ids)
        else:
            loss = theirs(train_ids, labels=train_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    tasks = {
        "prefill 1x512 (tok/s)": (prefill, 512),
        f"decode b=1, {new_tokens} new (tok/s)": (decode, new_tokens),
        "train 4x256 AdamW (tok/s)": (train_step, 4 * 256),
    }
    rows = []
    for name, (fn, tokens) in tasks.items():
        fn(ours), fn(theirs)  # warm-up
        times = {"havoc": [], "hf": []}
        for i in range(args.repeats):
            # A B, then B A: neither side always runs first.
            for key, model in (("havoc", ours), ("hf", theirs))[:: 1 if i % 2 == 0 else -1]:
                times[key].append(timed(lambda: fn(model)))
        havoc, hf = (tokens / statistics.median(times[k]) for k in ("havoc", "hf"))
        rows.append({"benchmark": name, "havoc": round(havoc, 1), "hf": round(hf, 1), "ratio": round(havoc / hf, 3)})

    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# {date.today()} | {machine} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"# havoc_small, fp32, medians of {args.repeats} alternating runs (ABBA order); greedy outputs identical")
    print("| benchmark | HAVOC | HF | HAVOC / HF |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['havoc']:,} | {r['hf']:,} | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(date.today()), "machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
