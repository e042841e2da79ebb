"""Trainer: pretraining a HavocModel on a prepared dataset, on one CPU/GPU or many through torchrun.

Parallelism, activation checkpointing, compile and precision are applied from outside the model,
by havoc_training.distributed (torchtitan's order: checkpointing, compile, then DDP or FSDP2 per block).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from havoc_core.config import HavocConfig
from havoc_core.interop import hf_to_havoc
from havoc_core.model import HavocModel
from havoc_core.model.transformer import IGNORE_INDEX, resolve_dtype
from havoc_core.pretrained import check_vocab
from havoc_core.tokenizer import HavocTokenizer
from havoc_training.checkpoint import checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from havoc_training.config import TrainConfig, check_seq_len
from havoc_training.data import TokenLoader
from havoc_training.distributed import (
    autocast,
    device_for,
    init_distributed,
    materialize,
    parallel_mode,
    parallelize,
    set_gradient_sync,
)
from havoc_training.finetune import ChatLoader
from havoc_training.lora import apply_lora
from havoc_training.metrics import METRICS_FILE, PLOT_FILE, MetricsLog

# Dense bf16 peak of known cards, for MFU.
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite."""


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps (step counts from 1)."""
    if step <= config.warmup_steps:
        return config.lr * step / max(config.warmup_steps, 1)
    progress = (step - config.warmup_steps) / max(config.max_steps - config.warmup_steps, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizers(model: torch.nn.Module, config: TrainConfig, fused: bool) -> list[torch.optim.Optimizer]:
    """AdamW; weight decay on matrices (projections, embedding) only, never on norm gains.

    With optimizer = "muon", torch's Muon takes the blocks' weight matrices (the hidden layers, as
    Muon is meant for) and AdamW the rest: the embedding (tied to the output head) and the norms.
    Muon's learning rate is scaled to match AdamW's update size ("match_rms_adamw"), so one lr
    and one schedule serve both."""
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            muon = config.optimizer == "muon" and p.dim() == 2 and ".layers." in f".{name}"
            (hidden if muon else rest).append(p)
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizers = [torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=fused or None)]
    if hidden:
        optimizers.append(torch.optim.Muon(hidden, lr=config.lr, weight_decay=config.weight_decay,
                                           adjust_lr_fn="match_rms_adamw"))
    return optimizers


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, chat: bool = False, overwrite: bool = False):
        """`chat=True` fine-tunes on a chat JSONL (loss on assistant tokens only) instead of a prepared dataset.
        `resume` continues the run in config.out; `overwrite` replaces it; with neither, out must hold no run."""
        self.config, self.chat = config, chat
        if chat and not config.init_from:
            raise ValueError("fine-tuning needs init_from: a HAVOC checkpoint or a Hugging Face Llama folder")
        if resume and overwrite:
            raise ValueError("--resume continues the run in out and --overwrite replaces it: choose one")
        self.device = device_for(config.device)
        self.rank, self.world_size = init_distributed(self.device)
        self.parallel = parallel_mode(config.parallel, self.world_size)
        self.dtype = resolve_dtype(config.dtype, self.device)  # compute; the master weights stay fp32
        self.out = Path(config.out)
        self._claim_out(resume, overwrite)
        self.tokenizer = HavocTokenizer.load(config.tokenizer)
        self.accumulation = config.accumulation_steps(self.world_size)
        self.loader = self._loader("train", config.micro_batch, self.rank, self.world_size, shuffle=True,
                                   accumulation=self.accumulation)
        self.val_loader = self._validation_loader()
        torch.manual_seed(config.seed)
        if config.init_from:
            # fp32 master weights whatever the file holds; the compute dtype is applied below.
            model = _load_init(config.init_from, self.device)
            check_vocab(model.config, self.tokenizer, config.init_from)
            check_seq_len(config.seq_len, model.config.max_seq_len, f"init_from {config.init_from}")
            model.train()
        else:
            model_config = config.model_config(self.tokenizer.vocab_size)
            preset_len = HavocConfig.preset(config.model).max_seq_len
            if model_config.max_seq_len > preset_len:
                self._print(f"note: max_seq_len raised from the {config.model} preset's {preset_len} to seq_len "
                            f"{config.seq_len} (set model_overrides max_seq_len to choose another)")
            # Built on meta, so no memory and no random numbers are spent before `materialize`.
            # Under FSDP no rank ever holds the whole model: it is sharded first, then each rank
            # initialises its shard only; DDP broadcasts real weights, so they come first.
            with torch.device("meta"):
                model = HavocModel(model_config)
            if self.parallel != "fsdp":
                materialize(model, self.device)
        self.model_config = model.config
        if config.lora_rank:
            apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
        self.raw_model = model
        self.model = parallelize(model, self.parallel, self.device, self.dtype, config.activation_checkpointing,
                                 config.compile)
        if model.embed_tokens.weight.is_meta:
            materialize(model, self.device)
        if config.optimizer == "muon" and self.parallel == "fsdp":
            raise ValueError("optimizer muon needs whole weight matrices, which FSDP shards across processes: "
                             "use parallel = 'ddp' with several processes (or adamw)")
        self.optimizers = build_optimizers(self.model, config, fused=self.device.type == "cuda")
        self.step = 0
        self.token_bytes = torch.tensor(self.tokenizer.token_byte_lengths(), device=self.device, dtype=torch.float64)
        if resume:
            self._resume()
        self.metrics = MetricsLog(self.out, enabled=self.rank == 0, keep_until_step=self.step)

    # Set-up.
    def _claim_out(self, resume: bool, overwrite: bool) -> None:
        """Never train over another run's files without being told: they would be deleted or mixed in."""
        metrics = self.out / METRICS_FILE
        previous = [metrics] if metrics.exists() and metrics.stat().st_size else []
        previous += sorted((self.out / "checkpoints").glob("step-*"))  # the newest checkpoint last, to be named
        if not previous or resume:
            return
        if not overwrite:
            raise FileExistsError(f"{self.out} already holds a run ({previous[-1]}); pass --resume to continue it, "
                                  "--overwrite to replace it, or choose a new out")
        if self.rank == 0:
            self._print(f"--overwrite: removing the previous run's checkpoints and metrics from {self.out}")
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out / "tensorboard", ignore_errors=True)
            for name in (METRICS_FILE, PLOT_FILE):
                (self.out / name).unlink(missing_ok=True)
        if self.world_size > 1:
            dist.barrier()

    def _loader(self, split: str, batch_size: int, rank: int, world_size: int, shuffle: bool,
                accumulation: int = 1):
        config = self.config
        common = dict(split=split, seed=config.seed, rank=rank, world_size=world_size, shuffle=shuffle,
                      accumulation=accumulation)
        if self.chat:
            loader = ChatLoader(config.data, self.tokenizer, config.seq_len, batch_size,
                                val_fraction=config.val_fraction, **common)
            if loader.report:
                self._print(f"note: {loader.report}")
            return loader
        return TokenLoader(config.data, config.seq_len, batch_size, tokenizer=self.tokenizer, **common)

    def _validation_loader(self):
        """Every validation item in order, the same on every rank: evaluate() gives each rank its share."""
        loader = self._loader("val", 1, 0, 1, shuffle=False)
        if loader.num_items == 0:
            what = "conversation" if self.chat else f"window of seq_len + 1 = {self.config.seq_len + 1} tokens"
            self._print(f"note: the validation split of {self.config.data} has no {what}: training without "
                        "validation")
            return None
        return loader

    def _resume(self) -> None:
        found = checkpoints(self.out / "checkpoints")
        if not found:
            self._print(f"--resume: no complete checkpoint under {self.out / 'checkpoints'}; starting fresh")
            return
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except ValueError as e:
                self._print(f"warning: {e}; falling back to the checkpoint before it")
                continue
            state = load_checkpoint(path, self.model, self.optimizers, self.loader, self.model_config)
            self.step = state["step"]
            resharded = f" (written by {state['world_size']} processes, now {self.world_size})" \
                if state["world_size"] != self.world_size else ""
            self._print(f"resumed from {path} at step {self.step}{resharded}")
            return
        raise ValueError(f"no intact checkpoint under {self.out / 'checkpoints'} (each is damaged: see above); "
                         "start again with --overwrite or a new out")

    # The loop.
    def train(self) -> dict:
        config = self.config
        if self.step >= config.max_steps:
            raise ValueError(f"nothing to do: {self.out} is already at step {self.step} and max_steps is "
                             f"{config.max_steps}; raise max_steps to train further")
        tokens_per_step = config.global_batch_tokens
        per_token = flops_per_token(self.model_config, self.raw_model.num_parameters(), config.seq_len)
        peak = peak_flops(self.device)
        bar = tqdm(total=config.max_steps, initial=self.step, disable=self.rank != 0, desc="training", unit="step")
        last_log, window_start, first_loss, summary = self.step, time.perf_counter(), None, {}
        start = time.perf_counter()
        while self.step < config.max_steps:
            self.step += 1
            lr = lr_at(self.step, config)
            for group in (g for optimizer in self.optimizers for g in optimizer.param_groups):
                group["lr"] = lr
            loss = self._train_step()
            first_loss = loss if first_loss is None else first_loss
            if not math.isfinite(loss):
                found = checkpoints(self.out / "checkpoints")
                kept = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was saved yet"
                raise TrainingDiverged(f"loss is {loss} at step {self.step}: training stopped; {kept}. "
                                       "Lower lr or raise warmup_steps, then resume.")
            if self.step % config.log_every == 0 or self.step == config.max_steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * (self.step - last_log) / elapsed
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}
                if peak:
                    record["mfu"] = tokens_per_s * per_token / (peak * self.world_size)
                self.metrics.log(record)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k != "step"})
                last_log, window_start = self.step, time.perf_counter()
            if self.val_loader is not None and (self.step % config.eval_every == 0 or self.step == config.max_steps):
                summary = self.evaluate()
                self.metrics.log({"step": self.step, **summary})
            if self.step % config.save_every == 0 or self.step == config.max_steps:
                extra = {"tokenizer": str(Path(config.tokenizer).resolve()), "tokenizer_sha256": self.tokenizer.sha256,
                         "dtype": str(self.dtype).removeprefix("torch.")}  # what `havoc export` writes by default
                if config.lora_rank:
                    extra["lora"] = {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": config.lora_targets}
                save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizers, self.loader,
                                self.model_config, config.keep_last, extra)
                self.metrics.plot()
            bar.update(1)
        bar.close()
        result = {"first_loss": first_loss, "last_loss": loss, **summary,
                  "steps": self.step, "seconds": time.perf_counter() - start,
                  "checkpoint": str(checkpoints(self.out / "checkpoints")[-1])}
        self.metrics.close()
        return result

    def _train_step(self) -> float:
        """One optimizer step; the loss is the sum of nats over the global count of target tokens, so
        every token weighs the same whatever micro-batch, accumulation step or rank it falls in."""
        batches = [tuple(t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
                   for _ in range(self.accumulation)]
        tokens = sum((targets != IGNORE_INDEX).sum() for _, targets in batches).double()
        if self.world_size > 1:
            dist.all_reduce(tokens)
        # DDP and FSDP average gradients over ranks: scaling by the world size makes that average a sum.
        scale = self.world_size / tokens.clamp(min=1)
        total = torch.zeros((), device=self.device, dtype=torch.float64)
        for micro, (inputs, targets) in enumerate(batches):
            # Only the last micro-batch reduces gradients across ranks (all-reduce or reduce-scatter).
            with set_gradient_sync(self.model, micro == self.accumulation - 1), self._autocast():
                logits = self.model(inputs).logits
                nats = _nats(logits, targets)
            (nats * scale.float()).backward()
            total += nats.detach().double()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.world_size > 1:
            dist.all_reduce(total)
        return (total / tokens.clamp(min=1)).item()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and bits-per-byte on the first eval_batches x micro_batch validation items: the same
        items whatever the number of processes, each rank scoring its share."""
        self.model.eval()
        val, micro = self.val_loader, self.config.micro_batch
        count = min(self.config.eval_batches * micro, val.num_items)
        mine = np.arange(count)[self.rank :: self.world_size]
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # nats, tokens, bytes
        # Every rank runs as many forwards as the busiest one (DDP and FSDP forwards are collective);
        # a rank with nothing left scores an item with every target masked.
        for b in range(math.ceil(math.ceil(count / self.world_size) / micro)):
            indices = mine[b * micro : (b + 1) * micro]
            inputs, targets = (t.to(self.device) for t in val.batch(indices if len(indices) else np.arange(1)))
            if not len(indices):
                targets = torch.full_like(targets, IGNORE_INDEX)
            with self._autocast():
                logits = self.model(inputs).logits
            scored = targets[targets != IGNORE_INDEX]
            sums += torch.stack([_nats(logits, targets).double(),
                                 torch.tensor(scored.numel(), device=self.device, dtype=torch.float64),
                                 self.token_bytes[scored].sum()])
        if self.world_size > 1:
            dist.all_reduce(sums)
        self.model.train()
        nats, tokens, n_bytes = sums.tolist()
        return {"val_loss": nats / max(tokens, 1), "val_bpb": nats / (math.log(2) * max(n_bytes, 1))}

    def _autocast(self):
        return autocast(self.device, self.dtype, self.parallel)

    def _print(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)


def _nats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the scored targets, in nats."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


def _load_init(path: str, device: torch.device) -> HavocModel:
    """Weights to start from: a HAVOC folder, or a Hugging Face Llama folder converted on the way in."""
    config = json.loads((Path(path) / "config.json").read_text()) if (Path(path) / "config.json").exists() else {}
    if "model_type" not in config:
        return HavocModel.load_pretrained(path, device=device, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        return HavocModel.load_pretrained(hf_to_havoc(path, Path(tmp) / "havoc"), device=device, dtype=torch.float32)


def flops_per_token(config: HavocConfig, parameters: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward and backward matmuls) plus attention's
    scores and weighted sum over seq_len keys (PaLM's appendix B)."""
    return 6 * parameters + 12 * config.num_layers * config.d_model * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known GPU, for MFU; None elsewhere."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_FLOPS.items() if key in name), None)
