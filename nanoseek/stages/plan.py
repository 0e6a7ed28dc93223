"""`nanoseek plan`: from a compute budget to a model, a token count, a learning rate, a batch size and a wall time,
by DeepSeek LLM's scaling laws (sec. 3: eta_opt, B_opt, M_opt, D_opt as power laws of C = M * D).

    nanoseek plan --compute 1e20
    nanoseek plan --hours 24 --device h100 --gpus 8 --from-run runs_out/small
    nanoseek plan --hours 0.5 --device cpu --seq-len 256 --vocab-size 4096 --json

M is DeepSeek's model scale (non-embedding FLOPs per token: active experts, MLA, causal attention, no lm_head,
no MTP). The model is the V3-style shape (nanoseek.scaling.v3_shape) whose M is nearest M_opt. The wall time
counts the FLOPs MFU is measured against (lm_head, MTP and full attention included), at --mfu of the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

from .. import scaling
from ..trainer import peak_flops, read_metrics

# Dense bf16 tensor-core peaks per accelerator (datasheets; H200 has H100's compute with more memory). 'cpu' is
# measured with a float32 matmul on this machine when asked for.
PEAKS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
# MFU when no run of this stack says otherwise: torchtitan's 16B MoE on 8 x H100 reaches ~20% (DeepSeek-V3's own
# run 35-39%; shared/REFERENCE.md). Pass --from-run to use what nanoseek measured on your machine.
DEFAULT_MFU = 0.20


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--compute", type=float, metavar="FLOPS", help="compute budget C = M * D in FLOPs")
    budget.add_argument("--hours", type=float, help="wall-clock hours on --gpus x --device (C follows from the peak "
                                                     "and --mfu)")
    p.add_argument("--device", default="h100", choices=[*PEAKS, "cpu"],
                   help="accelerator for the wall time (default h100; cpu measures a matmul here)")
    p.add_argument("--gpus", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--mfu", type=float, help=f"model FLOPs utilisation (default: --from-run's, else {DEFAULT_MFU})")
    p.add_argument("--from-run", type=Path, metavar="DIR", help="take the MFU from this run dir's metrics.jsonl "
                                                                "(median over steps, the first 10%% left out)")
    p.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096, DeepSeek LLM's)")
    p.add_argument("--vocab-size", type=int, default=129280, help="vocabulary (default 129280, V3's); it does not "
                                                                 "enter M but does enter the wall time")
    p.add_argument("--mtp", type=int, default=1, help="MTP depth of the planned model (default 1)")
    p.add_argument("--save-config", type=Path, metavar="PATH", help="write the planned model's HF config.json here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def mfu_from_run(run_dir: Path) -> float:
    rows = [r["mfu"] for r in read_metrics(run_dir) if r.get("mfu")]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no steps with an 'mfu' value; train there first or "
                         f"pass --mfu")
    return statistics.median(rows[len(rows) // 10:])


def make_plan(*, compute: float | None = None, hours: float | None = None, device: str = "h100", gpus: int = 1,
              mfu: float = DEFAULT_MFU, seq_len: int = 4096, vocab_size: int = 129280, mtp: int = 1,
              peak: float | None = None) -> dict:
    """The plan as a dict (what --json prints). With `hours`, C is found by fixed point: the hardware FLOPs the
    time buys, times M / (hardware FLOPs per token) of the model chosen for that C."""
    if (compute is None) == (hours is None):
        raise ValueError("give exactly one of compute or hours")
    if peak is None:
        peak = PEAKS[device] if device in PEAKS else peak_flops(torch.device("cpu"), torch.float32)
    throughput = peak * mfu * gpus  # FLOP/s as MFU counts them

    def choose(C):
        cand = scaling.search_config(scaling.m_opt(C), seq_len=seq_len, vocab_size=vocab_size, mtp=mtp)
        model = scaling.meta_model(cand.config)
        return cand, model, scaling.hardware_flops_per_token(cand.config, seq_len, model)

    if compute is not None:
        C = compute
        cand, model, hw_per_token = choose(C)
    else:
        available = hours * 3600 * throughput
        C = available / 3  # first guess; converges in a few rounds (the ratio only moves with the shape)
        for _ in range(6):
            cand, model, hw_per_token = choose(C)
            new_C = available * cand.M / hw_per_token
            if abs(new_C / C - 1) < 1e-3:
                break
            C = new_C
    config = cand.config
    tokens = C / cand.M  # D for the model actually chosen, so that M * D = C holds exactly
    hp = scaling.hparams_for_budget(C, seq_len)
    batch_tokens = hp.batch_seqs * seq_len
    counts = model.param_counts()
    seconds = hw_per_token * tokens / throughput
    return {
        "compute": C, "in_fitted_range": scaling.in_fitted_range(C), "fitted_range": list(scaling.FITTED_RANGE),
        "M_opt": scaling.m_opt(C), "D_opt": scaling.d_opt(C),
        "model": {"hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
                  "num_attention_heads": config.num_attention_heads, "n_routed_experts": config.n_routed_experts,
                  "num_experts_per_tok": config.num_experts_per_tok, "n_shared_experts": config.n_shared_experts,
                  "moe_intermediate_size": config.moe_intermediate_size, "kv_lora_rank": config.kv_lora_rank,
                  "q_lora_rank": config.q_lora_rank, "num_nextn_predict_layers": config.num_nextn_predict_layers,
                  "params_total": counts["total"] + counts["mtp_total"], "params_active": counts["active"],
                  "M": cand.M, "M_over_M_opt": cand.miss, "hardware_flops_per_token": hw_per_token},
        "tokens": tokens, "lr": hp.lr, "lr_law": hp.lr_law, "batch_tokens_law": hp.batch_tokens,
        "batch_sequences": hp.batch_seqs, "seq_len": seq_len, "steps": math.ceil(tokens / batch_tokens),
        "device": device, "gpus": gpus, "peak_flops": peak, "mfu": mfu, "hours": seconds / 3600,
        "hf_config": config.to_hf_dict(),
    }


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def print_plan(plan: dict, mfu_source: str) -> None:
    m = plan["model"]
    note = "" if plan["in_fitted_range"] else (f"  (outside the paper's fitted {_fmt(plan['fitted_range'][0])}.."
                                              f"{_fmt(plan['fitted_range'][1])}: extrapolated)")
    print(f"compute C = M * D      {_fmt(plan['compute'])} FLOPs{note}")
    print(f"law (DeepSeek LLM 3.2) M_opt {_fmt(plan['M_opt'])} FLOPs/token, D_opt {_fmt(plan['D_opt'])} tokens")
    print(f"model (v3_shape)       hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
          f"{m['num_attention_heads']} heads, {m['n_routed_experts']} routed experts (top-{m['num_experts_per_tok']}) "
          f"+ {m['n_shared_experts']} shared of width {m['moe_intermediate_size']}, kv/q LoRA {m['kv_lora_rank']}/"
          f"{m['q_lora_rank']}, MTP {m['num_nextn_predict_layers']}")
    print(f"                       {m['params_total'] / 1e6:,.1f}M params, {m['params_active'] / 1e6:,.1f}M active; "
          f"M {_fmt(m['M'])} ({m['M_over_M_opt']:.2f} x M_opt)")
    print(f"data                   {_fmt(plan['tokens'])} tokens = {plan['steps']:,} steps x "
          f"{plan['batch_sequences']} x {plan['seq_len']}")
    lr = f"{plan['lr']:.3g}" + (f" (law {plan['lr_law']:.3g}, capped)" if plan["lr"] < plan["lr_law"] else "")
    print(f"law (DeepSeek LLM 3.1) lr {lr}, batch {_fmt(plan['batch_tokens_law'])} tokens -> "
          f"{plan['batch_sequences']} sequences of {plan['seq_len']}")
    print(f"wall time              {plan['hours']:.3g} h on {plan['gpus']} x {plan['device']} "
          f"(peak {_fmt(plan['peak_flops'])} FLOP/s, MFU {plan['mfu']:.3f} {mfu_source}; "
          f"{_fmt(m['hardware_flops_per_token'])} FLOPs/token counted as MFU counts them)")


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.mfu is not None:
            mfu, source = args.mfu, "(--mfu)"
        elif args.from_run is not None:
            mfu, source = mfu_from_run(args.from_run), f"(measured in {args.from_run})"
        else:
            mfu, source = DEFAULT_MFU, "(default)"
        for name in ("compute", "hours"):
            value = getattr(args, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"--{name} must be a positive number, got {value}")
        if not 0 < mfu <= 1 or args.gpus < 1 or args.seq_len < 1:
            raise ValueError(f"need 0 < mfu <= 1 (got {mfu}), --gpus >= 1 and --seq-len >= 1")
        plan = make_plan(compute=args.compute, hours=args.hours, device=args.device, gpus=args.gpus, mfu=mfu,
                         seq_len=args.seq_len, vocab_size=args.vocab_size, mtp=args.mtp)
    except (ValueError, OSError) as e:
        print(f"nanoseek plan: {e}", file=sys.stderr)
        return 2
    plan["mfu_source"] = source
    if args.save_config:
        args.save_config.parent.mkdir(parents=True, exist_ok=True)
        args.save_config.write_text(json.dumps(plan["hf_config"], indent=2, sort_keys=True) + "\n")
    if args.json:
        print(json.dumps(plan, indent=2, sort_keys=True))
    else:
        print_plan(plan, source)
        if args.save_config:
            print(f"config                 written to {args.save_config}")
    return 0
