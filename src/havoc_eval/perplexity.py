"""`havoc eval perplexity`: mean token loss, perplexity and bits-per-byte of a model on text files.

Each document is scored as <|bos|> + its tokens, every token once, through sliding windows of
`context` tokens that advance by `stride` (see `rolling_windows`). Bits-per-byte divides the
nats of the scored tokens by ln 2 x their UTF-8 bytes, which does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tqdm import tqdm

from havoc_core.model import HavocModel
from havoc_core.tokenizer import Corpus, HavocTokenizer
from havoc_eval.scoring import rolling_windows, score


def read_texts(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """The documents of evaluation files; unlike training, a file that is not UTF-8 is an error."""
    corpus = Corpus(paths, text_field=text_field)
    texts = [doc.text for doc in corpus]
    if corpus.skipped:
        raise ValueError(f"{corpus.skipped[0]} is not UTF-8 text; convert it or leave it out")
    if not texts:
        raise ValueError(f"{', '.join(map(str, paths))}: no text to evaluate (the files are empty)")
    return texts


def document_windows(tokenizer: HavocTokenizer, text: str, context: int, stride: int) -> list[tuple[list[int], int]]:
    return list(rolling_windows([tokenizer.bos_token_id, *tokenizer.encode(text)], context, stride))


def perplexity(
    model: HavocModel,
    tokenizer: HavocTokenizer,
    texts: Sequence[str],
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict:
    context = context or model.config.max_seq_len
    stride = stride or context // 2
    if context > model.config.max_seq_len:
        raise ValueError(f"context {context} is longer than the model's max_seq_len {model.config.max_seq_len}")
    windows = [w for text in texts for w in document_windows(tokenizer, text, context, stride)]
    with tqdm(total=len(windows), desc="scoring", unit="window", disable=not show_progress) as bar:
        scored = score(model, windows, batch_size, progress=bar)
    byte_lengths = tokenizer.token_byte_lengths()
    nats = -sum(log_prob for log_prob, _, _ in scored)
    tokens = sum(len(targets) for _, _, targets in scored)
    n_bytes = sum(byte_lengths[t] for _, _, targets in scored for t in targets)
    mean = nats / tokens
    return {
        "documents": len(texts), "tokens": tokens, "bytes": n_bytes, "nats": nats,
        "mean_loss": mean, "perplexity": math.exp(mean), "bits_per_byte": nats / (math.log(2) * n_bytes),
        "context": context, "stride": stride,
    }
