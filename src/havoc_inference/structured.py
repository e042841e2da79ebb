"""Structured output: constraints compiled by llguidance into grammars, and the token masks they give.

A request's constraint (a JSON schema, any JSON object, a regex, a choice of strings, a Lark grammar)
becomes one llguidance grammar; each constrained sequence holds a matcher of it. Every step the
engine asks the matchers of its constrained rows for their next-token bitmasks (tens of µs each),
sets the logits of refused tokens to -inf on the device, and feeds each sampled token back. Rows
without a constraint are not touched.

llguidance over xgrammar: it has no dependencies (xgrammar brings triton and transformers), it says
what is wrong with a bad schema or regex, and its per-token cost on this project's CPU is a few
percent of a decode step (benchmarks/bench_grammar.py; RESULTS.md).
"""

from __future__ import annotations

import json
import re
from functools import cached_property

import llguidance
import llguidance.torch
import numpy as np
import torch

from havoc_core.tokenizer import HavocTokenizer

# OpenAI's `response_format` and vLLM's `structured_outputs` fields, as constraint kinds.
KINDS = ("json_object", "json_schema", "json", "regex", "choice", "grammar")
# JSON as json.dumps writes it, with no free whitespace: a small model allowed any whitespace can
# spend its whole budget on newlines (a known failure), and a client parses either form.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class InvalidConstraint(ValueError):
    """A schema, regex or grammar that cannot be compiled; the message says what is wrong."""


def grammar(kind: str, value=None, lenient: bool = False) -> str:
    """The llguidance grammar of a constraint: `json_object` (any JSON object), `json_schema` / `json`
    (value: a JSON schema, a dict or its text; a keyword llguidance cannot enforce is an error, or
    ignored if `lenient`), `regex` (the whole output matches it), `choice` (value: a list of strings,
    the output is one of them) or `grammar` (a Lark grammar)."""
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
    if kind in ("json_schema", "json"):
        try:
            schema = json.loads(value) if isinstance(value, str) else value
        except json.JSONDecodeError as e:
            raise InvalidConstraint(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise InvalidConstraint(f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={**JSON_OPTIONS, "lenient": lenient})
        except ValueError as e:
            raise InvalidConstraint(f"invalid JSON schema: {e}") from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidConstraint("choice must be a non-empty list of non-empty strings")
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in value))
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise InvalidConstraint(f"unknown constraint {kind!r}; use one of {', '.join(KINDS)}")


class Grammars:
    """One engine's llguidance tokenizer (built on first use) and the matchers it makes."""

    def __init__(self, tokenizer: HavocTokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.shifts: dict[torch.device, torch.Tensor] = {}

    @cached_property
    def _lltokenizer(self) -> llguidance.LLTokenizer:
        # Special tokens stay out of every grammar; eos is what a matcher allows once it accepts.
        return llguidance.LLTokenizer(self.tokenizer.to_str(), n_vocab=self.vocab_size,
                                      eos_token=self.tokenizer.eos_token_id)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidConstraint(f"it does not compile: {matcher.get_error()}")
        return matcher

    def masks(self, matchers: list[llguidance.LLMatcher], stop_ids: list[list[int]]) -> torch.Tensor:
        """The next-token bitmask of each matcher [rows, vocab / 32] (int32, on the CPU). Where a
        matcher allows eos (its grammar is complete), the row's other stop tokens are allowed too:
        a chat reply ends with <|end|>."""
        failed = next((m for m in matchers if m.is_error()), None)
        if failed is not None:
            raise RuntimeError(f"the grammar failed: {failed.get_error()}")
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        # One row after another: llguidance's thread pool (fill_next_token_bitmask_par) competed with
        # torch's threads for the cores and cost 30% of an 8-row step here, where these take ~30 µs each.
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        words = bitmask.numpy().view(np.uint32)
        eos = self.tokenizer.eos_token_id
        for row, ids in enumerate(stop_ids):
            if words[row, eos >> 5] >> (eos & 31) & 1:
                for token in ids:
                    words[row, token >> 5] |= np.uint32(1 << (token & 31))
        return bitmask

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        """Set the logits [rows, vocab] of the tokens `bitmask` refuses to -inf, in place, on their device."""
        device = logits.device
        if device not in self.shifts:
            self.shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bits = (bitmask.to(device, non_blocking=True)[:, :, None] >> self.shifts[device]) & 1
        logits.masked_fill_(bits.flatten(1)[:, : logits.shape[1]] == 0, float("-inf"))
