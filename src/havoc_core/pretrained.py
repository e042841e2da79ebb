"""A model folder with its tokenizer: what evaluation and serving load."""

from __future__ import annotations

import os

import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer


def check_vocab(config: HavocConfig, tokenizer: HavocTokenizer, source: str | os.PathLike) -> None:
    if config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"{source} has vocab_size {config.vocab_size}, the tokenizer {tokenizer.vocab_size}: "
                         "they do not belong together")


def load_model_and_tokenizer(
    directory: str | os.PathLike,
    tokenizer: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> tuple[HavocModel, HavocTokenizer]:
    """The model of `directory` (eval mode) and its tokenizer: `tokenizer`, or the one saved beside it.
    `dtype` and `quantize` are HavocModel.load_pretrained's."""
    model = HavocModel.load_pretrained(directory, device=device, dtype=dtype, quantize=quantize)
    loaded = HavocTokenizer.load(tokenizer or directory)
    check_vocab(model.config, loaded, directory)
    return model, loaded
