"""GGUF export, verified in llama.cpp itself (llama-cpp-python): the same token ids on hostile text,
the same logits, the same greedy tokens, the same chat prompt, and clear errors for bad input."""

import dataclasses
import subprocess
import sys

import llama_cpp
import numpy as np
import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.interop.gguf import havoc_to_gguf
from havoc_core.model import HavocModel

HOSTILE = [
    "def f(x):\n    return x + 1\n",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "中文和日本語の混在テキスト、한국어도",
    "combining: e\u0301 a\u0308 n\u0303, precomposed: é ä ñ",
    "runs of   spaces\t\ttabs\n\n\nnewlines    \n  ",
    "<|end|> <|user|> text that looks like special tokens <|bos|>",
    "x=[i**2 for i in range(10)]  # comment; s = f'{x!r:>10}'",
    "",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny model with peaked logits (a larger init std), so greedy choices are clear margins, not
    ties that f16 rounding could flip; its MLP width is a multiple of 32, as Q8_0 and Q4_0 need."""
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=256,
                                 initializer_range=0.1)
    config = HavocConfig.from_dict({**config.to_dict(), "mlp": {"hidden_dim": 192}})
    directory = tmp_path_factory.mktemp("gguf") / "model"
    HavocModel(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-files")
    return {kind: havoc_to_gguf(folder, out / f"model-{kind}.gguf", kind) for kind in ("f32", "f16", "bf16", "q8_0", "q4_0")}


def _llama(path):
    # An f32 KV cache: llama.cpp's default f16 cache would round what HAVOC keeps in fp32.
    return llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)


def _greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def test_llama_cpp_tokenizes_exactly_as_havoc(exported, tokenizer):
    llm = _llama(exported["f32"])
    try:
        for text in HOSTILE:
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text
            # Special-token text is a control token only where specials are asked for.
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tokenizer.encode(text, allow_special=True), text
        ids = tokenizer.encode("".join(HOSTILE))
        assert llm.detokenize(ids).decode() == tokenizer.decode(ids)
    finally:
        llm.close()


def test_logits_and_greedy_tokens_match(exported, folder, tokenizer):
    model = HavocModel.load_pretrained(folder)
    prompt = tokenizer.encode("import os\nclass Stack:\n    def push(self, item):")
    with torch.inference_mode():
        ours = model(torch.tensor([prompt])).logits[0].numpy()
    expected = model.generate([prompt], max_new_tokens=64, eos_token_id=None)[0, len(prompt):].tolist()
    identical, agreement = {}, {}
    for kind, path in exported.items():
        llm = _llama(path)
        try:
            llm.reset()
            llm.eval(prompt)
            theirs = np.array(llm.scores[: len(prompt)])
            if kind == "f32":
                assert np.abs(theirs - ours).max() < 1e-3
            identical[kind] = _greedy(llm, prompt, 64) == expected
            # Agreement of each next-token choice along HAVOC's greedy text: a first difference in free
            # generation would change every later token and say nothing about the rest.
            llm.reset()
            llm.eval(prompt + expected[:-1])
            choices = np.argmax(np.array(llm.scores[len(prompt) - 1 : len(prompt) + 63]), axis=-1)
        finally:
            llm.close()
        agreement[kind] = float(np.mean(choices == np.array(expected)))
    assert identical["f32"] and identical["f16"], identical
    assert agreement["f32"] == agreement["f16"] == 1.0, agreement
    assert agreement["bf16"] >= 0.95 and agreement["q8_0"] >= 0.95, agreement
    assert agreement["q4_0"] >= 0.6, agreement  # 4 bits on a tiny model: 70% measured; a wrong file gives ~0


def test_llama_cpp_formats_chats_with_the_embedded_template(exported, tokenizer):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = _llama(exported["f16"])
    try:
        template = llm.metadata["tokenizer.chat_template"]
        formatter = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")
        # No special-token text inside messages: llama.cpp tokenizes the rendered prompt with specials on,
        # so there a user's "<|end|>" would become the control token (apply_chat_template keeps it text).
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂, a\tb?"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
        prompt = formatter(messages=messages).prompt
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # the formatter's default


def test_bad_input_is_a_clear_error(folder, tmp_path, tokenizer):
    bare = tmp_path / "bare"
    HavocModel.load_pretrained(folder).save_pretrained(bare)  # no tokenizer beside it
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json: a GGUF file carries its tokenizer"):
        havoc_to_gguf(bare, tmp_path / "a.gguf")
    assert havoc_to_gguf(bare, tmp_path / "a.gguf", tokenizer=folder).exists()  # --tokenizer
    with pytest.raises(FileExistsError, match="a.gguf exists"):
        havoc_to_gguf(folder, tmp_path / "a.gguf")
    odd = tmp_path / "odd"
    torch.manual_seed(0)
    HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size)).save_pretrained(odd)
    tokenizer.save(odd)  # the tiny preset's MLP is 176 wide: not a multiple of 32
    with pytest.raises(ValueError, match=r"q8_0 needs rows of a multiple of 32 values; layers.0.mlp.w3.weight has "
                                         r"shape \(64, 176\)"):
        havoc_to_gguf(odd, tmp_path / "odd.gguf", "q8_0")
    assert not (tmp_path / "odd.gguf").exists() and not list(tmp_path.glob(".*.partial"))
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "convert", "havoc-to-gguf", str(odd),
                          str(tmp_path / "odd.gguf"), "--type", "q8_0"], capture_output=True, text=True)
    assert run.returncode == 1 and "q8_0 needs rows of a multiple of 32" in run.stderr
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "convert", "havoc-to-gguf", str(odd),
                          str(tmp_path / "odd.gguf")], capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "odd.gguf").stat().st_size > 0  # f16 holds any shape
