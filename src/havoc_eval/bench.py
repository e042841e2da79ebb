"""`havoc bench`: prefill, decode and training throughput of HAVOC beside HF transformers on the same weights.

Both sides are timed alternately (A B, then B A) in one process and medians are reported, since
shared machines are noisy. Greedy outputs are checked identical first (in fp32), so the two
sides are known to compute the same thing.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from havoc_core.config import HavocConfig
from havoc_core.interop.hf import hf_config_dict, weight_names
from havoc_core.model import HavocModel
from havoc_core.model.transformer import resolve_dtype
from havoc_core.quantize import check_scheme, quantization_of
from havoc_core.quantize import quantize as havoc_quantize


def _load(model: str, device: str, dtype: torch.dtype) -> HavocModel:
    if Path(model).is_dir():
        if quantization_of(model):
            raise ValueError(f"{model} is quantized already; bench its unquantized folder with --quantize, "
                             "so that HF transformers runs beside it on the same weights")
        return HavocModel.load_pretrained(model, device=device, dtype=dtype)
    # Built on meta and initialised in place: a 7B preset never exists in fp32 on the way.
    with torch.device("meta"):
        ours = HavocModel(HavocConfig.preset(model)).to(dtype)
    ours.to_empty(device=device)
    torch.manual_seed(0)
    ours.reset_parameters()
    return ours.eval()


def _hf_twin(ours: HavocModel, dtype: torch.dtype):
    """LlamaForCausalLM with the same weights, built in memory (no files: 2 x 14 GB at 7B)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    device = ours.embed_tokens.weight.device
    config = LlamaConfig(**hf_config_dict(ours.config, dtype), attn_implementation="sdpa")
    # A GPU machine may have an older transformers than ours: before 5.0 the argument was torch_dtype.
    name = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(device):
        theirs = LlamaForCausalLM._from_config(config, **{name: dtype})
    state = ours.state_dict()
    missing, unexpected = theirs.load_state_dict(
        {hf: state[name] for name, hf in weight_names(ours.config).items()}, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set()):
        raise RuntimeError(f"HF model does not match: missing {missing}, unexpected {unexpected}")
    theirs.tie_weights()
    return theirs.eval()


def cpu_model() -> str:
    """The processor's name (machines of one kind differ: every table says which one it ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(model: str = "small", device: str = "cpu", dtype: str | None = None, quantize: str | None = None,
          prefill_tokens: int = 512,
          new_tokens: int = 128, decode_batches: tuple[int, ...] = (1,), train_batch: int = 4, train_seq: int = 256,
          repeats: int = 5) -> dict:
    """Run the benchmarks; `model` is a checkpoint folder or a preset name; `train_batch` 0 skips training
    (7B with AdamW does not fit one GPU). With `quantize`, HAVOC's weights are quantized after the
    HF twin (bfloat16) took their values, and training is not run."""
    torch_dtype = resolve_dtype(dtype, device, quantize)
    check_scheme(quantize, torch_dtype)
    ours = _load(model, device, torch_dtype)
    theirs = _hf_twin(ours, torch_dtype)
    if quantize:
        havoc_quantize(ours, quantize)
        train_batch = 0
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(3, vocab, (1, prefill_tokens), generator=g).to(device)
    prompts = {b: torch.randint(3, vocab, (b, 16), generator=g).to(device) for b in decode_batches}
    train_ids = torch.randint(3, vocab, (train_batch, train_seq), generator=g).to(device)

    if torch_dtype == torch.float32:
        with torch.inference_mode():
            prompt = prompts[decode_batches[0]]
            a = ours.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None)
            b = theirs.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        if not torch.equal(a, b):
            raise RuntimeError("HAVOC and HF greedy outputs differ on the same weights: the comparison is void")

    def prefill(m):
        with torch.inference_mode():
            m(prefill_ids)

    def decoder(batch: int) -> Callable:
        def decode(m):
            with torch.inference_mode():
                if m is ours:
                    ours.generate(prompts[batch], max_new_tokens=new_tokens, eos_token_id=None)
                else:
                    theirs.generate(prompts[batch], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
        return decode

    optimizers = {}

    def train_step(m):
        if id(m) not in optimizers:  # created on first use: Adam's state costs 2x the weights
            optimizers[id(m)] = torch.optim.AdamW(m.parameters(), lr=1e-5)
        m.train()
        loss = ours.compute_loss(train_ids)[0] if m is ours else theirs(train_ids, labels=train_ids).loss
        loss.backward()
        optimizers[id(m)].step()
        optimizers[id(m)].zero_grad(set_to_none=True)
        m.eval()

    tasks: dict[str, tuple[Callable, int]] = {f"prefill 1x{prefill_tokens}": (prefill, prefill_tokens)}
    for b in decode_batches:
        tasks[f"decode b={b}, {new_tokens} new"] = (decoder(b), b * new_tokens)
    if train_batch:
        tasks[f"train {train_batch}x{train_seq} AdamW"] = (train_step, train_batch * train_seq)
    rows = []
    for name, (fn, tokens) in tasks.items():
        fn(ours), fn(theirs)  # warm-up
        times = {"havoc": [], "hf": []}
        for i in range(repeats):
            for key, m in (("havoc", ours), ("hf", theirs))[:: 1 if i % 2 == 0 else -1]:
                _sync(device)
                start = time.perf_counter()
                fn(m)
                _sync(device)
                times[key].append(time.perf_counter() - start)
        havoc, hf = (tokens / statistics.median(times[k]) for k in ("havoc", "hf"))
        rows.append({"benchmark": f"{name} (tok/s)", "havoc": havoc, "hf": hf, "ratio": havoc / hf})
    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"{cpu_model()}, {torch.get_num_threads()} threads"
    precision = str(torch_dtype).removeprefix("torch.") + (f", {quantize} weights" if quantize else "")
    return {"date": str(date.today()), "machine": machine, "model": model, "dtype": precision,
            "parameters": ours.num_parameters(), "repeats": repeats, "rows": rows}


def markdown_table(header: list[str], rows: list[tuple]) -> str:
    """A Markdown table (first column left-aligned, the others right-aligned), as RESULTS.md keeps them."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def table(result: dict) -> str:
    import transformers

    title = (
        f"# {result['date']} | {result['machine']} | torch {torch.__version__} | transformers {transformers.__version__}\n"
        f"# {result['model']} ({result['parameters'] / 1e6:.1f}M parameters), {result['dtype']}, medians of "
        f"{result['repeats']} alternating runs\n"
    )
    rows = [(r["benchmark"], f"{r['havoc']:,.1f}", f"{r['hf']:,.1f}", f"{r['ratio']:.2f}x") for r in result["rows"]]
    return title + markdown_table(["benchmark", "HAVOC", "HF", "HAVOC / HF"], rows)


def chart(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5))
    for ax, row in zip(axes, rows):
        bars = ax.bar(["HAVOC", "HF"], [row["havoc"], row["hf"]], color=["tab:orange", "tab:blue"])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(row["benchmark"], fontsize=9)
    fig.suptitle(f"{result['model']}, {result['dtype']}, {result['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
