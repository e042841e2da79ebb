"""Quality of each precision: bits per byte of the `make demo` model on its held-out documents.

fp32, bf16, and torchao's int8 (per channel) and int4 (groups of 32) weight-only quantization of the
same model folder, each evaluated with `havoc eval perplexity`'s windows (context 256, stride 128)
on the quickstart's validation split of the embedded corpus (documents it never trained on), with
the size of the folder `havoc quantize` writes for each.

    make demo && .venv/bin/python benchmarks/bench_quantize.py [--model runs/quickstart/model]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from havoc_core.model import HavocModel
from havoc_core.quantize import describe
from havoc_core.tokenizer import Corpus, HavocTokenizer, stdlib_corpus
from havoc_core.tokenizer.corpus import in_val_split
from havoc_eval.bench import cpu_model, markdown_table
from havoc_eval.perplexity import perplexity

PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": (None, "int8"), "int4": (None, "int4")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/quickstart/model")
    parser.add_argument("--context", type=int, default=256, help="the demo trains on 256-token sequences")
    args = parser.parse_args()
    tokenizer = HavocTokenizer.load(args.model)
    texts = [d.text for d in Corpus(stdlib_corpus()) if in_val_split(d.text, 0.05)]
    results = {}
    for name, (dtype, scheme) in PRECISIONS.items():
        model = HavocModel.load_pretrained(args.model, dtype=dtype, quantize=scheme)
        start = time.perf_counter()
        result = perplexity(model, tokenizer, texts, context=args.context, stride=args.context // 2)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        kept = (describe(model) or {}).get("bfloat16_layers", [])
        results[name] = (result["bits_per_byte"], size, time.perf_counter() - start, kept)
    base = results["fp32"][0]
    rows = [(name, f"{bpb:.4f}", f"{(bpb - base) / base:+.2%}", f"{size / 1e6:.1f}", f"{seconds:.0f}",
             ", ".join(kept) or "none")
            for name, (bpb, size, seconds, kept) in results.items()]
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"{args.model} | {len(texts)} held-out documents, {n_bytes / 1e6:.2f} MB | context {args.context}")
    print(markdown_table(["weights", "bits per byte", "vs fp32", "folder (MB)", "eval (s)", "layers kept in bf16"],
                         rows))


if __name__ == "__main__":
    main()
