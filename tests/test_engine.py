"""Inference engine: static cache and batching give the model's own outputs; sampling options behave."""

import dataclasses
import threading

import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import ContextTooLong, Draining, Engine, QueueFull
from havoc_inference.sampling import InvalidParameter, SamplingParams, process


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=192)
    return HavocModel(config).eval()


def _greedy(n, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_equals_model_generate(model, tokenizer, compile):
    prompts = [tokenizer.encode("def f(x):\n    return"), tokenizer.encode("import os, sys\n" * 5)]
    engine = Engine(model, tokenizer, slots=2, step_tokens=7, compile=compile)
    for prompt in prompts:
        expected = model.generate([prompt], max_new_tokens=64, eos_token_id=None)[0, len(prompt):].tolist()
        completion, = engine.generate(prompt, _greedy(64))
        assert completion.tokens == expected and completion.finish_reason == "length"
        assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_concurrent_sequences_do_not_disturb_each_other(model, tokenizer):
    prompts = [tokenizer.encode(f"value_{i} = {i} * x") for i in range(6)]
    alone = [Engine(model, tokenizer, slots=1).generate(p, _greedy(20))[0].tokens for p in prompts]
    engine = Engine(model, tokenizer, slots=4, step_tokens=3)  # 6 requests, 4 slots: some wait, all interleave
    sequences = [engine.submit([p], _greedy(20))[0] for p in prompts]
    while any(s.finish_reason is None for s in sequences):
        engine.step()
    assert [engine._collect(s).tokens for s in sequences] == alone


def test_same_seed_same_output_also_under_concurrency(model, tokenizer):
    prompt = tokenizer.encode("class Stack:")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = Engine(model, tokenizer, slots=1).generate(prompt, params)[0].tokens
    engine = Engine(model, tokenizer, slots=6)
    engine.start()
    try:
        for i in range(4):  # other sampled requests running beside the seeded ones
            engine.submit([tokenizer.encode(f"noise {i}")], SamplingParams(max_tokens=30, temperature=1.0))
        results = [None] * 3

        def run(i):
            results[i] = engine.generate(prompt, params)[0].tokens

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert results == [alone] * 3
    other = Engine(model, tokenizer, slots=1).generate(prompt, dataclasses.replace(params, seed=99))[0].tokens
    assert other != alone


def test_n_choices_are_independent_draws(model, tokenizer):
    choices = Engine(model, tokenizer, slots=4).generate(
        tokenizer.encode("x ="), SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True), n=3)
    assert len(choices) == 3 and len({tuple(c.tokens) for c in choices}) > 1


def test_stop_string_across_token_boundaries(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1)
    prompt = tokenizer.encode("def f(x):")
    free = engine.generate(prompt, _greedy(40))[0].text
    # A stop string made of the end of one token's text and the start of the next.
    boundary = None
    texts = [tokenizer.decode([t]) for t in engine.generate(prompt, _greedy(40))[0].tokens]
    for a, b in zip(texts, texts[1:]):
        if a and b:
            boundary = a[-1] + b[0]
            break
    assert boundary is not None
    stopped = engine.generate(prompt, _greedy(40, stop=[boundary]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == free[: free.find(boundary)]


def test_stop_token_ids_and_eos(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1)
    prompt = tokenizer.encode("for i in")
    free = engine.generate(prompt, _greedy(20))[0]
    stop_id = free.tokens[5]
    stopped = engine.generate(prompt, _greedy(20, stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop" and stopped.tokens[:-1] == free.tokens[: free.tokens.index(stop_id)]


def test_logprobs_and_prompt_logprobs(model, tokenizer):
    prompt = tokenizer.encode("def add(a, b):")
    completion, = Engine(model, tokenizer, slots=1).generate(prompt, _greedy(5, logprobs=3, echo=True))
    full = prompt + completion.tokens
    with torch.no_grad():
        log_probs = model(torch.tensor([full[:-1]])).logits[0].log_softmax(-1)
    expected = log_probs.gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    got = [e.logprob for e in completion.prompt_logprobs[1:]] + [e.logprob for e in completion.logprobs]
    assert completion.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-4, rtol=0)
    assert all(len(e.top) == 3 and e.top[0][0] == e.token for e in completion.logprobs)  # greedy = the best


def test_penalties_top_k_and_min_p_apply_to_their_own_row_only():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5]).repeat(5, 1)
    params = [SamplingParams(repetition_penalty=2.0, temperature=0),
              SamplingParams(frequency_penalty=0.5, presence_penalty=1.0, temperature=0),
              SamplingParams(min_p=0.3, temperature=1.0),
              SamplingParams(top_k=2, temperature=0.5),
              SamplingParams(temperature=1.0)]
    histories = [({0}, {2: 1}), (set(), {0: 2}), (set(), {}), ({1}, {1: 3}), (set(), {})]
    out = process(logits.clone(), params, histories)
    assert out[0].tolist() == [1.0, 1.0, -2.0, 0.5]
    assert out[1].tolist() == [2.0 - 2 * 0.5 - 1.0, 1.0, -1.0, 0.5]
    probs = logits[2].softmax(-1)
    assert torch.isinf(out[2][probs < 0.3 * probs.max()]).all() and torch.equal(out[2][probs >= 0.3 * probs.max()],
                                                                              logits[2][probs >= 0.3 * probs.max()])
    assert out[3].tolist() == [4.0, 2.0, float("-inf"), float("-inf")]
    assert torch.equal(out[4], logits[4])


def test_bad_requests(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1, context=64)
    with pytest.raises(ContextTooLong, match=r"prompt \(10 tokens\) \+ max_tokens \(60\) = 70 exceeds the context of 64"):
        engine.submit([[7] * 10], SamplingParams(max_tokens=60))
    with pytest.raises(ValueError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        engine.submit([[5, 1000]], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.submit([[]], SamplingParams())
    for field, value in (("temperature", 3.0), ("max_tokens", 0), ("top_p", 0.0), ("logprobs", 50)):
        with pytest.raises(InvalidParameter, match=field):
            SamplingParams(**{field: value})


def test_cancel_frees_the_slot(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1)
    seq, = engine.submit([tokenizer.encode("x")], _greedy(100))
    engine.step()
    engine.step()
    assert engine.running
    engine.cancel([seq])
    engine.step()
    assert not engine.running and seq.finish_reason == "cancelled"


def _run(engine, sequences):
    while any(s.finish_reason is None for s in sequences):
        engine.step()
    return [engine._collect(s) for s in sequences]


@pytest.mark.parametrize("extreme", [{"temperature": 1e-40}, {"temperature": 1e-6},
                                     {"temperature": 1.0, "repetition_penalty": 1e-40},
                                     {"temperature": 2.0, "repetition_penalty": 1e-40, "top_p": 0.5}])
def test_every_accepted_sampling_value_samples_finitely(model, tokenizer, extreme):
    engine = Engine(model, tokenizer, slots=2)
    prompt = tokenizer.encode("x = 1")
    innocent, = engine.submit([prompt], SamplingParams(max_tokens=20, temperature=1.0, seed=5, ignore_eos=True))
    odd, = engine.submit([prompt], SamplingParams(max_tokens=20, seed=1, ignore_eos=True, **extreme))
    a, b = _run(engine, [innocent, odd])
    assert a.finish_reason == b.finish_reason == "length" and len(b.tokens) == 20
    alone = Engine(model, tokenizer, slots=1).generate(prompt, innocent.params)[0]
    assert a.tokens == alone.tokens
    if extreme["temperature"] < 1e-5:  # below the bound sampling is greedy
        assert b.tokens == Engine(model, tokenizer, slots=1).generate(prompt, _greedy(20))[0].tokens


def test_a_failure_ends_only_the_request_that_caused_it(model, tokenizer, monkeypatch):
    import havoc_inference.engine as engine_module

    engine = Engine(model, tokenizer, slots=4)
    innocent, = engine.submit([tokenizer.encode("a = 1")], _greedy(12))
    guilty = engine.submit([tokenizer.encode("b = 2")], _greedy(12, seed=3), n=2)  # n=2: both must end
    real = engine_module.choose

    def choose(logits, params, generators):
        if any(p.seed == 3 for p in params):
            raise RuntimeError("simulated sampling failure")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_module, "choose", choose)
    results = _run(engine, [innocent, *guilty])
    assert [r.finish_reason for r in results] == ["length", "error", "error"]
    assert results[0].tokens == Engine(model, tokenizer, slots=1).generate(tokenizer.encode("a = 1"),
                                                                           _greedy(12))[0].tokens


def test_the_waiting_queue_is_bounded(model, tokenizer):
    engine = Engine(model, tokenizer, slots=1, max_queue=3)
    engine.submit([[5], [6]], _greedy(4))
    with pytest.raises(QueueFull, match="2 sequences are waiting .*bound is 3"):
        engine.submit([[7]], _greedy(4), n=2)
    assert len(engine.waiting) == 2  # a refused request leaves nothing behind
    engine.submit([[7]], _greedy(4))


def test_drain_refuses_new_work_and_aborts_what_outlives_the_timeout(model, tokenizer):
    import time

    engine = Engine(model, tokenizer, slots=1)
    quick, = engine.submit([tokenizer.encode("a")], _greedy(3))
    slow, = engine.submit([tokenizer.encode("b")], _greedy(150))
    while quick.finish_reason is None:
        engine.step()
    engine.step()
    engine.drain(timeout=0.2)
    with pytest.raises(Draining):
        engine.submit([[5]], _greedy(2))
    time.sleep(0.5)  # no step meanwhile: the slow sequence outlives the timeout
    engine.step()
    assert engine._collect(quick).finish_reason == "length"
    ended = engine._collect(slow)
    assert ended.finish_reason == "abort" and 0 < len(ended.tokens) < 150
    assert not engine.running and not engine.waiting


def test_stops_at_any_of_the_configs_eos_ids(model, tokenizer):
    free = Engine(model, tokenizer, slots=1).generate(tokenizer.encode("for"), _greedy(12))[0].tokens
    other = dataclasses.replace(model.config, eos_token_id=[2, free[4]])
    several = HavocModel(other).eval()
    several.load_state_dict(model.state_dict())
    out = Engine(several, tokenizer, slots=1).generate(tokenizer.encode("for"), dataclasses.replace(
        _greedy(12), ignore_eos=False))[0]
    assert out.finish_reason == "stop" and out.tokens == free[: free.index(free[4]) + 1]


def test_text_is_detokenized_incrementally_and_exactly(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, slots=4)
    decoded = []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or real(ids, **kw))
    params = SamplingParams(max_tokens=150, temperature=1.5, ignore_eos=True)
    completions = _run(engine, engine.submit([tokenizer.encode("s = '")], dataclasses.replace(params, seed=11), n=4))
    # Each step decodes a few recent ids, not the whole output (150 tokens x 4 would be ~45k ids).
    assert sum(decoded) < 10 * 150 * 4
    monkeypatch.setattr(tokenizer, "decode", real)
    for c in completions:  # random weights spell broken UTF-8 too: the text is still exactly the tokens'
        assert c.text == tokenizer.decode(c.tokens, skip_special_tokens=True)


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, slots=2)
    engine.start()
    try:
        real = engine._prefill_chunk
        calls = []

        def broken_once(seq, size):
            calls.append(seq)
            if len(calls) == 1:
                raise RuntimeError("simulated kernel failure")
            return real(seq, size)

        monkeypatch.setattr(engine, "_prefill_chunk", broken_once)
        failed, = engine.submit([tokenizer.encode("x = 1 + 2")], _greedy(5))  # a prompt to prefill
        event = failed.events.get(timeout=30)
        assert event.finish_reason == "error" and "simulated kernel failure" in event.error
        assert not engine.running
        ok, = engine.generate(tokenizer.encode("y"), _greedy(5))  # the loop is still alive
        assert ok.finish_reason == "length" and len(ok.tokens) == 5
    finally:
        engine.stop()


def test_long_prompts_are_prefilled_in_chunks_without_stalling_running_streams(model, tokenizer):
    engine = Engine(model, tokenizer, slots=2, step_tokens=8)
    running, = engine.submit([tokenizer.encode("x =")], _greedy(60))
    engine.step()
    engine.step()
    long_prompt = tokenizer.encode("def f(a, b):\n    return a + b\n" * 12)[:120]
    late, = engine.submit([long_prompt], _greedy(5))
    for step in range(len(long_prompt) // 7):
        before = len(running.output_ids)
        engine.step()
        assert len(running.output_ids) == before + 1  # a token every step while the prompt streams in
        # 8 positions a step: 1 for the running stream, 7 for the prompt but its last id, which goes
        # through the decode step (in the step that finishes the rest).
        prefilled = min(7 * (step + 1), len(long_prompt) - 1)
        assert late.computed == prefilled + (prefilled == len(long_prompt) - 1)
    assert late.output_ids
    # The pool holds slots x context positions by default, in blocks of 16, plus the spare block.
    assert engine.caches[0][0].shape == (2 * engine.context // 16 + 1, 16, model.config.attention.num_kv_heads,
                                         model.config.head_dim)


def test_several_compiled_engines_in_one_process(tokenizer):
    """Each engine compiles a graph per batch size into the one code object of its step, which dynamo
    caps at 8 graphs by default: three 4-slot engines (3 sizes each) are 9."""
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size)
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        engine = Engine(HavocModel(config).to(dtype).eval(), tokenizer, slots=4, context=32, compile=True)
        engine.warm_up()
        done = engine.complete([[5, 6]] * 4, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert [len(c.tokens) for c in done] == [2] * 4
