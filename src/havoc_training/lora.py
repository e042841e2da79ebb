"""LoRA adapters, applied from outside the model: y = W x + (alpha / rank) * B A x on chosen projections.

The base weights are frozen; only A and B train. `merge_lora` folds B A into W and removes the
adapters, leaving a plain HavocModel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _lora_hook(module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    return output + F.linear(F.linear(inputs[0], module.lora_A), module.lora_B) * module.lora_scale


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> int:
    """Freeze `model` and add rank-`rank` adapters to the projections named in `targets`; returns how many."""
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if rank < 1 or not targets or unknown:
        raise ValueError(f"LoRA needs lora_rank >= 1 and lora_targets from {', '.join(PROJECTIONS)} "
                         f"(got rank {rank}, unknown targets {unknown})")
    model.requires_grad_(False)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            weight = module.weight
            module.lora_A = nn.Parameter(torch.empty(rank, module.in_features, device=weight.device, dtype=weight.dtype))
            nn.init.kaiming_uniform_(module.lora_A, a=math.sqrt(5))
            # B starts at zero, so training starts from exactly the base model.
            module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=weight.device, dtype=weight.dtype))
            module.lora_scale = alpha / rank
            module.lora_hook = module.register_forward_hook(_lora_hook)
            count += 1
    return count


def merged(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain weight equal to `weight` with its adapter: W + scale * B A."""
    return weight + (lora_B @ lora_A) * scale


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and remove it; the model becomes plain again."""
    for module in model.modules():
        if hasattr(module, "lora_hook"):
            module.weight.copy_(merged(module.weight, module.lora_A, module.lora_B, module.lora_scale))
            module.lora_hook.remove()
            del module.lora_A, module.lora_B, module.lora_scale, module.lora_hook
    model.requires_grad_(True)
