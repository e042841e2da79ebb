"""Structured output: the per-token cost of llguidance and xgrammar on HAVOC's tokenizer, side by
side, and the engine's decode speed with and without a JSON-schema constraint.

1. For each schema, a valid document is tokenized and replayed through each library's matcher: per
   token, the time to fill the next-token bitmask and to advance the matcher by the document's
   token (what the engine does for a constrained row each step), and the one-time cost of
   compiling the schema. Both libraries run in this process on the same tokens. xgrammar is not a
   HAVOC dependency: `pip install xgrammar==0.2.9` to include it.
2. The engine (small preset, random weights, this tokenizer) decodes the same number of tokens
   per row unconstrained and under a schema, at 1 and 8 rows: tokens/s, medians of several runs.

    python benchmarks/bench_grammar.py [--tokenizer runs/quickstart/tokenizer] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import dataclasses
import importlib.util

import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer
from havoc_eval.bench import cpu_model
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams
from havoc_inference.structured import grammar

SCHEMAS = {
    "flat object": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                     "required": ["name", "age"]},
                    {"name": "Ada Lovelace", "age": 36}),
    "nested + arrays + enums": (
        {"type": "object", "required": ["id", "owner", "items"], "properties": {
            "id": {"type": "integer", "minimum": 0},
            "owner": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "email": {"type": "string"}}},
            "items": {"type": "array", "items": {"type": "object", "required": ["sku", "state"], "properties": {
                "sku": {"type": "string"}, "qty": {"type": "number", "minimum": 0},
                "state": {"enum": ["open", "shipped", "returned"]}}}}}},
        {"id": 4127, "owner": {"name": "Grace Hopper", "email": "grace@example.com"},
         "items": [{"sku": "A-113", "qty": 2, "state": "shipped"}, {"sku": "B-7", "qty": 0.5, "state": "open"},
                   {"sku": "C-42", "qty": 12, "state": "returned"}]}),
}


def _llguidance(tok: HavocTokenizer, vocab: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok._with_specials.to_str(), n_vocab=vocab, eos_token=tok.eos_token_id)
    matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(schema))
    compiled = time.perf_counter() - start
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        assert mask[0, token // 32] >> (token % 32) & 1, "llguidance refused the document"
        assert matcher.consume_token(token), matcher.get_error()
        times.append(time.perf_counter() - start)
    return compiled, times


def _xgrammar(tok: HavocTokenizer, vocab: int, schema: dict, ids: list[int]) -> tuple[float, list[float]]:
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok._with_specials, eos_token="<|eos|>")
    start = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    compiled_grammar = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    matcher = xgrammar.GrammarMatcher(compiled_grammar)
    compiled = time.perf_counter() - start
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    times = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        assert mask[0, token // 32] >> (token % 32) & 1, "xgrammar refused the document"
        assert matcher.accept_token(token)
        times.append(time.perf_counter() - start)
    return compiled, times


# Bounded strings: a random-weight model would otherwise write one string for its whole budget.
DECODE_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["items"], "properties": {
    "items": {"type": "array", "minItems": 40, "items": {
        "type": "object", "additionalProperties": False, "required": ["sku", "qty", "state"], "properties": {
            "sku": {"type": "string", "maxLength": 6}, "qty": {"type": "integer", "minimum": 0, "maximum": 99},
            "state": {"enum": ["open", "shipped", "returned"]}}}}}}
DECODE_TOKENS = 96  # per row: the schema's 40 items are far longer, so every run decodes exactly this many


def _decode_speed(tok: HavocTokenizer, repeats: int) -> None:
    torch.manual_seed(0)
    model = HavocModel(dataclasses.replace(HavocConfig.havoc_small(), vocab_size=tok.vocab_size)).eval()
    engine = Engine(model, tok, slots=8, compile=True)
    engine.warm_up()
    prompt = tok.encode("Orders as JSON:")
    print(f"\nEngine decode, small preset with this vocabulary (random weights, compiled), {DECODE_TOKENS} tokens per row, "
          f"median of {repeats}")
    print("| rows | unconstrained tok/s | JSON schema tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    constraint = grammar("json_schema", DECODE_SCHEMA)
    for rows in (1, 8):
        runs: dict[str, list[float]] = {"free": [], "schema": []}
        for _ in range(repeats):  # interleaved, so that both sides see the same machine load
            for name, constrained in (("free", None), ("schema", constraint)):
                params = SamplingParams(max_tokens=DECODE_TOKENS, temperature=1.0, seed=0, ignore_eos=True,
                                        grammar=constrained)
                start = time.perf_counter()
                outputs = engine.complete([prompt], params, n=rows)
                elapsed = time.perf_counter() - start
                assert all(len(c.tokens) == DECODE_TOKENS for c in outputs)
                runs[name].append(rows * DECODE_TOKENS / elapsed)
        speeds = {name: statistics.median(values) for name, values in runs.items()}
        print(f"| {rows} | {speeds['free']:.0f} | {speeds['schema']:.0f} | {speeds['schema'] / speeds['free']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="runs/quickstart/tokenizer", help="a HAVOC tokenizer folder")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tok = HavocTokenizer.load(args.tokenizer)
    vocab = tok.vocab_size
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; vocabulary {vocab}; {time.strftime('%Y-%m-%d')}")
    print("| schema | tokens | library | compile ms | per-token µs, median | p90 |")
    print("|---|---:|---|---:|---:|---:|")
    libraries = [("llguidance", _llguidance)]
    if importlib.util.find_spec("xgrammar") is not None:
        libraries.append(("xgrammar", _xgrammar))
    for name, (schema, document) in SCHEMAS.items():
        # Compact separators: both libraries are set to generate JSON without free whitespace.
        ids = tok.encode(json.dumps(document, separators=(", ", ": ")))
        for library, run in libraries:
            compiled, times = run(tok, vocab, schema, ids)
            times = sorted(times[1:])  # the first mask pays for lazy set-up in both
            print(f"| {name} | {len(ids)} | {library} | {compiled * 1e3:.1f} | {statistics.median(times) * 1e6:.0f} | "
                  f"{times[int(0.9 * len(times))] * 1e6:.0f} |")
    _decode_speed(tok, args.repeats)


if __name__ == "__main__":
    main()
