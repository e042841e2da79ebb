"""Device-clean code, checked on the CPU: what is built under a device stays there, sampling stays on
the weights' device with one host transfer per step, the compiled decode step mutates only buffers
(what CUDA-graph trees accept), and bf16 runs end to end."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import get_static_address_type
from torch.overrides import TorchFunctionMode

import havoc_inference.engine as engine_module
from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams, choose

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=128)
    return HavocModel(config).eval()


def test_a_model_and_engine_built_on_meta_stay_on_meta(model, tokenizer):
    with torch.device("meta"):
        meta = HavocModel(HavocConfig.havoc_7b())  # 7B: only possible because nothing is allocated
    tensors = dict(meta.named_parameters()) | dict(meta.named_buffers())
    assert tensors and all(t.is_meta for t in tensors.values()), [n for n, t in tensors.items() if not t.is_meta]
    assert meta.num_parameters() == 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 11008 + 2 * 4096) + 70000 * 4096 + 4096
    with torch.device("meta"):
        small = HavocModel(model.config).eval()
    engine = Engine(small, tokenizer, slots=3, context=64)
    state = dict(engine.decoder.named_buffers())
    assert len([n for n in state if re.fullmatch(r"[kv]\d+", n)]) == 2 * model.config.num_layers
    assert all(t.is_meta for t in state.values())  # every cache, the key positions, the RoPE tables
    assert engine.device.type == "meta"


def test_sequences_draw_from_a_generator_on_the_weights_device(model, tokenizer):
    # torch has no meta generator: the device a sequence's generator follows is the engine's.
    seq, = Engine(model, tokenizer, slots=1).submit([[5, 6]], SamplingParams(max_tokens=2, seed=3))
    assert seq.generator.device == model.embed_tokens.weight.device


# Hard-coded CPU tensors or generators break on a GPU. Each allowed place says why it is right.
ALLOWED = {
    # The benchmark's inputs are drawn on the CPU so that every device gets the same ids, then moved.
    ("havoc_eval/bench.py", "torch.Generator()"),
    # device_for's answer when no GPU is asked for or there: choosing the device, not hard-coding it.
    ("havoc_training/distributed.py", 'torch.device("cpu")'),
}
HARD_CODED = re.compile(r"""torch\.device\(["']cpu["']\)|torch\.Generator\(\s*\)|device=["']cpu["']|\.cpu\(\)""")


def test_no_hard_coded_devices_in_src():
    found = set()
    for path in SRC.rglob("*.py"):
        for line in path.read_text().splitlines():
            code = re.sub(r'#.*|f"[^"]*"', "", line)  # not in comments or error messages
            found |= {(path.relative_to(SRC).as_posix(), m.group(0)) for m in HARD_CODED.finditer(code)}
    assert found == ALLOWED, sorted(found ^ ALLOWED)


def test_draws_follow_the_distribution_and_each_seed_whatever_the_other_rows():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().repeat(4000, 1)
    params = [SamplingParams(temperature=0 if i % 7 == 3 else 1.0) for i in range(4000)]  # some greedy rows
    tokens, ok = choose(logits, params, [torch.Generator().manual_seed(seed) for seed in range(4000)]).tolist()
    assert all(ok) and all(t == 0 for t, p in zip(tokens, params) if p.greedy)
    drawn = torch.bincount(torch.tensor([t for t, p in zip(tokens, params) if not p.greedy]), minlength=5)
    # ~3,430 draws: each frequency within 4 standard deviations of its probability; never a zero.
    n = drawn.sum()
    assert ((drawn / n - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1e-9).all(), drawn
    # A seed's token does not depend on the rows beside it (or on how many there are).
    for seed in (0, 1, 2, 4):
        alone = choose(logits[:1], [params[seed]], [torch.Generator().manual_seed(seed)])[0, 0].item()
        assert alone == tokens[seed]


class _HostTransfers(TorchFunctionMode):
    """Counts what copies a device value to the host (a sync on a GPU)."""

    SYNCS = {"tolist", "item", "__int__", "__float__", "__bool__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.SYNCS
        return func(*args, **(kwargs or {}))


def test_a_decode_step_copies_to_the_host_once_for_all_rows(model, tokenizer):
    engine = Engine(model, tokenizer, slots=8)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1,
                             ignore_eos=True)
    sequences = engine.submit([tokenizer.encode("x = 1")], sampled, n=6)
    sequences += engine.submit([tokenizer.encode("y")], dataclasses.replace(sampled, temperature=0), n=2)
    while any(s.prefilling or not s.output_ids for s in sequences):
        engine.step()
    decoding = [s for s in sequences if s.finish_reason is None]
    before = [len(s.output_ids) for s in decoding]
    assert len(decoding) == 8
    with _HostTransfers() as transfers:
        engine._decode(engine._make_room(decoding))
    assert transfers.count == 1  # before: one int(...) per row (8)
    assert [len(s.output_ids) for s in decoding] == [n + 1 for n in before]


def test_nan_logits_fail_only_their_own_request(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, slots=2)
    innocent, = engine.submit([tokenizer.encode("a")], SamplingParams(max_tokens=6, seed=1, ignore_eos=True))
    guilty, = engine.submit([tokenizer.encode("b")], SamplingParams(max_tokens=6, seed=2, ignore_eos=True))
    real = engine_module.process

    def poisoned(logits, params, histories):
        out = real(logits, params, histories)
        out[[i for i, p in enumerate(params) if p.seed == 2]] = float("nan")
        return out

    monkeypatch.setattr(engine_module, "process", poisoned)
    while innocent.finish_reason is None or guilty.finish_reason is None:
        engine.step()
    assert engine._collect(innocent).finish_reason == "length"
    failed = engine._collect(guilty)
    assert failed.finish_reason == "error"


def test_the_compiled_decode_step_mutates_only_buffers_and_is_not_recompiled(model, tokenizer, monkeypatch):
    """CUDA-graph trees replay a graph only if every tensor it mutates has a static address (a
    parameter or buffer): here the only inputs that are not are the step's tokens, positions and
    block tables.
    The engine's own torch.compile call, with a backend that records what dynamo hands it."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs
                       if isinstance(t, torch.Tensor) and get_static_address_type(t) is None])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **{**options, "backend": backend}))
    engine = Engine(model, tokenizer, slots=4, compile=True)
    monkeypatch.setattr(torch, "compile", real_compile)
    engine.warm_up()
    # The tokens, positions and block tables; the tables' width is dynamic: one graph per batch size.
    assert graphs == [[(rows, 1), (rows, 1), (rows, engine.max_blocks)] for rows in (1, 2, 4)]
    before = len(graphs)
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = engine.complete([tokenizer.encode("for i in range(3):"), tokenizer.encode("import")], greedy, n=2)
    assert len(graphs) == before  # 40 steps at new positions and batch sizes: no new graph
    expected = model.generate([tokenizer.encode("import")], max_new_tokens=40, eos_token_id=None)
    assert out[2].tokens == expected[0, -40:].tolist()


def test_load_pretrained_dtype(model, tmp_path):
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model.float()
    assert HavocModel.load_pretrained(tmp_path / "bf16").embed_tokens.weight.dtype == torch.float32  # CPU default
    loaded = HavocModel.load_pretrained(tmp_path / "bf16", dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rotary.cos.dtype == torch.bfloat16 and loaded.rotary.cos.device.type == "cpu"
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32 or auto, got 'int8'"):
        HavocModel.load_pretrained(tmp_path / "bf16", dtype="int8")


def test_the_engine_runs_in_bf16_on_the_cpu(model, tokenizer):
    """bf16 weights and cache: the engine equals bf16 `generate`, and its logits stay within 0.1 of
    fp32's (bf16 has 8 mantissa bits; these logits are of order 1)."""
    bf16 = HavocModel(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    prompt = tokenizer.encode("class Stack:\n    def push(self, x):")
    engine = Engine(bf16, tokenizer, slots=2, step_tokens=5)
    assert engine.caches[0][0].dtype == torch.bfloat16
    out, = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    expected = bf16.generate([prompt], max_new_tokens=24, eos_token_id=None)[0, len(prompt):].tolist()
    assert out.tokens == expected
    ids = torch.tensor([prompt + out.tokens])
    with torch.inference_mode():
        diff = (bf16(ids).logits.float() - model(ids).logits).abs().max()
    assert diff < 0.1, diff
    sampled = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True))
    assert len(sampled[0].tokens) == 24
