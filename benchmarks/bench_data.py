"""Tokenizer and data pipeline throughput on the embedded corpus (the standard library's source).

- tokenizer training speed (MB/s) and compression (bytes/token) on held-out documents;
- `prepare` MB/s with one worker and with one per core, beside the raw `tokenizers`
  encode_batch_fast on the same documents (no file reading, no splitting, no writing), taking turns;
- the loader's cost per batch beside one training step of the small preset that consumes it.

    .venv/bin/python benchmarks/bench_data.py [--vocab-size 70000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_core.tokenizer import Corpus, HavocTokenizer, stdlib_corpus
from havoc_core.tokenizer.corpus import in_val_split
from havoc_eval.bench import cpu_model, markdown_table
from havoc_training.data import TokenLoader, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=70000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    files = stdlib_corpus()
    docs = list(Corpus(files))
    megabytes = sum(len(d.text.encode()) for d in docs) / 1e6
    train = [d.text for d in docs if not in_val_split(d.text, 0.05)]
    held_out = [d.text for d in docs if in_val_split(d.text, 0.05)]
    rows = []

    start = time.perf_counter()
    tokenizer = HavocTokenizer.train(train, vocab_size=args.vocab_size)
    seconds = time.perf_counter() - start
    train_mb = sum(len(t.encode()) for t in train) / 1e6
    rows.append(("tokenizer train", f"{train_mb / seconds:.1f} MB/s", f"{train_mb:.1f} MB, vocab {args.vocab_size}, {seconds:.1f}s"))
    rows.append(("compression, held-out", f"{tokenizer.bytes_per_token(held_out):.2f} bytes/token", f"{len(held_out)} documents"))

    raw = tokenizer._plain  # the `tokenizers` object itself (its own threads, one per core): the reference
    cores = os.cpu_count() or 1
    runs = {"1 worker": 1, f"{cores} workers": cores, "raw": None}
    times = {name: [] for name in runs}
    for i in range(args.repeats):  # taking turns, in a new order each repeat
        for name in list(runs)[i % 3:] + list(runs)[: i % 3]:
            start = time.perf_counter()
            if runs[name] is None:
                raw.encode_batch_fast([d.text for d in docs], add_special_tokens=False)
            else:
                prepare(Corpus(files), tokenizer, tmp / f"ds-{runs[name]}-{i}", workers=runs[name])
            times[name].append(time.perf_counter() - start)
    speed = {name: megabytes / statistics.median(t) for name, t in times.items()}
    one, many = speed["1 worker"], speed[f"{cores} workers"]
    rows.append(("data prepare, 1 worker (files -> shards)", f"{one:.1f} MB/s", f"{megabytes:.1f} MB, median of {args.repeats}"))
    rows.append((f"data prepare, --workers {cores}", f"{many:.1f} MB/s", f"{many / one:.2f}x one worker"))
    rows.append(("raw tokenizers encode_batch_fast", f"{speed['raw']:.1f} MB/s",
                 f"its own {cores} threads, no I/O; prepare / raw = {many / speed['raw']:.2f}x"))

    loader = TokenLoader(tmp / "ds-1-0", seq_len=256, batch_size=4, seed=0)
    model = HavocModel(dataclasses.replace(HavocConfig.havoc_small(), vocab_size=tokenizer.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    load_times, step_times = [], []
    for _ in range(6):
        start = time.perf_counter()
        inputs, targets = loader.next_batch()
        load_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step_times.append(time.perf_counter() - start)
    load, step = statistics.median(load_times[1:]), statistics.median(step_times[1:])
    rows.append(("loader next_batch (4x257)", f"{load * 1e3:.3f} ms", f"{100 * load / step:.3f}% of a {step * 1e3:.0f} ms train step (havoc_small, vocab {tokenizer.vocab_size})"))

    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | embedded corpus: {len(files)} files")
    print(markdown_table(["measure", "value", "notes"], rows))


if __name__ == "__main__":
    main()
