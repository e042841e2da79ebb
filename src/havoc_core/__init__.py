"""havoc_core: the HAVOC model library (config, model, tokenizer, Hugging Face interop)."""

from havoc_core.config import AttentionConfig, HavocConfig, MLPConfig

__all__ = ["AttentionConfig", "HavocConfig", "MLPConfig"]
