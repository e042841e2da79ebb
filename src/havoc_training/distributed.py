"""Processes, devices and parallelism for the trainer: one process, DDP, or FSDP2 built from the meta device.

torchtitan's order: activation checkpointing, compile, then DDP or FSDP2 (fully_shard per block,
then the root). Precision is applied here too, never inside the model: fp32 master weights
always, bf16 compute through FSDP2's MixedPrecisionPolicy or, without FSDP, autocast (not both).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from havoc_core.model import HavocModel


def device_for(name: str) -> torch.device:
    """The device of this process: `cuda` (this process's LOCAL_RANK GPU), `cpu`, or `auto` (cuda if available)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size); under torchrun, joins the process group: NCCL for GPUs, gloo for the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world_size) if world_size > 1 else (0, 1)


def parallel_mode(parallel: str, world_size: int) -> str:
    """"none" for one process; "auto" is FSDP2 with several (DDP keeps a whole fp32 model, its
    gradients and Adam's state on every GPU: ~112 GB at 7B), DDP only when asked."""
    if world_size == 1:
        return "none"
    return "fsdp" if parallel == "auto" else parallel


def autocast(device: torch.device, dtype: torch.dtype, mode: str):
    """bf16 autocast without FSDP; under FSDP its MixedPrecisionPolicy already casts the parameters."""
    if dtype == torch.float32 or mode == "fsdp":
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def parallelize(model: HavocModel, mode: str, device: torch.device, dtype: torch.dtype,
                activation_checkpointing: bool, compile: bool) -> torch.nn.Module:
    for block in model.layers:
        if activation_checkpointing:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile()
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if mode != "fsdp":
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Gradients are reduced in fp32 whatever the compute dtype: a bf16 sum over many ranks loses bits.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root holds the (tied) embedding and final norm
    return model


@torch.no_grad()
def materialize(model: HavocModel, device: torch.device) -> None:
    """Give a model built on the meta device (and perhaps sharded) real, initialised weights on `device`.

    Each parameter is drawn full-size in HavocModel.parameter_inits' order from this process's
    generator and only this rank's shard is kept, so the weights equal one-process init for the
    same seed. One full parameter at a time is the peak (the 7B embedding: 1.1 GB in fp32).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    model.to_empty(device=device)
    for _, param, init in model.parameter_inits():
        if isinstance(param, DTensor):
            full = torch.empty(param.shape, dtype=param.dtype, device=device)
            init(full)
            # src_data_rank=None: every rank holds the same full tensor, so each slices its own shard.
            param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
            del full
        else:
            init(param)
    model.rotary.reset_tables(device)


def set_gradient_sync(model: torch.nn.Module, sync: bool):
    """A context for one micro-step: gradients are reduced across ranks only when `sync` (the last
    micro-step of an accumulation); the others accumulate locally."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    return nullcontext()
