"""Speculative decoding: proposers of draft tokens, and the rule that accepts them.

A step guesses up to K next tokens of a sequence. Then one forward pass of the target model over
the last token and the K guesses gives the target's distribution at every one of them. The
guesses are accepted left to right, and one more token is drawn where the first is refused
(or after the last). Each step thus yields between 1 and K + 1 tokens for one read of the weights.

Two proposers:
- prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's last
  n-gram, in its prompt or output. No second model. It shines when the output copies the prompt,
  as in code editing.
- a draft model: a smaller HAVOC with the same tokenizer, run K times. The engine keeps its KV
  cache in a pool of its own, indexed by the target's block tables (see engine.py).

Acceptance (Leviathan et al. 2023, Chen et al. 2023) keeps the output distribution the target's.
A guess d drawn from q is accepted with probability min(1, p(d) / q(d)). At the first refusal,
the next token is drawn from max(0, p - q), renormalised. A prompt-lookup guess is a q that puts
all its mass on d. Greedy rows accept while the guess is the target's argmax, so their output is
token for token that of plain decoding.
"""

from __future__ import annotations

import torch

# Prompt lookup matches the longest of the sequence's last 3, 2 or 1 tokens (HF's
# prompt_lookup_decoding uses at most 2-3; longer matches are rarer and add little).
NGRAM_MAX = 3


class PromptLookup:
    """One sequence's n-gram index: each n-gram (n <= NGRAM_MAX) of its ids mapped to where its
    latest occurrence ends. It is updated as the ids grow, so a proposal costs O(K), not O(length)."""

    def __init__(self):
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # ids[:indexed] are in the index (each n-gram ending before `indexed`)

    def propose(self, ids: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        # Index the n-grams that end before the last id: the suffix itself must not match itself.
        for end in range(max(self.indexed, 1), len(ids)):
            for n in range(1, min(NGRAM_MAX, end) + 1):
                self.ends[tuple(ids[end - n : end])] = end
        self.indexed = max(self.indexed, len(ids))
        for n in range(min(NGRAM_MAX, len(ids)), 0, -1):
            end = self.ends.get(tuple(ids[len(ids) - n :]))
            if end is not None:
                # A match that overlaps the end (a repeating output) goes on with its own guesses,
                # as the pattern would: a period of 1 guesses k copies, not one.
                guess: list[int] = []
                for i in range(end, end + k):
                    guess.append(ids[i] if i < len(ids) else guess[i - len(ids)])
                return guess
        return []


def accept(target: torch.Tensor, drafts: torch.Tensor, counts: torch.Tensor, greedy: torch.Tensor,
           draft_probs: torch.Tensor | None, noise: torch.Tensor) -> torch.Tensor:
    """The accepted guesses and the next token of each row, as [2, rows] (on the device, no host sync).

    target: processed target logits [rows, K + 1, vocab] at the last token and each guess.
    drafts: the guesses [rows, K], row r's first counts[r] real (the rest is padding).
    greedy: [rows] bool. draft_probs: q [rows, K, vocab] of a draft model, or None for
    prompt lookup (q is one-hot on the guess).
    noise: uniform [rows, K + vocab]. The first K values decide acceptances, the rest feed the
    exponential race that draws the next token (as in sampling.choose).
    Returns row r's count of accepted guesses n, and the token it continues with: the target's
    choice at position n.
    """
    rows, width, vocab = target.shape
    k = width - 1
    probs = target.softmax(-1)
    real = torch.arange(k, device=target.device)[None] < counts[:, None]
    guess_p = probs[:, :k].gather(-1, drafts[:, :, None])[..., 0]
    if draft_probs is None:
        guess_q = torch.ones_like(guess_p)
    else:
        guess_q = draft_probs.gather(-1, drafts[:, :, None])[..., 0]
    sampled_ok = noise[:, :k] * guess_q < guess_p  # u < p / q, without dividing by a q of 0
    greedy_ok = drafts == target[:, :k].argmax(-1)
    ok = torch.where(greedy[:, None], greedy_ok, sampled_ok) & real
    accepted = ok.long().cumprod(-1).sum(-1)  # the run of acceptances from the left
    at = accepted[:, None, None].expand(rows, 1, vocab)
    final_p = probs.gather(1, at)[:, 0]
    if draft_probs is None:
        q = torch.zeros_like(final_p).scatter_(-1, drafts.gather(1, accepted.clamp(max=k - 1)[:, None]), 1.0)
    else:
        q = draft_probs.gather(1, at.clamp(max=k - 1))[:, 0]
    refused = accepted < counts
    residual = torch.where(refused[:, None], (final_p - q).clamp(min=0), final_p)
    # A residual of all zeros (p == q to rounding, where a refusal is nearly impossible) falls back on p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, final_p)
    race = residual / -noise[:, k:].log()
    final_logits = target.gather(1, at)[:, 0]
    token = torch.where(greedy, final_logits.argmax(-1), race.argmax(-1))
    return torch.stack((accepted, token))
