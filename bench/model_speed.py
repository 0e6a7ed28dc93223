"""Training throughput (forward + backward + AdamW) of nanoseek against transformers' DeepseekV3ForCausalLM on the
same config and weights, in one run, fp32 and bf16, plus the fraction of this machine's measured matmul peak.

    python bench/model_speed.py                 # the issue's config, 16 and 64 routed experts
    python bench/model_speed.py --steps 5 --experts 16
    python bench/model_speed.py --compile       # nanoseek under torch.compile (transformers eager)

bf16 means parameters, activations and optimizer state in bfloat16 for both models (the same treatment).
Timings alternate between the two models so that machine noise hits both; the ratio is what to read.
"""

import argparse
import logging
import statistics
import time

import torch

from nanoseek import ModelConfig, Transformer

logging.getLogger("transformers").setLevel(logging.ERROR)


def bench_config(experts: int) -> ModelConfig:
    return ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                       num_hidden_layers=6, num_attention_heads=8, n_shared_experts=1, n_routed_experts=experts,
                       num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=1.0, q_lora_rank=128,
                       kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       first_k_dense_replace=1, num_nextn_predict_layers=0, aux_loss_alpha=0.0,
                       max_position_embeddings=1024)


def matmul_peak(dtype: torch.dtype, n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def make_step(model, ids, targets, is_hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step():
        if is_hf:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(ids, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def run(experts: int, dtype: torch.dtype, steps: int, batch: int, seq: int, tmp: str, compile_: bool) -> dict:
    import transformers

    torch.manual_seed(0)
    config = bench_config(experts)
    ours = Transformer(config)
    ours.save_pretrained(tmp)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32)
    ours = Transformer.from_pretrained(tmp)
    ours.train(), theirs.train()
    if dtype != torch.float32:
        ours.to(dtype), theirs.to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    # HF shifts labels inside its loss; ours takes explicit targets. Same tokens, same loss definition.
    targets = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], dim=1)
    with torch.no_grad():
        l0, l1 = ours(ids, targets=targets).item(), theirs(input_ids=ids, labels=ids).loss.item()
    if compile_:
        ours.compile()  # in place: state_dict keys unchanged (what `nanoseek pretrain --compile` does)
    fns = {"nanoseek": make_step(ours, ids, targets, False), "transformers": make_step(theirs, ids, ids, True)}
    times = {k: [] for k in fns}
    t_compile = time.perf_counter()
    for name, fn in fns.items():  # warm-up (and compilation)
        fn()
        if name == "nanoseek":
            t_compile = time.perf_counter() - t_compile
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flops = ours.flops_per_token(seq, include_mtp=False)
    peak = matmul_peak(dtype)
    out = {"experts": experts, "dtype": str(dtype).replace("torch.", ""), "loss_ours": l0, "loss_hf": l1,
           "peak_gflops": peak / 1e9, "warmup_s": t_compile}
    for name, ts in times.items():
        tps = batch * seq / statistics.median(ts)
        out[name] = tps
        out[name + "_mfu"] = tps * flops / peak
    out["ratio"] = out["nanoseek"] / out["transformers"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model (median reported)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--experts", type=int, nargs="+", default=[16, 64])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile nanoseek (transformers stays eager)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    rows = []
    for experts in args.experts:
        for dt in args.dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                r = run(experts, getattr(torch, dt), args.steps, args.batch, args.seq, tmp, args.compile)
            rows.append(r)
            print(f"experts={r['experts']:3d} {r['dtype']:9s} nanoseek {r['nanoseek']:8.0f} tok/s "
                  f"({100 * r['nanoseek_mfu']:4.1f}% of {r['peak_gflops']:.0f} GFLOP/s matmul peak)  "
                  f"transformers {r['transformers']:8.0f} tok/s ({100 * r['transformers_mfu']:4.1f}%)  "
                  f"ratio {r['ratio']:.2f}x   initial loss {r['loss_ours']:.4f} vs {r['loss_hf']:.4f}"
                  + (f"  (compile {r['warmup_s']:.0f}s)" if args.compile else ""), flush=True)
    by = {(r["experts"], r["dtype"]): r for r in rows}
    for dt in args.dtypes:
        dt = dt.replace("torch.", "")
        if (16, dt) in by and (64, dt) in by:
            print(f"{dt}: 64 experts cost {by[(16, dt)]['nanoseek'] / by[(64, dt)]['nanoseek']:.2f}x the 16-expert "
                  f"step time (nanoseek), {by[(16, dt)]['transformers'] / by[(64, dt)]['transformers']:.2f}x "
                  f"(transformers)")


if __name__ == "__main__":
    main()
