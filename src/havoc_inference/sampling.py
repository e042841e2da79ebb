"""Sampling parameters and the processing of one sequence's next-token logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from havoc_core.model.transformer import filter_logits

SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output; 1 = off
    presence_penalty: float = 0.0  # OpenAI style, over output
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's and the top k
    echo: bool = False  # also return the prompt (and, with logprobs, its log-probabilities)

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an integer >= 1"),
            (0 <= self.temperature <= 2, "temperature", "in [0, 2]"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0"),
            (0 <= self.min_p <= 1, "min_p", "in [0, 1]"),
            (0 < self.repetition_penalty <= 10, "repetition_penalty", "in (0, 10]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "between 0 and 20"),
            (len(self.stop) <= 16 and all(isinstance(s, str) and s for s in self.stop), "stop", "up to 16 non-empty strings"),
            (self.seed is None or -2**63 <= self.seed < 2**63, "seed", "a 64-bit signed integer"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise InvalidParameter(name, f"{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows; vLLM treats such temperatures as greedy too.
        return self.temperature < SAMPLING_EPS


class InvalidParameter(ValueError):
    """A request field with a bad value; `param` names the field (OpenAI's error shape has it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def process_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                   output_counts: dict[int, int]) -> torch.Tensor:
    """Apply penalties, temperature, top-k, top-p and min-p to one row of float32 logits [vocab]."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_counts)), device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_counts and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(output_counts), device=logits.device)
        counts = torch.tensor(list(output_counts.values()), device=logits.device, dtype=logits.dtype)
        logits[ids] -= counts * params.frequency_penalty + params.presence_penalty
    if params.greedy:
        return logits
    return filter_logits(_finite(_finite(logits) / params.temperature), params.top_k, params.top_p, params.min_p)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    # A tiny repetition penalty or temperature divides by ~0: +inf would make softmax NaN. NaN from
    # the model itself stays NaN and fails its own request.
    return logits.nan_to_num(nan=float("nan"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def choose(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """The next token from processed logits, as a 0-d tensor on their device (no host sync): argmax
    when greedy, else a draw from `generator`, which lives on the same device."""
    if params.greedy:
        return logits.argmax()
    return draw(logits.softmax(-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index drawn from `probs` [vocab]: argmax(p / q) with q ~ Exp(1) is a draw from p.

    This is torch.multinomial's own one-sample algorithm, so the same generator state gives the
    same token; multinomial first checks the probabilities with a host sync, which a GPU decode
    step cannot afford per row. Invalid probabilities (NaN, inf) are caught by the caller.
    """
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).argmax()


def valid(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A 0-d bool tensor: these processed logits can be sampled (what multinomial would check)."""
    if params.greedy:
        return torch.ones((), dtype=torch.bool, device=logits.device)
    return ~logits.isnan().any() & (logits.amax() > float("-inf"))
