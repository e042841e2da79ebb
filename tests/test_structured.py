"""Structured output: a random-weight model (which never writes JSON by itself) gives valid outputs
under every constraint, checked by jsonschema and Python's re; unconstrained neighbours are untouched."""

import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams
from havoc_inference.structured import InvalidConstraint, grammar

SCHEMAS = {
    "required fields, bounded integer": {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "nested object, enum array, bounded number": {
        "type": "object", "additionalProperties": False, "required": ["tags", "score", "inner"],
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
            "inner": {"type": "object", "additionalProperties": False, "required": ["ok"],
                      "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 8}}}}},
    "array of objects": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "additionalProperties": False, "required": ["id", "state"],
                  "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                 "state": {"enum": ["open", "closed", 7, None]}}}},
}


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=512)
    return Engine(HavocModel(config).eval(), tokenizer, slots=16, max_queue=128)


def _sampled(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, **kw)


@pytest.mark.parametrize("name", SCHEMAS)
def test_100_seeds_give_valid_json(engine, tokenizer, name):
    schema = SCHEMAS[name]
    outputs = engine.complete([tokenizer.encode("Answer:")], _sampled(400, seed=100, grammar=grammar("json_schema", schema)),
                              n=100)
    assert {c.finish_reason for c in outputs} == {"stop"}
    for c in outputs:
        jsonschema.validate(json.loads(c.text), schema)
    assert len({c.text for c in outputs}) > 50  # real draws, not one forced answer


def test_the_model_alone_writes_no_json(engine, tokenizer):
    outputs = engine.complete([tokenizer.encode("Answer:")], _sampled(30, seed=100), n=20)

    def parses(text):
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    assert not any(parses(c.text) for c in outputs)


def test_any_json_object(engine, tokenizer):
    outputs = engine.complete([tokenizer.encode("{")], _sampled(300, seed=5, grammar=grammar("json_object")), n=32)
    finished = [c for c in outputs if c.finish_reason == "stop"]
    assert len(finished) >= 16  # free-form objects may nest past the budget: those end with "length"
    assert all(isinstance(json.loads(c.text), dict) for c in finished)


def test_regex_and_choice(engine, tokenizer):
    pattern = r"[a-z]{3}-[0-9]{2,4}"
    outputs = engine.complete([[5]], _sampled(40, seed=1, grammar=grammar("regex", pattern)), n=32)
    assert all(c.finish_reason == "stop" and re.fullmatch(pattern, c.text) for c in outputs)
    choices = ["yes", "no", "maybe so", "a|b (c).*"]  # regex characters are taken literally
    outputs = engine.complete([[5]], _sampled(40, seed=1, grammar=grammar("choice", choices)), n=64)
    assert {c.text for c in outputs} == set(choices)


def test_lark_grammar(engine):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    outputs = engine.complete([[5]], _sampled(60, seed=2, grammar=grammar("grammar", lark)), n=16)
    assert all(re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", c.text) for c in outputs if c.finish_reason == "stop")
    assert sum(c.finish_reason == "stop" for c in outputs) >= 8


def test_max_tokens_cuts_with_finish_reason_length(engine, tokenizer):
    schema = SCHEMAS["nested object, enum array, bounded number"]
    outputs = engine.complete([[5]], _sampled(6, seed=3, grammar=grammar("json_schema", schema)), n=8)
    for c in outputs:
        assert c.finish_reason == "length" and len(c.tokens) == 6 and c.text.startswith('{"tags"')
        with pytest.raises(json.JSONDecodeError):
            json.loads(c.text)


def test_a_complete_grammar_stops_even_with_ignore_eos(engine):
    outputs = engine.complete([[5]], _sampled(40, seed=4, ignore_eos=True, grammar=grammar("choice", ["alpha", "beta"])),
                              n=8)
    assert all(c.finish_reason == "stop" and c.text in ("alpha", "beta") for c in outputs)


def test_a_chat_stop_token_ends_a_complete_grammar(engine, tokenizer):
    end = tokenizer.end_token_id
    # After each "ab" the grammar may end or go on: the row then chooses among eos, <|end|> and "ab".
    outputs = engine.complete([[5]], _sampled(40, seed=6, stop_token_ids=[end], grammar=grammar("regex", "(ab)+")), n=16)
    assert all(c.finish_reason == "stop" and re.fullmatch("(ab)+", c.text) for c in outputs)
    assert any(c.tokens[-1] == end for c in outputs)  # <|end|> is allowed where eos is


def test_unconstrained_rows_are_untouched_by_constrained_neighbours(engine, tokenizer):
    prompts = [tokenizer.encode(f"def f_{i}(x):") for i in range(3)]
    free = [_sampled(30, seed=40 + i, ignore_eos=True) for i in range(3)]
    alone = [engine.complete([p], params)[0].tokens for p, params in zip(prompts, free)]
    constrained = _sampled(60, seed=9, grammar=grammar("json_schema", SCHEMAS["array of objects"]))
    sequences = []
    for p, params in zip(prompts, free):  # interleaved: constrained rows sit between the free ones
        sequences += engine.submit([tokenizer.encode("[")], constrained, n=2)
        sequences += engine.submit([p], params)
    while any(s.finish_reason is None for s in sequences):
        engine.step()
    results = [engine._collect(s) for s in sequences]
    assert [r.tokens for r in results[2::3]] == alone
    for r in results[0::3] + results[1::3]:
        if r.finish_reason == "stop":
            jsonschema.validate(json.loads(r.text), SCHEMAS["array of objects"])


def test_preempted_constrained_sequences_keep_their_output(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=512)
    model = HavocModel(config).eval()
    params = _sampled(120, seed=11, grammar=grammar("json_schema", SCHEMAS["nested object, enum array, bounded number"]))
    prompt = tokenizer.encode("x = " * 20)
    roomy = Engine(model, tokenizer, slots=4).complete([prompt], params, n=4)
    tight = Engine(model, tokenizer, slots=4, kv_cache_tokens=256)  # four sequences cannot all fit
    outputs = tight.complete([prompt], params, n=4)
    assert tight.preemptions > 0
    assert [c.text for c in outputs] == [c.text for c in roomy]


@pytest.mark.parametrize("kind, value, fragment", [
    ("json_schema", {"type": "objectx"}, "objectx"),
    ("json_schema", {"properties": {"a": {"type": "string", "pattern": "("}}}, "unclosed group"),
    ("json_schema", {"$ref": "#/definitions/missing"}, "/definitions/missing"),
    ("json_schema", '{"type": ', "not valid JSON"),
    ("json_schema", ["a list"], "object or a boolean"),
    ("regex", "[a-z", "unclosed"),
    ("choice", [], "non-empty list"),
    ("grammar", "start: missing_rule", "missing_rule"),
])
def test_invalid_constraints_say_what_is_wrong(engine, kind, value, fragment):
    with pytest.raises(InvalidConstraint, match=re.escape(fragment)):
        engine.submit([[5]], SamplingParams(grammar=grammar(kind, value)))


def test_strict_schemas_refuse_what_cannot_be_enforced_and_lenient_ones_ignore_it(engine):
    schema = {"type": "string", "format": "no-such-format"}
    with pytest.raises(InvalidConstraint, match="no-such-format"):
        engine.submit([[5]], SamplingParams(grammar=grammar("json_schema", schema)))
    outputs = engine.complete([[5]], _sampled(40, seed=1, grammar=grammar("json_schema", schema, lenient=True)), n=4)
    assert all(isinstance(json.loads(c.text), str) for c in outputs if c.finish_reason == "stop")
