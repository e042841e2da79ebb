"""Evaluation: perplexity and bits-per-byte against a hand computation; lm-eval end to end."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_eval.perplexity import perplexity
from havoc_eval.scoring import rolling_windows

TASKS = Path(__file__).resolve().parents[1] / "src" / "havoc_eval" / "tasks"
TEXT = "def add(a, b):\n    return a + b  # naïve, ünïcode 漢字\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("eval") / "model"
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=64)
    HavocModel(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return HavocModel.load_pretrained(model_dir)


def test_perplexity_matches_a_hand_computation(model, tokenizer):
    ids = [tokenizer.bos_token_id, *tokenizer.encode(TEXT)]
    assert len(ids) <= 64
    with torch.no_grad():
        log_probs = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    nats = -log_probs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    result = perplexity(model, tokenizer, [TEXT], context=64, stride=32)
    assert result["tokens"] == len(ids) - 1 and result["bytes"] == len(TEXT.encode("utf-8"))
    assert result["nats"] == pytest.approx(nats, rel=1e-6)
    assert result["mean_loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(nats / (len(ids) - 1)), rel=1e-6)
    assert result["bits_per_byte"] == pytest.approx(nats / (math.log(2) * len(TEXT.encode())), rel=1e-6)


@pytest.mark.parametrize("n, context, stride", [(50, 16, 8), (50, 16, 15), (17, 16, 1), (16, 16, 8), (2, 4, 2)])
def test_rolling_windows_score_every_token_once_with_enough_context(n, context, stride):
    tokens = list(range(n))
    scored = []
    for window, n_scored in rolling_windows(tokens, context, stride):
        assert len(window) <= context and 1 <= n_scored <= len(window) - 1
        first_scored = window[-n_scored]  # tokens are their own positions
        assert first_scored - window[0] >= min(context - stride, first_scored)  # context before it
        scored += window[-n_scored:]
    assert scored == tokens[1:]


def test_long_documents_use_sliding_windows(model, tokenizer):
    text = TEXT * 8
    windowed = perplexity(model, tokenizer, [text], context=32, stride=16, batch_size=3)
    assert windowed["tokens"] == len(tokenizer.encode(text))
    assert windowed["bytes"] == len(text.encode())


def test_eval_cli_and_its_errors(model_dir, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "eval", "perplexity", str(model_dir), "--data",
                          str(tmp_path / "a.txt"), "--context", "64", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["bytes"] == len(TEXT.encode())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, message in (("empty.txt", "no text to evaluate"), ("latin1.txt", "latin1.txt is not UTF-8 text")):
        bad = subprocess.run([sys.executable, "-m", "havoc.cli", "eval", "perplexity", str(model_dir), "--data",
                              str(tmp_path / name)], capture_output=True, text=True)
        assert bad.returncode == 1 and message in bad.stderr and "Traceback" not in bad.stderr


def test_checkpoint_and_tokenizer_that_do_not_belong_together(model_dir, tmp_path):
    from havoc_core.pretrained import load_model_and_tokenizer
    from havoc_core.tokenizer import HavocTokenizer

    HavocTokenizer.train([f"text {i}" for i in range(50)], vocab_size=300).save(tmp_path / "tok")
    with pytest.raises(ValueError, match="vocab_size 1000, the tokenizer 2[0-9][0-9]: they do not belong together"):
        load_model_and_tokenizer(model_dir, tmp_path / "tok")


class _Request:  # what lm-eval hands a model: .args
    def __init__(self, *args):
        self.args = args


def test_lm_eval_methods_against_direct_computation(model_dir, model, tokenizer):
    from havoc_eval.lm_eval_model import HavocLM

    lm = HavocLM(pretrained=str(model_dir), batch_size=2)
    context, continuation = "def add(a, b):", " return a + b"
    (log_prob, greedy), = lm.loglikelihood([_Request(context, continuation)])
    ids = [tokenizer.bos_token_id, *tokenizer.encode(context)]
    cont = tokenizer.encode(context + continuation)[len(ids) - 1:]
    with torch.no_grad():
        lp = model(torch.tensor([ids + cont[:-1]])).logits[0].log_softmax(-1)[len(ids) - 1:]
    assert log_prob == pytest.approx(lp.gather(-1, torch.tensor(cont)[:, None]).sum().item(), rel=1e-6)
    assert greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
    rolling, = lm.loglikelihood_rolling([_Request(TEXT * 3)])
    nats = perplexity(model, tokenizer, [TEXT * 3], context=lm.max_length, stride=lm.stride)["nats"]
    assert rolling == pytest.approx(-nats, rel=1e-9)  # the same windows as `havoc eval perplexity`
    out, = lm.generate_until([_Request("def ", {"until": ["\n"], "max_gen_toks": 5})])
    greedy_ids = model.generate([[tokenizer.bos_token_id, *tokenizer.encode("def ")]], max_new_tokens=5)
    assert out == tokenizer.decode(greedy_ids[0, -5:].tolist(), skip_special_tokens=True).split("\n")[0]


def _log_prob(model, context: list[int], target: int) -> float:
    with torch.no_grad():
        return model(torch.tensor([context])).logits[0, -1].log_softmax(-1)[target].item()


def test_lm_eval_empty_and_overlong_continuations(model_dir, model, tokenizer):
    from havoc_eval.lm_eval_model import HavocLM

    lm = HavocLM(pretrained=str(model_dir), batch_size=3, max_length=16, stride=1)
    continuation = " return [x * 2 for x in items if x] + other_items"
    (empty, empty_greedy), (long, _), (short, _) = lm.loglikelihood(
        [_Request("def f", ""), _Request("def f(items):", continuation), _Request("x =", " 1")])
    assert (empty, empty_greedy) == (0.0, True)
    # Each continuation token scored once, with the 15 tokens before it (max_length 16, stride 1).
    context_ids, cont = lm._encode_pair("def f(items):", continuation)
    tokens = context_ids + cont
    assert len(cont) > 16
    expected = sum(_log_prob(model, tokens[max(0, p - 15) : p], tokens[p]) for p in range(len(context_ids), len(tokens)))
    assert long == pytest.approx(expected, rel=1e-5)
    ids, one = lm._encode_pair("x =", " 1")
    assert short == pytest.approx(sum(_log_prob(model, (ids + one)[:p], (ids + one)[p])
                                      for p in range(len(ids), len(ids) + len(one))), rel=1e-5)


def test_lm_eval_generate_until_stops_and_samples(model_dir, model, tokenizer, monkeypatch):
    from havoc_eval.lm_eval_model import HavocLM
    from havoc_inference.engine import Engine

    lm = HavocLM(pretrained=str(model_dir), batch_size=2)
    prompt = "def "
    free, = lm.generate_until([_Request(prompt, {"until": [], "max_gen_toks": 30})])
    stop = free[3:5]
    steps = []
    real = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: steps.append(1) or real(self))
    cut, = lm.generate_until([_Request(prompt, {"until": [stop], "max_gen_toks": 30})])
    assert cut == free[: free.find(stop)] and len(steps) < 15  # it stopped, not ran on to 30 tokens
    greedy = lm.generate_until([_Request(prompt, {"max_gen_toks": 12, "do_sample": False, "temperature": 1.0})] * 2)
    sampled = lm.generate_until([_Request(prompt, {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0})] * 4)
    assert greedy[0] == greedy[1] == free[: len(greedy[0])]
    assert len(set(sampled)) > 1  # requests draw from seeds of their own
    again = HavocLM(pretrained=str(model_dir), batch_size=2).generate_until(
        [_Request(prompt, {"max_gen_toks": 12, "do_sample": True, "temperature": 1.0})] * 4)
    assert again == sampled  # and the same run repeats


def test_scoring_takes_the_log_softmax_in_chunks(model, monkeypatch):
    import havoc_eval.scoring as scoring

    monkeypatch.setattr(scoring, "LOGIT_ROWS", 3)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    sequences = [(list(range(5, 25)), 7), (list(range(30, 40)), 9), (list(range(50, 53)), 0), (list(range(8, 20)), 1)]
    results = scoring.score(model, sequences, batch_size=3)
    assert rows and max(rows) <= 3
    for (tokens, n), (log_prob, greedy, targets) in zip(sequences, results):
        positions = range(len(tokens) - n, len(tokens))
        expected = sum(_log_prob(model, tokens[:p], tokens[p]) for p in positions)
        with torch.no_grad():
            best = [model(torch.tensor([tokens[:p]])).logits[0, -1].argmax().item() for p in positions]
        assert log_prob == pytest.approx(expected, rel=1e-5, abs=1e-9) and targets == tokens[len(tokens) - n :]
        assert greedy == (best == targets)


def test_lm_eval_cli_runs_the_shipped_tasks(model_dir, tmp_path):
    run = subprocess.run(
        ["lm_eval", "--model", "havoc", "--model_args", f"pretrained={model_dir}", "--tasks",
         "havoc_python_mc,havoc_python_gen", "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"),
         "--batch_size", "4"],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1"},
        executable=str(Path(sys.executable).with_name("lm_eval")),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    # The same numbers computed here from the task files and the model's own methods.
    from havoc_eval.lm_eval_model import HavocLM

    lm = HavocLM(pretrained=str(model_dir), batch_size=4)
    docs = [json.loads(line) for line in (TASKS / "havoc_python" / "mc.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        scores = [ll for ll, _ in lm.loglikelihood([_Request(doc["context"], c) for c in doc["choices"]])]
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    assert results["havoc_python_mc"]["acc,none"] == pytest.approx(correct / len(docs))
    docs = [json.loads(line) for line in (TASKS / "havoc_python" / "gen.jsonl").read_text().splitlines()]
    outs = lm.generate_until([_Request(d["prompt"], {"until": ["\n"], "max_gen_toks": 16, "do_sample": False})
                              for d in docs])
    expected = sum(out == d["target"] for out, d in zip(outs, docs)) / len(docs)
    assert results["havoc_python_gen"]["exact_match,none"] == pytest.approx(expected)


def test_lm_eval_unknown_task_is_a_clear_error(model_dir, tmp_path):
    run = subprocess.run(
        [str(Path(sys.executable).with_name("lm_eval")), "--model", "havoc", "--model_args", f"pretrained={model_dir}",
         "--tasks", "no_such_task", "--include_path", str(TASKS)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode != 0 and "no_such_task" in run.stderr + run.stdout


def test_bench_prints_the_side_by_side_table(tmp_path, model_dir):
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "bench", str(model_dir), "--prefill-tokens", "32",
                          "--new-tokens", "8", "--train-seq", "32", "--repeats", "1", "--json", str(tmp_path / "b.json"),
                          "--chart", str(tmp_path / "b.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| benchmark | HAVOC | HF | HAVOC / HF |" in run.stdout and "decode b=1, 8 new" in run.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 3 and all(r["havoc"] > 0 and r["hf"] > 0 for r in rows)
    assert (tmp_path / "b.png").stat().st_size > 1000
