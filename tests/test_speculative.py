"""Speculative decoding: greedy output is plain decoding's, token for token, with either proposer;
sampled output keeps the target's distribution (chi-square tests); batching, preemption and
prefix caching leave outputs unchanged."""

import dataclasses
import json

import jsonschema
import pytest
import torch
from scipy.stats import chisquare

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams
from havoc_inference.speculative import PromptLookup, accept
from havoc_inference.structured import grammar


@pytest.fixture(scope="module")
def config(tokenizer):
    # A wider initialisation than training's: a random model with opinions, whose greedy output varies.
    return dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=512,
                               initializer_range=0.2)


@pytest.fixture(scope="module")
def target(config):
    torch.manual_seed(0)
    return HavocModel(config).eval()


@pytest.fixture(scope="module")
def near_draft(config, target):
    """The target with noise on its weights: it agrees with the target often, not always."""
    draft = HavocModel(config).eval()
    draft.load_state_dict(target.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in draft.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.3 * weight.std())
    return draft


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.encode("def area(r):\n    return 3.14 * r * r\n\ndef area(r):\n"),
            tokenizer.encode("import os\n"), tokenizer.encode("x = [1, 2, 3]\ny = [1, 2,")]


def _greedy(n):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup()
    assert lookup.propose([1, 2, 3], 4) == []  # the suffix itself is no match
    ids = [5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 6, 1, 2, 3]
    assert PromptLookup().propose(ids, 2) == [7, 8]  # "1 2 3" occurs twice before the end: the later one wins
    assert PromptLookup().propose([*ids, 7, 4], 3) == []  # no earlier "3 7 4", "7 4" or "4"
    assert PromptLookup().propose([*ids, 9], 3) == [1, 2, 3]  # "2 3 9" occurred near the start
    lookup = PromptLookup()
    assert lookup.propose([4, 6, 4], 3) == [6, 4, 6]  # the 1-gram "4" matches; the guess goes on with the pattern
    assert PromptLookup().propose([8, 8, 8], 4) == [8, 8, 8, 8]


def test_prompt_lookup_index_grows_with_the_sequence():
    lookup, ids = PromptLookup(), [3, 1, 4, 1, 5]
    assert lookup.propose(ids, 2) == []
    ids += [9, 2, 6, 3, 1]
    assert lookup.propose(ids, 3) == [4, 1, 5]  # "3 1", indexed by the first call, beats the later "1"


@pytest.mark.parametrize("proposer", ["prompt lookup", "near draft", "target as draft", "compiled prompt lookup"])
def test_greedy_output_is_plain_decoding_token_for_token(tokenizer, target, near_draft, prompts, proposer):
    plain = Engine(target, tokenizer, slots=4).complete(prompts, _greedy(48))
    options = {"prompt lookup": {}, "compiled prompt lookup": {"compile": True}, "near draft": {"draft": near_draft},
               "target as draft": {"draft": target}}[proposer]
    engine = Engine(target, tokenizer, slots=4, speculate=4, **options)
    spec = engine.complete(prompts, _greedy(48))  # three rows at once, accepting different counts
    assert [c.tokens for c in spec] == [c.tokens for c in plain]
    assert [c.text for c in spec] == [c.text for c in plain]
    assert all(c.finish_reason == "length" and len(c.tokens) == 48 for c in spec)
    assert engine.draft_tokens > 0
    if proposer == "target as draft":
        assert engine.accepted_tokens == engine.draft_tokens
    if proposer == "near draft":
        assert 0 < engine.accepted_tokens < engine.draft_tokens


def test_prompt_lookup_turns_a_repetitive_output_into_few_steps(tokenizer, config):
    # At training's initialisation a random model's greedy output repeats itself: lookup finds it.
    torch.manual_seed(0)
    model = HavocModel(dataclasses.replace(config, initializer_range=0.02)).eval()
    prompt = tokenizer.encode("for x in")
    plain, = Engine(model, tokenizer, slots=1).complete([prompt], _greedy(150))
    engine = Engine(model, tokenizer, slots=1, speculate=6)
    sequence, = engine.submit([prompt], _greedy(150))
    steps = 0
    while sequence.finish_reason is None:
        engine.step()
        steps += 1
    assert engine._collect(sequence).tokens == plain.tokens
    assert engine.accepted_tokens > 120 and steps < 30  # up to 7 tokens a step


def test_rows_accepting_different_counts_beside_plain_rows_and_preemption(tokenizer, target, near_draft, prompts):
    params = [_greedy(60), SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[5]), _greedy(25)]
    alone = [Engine(target, tokenizer, slots=1).complete([p], q)[0].tokens for p, q in zip(prompts, params)]
    # A pool too small for all three: the newest is preempted and recomputed, rejected guesses rolled back.
    engine = Engine(target, tokenizer, slots=3, speculate=5, draft=near_draft, kv_cache_tokens=128, step_tokens=8)
    sequences = [engine.submit([p], q)[0] for p, q in zip(prompts, params)]
    while any(s.finish_reason is None for s in sequences):
        engine.step()
    assert [engine._collect(s).tokens for s in sequences] == alone
    assert engine.preemptions > 0 and 0 < engine.accepted_tokens < engine.draft_tokens


def test_prefix_cache_with_speculation(tokenizer, target, near_draft, prompts):
    shared = tokenizer.encode("# a shared header of more than one block\n" * 3)
    engine = Engine(target, tokenizer, slots=2, speculate=3, draft=near_draft)
    first = engine.complete([shared + prompts[0]], _greedy(30))[0].tokens
    again = engine.complete([shared + prompts[0]], _greedy(30))[0].tokens
    assert engine.prefix_hits > 0 and first == again
    assert first == Engine(target, tokenizer, slots=1).complete([shared + prompts[0]], _greedy(30))[0].tokens


def test_logprobs_of_accepted_tokens_are_the_targets(tokenizer, target):
    prompt = tokenizer.encode("for")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=2)
    spec = Engine(target, tokenizer, slots=1, speculate=4).complete([prompt], params)[0]
    plain = Engine(target, tokenizer, slots=1).complete([prompt], params)[0]
    assert [e.token for e in spec.logprobs] == spec.tokens == plain.tokens
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_stop_strings_and_max_tokens_cut_inside_an_accepted_run(tokenizer, target):
    prompt = tokenizer.encode("for")
    plain = Engine(target, tokenizer, slots=1).complete([prompt], _greedy(150))[0]
    stop = plain.text[60:64]
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True, stop=[stop])
    spec = Engine(target, tokenizer, slots=1, speculate=6).complete([prompt], params)[0]
    assert spec.finish_reason == "stop" and spec.text == plain.text[: plain.text.index(stop)]
    for n in (1, 2, 7, 33):
        cut = Engine(target, tokenizer, slots=1, speculate=6).complete([prompt], _greedy(n))[0]
        assert cut.tokens == plain.tokens[:n] and cut.finish_reason == "length"


def test_constrained_rows_do_not_guess_and_stay_valid(tokenizer, target):
    schema = {"type": "object", "required": ["n"], "additionalProperties": False,
              "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}}
    engine = Engine(target, tokenizer, slots=4, speculate=4)
    free = engine.submit([tokenizer.encode("for")], _greedy(40))
    bound = engine.submit([[5]], SamplingParams(max_tokens=30, temperature=1.0, seed=2, grammar=grammar("json_schema", schema)), n=3)
    while any(s.finish_reason is None for s in free + bound):
        engine.step()
    assert engine._collect(free[0]).tokens == Engine(target, tokenizer, slots=1).complete([tokenizer.encode("for")], _greedy(40))[0].tokens
    for seq in bound:
        jsonschema.validate(json.loads(engine._collect(seq).text), schema)


def test_bad_options(tokenizer, target, config):
    with pytest.raises(ValueError, match="speculate must be between 0 and 15"):
        Engine(target, tokenizer, speculate=16)
    with pytest.raises(ValueError, match="needs speculate K > 0"):
        Engine(target, tokenizer, draft=target)
    other = HavocModel(dataclasses.replace(config, vocab_size=config.vocab_size + 8))
    with pytest.raises(ValueError, match="same tokenizer"):
        Engine(target, tokenizer, speculate=2, draft=other)
    short = HavocModel(dataclasses.replace(config, max_seq_len=64))
    with pytest.raises(ValueError, match=r"max_seq_len \(64\) is shorter than the context \(512\)"):
        Engine(target, tokenizer, speculate=2, draft=short)


# The rejection rule on its own: many rows of one step, a 6-token vocabulary.
VOCAB, ROWS = 6, 40_000


def _first_two(target_probs, draft_probs, k):
    """The first and second tokens each row emits, for target distributions p (the same at every
    position) and guesses drawn from q (or fixed guesses, one-hot q, if draft_probs is 1-D ints)."""
    generator = torch.Generator().manual_seed(0)
    logits = target_probs.log().expand(ROWS, k + 1, VOCAB)
    if draft_probs.dtype == torch.long:  # prompt lookup: the same guesses every row
        drafts, q = draft_probs.expand(ROWS, k), None
    else:
        drafts = torch.multinomial(draft_probs, ROWS * k, replacement=True, generator=generator).view(ROWS, k)
        q = draft_probs.expand(ROWS, k, VOCAB)
    noise = torch.rand((ROWS, k + VOCAB), generator=generator)
    accepted, token = accept(logits, drafts, torch.full((ROWS,), k), torch.zeros(ROWS, dtype=torch.bool), q, noise)
    first = torch.where(accepted > 0, drafts[:, 0], token)
    second = torch.where(accepted > 1, drafts[:, min(1, k - 1)], token)  # the output's second token, where it has one
    return first, second[accepted >= 1]


def _fits(tokens, probs):
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    return chisquare(counts.numpy(), (probs.double() / probs.double().sum() * counts.sum()).numpy()).pvalue


@pytest.mark.parametrize("k", [1, 3])
def test_rejection_sampling_keeps_the_target_distribution(k):
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])  # far from p
    first, second = _first_two(p, q, k)
    assert _fits(first, p) > 1e-3
    if k > 1:
        assert _fits(second, p) > 1e-3
    # The test has power: the guesses themselves (q) are rejected outright.
    drafts = torch.multinomial(q, ROWS, replacement=True, generator=torch.Generator().manual_seed(5))
    assert _fits(drafts, p) < 1e-12
    fixed_first, _ = _first_two(p, torch.tensor([2, 0, 5][:k]), k)  # prompt lookup: one-hot q
    assert _fits(fixed_first, p) > 1e-3


def test_sampled_engine_output_follows_the_target_with_a_draft(tokenizer, target, near_draft):
    """The first token of many seeded sequences, drawn with a draft model's guesses, against the
    target's own top-4 distribution."""
    prompt = tokenizer.encode("def")
    params = SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=1000, ignore_eos=True)
    engine = Engine(target, tokenizer, slots=16, speculate=2, draft=near_draft, max_queue=2000)
    firsts = torch.tensor([c.tokens[0] for c in engine.complete([prompt], params, n=1500)])
    assert engine.draft_tokens > 0
    with torch.no_grad():
        logits = target(torch.tensor([prompt])).logits[0, -1]
    top = logits.topk(4)
    probs = top.values.softmax(-1)
    index = {t: i for i, t in enumerate(top.indices.tolist())}
    assert set(firsts.tolist()) <= set(index)
    counts = torch.bincount(torch.tensor([index[t] for t in firsts.tolist()]), minlength=4).double()
    expected = probs.double() / probs.double().sum() * counts.sum()
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_cli_refuses_a_draft_without_speculate(capsys):
    from havoc.cli import main

    assert main(["serve", "some_model", "--draft", "some_draft"]) == 1
    assert "--draft needs --speculate K" in capsys.readouterr().err
