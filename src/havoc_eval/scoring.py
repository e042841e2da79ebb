"""Scoring token sequences with a HavocModel: the one routine behind perplexity and lm-eval's log-likelihoods."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from havoc_core.model import HavocModel


def rolling_windows(tokens: Sequence[int], context: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """Windows (window_tokens, n_scored) that score tokens[1:] each exactly once.

    A window holds at most `context` tokens and scores only its last n_scored targets, the ones
    no earlier window scored; windows start every `stride` tokens, so each scored token sees at
    least context - stride tokens of context (all earlier ones while the document fits).
    """
    if not 1 <= stride < context:
        raise ValueError(f"stride must be in [1, context), got stride {stride} with context {context}")
    if len(tokens) < 2:
        return
    scored_until = 1
    for begin in range(0, len(tokens), stride):
        end = min(begin + context, len(tokens))
        yield list(tokens[begin:end]), end - scored_until
        scored_until = end
        if end == len(tokens):
            return


@torch.inference_mode()
def score(
    model: HavocModel, sequences: Sequence[tuple[Sequence[int], int]], batch_size: int, progress=None
) -> list[tuple[float, bool, list[int]]]:
    """For each (tokens, n_scored): the sum of log-probabilities of its last n_scored tokens, whether
    each was the greedy choice, and the scored targets. Batched, longest first, right-padded."""
    device = model.embed_tokens.weight.device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(sequences[chunk[0]][0]) - 1
        inputs = torch.full((len(chunk), width), model.config.pad_token_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens = sequences[i][0]
            inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        # Right padding needs no mask: causal attention never looks at later positions.
        log_probs = model(inputs.to(device)).logits.float().log_softmax(dim=-1)
        for row, i in enumerate(chunk):
            tokens, n_scored = sequences[i]
            end = len(tokens) - 1
            targets = torch.tensor(tokens[-n_scored:], device=device)
            scores = log_probs[row, end - n_scored : end]
            picked = scores.gather(-1, targets[:, None]).squeeze(-1)
            results[i] = (picked.double().sum().item(), bool((scores.argmax(-1) == targets).all()), list(tokens[-n_scored:]))
        if progress is not None:
            progress.update(len(chunk))
    return results
