"""How much memory a training run needs per GPU, before it starts (`havoc train --dry-run`).

An estimate from the shapes alone: fp32 master weights, gradients and AdamW's two moments (each
divided by the processes under FSDP), the compute-dtype copies of the weights, and what one
micro-batch's forward keeps for the backward (counted tensor by tensor from the block's code
below, then the logits). Not counted: the CUDA context (~0.5 GB), allocator fragmentation and
NCCL buffers, which the peak adds on a GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from havoc_core.config import HavocConfig
from havoc_core.interop.hf import havoc_config_from_hf
from havoc_core.model import HavocModel
from havoc_core.model.transformer import resolve_dtype
from havoc_core.tokenizer import HavocTokenizer
from havoc_training.config import TrainConfig
from havoc_training.distributed import parallel_mode
from havoc_training.lora import apply_lora

GB = 1 << 30


def estimate(config: TrainConfig, model: HavocConfig, parameters: int, trainable: int, world_size: int,
             mode: str, dtype: torch.dtype) -> dict[str, float]:
    """Bytes per process, by kind. `mode` is "none", "ddp" or "fsdp"; `dtype` the compute dtype."""
    shards = world_size if mode == "fsdp" else 1
    half = dtype != torch.float32
    act = 2 if half else 4
    d, h, kv = model.d_model, model.mlp.hidden_dim, model.attention.num_kv_heads * model.head_dim
    per_block = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d  # wq, wo, wk, wv, the MLP, two norms
    embedding = model.vocab_size * d * (1 if model.tie_word_embeddings else 2)
    tokens = config.micro_batch * config.seq_len

    out = {"weights (fp32 master)": 4 * parameters / shards}
    if mode == "fsdp" and half:  # all-gathered bf16 copies: the block computing and the next one prefetched
        out["weights (compute copies)"] = act * (2 * per_block + embedding)
    elif half:  # autocast caches a bf16 copy of every weight it casts, until the forward ends
        out["weights (compute copies)"] = act * parameters
    grads = 4 * trainable / shards
    if mode == "ddp":
        grads *= 2  # DDP's reduction buckets hold a second copy
    elif mode == "fsdp" and config.accumulation_steps(world_size) > 1:
        grads += 4 * trainable  # gradients accumulate unsharded until the last micro-step reduces them
    out["gradients"] = grads
    out["optimizer (AdamW)"] = 8 * trainable / shards

    # Saved for backward per token of one block, as the block's code keeps them:
    # RMSNorm x2: its fp32 input and normalised value, and its output in the compute dtype;
    # attention: q, k, v, the rotate-half terms and rotated q, k, the SDPA output, its reshaped copy;
    # SwiGLU: w1 and w2 outputs, SiLU output, their product.
    norms = 2 * (2 * 4 * d + act * d)
    attention = act * (5 * d + 4 * kv)
    mlp = act * 4 * h
    block = tokens * (norms + attention + mlp + 4 * model.attention.num_heads)  # + SDPA's fp32 log-sum-exp
    if config.activation_checkpointing:  # each block keeps its input; one block's worth is recomputed at a time
        blocks = tokens * act * d * model.num_layers + block
    else:
        blocks = block * model.num_layers
    # Logits (+ their fp32 copy when half), log-softmax, and the logits' gradient during backward.
    logits = tokens * model.vocab_size * (4 + 4 + 4 + (act if half else 0))
    out["activations (one micro-batch)"] = blocks + tokens * norms / 2 + logits
    out["total"] = sum(out.values())
    return out


def report(estimates: dict[str, float], world_size: int, mode: str, dtype: torch.dtype) -> str:
    lines = [f"memory estimate per process ({world_size} process{'es' if world_size > 1 else ''}, "
             f"{'one process' if mode == 'none' else mode}, compute {str(dtype).removeprefix('torch.')}):"]
    lines += [f"  {name:32s} {value / GB:9.2f} GB" for name, value in estimates.items()]
    lines.append("  (not counted: the CUDA context, allocator fragmentation, communication buffers)")
    return "\n".join(lines)


def dry_run(config: TrainConfig) -> str:
    """The estimate for `config` under this launch (WORLD_SIZE from torchrun), computed on the meta device:
    nothing is allocated, so a 7B plan can be checked on a laptop."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # Planned for the device the run will use: an explicit cuda needs no GPU here.
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    dtype = resolve_dtype(config.dtype, "cuda" if cuda else "cpu")
    mode = parallel_mode(config.parallel, world_size)
    if config.init_from:
        source = Path(config.init_from) / "config.json"
        raw = json.loads(source.read_text())
        model_config = havoc_config_from_hf(raw, source) if "model_type" in raw else HavocConfig.from_dict(raw)
    else:
        model_config = config.model_config(HavocTokenizer.load(config.tokenizer).vocab_size)
    with torch.device("meta"):
        model = HavocModel(model_config)
    if config.lora_rank:
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimates = estimate(config, model_config, model.num_parameters(), trainable, world_size, mode, dtype)
    return report(estimates, world_size, mode, dtype)
