"""What only a GPU can confirm: `make gpu-check` runs these on one (marker `cuda`).

They run on HAVOC_TEST_DEVICE (default cuda) and are skipped where it is absent, so CI shows why.
`make gpu-check` on a CPU with `--dry-run` runs them with HAVOC_TEST_DEVICE=cpu to check their logic.
"""

import dataclasses
import os

import pytest
import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams
from havoc_training.config import TrainConfig
from havoc_training.trainer import Trainer
from test_server import _start, _wait_ready
from test_train import _killed_at_then_resumed, _losses, data_dir  # noqa: F401 (data_dir is a fixture)

DEVICE = os.environ.get("HAVOC_TEST_DEVICE", "cuda")
CUDA = DEVICE == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: `make gpu-check` runs these on one"),
]


@pytest.fixture
def config(tmp_path, data_dir, tokenizer_dir):  # noqa: F811
    return TrainConfig(data=str(data_dir), tokenizer=str(tokenizer_dir), out=str(tmp_path / "run"), model="tiny",
                       model_overrides={"d_model": 256, "num_layers": 4, "dropout": 0.1}, seq_len=128,
                       micro_batch=8, global_batch_tokens=2048, max_steps=20, lr=1e-3, warmup_steps=2, log_every=1,
                       eval_every=10, eval_batches=2, save_every=10, device=DEVICE, dtype="bfloat16")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size, max_seq_len=256)
    return HavocModel(config).to(DEVICE, torch.bfloat16).eval()


def test_train_from_scratch_in_bf16_then_kill_and_resume_exactly(config, tmp_path):
    straight = dataclasses.replace(config, out=str(tmp_path / "straight"))
    _killed_at_then_resumed(straight, config, step=10)
    a, b = _losses(straight.out), _losses(config.out)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert a[20] < a[1] - 0.5  # it learns in bf16
    # The data position, the weights, Adam's state and the RNG (dropout 0.1) are restored exactly; a
    # difference could only come from a kernel that is not run-to-run deterministic, so say which steps.
    differ = [step for step in a if a[step] != b[step]]
    assert not differ, {step: (a[step], b[step]) for step in differ}


def test_finetune_from_a_bf16_folder_keeps_fp32_master_weights(config, tmp_path, tokenizer):
    torch.manual_seed(0)
    base = HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size))
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    lines = [f'{{"messages": [{{"role": "user", "content": "{i}?"}}, {{"role": "assistant", "content": "ok {i}"}}]}}'
             for i in range(64)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    ft = dataclasses.replace(config, data=str(tmp_path / "chat.jsonl"), init_from=str(tmp_path / "bf16"),
                             out=str(tmp_path / "ft"), model_overrides={}, seq_len=32, micro_batch=4,
                             global_batch_tokens=128, max_steps=4, eval_every=100, save_every=4)
    trainer = Trainer(ft, chat=True)
    assert {p.dtype for p in trainer.raw_model.parameters()} == {torch.float32}
    assert trainer.raw_model.embed_tokens.weight.device.type == DEVICE
    seen = []
    trainer.raw_model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    summary = trainer.train()
    assert set(seen) == {torch.bfloat16} and summary["last_loss"] < summary["first_loss"]
    assert {p.dtype for p in trainer.raw_model.parameters()} == {torch.float32}


def test_engine_greedy_equals_generate_and_sampling_works(model, tokenizer):
    engine = Engine(model, tokenizer, slots=4, step_tokens=16)
    assert engine.caches[0][0].device.type == DEVICE and engine.caches[0][0].dtype == torch.bfloat16
    prompts = [tokenizer.encode("def f(x):\n    return"), tokenizer.encode("import os\n" * 4)]
    for prompt in prompts:
        expected = model.generate([prompt], max_new_tokens=48, eos_token_id=None)[0, len(prompt):].tolist()
        assert engine.generate(prompt, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0].tokens == \
            expected
    # The API's default temperature is 1.0: sampled, seeded requests on the device, several at once.
    params = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    first = engine.complete(prompts, params, n=2)
    again = engine.complete(prompts, params, n=2)
    assert [c.tokens for c in first] == [c.tokens for c in again] and all(len(c.tokens) == 32 for c in first)


def test_compiled_step_is_replayed_not_rerecorded(model, tokenizer, monkeypatch):
    captures = []
    if CUDA:
        real = torch.cuda.CUDAGraph.capture_begin

        def counted(self, *args, **kwargs):
            captures.append(1)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counted)
    from torch._dynamo.utils import counters

    counters.clear()
    engine = Engine(model, tokenizer, slots=4, compile=True)
    engine.start(warm_up=True)  # records in the engine's own thread, as serving does
    try:
        recorded = len(captures)
        params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        out = engine.complete([tokenizer.encode("while True:"), tokenizer.encode("x = [")], params, n=2)
    finally:
        engine.stop()
    expected = model.generate([tokenizer.encode("while True:")], max_new_tokens=64, eos_token_id=None)
    assert out[0].tokens == expected[0, -64:].tolist()
    if CUDA:
        assert recorded >= 3, "warm-up recorded no CUDA graph for batch sizes 1, 2, 4"
        assert len(captures) == recorded, f"{len(captures) - recorded} graphs recorded after warm-up"
        assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


def test_the_server_answers_the_openai_client(tmp_path, tokenizer):
    import openai

    torch.manual_seed(0)
    HavocModel(dataclasses.replace(HavocConfig.havoc_tiny(), vocab_size=tokenizer.vocab_size)).save_pretrained(
        tmp_path / "model")
    tokenizer.save(tmp_path / "model")
    proc, url = _start(tmp_path / "model", "--device", DEVICE, "--compile", "--slots", "2")
    try:
        _wait_ready(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(model="tiny-havoc", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=16)  # temperature 1.0: sampled on the device
        assert chat.choices[0].finish_reason in ("stop", "length")
        stream = client.completions.create(model="tiny-havoc", prompt="def", max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert len([c for c in stream if c.choices and c.choices[0].text is not None]) >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_hf_parity_in_bf16(model, tokenizer):
    """HF LlamaForCausalLM on the same bf16 weights: logits agree to bf16 precision (different kernels
    round differently: max 0.1, mean 0.01 on logits of order 1)."""
    from havoc_eval.bench import _hf_twin

    theirs = _hf_twin(model, torch.bfloat16)
    ids = torch.tensor([tokenizer.encode("class Queue:\n    def __init__(self):\n        self.items = []")],
                       device=DEVICE)
    with torch.inference_mode():
        diff = (model(ids).logits.float() - theirs(ids).logits.float()).abs()
    assert diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_decode_compiled_on_the_device(model, tokenizer, tmp_path, scheme):
    """torchao's int8 / int4 kernels of the device (int4: tinygemm's CUDA layout on a GPU), under the
    engine's compiled step: the same greedy tokens as the quantized model's own generate, and a
    `havoc quantize`-style folder that loads back with equal logits."""
    from havoc_core.quantize import describe, quantize

    quantized = HavocModel(model.config).to(DEVICE, torch.bfloat16).eval()
    quantized.load_state_dict(model.state_dict())
    quantize(quantized, scheme)
    assert describe(quantized)["device"] == DEVICE
    prompt = tokenizer.encode("def f(x):\n    return")
    expected = quantized.generate([prompt], max_new_tokens=24, eos_token_id=None)[0, len(prompt):].tolist()
    engine = Engine(quantized, tokenizer, slots=2, compile=True)
    engine.warm_up()
    assert engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].tokens == expected
    quantized.save_pretrained(tmp_path / "q")
    loaded = HavocModel.load_pretrained(tmp_path / "q", device=DEVICE)
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
