"""Checkpoint formats at HAVOC's boundary: Hugging Face Llama import and export."""

from havoc_core.interop.hf import havoc_to_hf, hf_to_havoc

__all__ = ["havoc_to_hf", "hf_to_havoc"]
