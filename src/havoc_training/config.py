"""TrainConfig: every setting of a training run; loaded from TOML or YAML, any key overridable by flag.

One name per concept: the key `max_steps` is the flag `--max-steps` and the attribute `max_steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from havoc_core.config import HavocConfig


@dataclass
class TrainConfig:
    data: str = ""  # train: a `havoc data prepare` folder; finetune: a chat .jsonl file
    tokenizer: str = ""  # the tokenizer folder the data was prepared with (default: init_from's, if it has one)
    out: str = "runs/havoc"  # checkpoints, metrics, TensorBoard events, loss plot
    model: str = "small"  # a HavocConfig preset; vocab_size always comes from the tokenizer
    model_overrides: dict[str, Any] = field(default_factory=dict)  # HavocConfig fields, e.g. {"num_layers": 4}
    init_from: str = ""  # start from these weights (a HAVOC or HF Llama folder) instead of random ones
    seq_len: int = 256
    global_batch_tokens: int = 8192  # per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per forward/backward on each rank
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    optimizer: str = "adamw"  # or "muon": Muon for the blocks' weight matrices, AdamW for embeddings and norms
    weight_decay: float = 0.1  # on matrices only (see optimizer groups in the trainer)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8  # validation scores the first eval_batches x micro_batch sequences, whatever the processes
    save_every: int = 100
    keep_last: int = 3
    log_every: int = 10
    parallel: str = "auto"  # with several processes: "fsdp" (FSDP2, fully_shard per block; what auto picks) or "ddp"
    activation_checkpointing: bool = False
    compile: bool = False
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # compute dtype (bfloat16 or float32; auto: bf16 on cuda); master weights are always fp32
    val_fraction: float = 0.05  # finetune: share of conversations held out (train: fixed by `data prepare`)
    lora_rank: int = 0  # finetune: 0 trains every weight; >= 1 trains LoRA adapters only
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])

    def __post_init__(self) -> None:
        problems = [_type_problem(f.name, f.type, getattr(self, f.name)) for f in dataclasses.fields(self)]
        problems = [p for p in problems if p]
        if problems:  # before any comparison, which would fail with a message naming nothing
            raise ValueError("invalid training config: " + "; ".join(problems))
        if not self.tokenizer and self.init_from and (Path(self.init_from) / "tokenizer.json").exists():
            self.tokenizer = self.init_from  # `havoc export` puts the tokenizer beside the model
        for name in ("seq_len", "global_batch_tokens", "micro_batch", "max_steps", "eval_every", "eval_batches",
                     "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.warmup_steps < 0 or self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append("need lr > 0, 0 <= min_lr <= lr and warmup_steps >= 0")
        if self.optimizer not in ("adamw", "muon"):
            problems.append(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            problems.append(f"parallel must be auto, ddp or fsdp, got {self.parallel!r}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            problems.append(f"dtype must be auto, bfloat16 or float32 (float16 would need loss scaling), "
                            f"got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not self.data or not self.tokenizer:
            problems.append("data and tokenizer are required (folders from `havoc data prepare` / `havoc tokenizer train`)")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    def model_config(self, vocab_size: int) -> HavocConfig:
        """The model to train from scratch. Its max_seq_len grows to seq_len unless model_overrides set it."""
        base = HavocConfig.preset(self.model).to_dict()
        unknown = sorted(set(self.model_overrides) - set(base))
        if unknown:
            raise ValueError(f"unknown model_overrides keys: {', '.join(unknown)}")
        merged = {**base, **self.model_overrides, "vocab_size": vocab_size}
        if "max_seq_len" in self.model_overrides:
            check_seq_len(self.seq_len, merged["max_seq_len"], "model_overrides")
        merged["max_seq_len"] = max(merged["max_seq_len"], self.seq_len)
        return HavocConfig.from_dict(merged)

    def accumulation_steps(self, world_size: int) -> int:
        per_pass = self.seq_len * self.micro_batch * world_size
        if self.global_batch_tokens % per_pass:
            raise ValueError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of seq_len x micro_batch x "
                f"processes = {self.seq_len} x {self.micro_batch} x {world_size} = {per_pass}"
            )
        return self.global_batch_tokens // per_pass


def check_seq_len(seq_len: int, max_seq_len: int, source: str) -> None:
    if seq_len > max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_seq_len {max_seq_len} (from {source}); "
                         "lower seq_len")


_EXPECTED = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict[str, Any]": (dict,),
             "list[str]": (list,)}


def _type_problem(name: str, annotation: str, value: Any) -> str | None:
    expected = _EXPECTED[annotation]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)  # True is no int here
    if ok and annotation == "list[str]":
        ok = all(isinstance(v, str) for v in value)
    return None if ok else f"{name} must be {'an' if annotation == 'int' else 'a'} {annotation}, got {value!r}"


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A TrainConfig from a .toml/.yaml file (or none) plus overrides; unknown keys are errors."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
            data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"training config {path} does not exist") from None
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"training config {path} cannot be parsed: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"training config {path} must be a table of keys")
    data.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown training config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return TrainConfig(**data)


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig key (default: not set, so the file's value stands)."""
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float, "str": str}.get(str(f.type))
        if str(f.type) == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif kind is not None:
            parser.add_argument(flag, dest=f.name, type=kind, default=None)
        else:  # dict-valued keys take JSON
            parser.add_argument(flag, dest=f.name, type=json.loads, default=None, metavar="JSON")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if getattr(args, f.name, None) is not None}
