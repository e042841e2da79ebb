"""Standalone smoke test: the specification's usage examples, run as written on the small preset.

    python test_smoke.py        (what `make demo` runs until the training quickstart replaces it)
"""

import sys
import tempfile
import time

import torch

from havoc_core.config import HavocConfig
from havoc_core.model import HavocModel


def check(name: str, ok: bool) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    if not ok:
        sys.exit(1)


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    print("HAVOC smoke test (small preset; the 7B preset is built on the meta device)")

    with torch.device("meta"):
        big = HavocModel(HavocConfig.havoc_7b())
    check(f"havoc_7b has {big.num_parameters():,} parameters", big.num_parameters() == 5_957_685_248)

    # Create config and initialise the model.
    config = HavocConfig.havoc_small()
    model = HavocModel(config)
    check(f"imports and init: {model.num_parameters() / 1e6:.1f}M parameters", model.lm_head.weight is model.embed_tokens.weight)

    # Forward pass.
    input_ids = torch.randint(0, config.vocab_size, (2, 128))  # [batch, seq_len]
    logits, past_kv = model(input_ids, use_cache=True)
    check(f"forward: logits {tuple(logits.shape)}", logits.shape == (2, 128, config.vocab_size))
    check(f"KV cache: {len(past_kv)} layers of {tuple(past_kv[0][0].shape)}",
          past_kv[0][0].shape == (2, config.attention.num_kv_heads, 128, config.head_dim))

    # KV cache: one more token through the cache equals the uncached forward.
    model.eval()
    with torch.no_grad():
        nxt = torch.randint(3, config.vocab_size, (2, 1))
        cached = model(nxt, past_kv=model(input_ids, use_cache=True).past_kv).logits[:, -1]
        full = model(torch.cat((input_ids, nxt), dim=1)).logits[:, -1]
    check(f"incremental decoding matches the full forward (max diff {(cached - full).abs().max():.1e})",
          torch.allclose(cached, full, atol=1e-4))

    # Training with loss.
    input_ids = torch.randint(0, config.vocab_size, (4, 256))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, logits = model.compute_loss(input_ids)
    loss.backward()
    optimizer.step()
    grads = sum(p.grad is not None for p in model.parameters())
    check(f"loss {loss.item():.3f} (ln vocab = {torch.log(torch.tensor(config.vocab_size)):.3f}); gradients reach all {grads} tensors",
          torch.isfinite(loss) and grads == len(list(model.parameters())))

    # Generation.
    prompt_ids = torch.tensor([[1, 234, 567, 890]])  # [batch=1, prompt_len=4]
    model.eval()
    generated = model.generate(prompt_ids, max_new_tokens=50, temperature=0.7, seed=0)
    check(f"generate: {tuple(generated.shape)}", generated.shape[0] == 1 and 5 <= generated.shape[1] <= 54)
    again = model.generate(prompt_ids, max_new_tokens=50, temperature=0.7, seed=0)
    check("seeded generation is reproducible", torch.equal(generated, again))

    # Save and load.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, use_safetensors=True)
        loaded = HavocModel.load_pretrained(tmp, device="cpu")
        same = torch.equal(loaded(prompt_ids).logits, model(prompt_ids).logits)
    check("save_pretrained / load_pretrained round trip", same and not loaded.training)

    print(f"all checks passed in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
