"""HavocTokenizer: lossless byte-level BPE, fixed special ids, chat format, and parity with transformers."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from havoc_core.config import HavocConfig
from havoc_core.tokenizer import SPECIAL_TOKENS, Corpus, HavocTokenizer

AWKWARD = [
    "",
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "漢字かなカナ한국어 中文标点，。",
    "e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353 combining marks",
    "control \x01\x02\x1b[31m\x7f and NUL \x00 inside",
    "\ufeffBOM at the start, and inside \ufeff",
    " " * 100 + "\t" * 30 + "\n" * 20 + "\r\n\r\n" + "\u00a0\u2003\u3000",
    "<|assistant|> typed by a user <|end|><|bos|>",
    "def f(x):\n    return x ** 2  # comment\n",
]


def test_special_tokens_have_the_config_ids(tokenizer):
    config = HavocConfig()
    assert [tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert tokenizer.vocab_size == 1000


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_text_round_trips(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)  # plain text never yields special ids


@settings(max_examples=300, deadline=None)
@given(st.text())  # any string without surrogates (hypothesis's default alphabet excludes them)
def test_every_string_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_batch_variants_agree(tokenizer):
    assert tokenizer.encode_batch(AWKWARD) == [tokenizer.encode(t) for t in AWKWARD]
    assert tokenizer.decode_batch(tokenizer.encode_batch(AWKWARD)) == AWKWARD


def test_encode_adds_no_bos_or_eos(tokenizer):
    ids = tokenizer.encode("hello")
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids


def test_special_token_text_stays_plain_unless_allowed(tokenizer):
    text = "<|assistant|>"
    assert tokenizer.token_id(text) not in tokenizer.encode(text)
    assert tokenizer.encode(text, allow_special=True) == [tokenizer.token_id(text)]
    assert tokenizer.decode([1, *tokenizer.encode("hi"), 2], skip_special_tokens=True) == "hi"
    assert tokenizer.decode([1, *tokenizer.encode("hi"), 2]) == "<|bos|>hi<|eos|>"


def test_compression_on_code(tokenizer, corpus_files):
    from havoc_core.tokenizer import stdlib_corpus

    held_out = [p.read_text() for p in stdlib_corpus()[80:] if "encodings" not in p.parts][:20]
    assert tokenizer.bytes_per_token(held_out) > 2.5  # merges learnt: far better than 1 byte/token


def test_chat_template_layout(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|assistant|>hi"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    sys_id, user_id, asst_id, end_id = (tokenizer.token_id(f"<|{r}|>") for r in ("system", "user", "assistant", "end"))
    body = tokenizer.encode("Be brief.")
    assert ids[: 3 + len(body)] == [1, sys_id, *body, end_id]
    assert ids[-1] == asst_id and ids.count(asst_id) == 1  # the user's typed marker is plain text


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], "hi"])
def test_chat_template_rejects_bad_messages(tokenizer, messages):
    with pytest.raises(ValueError, match="messages"):
        tokenizer.apply_chat_template(messages)


def test_transformers_autotokenizer_gives_identical_ids(tokenizer, tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in AWKWARD[:-2] + AWKWARD[-1:]:  # HF parses special-token text as specials (see README)
        assert hf.encode(text) == tokenizer.encode(text), text
        assert hf.decode(tokenizer.encode(text)) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 2 + 2."},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "und 漢字?"}]
    for prompt in (False, True):
        theirs = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt, return_dict=True)
        assert theirs["input_ids"] == tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def test_save_load_round_trip(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    again = HavocTokenizer.load(tmp_path)
    assert again.sha256 == tokenizer.sha256 and again.encode(AWKWARD[1]) == tokenizer.encode(AWKWARD[1])


def test_train_from_iterator_and_jsonl(tmp_path):
    texts = [f"record number {i} says hello world" for i in range(200)]
    a = HavocTokenizer.train(texts, vocab_size=300)
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    b = HavocTokenizer.train(Corpus([tmp_path / "data.jsonl"], text_field="body"), vocab_size=300)
    assert a.sha256 == b.sha256
    assert a.encode("hello world") == b.encode("hello world") and len(a.encode("hello world")) <= 3


def test_folder_include_filters(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("text\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.py").write_text("hidden\n")
    (tmp_path / "blob.py").write_bytes(b"\xff\xfe\x00bin")
    corpus = Corpus([tmp_path], include=["*.py"])
    assert [d.text for d in corpus] == ["x = 1\n"]
    assert corpus.skipped == [str(tmp_path / "blob.py")]


# Bad input
def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size 262 is too small.*at least 263"):
        HavocTokenizer.train(["some text"], vocab_size=262)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="corpus is empty"):
        HavocTokenizer.train(Corpus([tmp_path / "empty.txt"]), vocab_size=300)
    with pytest.raises(ValueError, match="corpus is empty"):
        HavocTokenizer.train([], vocab_size=300)


def test_unreadable_and_missing_inputs(tmp_path):
    with pytest.raises(OSError, match="cannot read input file /proc/self/mem"):
        list(Corpus(["/proc/self/mem"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(Corpus([tmp_path / "nope.txt"]))
    with pytest.raises(FileNotFoundError, match=r"has no files matching \*.md"):
        list(Corpus([tmp_path], include=["*.md"]))


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2 is not valid JSON"):
        list(Corpus([path]))
    path.write_text('{"content": "ok"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1 has no string field 'text' \(set --text-field\)"):
        list(Corpus([path]))


def test_corrupted_tokenizer_file(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.write_text(path.read_text()[:500])
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer file"):
        HavocTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="havoc tokenizer train"):
        HavocTokenizer.load(tmp_path / "none")


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"token id 1000 is outside the vocabulary \[0, 1000\)"):
        tokenizer.decode([5, 1000])


def _havoc(*args):
    return subprocess.run([sys.executable, "-m", "havoc.cli", *args], capture_output=True, text=True)


def test_cli_train_reports_and_writes_atomically(tmp_path, corpus_files):
    out = tmp_path / "tok"
    run = _havoc("tokenizer", "train", *map(str, corpus_files[:30]), "--vocab-size", "600", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert "MB/s" in run.stdout and "bytes/token" in run.stdout
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    enc = _havoc("tokenizer", "encode", "--tokenizer", str(out), "x = 1")
    ids = enc.stdout.split()
    dec = _havoc("tokenizer", "decode", "--tokenizer", str(out), *ids)
    assert dec.stdout == "x = 1\n"


def test_cli_failure_leaves_nothing_at_out(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    run = _havoc("tokenizer", "train", str(tmp_path / "empty.txt"), "--vocab-size", "300", "--out", str(tmp_path / "tok"))
    assert run.returncode == 1 and "corpus is empty" in run.stderr and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_long_documents_go_in_pieces_with_exactly_the_same_ids(monkeypatch):
    from havoc_core.tokenizer import stdlib_corpus
    from havoc_core.tokenizer import tokenizer as tokenizer_module

    texts = [doc.text for doc in Corpus(stdlib_corpus())]  # the whole embedded corpus
    trained = HavocTokenizer.train(texts[:200], vocab_size=2000)
    whole = [trained._plain.encode(t, add_special_tokens=False).ids for t in texts]
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 300)  # every file in many pieces
    assert sum(len(tokenizer_module.pieces(t)) for t in texts) > 20 * len(texts)
    assert trained.encode_batch(texts) == whole
    assert [trained.encode(t) for t in texts[:50]] == whole[:50]
    assert HavocTokenizer.train(texts[:200], vocab_size=2000).sha256 == trained.sha256  # the same merges


def test_a_one_line_document_takes_no_more_memory_than_many_files(tmp_path):
    import json as json_module
    import resource
    import subprocess
    import sys

    from havoc_core.tokenizer import stdlib_corpus

    text = "".join(p.read_text() for p in stdlib_corpus())[:16_000_000]
    (tmp_path / "files").mkdir()
    for i in range(16):
        (tmp_path / "files" / f"{i:02d}.txt").write_text(text[i * 1_000_000 : (i + 1) * 1_000_000])
    (tmp_path / "one.jsonl").write_text(json_module.dumps({"text": text}) + "\n")

    def peak_mb(*args) -> float:
        # Each command in a fresh process; the last child's peak is read through a wrapper that reports it.
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "havoc.cli", *args],
                             capture_output=True, text=True, check=True)
        return int(out.stdout) / 1024

    many = peak_mb("tokenizer", "train", str(tmp_path / "files"), "--vocab-size", "4000", "--out", str(tmp_path / "a"))
    one = peak_mb("tokenizer", "train", str(tmp_path / "one.jsonl"), "--vocab-size", "4000", "--out", str(tmp_path / "b"))
    assert one < 2 * many, (one, many)
    many = peak_mb("data", "prepare", str(tmp_path / "files"), "--tokenizer", str(tmp_path / "a"), "--out",
                   str(tmp_path / "da"), "--val-fraction", "0")
    one = peak_mb("data", "prepare", str(tmp_path / "one.jsonl"), "--tokenizer", str(tmp_path / "a"), "--out",
                  str(tmp_path / "db"), "--val-fraction", "0")
    assert one < 2 * many, (one, many)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # (the test process itself stays small)
