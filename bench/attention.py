"""Dense MLA against DeepSeek Sparse Attention as the context grows: prefill and decode time of one attention layer.

    python bench/attention.py                       # 1K..32K decode, 1K..8K prefill, V3-shaped heads (scaled down)
    python bench/attention.py --contexts 1024,4096 --reps 3 --threads 2

One MLA layer with V3's per-head shapes (nope 128, rope 64, v 128, kv_lora 512) but --heads heads (V3: 128), and a
V3.2 indexer with heads/2 indexer heads of 128 and top-k 2048 (V3.2: 64 x 128 beside 128 heads, top-2048):

  decode    one new token against a latent cache of S tokens (random contents): dense absorbed MLA reads all S
            latents; DSA scores S indexer keys (cheap heads), keeps 2048 and attends over those gathered latents.
  prefill   S tokens from an empty cache. dense: expanded MLA, causal SDPA. dsa-masked: the indexer plus SDPA with
            the top-k mask (nanoseek's training/prefill form; costs more than dense, by construction).
            dsa-gathered: absorbed MLA over each query's 2048 gathered latents, in chunks of --chunk queries
            (nanoseek's decode path run over a prompt; O(S * k) attention plus the O(S^2) indexer).

Times are medians of --reps runs on whatever this machine is doing; the ratios matter, not the milliseconds.
The table ends with where DSA first beats dense, and the FLOP-count crossover for comparison.

Recorded at commit 4981877, `python bench/attention.py --reps 3`, 2 shared CPU cores, fp32 (noisy: 4096 vs 8192):

         S | decode dense      dsa  ratio flops ratio | prefill dense dsa-masked dsa-gathered  ratio
      1024 |       1.84ms   2.37ms  0.78x       0.94x |         192ms      248ms        646ms  0.30x
      2048 |       2.43ms   3.13ms  0.78x       0.94x |        1035ms     1417ms       2775ms  0.37x
      4096 |       7.17ms   6.98ms  1.03x       1.79x |        2132ms     3378ms       6625ms  0.32x
      8192 |       5.75ms   4.07ms  1.41x       3.24x |       13507ms          -      16260ms  0.83x
     16384 |      10.11ms   5.22ms  1.94x       5.44x |
     32768 |      17.73ms   7.32ms  2.42x       8.24x |

Decode: DSA wins from 4K (FLOP count: 2.2K; the gather and top-k are the fixed cost), 2.4x at 32K and growing.
Prefill: DSA (gathered) has not caught up by 8K (0.83x) but closes fast, since dense expanded MLA falls off
SDPA's flash kernel on CPU (v_head_dim != qk_head_dim: the math path holds H x S x S scores) and grows ~S^2 with
a big constant; at S = 16K that path needs ~34 GB and was OOM-killed on this 23 GB machine, so --max-prefill
stays at 8K. The masked form (training/prefill in nanoseek) always costs more than dense: it is dense attention
plus the indexer, as V3.2 uses it only for short sequences.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanoseek import ModelConfig
from nanoseek.model import MLA, LatentCache, rope_cos_sin, rope_inv_freq


def layer_config(heads: int, topk: int, index_heads: int | None) -> ModelConfig:
    return ModelConfig(vocab_size=256, hidden_size=1024, num_hidden_layers=1, num_attention_heads=heads,
                       n_routed_experts=0, q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128,
                       qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1, num_nextn_predict_layers=0,
                       max_position_embeddings=1 << 17, index_topk=topk, index_n_heads=index_heads or heads // 2,
                       index_head_dim=128)


def timed(fn, reps: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.no_grad()
def bench_decode(dense: MLA, sparse: MLA, config: ModelConfig, S: int, reps: int, rope) -> tuple[float, float]:
    cache = LatentCache.allocate(config, 1, S, with_mtp=False)
    g = torch.Generator().manual_seed(S)
    for t in (cache.kv, cache.pe, cache.idx):
        t.copy_(torch.randn(t.shape, generator=g))
    x = torch.randn(1, 1, config.hidden_size, generator=g)
    pos = torch.full((1, 1), S - 1)
    cos, sin = rope(pos)
    return (timed(lambda: dense(x, cos, sin, cache=cache, positions_BT=pos), reps),
            timed(lambda: sparse(x, cos, sin, cache=cache, positions_BT=pos), reps))


@torch.no_grad()
def bench_prefill(dense: MLA, sparse: MLA, config: ModelConfig, S: int, reps: int, rope, chunk: int,
                  masked: bool) -> tuple[float, float | None, float]:
    x = torch.randn(1, S, config.hidden_size, generator=torch.Generator().manual_seed(S))
    pos = torch.arange(S)[None]
    cos, sin = rope(pos)
    cache = LatentCache.allocate(config, 1, S, with_mtp=False)

    def gathered():
        for t0 in range(0, S, chunk):
            t1 = min(S, t0 + chunk)
            sparse(x[:, t0:t1], cos[:, t0:t1], sin[:, t0:t1], cache=cache, positions_BT=pos[:, t0:t1])

    d = timed(lambda: dense(x, cos, sin), reps)
    m = timed(lambda: sparse(x, cos, sin), reps) if masked else None
    return d, m, timed(gathered, reps)


def flops_decode(c: ModelConfig, S: int) -> tuple[float, float]:
    """Attention FLOPs of one decode token (absorbed): 2 * H * (C + R + C) per key; DSA adds 2 * J * I per key
    for the indexer and attends over min(S, k) keys."""
    per_key = 2 * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return per_key * S, 2 * c.index_n_heads * c.index_head_dim * S + per_key * min(S, c.index_topk)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768", help="context lengths S")
    p.add_argument("--max-prefill", type=int, default=8192, help="longest prefill timed (they are O(S^2))")
    p.add_argument("--max-masked", type=int, default=4096, help="longest dsa-masked prefill (SDPA with a mask "
                   "materialises H x S x S scores on CPU)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (V3: 128)")
    p.add_argument("--index-heads", type=int, help="indexer heads (default heads / 2, as V3.2's 64 for 128)")
    p.add_argument("--topk", type=int, default=2048, help="keys per query (V3.2: 2048)")
    p.add_argument("--chunk", type=int, default=128, help="queries per chunk in the gathered prefill")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (median)")
    p.add_argument("--threads", type=int, help="torch threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = layer_config(args.heads, args.topk, args.index_heads)
    sparse = MLA(config, 0).eval()
    dense = MLA(config.replace(index_topk=None), 0).eval()
    for m in (sparse, dense):
        for name, w in m.named_parameters():
            torch.nn.init.normal_(w, std=0.02) if w.dim() > 1 else torch.nn.init.ones_(w)
    dense.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.startswith("indexer.")})
    inv_freq, factor = rope_inv_freq(config)

    def rope(pos):
        return rope_cos_sin(inv_freq, factor, pos)

    print(f"one MLA layer: {args.heads} heads (nope 128 + rope 64, v 128, kv_lora 512), indexer "
          f"{config.index_n_heads} x 128, top-{args.topk}; fp32, {torch.get_num_threads()} threads")
    header = (f"{'S':>6} | {'decode dense':>12} {'dsa':>8} {'ratio':>6} {'flops ratio':>11} | "
              f"{'prefill dense':>13} {'dsa-masked':>10} {'dsa-gathered':>12} {'ratio':>6}")
    print(header + "\n" + "-" * len(header))
    cross_decode = cross_prefill = None
    for S in [int(s) for s in args.contexts.split(",")]:
        dd, ds = bench_decode(dense, sparse, config, S, args.reps, rope)
        fd, fs = flops_decode(config, S)
        row = f"{S:>6} | {dd:>10.2f}ms {ds:>6.2f}ms {dd / ds:>5.2f}x {fd / fs:>10.2f}x |"
        if cross_decode is None and ds < dd:
            cross_decode = S
        if S <= args.max_prefill:
            pd, pm, pg = bench_prefill(dense, sparse, config, S, max(1, args.reps // 2), rope, args.chunk,
                                       S <= args.max_masked)
            masked = f"{pm:>8.0f}ms" if pm is not None else f"{'-':>10}"
            row += f" {pd:>11.0f}ms {masked} {pg:>10.0f}ms {pd / pg:>5.2f}x"
            if cross_prefill is None and pg < pd:
                cross_prefill = S
        print(row, flush=True)
    per_key = 2 * config.num_attention_heads * (2 * config.kv_lora_rank + config.qk_rope_head_dim)
    idx_key = 2 * config.index_n_heads * config.index_head_dim
    flop_cross = per_key * args.topk / (per_key - idx_key)
    print(f"\ndecode: DSA faster from S = {cross_decode or 'never (in range)'}; FLOP count crosses at S = "
          f"{flop_cross:.0f} (k * per-key / (per-key - indexer per-key))")
    print(f"prefill (gathered vs dense SDPA): DSA faster from S = {cross_prefill or 'never (in range)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
