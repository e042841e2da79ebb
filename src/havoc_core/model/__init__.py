"""The HAVOC transformer: building blocks and the full model."""

from havoc_core.model.blocks import (
    GQAttention,
    GroupedQueryAttention,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerBlock,
)
from havoc_core.model.transformer import CausalLMOutput, HavocModel, SigmaModel

__all__ = [
    "CausalLMOutput",
    "GQAttention",
    "GroupedQueryAttention",
    "HavocModel",
    "RMSNorm",
    "RotaryEmbedding",
    "SigmaModel",
    "SwiGLU",
    "TransformerBlock",
]
