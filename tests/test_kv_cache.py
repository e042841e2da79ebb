"""The paged KV cache: block bookkeeping, prefix caching and preemption leave every output as it
would be with all the memory in the world and no cache at all."""

import dataclasses

import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import BLOCK_SIZE, ContextTooLong, Engine
from havoc_inference.kv_cache import BlockPool, block_name
from havoc_inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=256)
    return HavocModel(config).eval()


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)


def _run(engine, prompts, params):
    sequences = [engine.submit([p], params)[0] for p in prompts]
    return [c.tokens for c in engine.collect(sequences)]


def test_the_pool_reuses_named_blocks_and_evicts_the_least_recently_released():
    pool = BlockPool(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a = [pool.allocate(), pool.allocate()]
    names = [block_name(b"", tokens[:2])]
    names.append(block_name(names[0], tokens[2:4]))
    for block, name in zip(a, names):
        pool.name(block, name)
    assert pool.lookup(tokens, most=2) == (a, names)  # held twice now
    assert pool.lookup([1, 2, 9, 9], most=2) == ([a[0]], names[:1])  # the longest equal prefix only
    assert pool.lookup([9, 2, 3, 4], most=2) == ([], [])  # a name covers everything before it
    pool.release(a)
    pool.release(a)
    pool.release([a[0]])
    assert pool.available == 4 and pool.users == [0] * 4
    b = [pool.allocate(), pool.allocate()]  # the two blocks never named come first
    assert set(b).isdisjoint(a)
    # Then the least recently released named one: a's tail went last-first, so a[1] before a[0]
    # (released again later, by the one-block lookup).
    assert pool.allocate() == a[1] and pool.lookup(tokens, most=2) == ([a[0]], names[:1])
    assert pool.available == 0
    pool.release(b)
    pool.name(b[0], names[0])  # the same prefix computed twice: the first block keeps the name
    assert pool.block_of[names[0]] == a[0] and b[0] not in pool.name_of


def test_without_prefix_caching_nothing_is_named_or_found():
    pool = BlockPool(num_blocks=2, block_size=2, prefix_caching=False)
    block = pool.allocate()
    pool.name(block, block_name(b"", [1, 2]))
    assert pool.lookup([1, 2, 3], most=1) == ([], []) and not pool.name_of


def test_preempted_sequences_finish_with_the_outputs_of_an_unconstrained_run(model, tokenizer):
    prompts = [tokenizer.encode(f"def function_{i}(x, y):\n    return x * {i} + y") for i in range(6)]
    for params in (GREEDY, SEEDED):
        free = _run(Engine(model, tokenizer, slots=6), prompts, params)
        # 6 sequences of ~60 positions (4 blocks each) in 9 blocks: most must wait or be preempted.
        tight = Engine(model, tokenizer, slots=6, kv_cache_tokens=9 * BLOCK_SIZE, step_tokens=32)
        assert _run(tight, prompts, params) == free
        assert tight.preemptions > 0
        assert tight.pool.available == tight.pool.num_blocks  # everything given back


def test_prompt_logprobs_survive_preemption_and_bypass_the_prefix_cache(model, tokenizer):
    prompt = tokenizer.encode("import os\nimport sys\n" * 3)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, logprobs=1, echo=True)
    alone = Engine(model, tokenizer, slots=1).generate(prompt, params)[0]
    tight = Engine(model, tokenizer, slots=3, kv_cache_tokens=6 * BLOCK_SIZE, step_tokens=16)
    runs = tight.collect([tight.submit([prompt], params)[0] for _ in range(3)])
    assert tight.preemptions > 0 and tight.prefix_hits == 0
    for run in runs:
        assert run.tokens == alone.tokens
        assert len(run.prompt_logprobs) == len(prompt)
        torch.testing.assert_close(torch.tensor([e.logprob for e in run.prompt_logprobs[1:]]),
                                   torch.tensor([e.logprob for e in alone.prompt_logprobs[1:]]), atol=1e-4, rtol=0)


def test_a_shared_prefix_is_computed_once_and_changes_no_output(model, tokenizer):
    system = tokenizer.encode("You are a careful Python programmer. Answer with code only.\n" * 3)
    prompts = [system + tokenizer.encode(f"Question {i}: write a function that adds {i}.") for i in range(4)]
    for params in (GREEDY, SEEDED):
        cold = Engine(model, tokenizer, slots=2, prefix_caching=False)
        expected = [_run(cold, [p], params)[0] for p in prompts]  # one at a time, as warm runs them
        warm = Engine(model, tokenizer, slots=2)
        assert [_run(warm, [p], params)[0] for p in prompts] == expected
        shared = len(system) // BLOCK_SIZE * BLOCK_SIZE
        assert warm.prefix_hits >= 3 * shared and cold.prefix_hits == 0
        assert warm.prefill_tokens <= cold.prefill_tokens - 3 * shared


def test_a_chat_turn_reuses_the_conversation_so_far(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1)
    first = tokenizer.encode("user: write a stack class\nassistant:")
    reply, = _run(engine, [first], GREEDY)
    second = first + reply + tokenizer.encode("\nuser: now add a pop method\nassistant:")
    before = engine.prefix_hits
    answer, = _run(engine, [second], GREEDY)
    # Blocks filled while decoding the reply are named too: all full blocks before the new turn are found.
    assert engine.prefix_hits - before == (len(first) + len(reply) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert answer == _run(Engine(model, tokenizer, slots=1, prefix_caching=False), [second], GREEDY)[0]


def test_a_prompt_cached_whole_still_computes_its_last_position(model, tokenizer):
    prompt = tokenizer.encode("for i in range(10):\n    print(i)\n" * 4)[: 3 * BLOCK_SIZE + 1]
    engine = Engine(model, tokenizer, slots=1)
    first, = _run(engine, [prompt], GREEDY)
    computed = engine.prefill_tokens
    again, = _run(engine, [prompt], GREEDY)
    assert again == first and engine.prefill_tokens == computed  # only the last id, through the decode step
    assert engine.prefix_hits == 3 * BLOCK_SIZE


def test_unused_prefixes_are_evicted_least_recent_first_and_held_ones_never(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1, kv_cache_tokens=8 * BLOCK_SIZE)
    prompts = [tokenizer.encode(f"# file number {i}\n" + "x = 1\n" * 12)[: 2 * BLOCK_SIZE + 1] for i in range(5)]
    params = dataclasses.replace(GREEDY, max_tokens=8)
    outputs = [_run(engine, [p], params)[0] for p in prompts]  # 3 blocks each, 8 in the pool
    hits = engine.prefix_hits
    assert _run(engine, [prompts[4]], params)[0] == outputs[4]  # the most recent is still there
    assert engine.prefix_hits - hits == 2 * BLOCK_SIZE
    hits = engine.prefix_hits
    assert _run(engine, [prompts[0]], params)[0] == outputs[0]  # the oldest was evicted
    assert engine.prefix_hits == hits


def test_a_request_longer_than_the_whole_pool_is_refused_naming_both_numbers(model, tokenizer):
    engine = Engine(model, tokenizer, slots=2, kv_cache_tokens=4 * BLOCK_SIZE)
    with pytest.raises(ContextTooLong, match=r"\(50 tokens\) \+ max_tokens \(20\) = 70 exceeds the whole KV cache "
                                             r"of 64 tokens"):
        engine.submit([[5] * 50], SamplingParams(max_tokens=20))
    assert not engine.waiting
    with pytest.raises(ValueError, match="at least one block"):
        Engine(model, tokenizer, kv_cache_tokens=8)


def test_decode_reads_only_the_live_blocks(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, slots=2)
    widths = []
    real = engine.decode_step
    monkeypatch.setattr(engine, "decode_step", lambda tokens, positions, tables: widths.append(tables.shape[1])
                        or real(tokens, positions, tables))
    engine.generate(tokenizer.encode("x = 1"), dataclasses.replace(GREEDY, max_tokens=70))
    # A table as wide as the power of two of blocks in use (at least 2), never the whole context's 16.
    assert engine.max_blocks == 16 and sorted(set(widths)) == [2, 4, 8]
