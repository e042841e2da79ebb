"""Scoring token sequences with a HavocModel: the one routine behind perplexity and lm-eval's log-likelihoods."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer


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


def generation_prompt(tokenizer: HavocTokenizer, text: str, keep: int) -> list[int]:
    """<|bos|> + the ids of `text`, its start cut to the last `keep` ids (as lm-eval's HF model cuts
    a generation's context to leave room for the new tokens)."""
    return [tokenizer.bos_token_id, *tokenizer.encode(text)][-keep:]


# Rows of hidden states turned into log-probabilities at once: 1024 x 70000 fp32 is 290 MB,
# where a whole batch (8 x 4095 x 70000) would be 9 GB.
LOGIT_ROWS = 1024


@torch.inference_mode()
def score(
    model: HavocModel, sequences: Sequence[tuple[Sequence[int], int]], batch_size: int, progress=None
) -> list[tuple[float, bool, list[int]]]:
    """For each (tokens, n_scored): the sum of log-probabilities of its last n_scored tokens, whether
    each was the greedy choice, and the scored targets. Batched, longest first, right-padded; the
    LM head runs on the scored positions only, LOGIT_ROWS at a time."""
    device = model.embed_tokens.weight.device
    for tokens, n_scored in sequences:
        if not 0 <= n_scored < len(tokens):
            raise ValueError(f"cannot score the last {n_scored} of {len(tokens)} tokens: the first has no context")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    results: list = [None] * len(sequences)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start : start + batch_size] if sequences[i][1] > 0]
        for i in order[start : start + batch_size]:
            if sequences[i][1] == 0:  # an empty continuation: log 1, trivially greedy
                results[i] = (0.0, True, [])
        if chunk:
            _score_batch(model, [sequences[i] for i in chunk], chunk, results, device)
        if progress is not None:
            progress.update(len(order[start : start + batch_size]))
    return results


def _score_batch(model: HavocModel, batch, indices, results, device) -> None:
    width = len(batch[0][0]) - 1
    inputs = torch.full((len(batch), width), model.config.pad_token_id, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, (tokens, n_scored) in enumerate(batch):
        inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
        end = len(tokens) - 1
        rows += [row] * n_scored
        positions += range(end - n_scored, end)
        targets += tokens[-n_scored:]
    # Right padding needs no mask: causal attention never looks at later positions.
    hidden = model.hidden_states(inputs.to(device))[torch.tensor(rows, device=device), torch.tensor(positions, device=device)]
    targets_t = torch.tensor(targets, device=device)
    picked, greedy = [], []
    for begin in range(0, len(targets), LOGIT_ROWS):
        log_probs = model.lm_head(hidden[begin : begin + LOGIT_ROWS]).float().log_softmax(-1)
        wanted = targets_t[begin : begin + LOGIT_ROWS]
        picked.append(log_probs.gather(-1, wanted[:, None]).squeeze(-1))
        greedy.append(log_probs.argmax(-1) == wanted)
    picked_all, greedy_all = torch.cat(picked).double(), torch.cat(greedy)
    begin = 0
    for i, (tokens, n_scored) in zip(indices, batch):
        span = slice(begin, begin + n_scored)
        results[i] = (picked_all[span].sum().item(), bool(greedy_all[span].all()), list(tokens[-n_scored:]))
        begin += n_scored
