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
    grammar: str | None = None  # an llguidance grammar the output follows (see structured.py)

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


def process(logits: torch.Tensor, params: list[SamplingParams], histories: list[tuple[set[int], dict[int, int]]]
            ) -> torch.Tensor:
    """Penalties, temperature, top-k, top-p and min-p for float32 logits [rows, vocab] (changed in
    place), one row per sequence with its params and history (the set of its prompt's ids, the
    counts of its output's). All rows at once: a handful of calls per step, not per row."""
    device = logits.device
    rows, ids, values = [], [], []  # repetition penalty: every (row, id) seen, and the row's penalty
    for r, (p, (prompt, counts)) in enumerate(zip(params, histories)):
        if p.repetition_penalty != 1.0:
            seen = sorted(prompt | counts.keys())
            rows += [r] * len(seen)
            ids += seen
            values += [p.repetition_penalty] * len(seen)
    if rows:
        at = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
        penalty, picked = torch.tensor(values, device=device, dtype=logits.dtype), logits[at]
        logits[at] = torch.where(picked > 0, picked / penalty, picked * penalty)
    rows, ids, values = [], [], []  # presence and frequency penalties: what each output id costs
    for r, (p, (_, counts)) in enumerate(zip(params, histories)):
        if counts and (p.presence_penalty or p.frequency_penalty):
            rows += [r] * len(counts)
            ids += counts
            values += [n * p.frequency_penalty + p.presence_penalty for n in counts.values()]
    if rows:
        at = (torch.tensor(rows, device=device), torch.tensor(ids, device=device))
        logits[at] -= torch.tensor(values, device=device, dtype=logits.dtype)
    sampled = [r for r, p in enumerate(params) if not p.greedy]
    if not sampled:
        return logits
    kept = [params[r] for r in sampled]
    temperature = torch.tensor([[p.temperature] for p in kept], device=device, dtype=logits.dtype)
    every = len(sampled) == len(params)
    chosen = logits if every else logits[sampled]
    chosen = filter_logits(_finite(_finite(chosen) / temperature), [p.top_k for p in kept], [p.top_p for p in kept],
                           [p.min_p for p in kept])
    if every:
        return chosen
    logits[sampled] = chosen
    return logits


def _finite(logits: torch.Tensor) -> torch.Tensor:
    # A tiny repetition penalty or temperature divides by ~0: +inf would make softmax NaN. NaN from
    # the model itself stays NaN and fails its own request.
    return logits.nan_to_num(nan=float("nan"), posinf=torch.finfo(logits.dtype).max, neginf=float("-inf"))


def choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of each row of processed logits [rows, vocab], and whether the row could be
    sampled, as [2, rows] on their device (no host sync): argmax when greedy, else a draw from the
    row's own generator, on the same device.

    A draw is argmax(p / q) with q = -log(u) ~ Exp(1), u uniform: the exponential race, an exact
    draw from p, so a seed gives its tokens whatever the other rows are. torch.multinomial would
    check the probabilities with a host sync, which a GPU step cannot afford per row; the CPU's
    exponential_ is 6x slower than uniform_ and a log. The noise is the one call per sampled row:
    torch generators hold one stream each.
    """
    greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    uniform = torch.ones_like(logits)
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.greedy:
            uniform[row].uniform_(generator=generator)
    race = logits.softmax(-1) / -uniform.log()  # greedy rows' race is moot
    tokens = torch.where(greedy, logits.argmax(-1), race.argmax(-1))
    ok = greedy | (~logits.isnan().any(-1) & (logits.amax(-1) > float("-inf")))
    return torch.stack((tokens, ok.long()))
