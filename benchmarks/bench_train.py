"""Training throughput on the CPU: HAVOC's Trainer step vs HF transformers, same shape, batches and optimizer.

Both sides: havoc_small shape (vocabulary from an 8192-token tokenizer of the embedded corpus),
fp32, micro-batch 8 x 256, AdamW with the same groups and hyperparameters, gradient clipping 1.0.
Timed alternately (A B, then B A), medians.

    .venv/bin/python benchmarks/bench_train.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import transformers
from transformers import LlamaForCausalLM

from havoc_core.interop import havoc_to_hf
from havoc_core.tokenizer import Corpus, HavocTokenizer, stdlib_corpus
from havoc_eval.bench import cpu_model, markdown_table
from havoc_training.config import TrainConfig
from havoc_training.data import prepare
from havoc_training.trainer import Trainer, build_optimizers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--compile", action="store_true", help="HAVOC's blocks through torch.compile (TrainConfig.compile)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    corpus = Corpus(stdlib_corpus())
    tokenizer = HavocTokenizer.train((d.text for d in corpus), vocab_size=8192)
    tokenizer.save(tmp / "tok")
    prepare(corpus, tokenizer, tmp / "data")
    config = TrainConfig(data=str(tmp / "data"), tokenizer=str(tmp / "tok"), out=str(tmp / "run"), model="small",
                         seq_len=256, micro_batch=8, global_batch_tokens=2048, max_steps=10**6, warmup_steps=0,
                         compile=args.compile)
    trainer = Trainer(config)
    trainer.raw_model.save_pretrained(tmp / "havoc")
    havoc_to_hf(tmp / "havoc", tmp / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32, attn_implementation="sdpa").train()
    hf_optimizer, = build_optimizers(hf, config, fused=False)
    hf_loader = trainer._loader("train", config.micro_batch, 0, 1, shuffle=True)

    def havoc_step():
        trainer._train_step()

    def hf_step():
        inputs, targets = hf_loader.next_batch()
        logits = hf(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_optimizer.step()
        hf_optimizer.zero_grad(set_to_none=True)

    steps = {"havoc": havoc_step, "hf": hf_step}
    for step in steps.values():
        step()  # warm-up (and compilation)
        step()
    times = {k: [] for k in steps}
    for i in range(args.repeats):
        for name in list(steps)[:: 1 if i % 2 == 0 else -1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    tokens = config.global_batch_tokens
    havoc, ref = (tokens / statistics.median(times[k]) for k in ("havoc", "hf"))
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"transformers {transformers.__version__}")
    print(f"# havoc_small shape, vocab {tokenizer.vocab_size}, fp32, 8x256 tokens per step, AdamW + clip, "
          f"medians of {args.repeats} alternating steps")
    label = "train step, compiled blocks" if args.compile else "train step"
    print(markdown_table(["benchmark", "HAVOC Trainer", "HF", "HAVOC / HF"],
                         [(f"{label} (tok/s)", f"{havoc:,.0f}", f"{ref:,.0f}", f"{havoc / ref:.2f}x")]))


if __name__ == "__main__":
    main()
