"""The pieces of a HAVOC block: RMSNorm, RoPE, grouped-query attention, SwiGLU, TransformerBlock.

Plain PyTorch: compile, sharding and precision are applied from outside (trainer, engine).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from havoc_core.config import HavocConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (key, value), each [batch, num_kv_heads, seq, head_dim]


class StaticCache(Protocol):
    """A preallocated cache (the inference engine's): stores the new keys/values, returns all of them."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> KVCache: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as HF Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE, in HF Llama's rotate-half layout.

    The tables are indexed by absolute position, so cached decoding (a position offset) and
    left-padded rows (positions counted from each row's first real token) need no special case.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # On the ambient device (`with torch.device(...)`), like the parameters; derived from the
        # config, so not saved in checkpoints.
        cos, sin = self._tables(None)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / self.theta ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        )
        angles = torch.outer(torch.arange(self.max_seq_len, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()

    def reset_tables(self, device: torch.device | str) -> None:
        """Recompute the tables in fp32 on `device`, e.g. after the model was built on the meta device
        and materialised with `to_empty`."""
        self.cos, self.sin = self._tables(torch.device(device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `position_ids` [batch, seq], shaped [batch, 1, seq, head_dim]."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class GQAttention(nn.Module):
    """Causal self-attention with fewer key/value heads than query heads (GQA), bias-free."""

    def __init__(self, config: HavocConfig):
        super().__init__()
        self.num_heads = config.attention.num_heads
        self.num_kv_heads = config.attention.num_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, self.num_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, self.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.num_heads * self.head_dim, config.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past_kv: KVCache | StaticCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """`mask` is boolean [batch, 1, seq, keys] (True = may attend) or None for plain causal.

        `past_kv` is the (key, value) of earlier tokens, extended here, or a `StaticCache`.
        """
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(past_kv, tuple):
            k = torch.cat((past_kv[0], k), dim=2)
            v = torch.cat((past_kv[1], v), dim=2)
        elif past_kv is not None:
            k, v = past_kv.update(k, v)
        # enable_gqa lets each group of query heads read its shared KV head without a copy.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.wo(out), (k, v)


GroupedQueryAttention = GQAttention


class SwiGLU(nn.Module):
    """w3(SiLU(w1(x)) * w2(x)): w1 is the gate, w2 the up projection, w3 the down projection."""

    def __init__(self, d_model: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w2 = nn.Linear(d_model, hidden_dim, bias=False)
        self.w3 = nn.Linear(hidden_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); dropout on each branch."""

    def __init__(self, config: HavocConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attn = GQAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.mlp = SwiGLU(config.d_model, config.mlp.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)  # identity in eval mode

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        past_kv: KVCache | StaticCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        attn_out, kv = self.attn(self.attn_norm(x), rope, mask, past_kv)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, kv
