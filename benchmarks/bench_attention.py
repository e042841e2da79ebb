"""Decode attention over a paged KV cache, three ways, compiled, on the CPU (one layer's attention
at the havoc_small shape: 8 query heads, 2 KV heads, head dim 64; 16 rows of one query each).

- static: the old engine's slots x context cache, SDPA over every position with a mask.
- gather: the engine's paged cache; each row's live blocks (a power-of-two table) gathered, then SDPA.
- flex: FlexAttention over the whole pool, a mask that admits a row's own blocks up to its position
  (how torch's experimental PagedAttention maps logical to physical positions), with its block mask.

    .venv/bin/python benchmarks/bench_attention.py [--context 4096] [--live 136]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from havoc_eval.bench import cpu_model, markdown_table

ROWS, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 2, 64, 16


def timed(fn, *args, repeats: int = 50) -> float:
    for _ in range(5):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096, help="positions per sequence (the static cache's width)")
    parser.add_argument("--live", type=int, default=136, help="positions each row has so far")
    args = parser.parse_args()
    torch.manual_seed(0)
    q = torch.randn(ROWS, HEADS, 1, HEAD_DIM)
    positions = torch.full((ROWS, 1), args.live - 1)

    # static: [rows, kv heads, context, head dim], the live prefix filled.
    k_static, v_static = (torch.randn(ROWS, KV_HEADS, args.context, HEAD_DIM) for _ in range(2))
    key_positions = torch.arange(args.context)

    def static(q, k, v, positions):
        mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    # paged: a pool of every row's context in blocks, rows' blocks shuffled through it.
    blocks_per_row = args.context // BLOCK
    pool_k, pool_v = (torch.randn(ROWS * blocks_per_row + 1, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(2))
    order = torch.randperm(ROWS * blocks_per_row).view(ROWS, blocks_per_row)
    live_blocks = -(-args.live // BLOCK)
    width = min(blocks_per_row, 1 << (live_blocks - 1).bit_length())
    tables = order[:, :width].contiguous()

    def gather(q, pool_k, pool_v, tables, positions):
        rows, blocks = tables.shape
        k, v = (p[tables].view(rows, blocks * BLOCK, KV_HEADS, HEAD_DIM).transpose(1, 2) for p in (pool_k, pool_v))
        mask = (torch.arange(blocks * BLOCK)[None, None, :] <= positions[:, :, None])[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    # flex: the pool as one sequence [1, kv heads, positions, head dim]; a physical block's owner row
    # and logical index say whether a row may read it.
    owner = torch.full((pool_k.shape[0],), -1)
    logical = torch.zeros(pool_k.shape[0], dtype=torch.long)
    for row in range(ROWS):
        owner[order[row, :live_blocks]] = row
        logical[order[row, :live_blocks]] = torch.arange(live_blocks)
    flat_k, flat_v = (p.view(1, -1, KV_HEADS, HEAD_DIM).transpose(1, 2) for p in (pool_k, pool_v))
    last = positions[:, 0]

    def readable(b, h, q_idx, kv_idx):
        block = kv_idx // BLOCK
        return (owner[block] == b) & (logical[block] * BLOCK + kv_idx % BLOCK <= last[b])

    def flex(q, flat_k, flat_v, block_mask):
        # flex takes one batch of keys: the pool is broadcast to every row, the mask picks each row's own.
        k, v = (t.expand(ROWS, -1, -1, -1) for t in (flat_k, flat_v))
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)

    def build_mask():
        return create_block_mask(readable, ROWS, None, 1, flat_k.shape[2], device="cpu")

    block_mask = build_mask()
    compiled = {name: torch.compile(fn, fullgraph=True, dynamic=False) for name, fn in
                (("static", static), ("gather", gather), ("flex", flex))}
    with torch.inference_mode():
        reference = static(q, k_static, v_static, positions)
        # Same keys for the paged layouts: copy each row's live positions into its blocks.
        for row in range(ROWS):
            for i in range(live_blocks):
                part = slice(i * BLOCK, (i + 1) * BLOCK)
                pool_k[order[row, i]] = k_static[row, :, part].transpose(0, 1)
                pool_v[order[row, i]] = v_static[row, :, part].transpose(0, 1)
        for name, out in (("gather", compiled["gather"](q, pool_k, pool_v, tables, positions)),
                          ("flex", compiled["flex"](q, flat_k, flat_v, block_mask))):
            torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4, msg=f"{name} differs from static")
        results = {
            "static": timed(compiled["static"], q, k_static, v_static, positions),
            "gather": timed(compiled["gather"], q, pool_k, pool_v, tables, positions),
            "flex": timed(compiled["flex"], q, flat_k, flat_v, block_mask),
            "flex block mask, rebuilt per step": timed(build_mask, repeats=10),
        }
    rows = [(name, f"{1e6 * t:.0f}", f"{results['static'] / t:.2f}x") for name, t in results.items()]
    print(f"# {date.today()} | {cpu_model()}, {torch.get_num_threads()} threads | torch {torch.__version__} | "
          f"context {args.context}, {args.live} live positions, {ROWS} rows, table width {width} blocks")
    print(markdown_table(["decode attention, one layer", "median (µs)", "vs static"], rows))


if __name__ == "__main__":
    main()
