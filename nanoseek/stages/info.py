"""`nanoseek info`: build presets (on the meta device, so even 671B is instant) and print their sizes and costs."""

import argparse

import torch

from ..config import PRESETS, ModelConfig
from ..model import Transformer


def describe(name: str, config: ModelConfig, seq_len: int) -> str:
    with torch.device("meta"):
        model = Transformer(config)
    c = model.param_counts()
    kind = "V3 (sigmoid, noaux_tc)" if config.scoring_func == "sigmoid" else f"V2 (softmax, {config.topk_method})"
    lines = [
        f"{name}: {kind}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.n_routed_experts} routed + {config.n_shared_experts} shared experts, top-{config.num_experts_per_tok}",
        f"  parameters     {_fmt(c['total'])} total, {_fmt(c['active'])} active per token"
        + (f"; MTP module {_fmt(c['mtp_total'])} ({config.num_nextn_predict_layers} depth)" if c["mtp_total"] else ""),
        f"  FLOPs/token    {_fmt(model.flops_per_token(seq_len, training=False))} forward, "
        f"{_fmt(model.flops_per_token(seq_len))} training (seq {seq_len}, MTP included)",
        f"  KV cache       {config.latent_cache_dim} values/token/layer (latent) vs {config.kv_cache_dim} per-head K/V "
        f"({config.kv_cache_dim / config.latent_cache_dim:.1f}x smaller)",
    ]
    return "\n".join(lines)


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek info", description=__doc__)
    p.add_argument("--preset", choices=list(PRESETS), action="append",
                   help="preset to describe (repeatable; default: all)")
    p.add_argument("--model", help="an HF-format folder to describe instead (reads its config.json)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for attention FLOPs (default 4096)")
    args = p.parse_args(argv)
    if args.model:
        print(describe(args.model, ModelConfig.load(args.model), args.seq_len))
        return 0
    for name in args.preset or list(PRESETS):
        print(describe(name, PRESETS[name], args.seq_len))
    return 0
