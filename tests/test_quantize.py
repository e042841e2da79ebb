"""torchao weight-only quantization: the kernels compute what the quantized values say, the engine
(compiled or not) and the server run it, `havoc quantize` folders load without quantizing again,
and bad input is a clear error."""

import dataclasses
import json
import subprocess
import sys

import openai
import pytest
import torch
from safetensors import safe_open

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_core.quantize import describe
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """A tiny model whose MLP width (176) is not whole groups of 32: its down projection stays bf16 in int4."""
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, initializer_range=0.1)
    directory = tmp_path_factory.mktemp("quantize") / "model"
    HavocModel(config).save_pretrained(directory)
    tokenizer.save(directory)
    return directory


def _ids(vocab):
    return torch.randint(3, vocab, (2, 40), generator=torch.Generator().manual_seed(1))


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """The values a quantized weight stands for, in fp32 (int4's CPU layout has no dequantize: its
    kernel applied to the identity reads them out)."""
    if type(weight).__name__ == "Int4OpaqueTensor":
        with torch.inference_mode():
            return torch.nn.functional.linear(torch.eye(weight.shape[1], dtype=torch.bfloat16), weight).t().float()
    return (weight.dequantize() if hasattr(weight, "dequantize") else weight).float()


def _dequantized_twin(model: HavocModel) -> HavocModel:
    """The same model in fp32 with every quantized weight replaced by its dequantized values."""
    twin = HavocModel(model.config)
    twin.lm_head.weight = torch.nn.Parameter(torch.empty_like(twin.lm_head.weight))
    twin.load_state_dict({name: _dequantized(t) for name, t in model.state_dict().items()})
    return twin.eval()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_logits_are_the_dequantized_weights_logits(folder, scheme):
    """torchao's kernels compute with exactly the quantized values (checked against an fp32 matmul of
    dequantized weights), and those values stay close to the original weights."""
    model = HavocModel.load_pretrained(folder, quantize=scheme)
    kinds = {name: type(p).__name__ for name, p in model.named_parameters()}
    quantized = {name for name, kind in kinds.items() if kind != "Parameter"}
    expected = {"int8": "Int8Tensor", "int4": "Int4OpaqueTensor"}[scheme]
    assert {kinds[name] for name in quantized} == {expected}
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    # int4: tinygemm needs in_features in whole groups of 32 and out_features a multiple of 16. Here the
    # MLP width 176 and the vocabulary 1000 are neither, so the down projections and the LM head stay bf16.
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fits = {name for name, m in linears.items() if m.in_features % 32 == 0 and m.out_features % 16 == 0}
    assert quantized == (set(linears) if scheme == "int8" else fits)
    assert scheme == "int8" or {"lm_head.weight", "layers.0.mlp.w3.weight"} <= set(linears) - fits
    twin, unquantized = _dequantized_twin(model), HavocModel.load_pretrained(folder)
    for name in quantized:  # the values are a real int8 / int4 grid over the original weights
        w, q = unquantized.get_parameter(name).detach().bfloat16().float(), twin.get_parameter(name).detach()
        group = w.shape[1] if scheme == "int8" else 32
        w, q = w.reshape(w.shape[0], -1, group), q.reshape(w.shape[0], -1, group)
        # Symmetric int8: steps of absmax / 127; asymmetric int4: 15 steps from the group's min to max.
        step = w.abs().amax(-1) / 127 if scheme == "int8" else (w.amax(-1) - w.amin(-1)) / 15
        # Half a step, plus the rounding of bf16 scales and values.
        assert ((q - w).abs() <= step[..., None] * 0.6 + w.abs() / 256 + 1e-6).all(), name
        distinct = max(len(row.unique()) for row in q.flatten(0, 1))
        assert distinct <= (255 if scheme == "int8" else 16), name
    ids = _ids(model.config.vocab_size)
    with torch.inference_mode():
        ours = model(ids).logits.float()
        exact = twin(ids).logits
        original = unquantized(ids).logits
    scale = exact.abs().max()
    assert (ours - exact).abs().max() < 0.02 * scale  # bf16 activations only
    error = ((ours - original).norm() / original.norm()).item()
    assert error < {"int8": 0.03, "int4": 0.25}[scheme]
    assert error > 1e-4  # the weights did change


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_engine_decodes_quantized_weights_like_eager(folder, tokenizer, scheme):
    model = HavocModel.load_pretrained(folder, quantize=scheme)
    prompts = [tokenizer.encode("def f(x):"), tokenizer.encode("import os\nimport sys\n")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    eager = Engine(model, tokenizer, slots=2, context=64).complete(prompts, params)
    torch._dynamo.reset()
    compiled = Engine(model, tokenizer, slots=2, context=64, compile=True).complete(prompts, params)
    for ours, theirs in zip(compiled, eager):
        # bf16 kernels differ in the last bits: the same log-probabilities within bf16 noise, and the
        # same tokens up to a near-tie of this random model (top two within 0.05 nats), if any.
        same = next((i for i, (a, b) in enumerate(zip(ours.tokens, theirs.tokens)) if a != b), 12)
        for a, b in zip(ours.logprobs[:same], theirs.logprobs[:same]):
            assert abs(a.logprob - b.logprob) < 0.05
        if same < 12:
            top = theirs.logprobs[same].top
            assert top[0][1] - top[1][1] < 0.05, (same, top)
    eager = [c.tokens for c in eager]
    with torch.inference_mode():  # and the engine's tokens are the model's own greedy tokens
        expected = model.generate(torch.tensor([prompts[0]]), max_new_tokens=12, eos_token_id=None)[0, len(prompts[0]):]
    assert eager[0] == expected.tolist()


def recorded_quantized(recorded: dict, numel: dict) -> set[str]:
    """The linear weights quantization.json does not list as kept in bfloat16."""
    linears = {name for name in numel if name.endswith(".weight") and "norm" not in name and "embed" not in name}
    return linears - {f"{name}.weight" for name in recorded["bfloat16_layers"]}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_havoc_quantize_writes_a_folder_that_loads_without_quantizing(folder, tmp_path, scheme, monkeypatch):
    out = tmp_path / scheme
    run = subprocess.run([sys.executable, "-m", "havoc.cli", "quantize", str(folder), str(out), "--scheme", scheme],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    recorded = json.loads((out / "quantization.json").read_text())
    assert recorded["scheme"] == scheme and recorded["device"] == "cpu"
    assert (out / "tokenizer.json").exists() and not (out / "pytorch_model.bin").exists()
    with safe_open(out / "model.safetensors", "pt") as f:  # plain tensors and JSON: nothing to unpickle
        assert "tensor_names" in f.metadata()
        qdata = {k.replace("._weight_qdata", ".weight"): f.get_tensor(k).nbytes for k in f.keys()
                 if k.endswith("._weight_qdata")}
    numel = {name: t.numel() for name, t in HavocModel.load_pretrained(folder).state_dict().items()}
    assert len(qdata) == len(recorded_quantized(recorded, numel))
    assert all(nbytes == numel[name] * {"int8": 1, "int4": 0.5}[scheme] for name, nbytes in qdata.items())

    import havoc_core.quantize as q

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a quantized folder was quantized again")

    monkeypatch.setattr(q, "quantize", no_requantizing)
    loaded = HavocModel.load_pretrained(out)
    monkeypatch.undo()
    fresh = HavocModel.load_pretrained(folder, quantize=scheme)
    assert describe(loaded) == recorded
    ids = _ids(fresh.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, fresh(ids).logits)


def test_bad_input_is_a_clear_error(folder, tmp_path):
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        HavocModel.load_pretrained(folder, quantize="int3")
    with pytest.raises(ValueError, match="compute in bfloat16, not torch.float32"):
        HavocModel.load_pretrained(folder, dtype="float32", quantize="int8")
    out = tmp_path / "q"
    HavocModel.load_pretrained(folder, quantize="int4").save_pretrained(out)
    with pytest.raises(ValueError, match="holds int4 weights; it cannot be loaded as int8"):
        HavocModel.load_pretrained(out, quantize="int8")
    for direction, dst in (("havoc-to-hf", tmp_path / "hf"), ("havoc-to-gguf", tmp_path / "q.gguf")):
        run = subprocess.run([sys.executable, "-m", "havoc.cli", "convert", direction, str(out), str(dst),
                              "--tokenizer", str(folder)],
                             capture_output=True, text=True)
        assert run.returncode == 1 and "holds torchao-quantized weights" in run.stderr and not dst.exists()
    recorded = json.loads((out / "quantization.json").read_text())
    (out / "quantization.json").write_text(json.dumps({**recorded, "device": "cuda"}))
    with pytest.raises(ValueError, match="packed for cuda's kernel, not cpu's: run `havoc quantize` again"):
        HavocModel.load_pretrained(out)
    (out / "quantization.json").write_text("{not json")
    with pytest.raises(ValueError, match="quantization.json cannot be read"):
        HavocModel.load_pretrained(out)
    (out / "quantization.json").write_text(json.dumps(recorded))
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        HavocModel.load_pretrained(out)
    existing = subprocess.run([sys.executable, "-m", "havoc.cli", "quantize", str(folder), str(folder),
                               "--scheme", "int8"], capture_output=True, text=True)
    assert existing.returncode == 1 and "exists and is not empty" in existing.stderr
    bench = subprocess.run([sys.executable, "-m", "havoc.cli", "bench", str(out)], capture_output=True, text=True)
    assert bench.returncode == 1 and "is quantized already" in bench.stderr


def test_perplexity_and_serving_quantized(folder, tmp_path, corpus_files, tokenizer):
    from test_server import MODEL, _start, _wait_ready

    text = tmp_path / "text.txt"
    text.write_text(corpus_files[0].read_text()[:4000])
    results = {}
    for flag in ([], ["--quantize", "int8"]):
        run = subprocess.run([sys.executable, "-m", "havoc.cli", "eval", "perplexity", str(folder), "--data",
                              str(text), "--context", "128", *flag], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        results[bool(flag)] = json.loads(run.stdout)["bits_per_byte"]
    assert results[True] == pytest.approx(results[False], rel=0.01)
    proc, url = _start(folder, "--quantize", "int4", "--compile")
    try:
        _wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        prompt = "def f(x):"
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0]
        model = HavocModel.load_pretrained(folder, quantize="int4")
        ids = tokenizer.encode(prompt)
        with torch.inference_mode():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=8, eos_token_id=None)[0, len(ids):]
        assert got.text == tokenizer.decode(expected.tolist())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
