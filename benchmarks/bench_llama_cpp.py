"""CPU decode and prefill: HAVOC's engine beside llama.cpp (llama-cpp-python) on the same weights.

havoc_small shape, random init (seed 0), exported with `havoc convert havoc-to-gguf`; batch 1 greedy
decode of 128 tokens after a 16-token prompt, and a 512-token prefill, at every precision: HAVOC in
fp32, bf16 and torchao int8 / int4 weights (`--quantize`), llama.cpp in f32, f16, q8_0 and q4_0.
Each row is also given as a fraction of its floor: the bytes of weights one decode token reads over
the machine's read bandwidth, measured here. HAVOC's engine also decodes 8 streams at once (batch 8;
llama-cpp-python's API runs one sequence). Medians of alternating runs.

    .venv/bin/python benchmarks/bench_llama_cpp.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import llama_cpp
import numpy as np
import torch

from havoc_core.config import HavocConfig
from havoc_core.interop.gguf import havoc_to_gguf
from havoc_core.model import HavocModel
from havoc_core.tokenizer import HavocTokenizer, stdlib_corpus
from havoc_eval.bench import cpu_model, markdown_table
from havoc_inference.engine import Engine
from havoc_inference.sampling import SamplingParams

NEW, PREFILL = 128, 512
# Q8_0: 32 int8 + an f16 scale; Q4_0: 32 nibbles + an f16 scale; torchao int4: a bf16 scale and zero per 32.
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "int8": 1.0,
                    "int4": 20 / 32}


def read_bandwidth() -> float:
    """Bytes per second that summing a 1 GiB tensor reads (median of 5)."""
    x = torch.ones(1 << 28)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times[1:])


def llama_decode(llm: llama_cpp.Llama, prompt: list[int]) -> list[int]:
    """Greedy tokens from llama.cpp's own last-position logits (logits_all off, as in serving)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(NEW):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    tokenizer = HavocTokenizer.train((p.read_text(errors="replace") for p in stdlib_corpus()[:200]), vocab_size=8192)
    model = HavocModel(HavocConfig.havoc_small()).eval()
    model.save_pretrained(tmp / "model")
    tokenizer.save(tmp / "model")
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    prompt = tokenizer.encode("def parse_arguments(argv):\n    parser = argparse.")[:16]
    prefill_ids = torch.randint(7, model.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(1))
    bandwidth = read_bandwidth()

    systems: dict[str, tuple] = {}
    batch8 = {}
    prompts8 = [tokenizer.encode(text)[:16] for text in ("import os\n", "class Stack:\n", "def main():\n",
                "from typing import", "# Copyright", "while True:\n", "try:\n    x = ", "if __name__ ==")]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for name, dtype, scheme in (("fp32", "float32", None), ("bf16", "bfloat16", None), ("int8", None, "int8"),
                                ("int4", None, "int4")):
        ours = HavocModel.load_pretrained(tmp / "model", dtype=dtype, quantize=scheme)
        engine = Engine(ours, tokenizer, slots=1, context=PREFILL + 1, compile=True)
        engine8 = Engine(ours, tokenizer, slots=8, context=PREFILL + 1, compile=True)

        def decode(engine=engine):
            return engine.generate(prompt, params)[0].tokens

        def prefill(ours=ours):
            with torch.inference_mode():
                ours(prefill_ids, logits_to_keep=1)

        label = f"HAVOC engine, {name}" + (" (torchao, bf16 compute)" if scheme else "") + ", compiled"
        systems[label] = (decode, prefill, BYTES_PER_WEIGHT["f32" if name == "fp32" else name])
        batch8[label] = lambda engine8=engine8: engine8.complete(prompts8, params)
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        llm = llama_cpp.Llama(str(havoc_to_gguf(tmp / "model", tmp / f"m-{kind}.gguf", kind)), n_ctx=PREFILL + NEW + 32,
                              n_batch=PREFILL, n_threads=torch.get_num_threads(), verbose=False)

        def decode(llm=llm):
            return llama_decode(llm, prompt)

        def prefill(llm=llm):
            llm.reset()
            llm.eval(prefill_ids[0].tolist())

        systems[f"llama.cpp {llama_cpp.__version__}, {kind} GGUF"] = (decode, prefill, BYTES_PER_WEIGHT[kind])

    reference = systems["HAVOC engine, fp32, compiled"][0]()
    agreement = {name: np.mean(np.array(fns[0]()) == np.array(reference)) for name, fns in systems.items()}
    for fn in batch8.values():  # compiles each batch size the 8 streams pass through
        fn()
    times = {name: {"decode": [], "prefill": [], "batch 8": []} for name in systems}
    for i in range(args.repeats):
        for name in list(systems)[:: 1 if i % 2 == 0 else -1]:
            decode, prefill, _ = systems[name]
            for what, fn in (("decode", decode), ("prefill", prefill), ("batch 8", batch8.get(name))):
                if fn is None:
                    continue
                start = time.perf_counter()
                fn()
                times[name][what].append(time.perf_counter() - start)
    base = NEW / statistics.median(times["HAVOC engine, fp32, compiled"]["decode"])
    rows = []
    for name, (_, _, per_weight) in systems.items():
        decode_tps = NEW / statistics.median(times[name]["decode"])
        floor = bandwidth / (matrices * per_weight)
        batch = f"{8 * NEW / statistics.median(times[name]['batch 8']):,.0f}" if times[name]["batch 8"] else "-"
        rows.append((name, f"{decode_tps:,.0f}", f"{decode_tps / floor:.0%}", f"{base / decode_tps:.2f}x", batch,
                     f"{PREFILL / statistics.median(times[name]['prefill']):,.0f}", f"{agreement[name]:.0%}"))
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s | havoc_small ({model.num_parameters() / 1e6:.1f}M parameters) | "
          f"medians of {args.repeats}")
    print(markdown_table(["system", "decode b=1 (tok/s)", "of the bandwidth floor", "HAVOC fp32 / it",
                          "decode b=8 (tok/s)", "prefill 1x512 (tok/s)", "greedy tokens = HAVOC fp32"], rows))


if __name__ == "__main__":
    main()
