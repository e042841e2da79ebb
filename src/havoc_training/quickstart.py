"""`havoc quickstart`: tokenizer, data, a few minutes of training and samples, on the embedded corpus."""

from __future__ import annotations

import json
from pathlib import Path


from havoc_core.model import HavocModel
from havoc_core.tokenizer import Corpus, HavocTokenizer, stdlib_corpus
from havoc_core.tokenizer.corpus import in_val_split
from havoc_training.checkpoint import export_checkpoint
from havoc_training.config import TrainConfig
from havoc_training.data import prepare
from havoc_training.trainer import Trainer

PROMPTS = ["def fibonacci(n):\n", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n"]


def recipe(quickstart_dir: str | Path, out: str | Path, max_steps: int, **changes) -> TrainConfig:
    """The quickstart's training config, on the data and tokenizer of `quickstart_dir`; `changes`
    are TrainConfig fields to set otherwise (the benchmarks vary the optimizer or the model)."""
    quickstart_dir = Path(quickstart_dir)
    settings = dict(
        data=str(quickstart_dir / "data"), tokenizer=str(quickstart_dir / "tokenizer"), out=str(out), model="small",
        model_overrides={"d_model": 256, "num_layers": 4, "attention": {"num_heads": 4, "num_kv_heads": 2},
                         "mlp": {"hidden_dim": 688}},
        seq_len=256, micro_batch=8, global_batch_tokens=4096, max_steps=max_steps, optimizer="muon", lr=6e-3,
        min_lr=6e-4,
        warmup_steps=max(1, max_steps // 20), eval_every=max(1, max_steps // 5), eval_batches=16,
        save_every=max(1, max_steps // 5), log_every=10,
    )
    return TrainConfig(**{**settings, **changes})


def quickstart(out: str | Path, max_steps: int, val_fraction: float = 0.05) -> dict:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or pass another --out")
    corpus = Corpus(stdlib_corpus())
    print(f"1/4 tokenizer: training on the embedded corpus ({len(corpus.files())} standard-library files)")
    train_texts = [d.text for d in corpus if not in_val_split(d.text, val_fraction)]
    tokenizer = HavocTokenizer.train(train_texts, vocab_size=4096)
    tokenizer.save(out / "tokenizer")
    print("2/4 data: tokenizing into shards")
    prepare(corpus, tokenizer, out / "data", val_fraction=val_fraction, show_progress=True)
    print("3/4 training a 4-layer, d_model 256 HAVOC model (device found automatically)")
    summary = Trainer(recipe(out, out / "run", max_steps)).train()
    model_dir = export_checkpoint(summary["checkpoint"], out / "model")
    print(f"4/4 samples from {model_dir}:")
    model = HavocModel.load_pretrained(model_dir)
    for prompt in PROMPTS:
        ids = model.generate([tokenizer.encode(prompt)], max_new_tokens=60, temperature=0.6, top_k=40, seed=0)
        text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
        print("-" * 60 + "\n" + text)
    print("-" * 60)
    print(f"loss {summary['first_loss']:.2f} -> {summary['last_loss']:.2f}; validation loss {summary['val_loss']:.2f}, "
          f"{summary['val_bpb']:.3f} bits/byte; {summary['steps']} steps in {summary['seconds']:.0f}s")
    print(f"checkpoint {summary['checkpoint']}, loss plot {out / 'run' / 'loss.png'}, model {model_dir}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
