"""`nanoseek scaling`: an IsoFLOP sweep (DeepSeek LLM sec. 3.2) with the pretraining stack, then the fits.

    nanoseek scaling --run-dir runs_out/scaling --budgets 1e11 3e11 1e12 --sizes 3

For each compute budget C (C = M * D, DeepSeek's definition) it trains --sizes V3-style models (v3_shape, no MTP)
whose M spans --span x around the paper's M_opt(C), each for D = C / M tokens with the learning rate and batch of
the laws at C (sec. 3.1), on the same data in the same order. A point's final validation loss goes to
DIR/points/<name>/result.json; a point with a result is skipped, one without resumes from its checkpoint, so
running the command again continues the sweep (or only redoes the fits).

Fits: loss against ln M, one parabola per budget; its vertex is M_opt(C) and D_opt(C) = C / M_opt; then power
laws M_opt = M_base C^a and D_opt = D_base C^b, printed beside the paper's (a = 0.5243, b = 0.4757), written to
DIR/scaling.json and plotted in DIR/plots/isoflop.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import data, scaling
from ..model import Transformer
from ..optim import build_optimizer
from ..trainer import Trainer, TrainConfig, evaluate_lm, prepare_run_dir
from .pretrain import ensure_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for the tokenizer, the points and the fits")
    p.add_argument("--budgets", type=float, nargs="+", required=True, metavar="C",
                   help="compute budgets C = M * D in FLOPs (at least 2 for the power laws)")
    p.add_argument("--sizes", type=int, default=5, help="model sizes per budget (default 5; at least 3)")
    p.add_argument("--span", type=float, default=2.5, help="ratio of M between neighbouring sizes (default 2.5)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--data", action="append", metavar="PATH", help="corpus (default: the Python standard library)")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary when it is trained here (default 4096)")
    p.add_argument("--fim-rate", type=float, default=0.0,
                   help="fill-in-the-middle rate (default 0: plain next-token loss, like the validation loss)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches of 16 sequences (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order, the same for every point")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--dry-run", action="store_true", help="print the points (sizes, steps, tokens) and stop")
    return p


def point_name(C: float, config) -> str:
    return f"C{C:.2e}_d{config.hidden_size}_L{config.num_hidden_layers}_E{config.n_routed_experts}"


def plan_points(budgets, sizes: int, span: float, seq_len: int, vocab_size: int) -> list[dict]:
    """Per budget, `sizes` targets spaced by `span` around the paper's M_opt(C), moved up as a block when the lower
    end falls below the smallest v3_shape model; each target becomes the nearest v3_shape config."""
    smallest = scaling.search_config(1.0, seq_len=seq_len, vocab_size=vocab_size, mtp=0).M
    points = []
    for C in sorted(budgets):
        low = scaling.m_opt(C) * span ** (-(sizes - 1) / 2)
        low = max(low, smallest)
        seen = set()
        hp = scaling.hparams_for_budget(C, seq_len)
        for i in range(sizes):
            cand = scaling.search_config(low * span**i, seq_len=seq_len, vocab_size=vocab_size, mtp=0)
            name = point_name(C, cand.config)
            if name in seen:
                continue
            seen.add(name)
            batch_tokens = hp.batch_seqs * seq_len
            steps = max(1, round(C / cand.M / batch_tokens))
            points.append({"name": name, "budget": C, "M": cand.M, "config": cand.config, "lr": hp.lr,
                           "batch_seqs": hp.batch_seqs, "steps": steps, "tokens": steps * batch_tokens,
                           "compute": cand.M * steps * batch_tokens})
    return points


def train_point(point: dict, run_dir: Path, tok, corpus, args) -> dict:
    """Trains one point in run_dir/points/<name> (resumable) and returns its result (also written to result.json)."""
    folder = run_dir / "points" / point["name"]
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    config, steps = point["config"], point["steps"]
    run_config = {"stage": "scaling-point", "model": config.to_hf_dict(), "budget": point["budget"],
                  "lr": point["lr"], "batch_seqs": point["batch_seqs"], "steps": steps, "seq_len": args.seq_len,
                  "seed": args.seed, "fim_rate": args.fim_rate, "data": args.data}
    prepare_run_dir(folder, run_config, may_change=())
    torch.manual_seed(args.seed)
    model = Transformer(config)
    optimizer = build_optimizer(model, point["lr"])
    loader = data.PackedLoader(corpus, tok, point["batch_seqs"], args.seq_len, seed=args.seed, fim_rate=args.fim_rate)
    # Short schedules: 5% warm-up, then DeepSeek's multi-step decay; no MTP (mtp=0 configs); a checkpoint every
    # quarter (and by step 50) so an interrupted point resumes. The guard only acts on non-finite losses: every point
    # must see the same tokens, and in a few hundred steps on the stdlib its 6-sigma spike rule fires on ordinary
    # batch-to-batch variation (odd files: data tables, encodings) and ended the first attempt at this sweep.
    cfg = TrainConfig(steps=steps, lr=point["lr"], warmup=max(1, steps // 20), schedule="multistep",
                      mtp_weight=0.0, mtp_weight_late=0.0, save_every=max(1, min(steps // 4, 50)), keep_last=1,
                      eval_every=None, progress=False, guard_sigma=float("inf"))
    t0 = time.time()
    trainer = Trainer(model, optimizer, loader, folder, cfg, stage="scaling", seq_len=args.seq_len,
                      log=lambda s: None)
    last = trainer.fit()
    bpt = data.val_bytes_per_token(corpus, tok, args.seq_len)
    val = evaluate_lm(model.eval(), lambda: data.val_batches(corpus, tok, 16, args.seq_len), bpt,
                      max_batches=args.eval_batches)
    result = {"name": point["name"], "budget": point["budget"], "M": point["M"], "steps": steps,
              "batch_seqs": point["batch_seqs"], "seq_len": args.seq_len, "lr": point["lr"],
              "tokens": point["tokens"], "compute": point["compute"],
              "hardware_flops_per_token": model.flops_per_token(args.seq_len),
              "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
              "n_routed_experts": config.n_routed_experts, "params_active": model.param_counts()["active"],
              "loss": val["val/loss"], "bpb": val["val/bpb"], "train_loss": last.get("loss"),
              "seconds": time.time() - t0}
    result_path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def best_per_budget(results: list[dict]) -> dict[float, dict]:
    """{budget: its point with the lowest loss}, budgets ascending: the measurement, fitted or not."""
    return {C: min((r for r in results if r["budget"] == C), key=lambda r: r["loss"])
            for C in sorted({r["budget"] for r in results})}


def plot(fit: scaling.IsoFlopFit, results: list[dict], path: Path, surface: scaling.LossSurface | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    budgets = sorted({r["budget"] for r in results})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(budgets)))
    for C, color in zip(budgets, colors):
        pts = sorted((r["M"], r["loss"]) for r in results if r["budget"] == C)
        ax1.plot(*zip(*pts), "o", color=color, label=f"C = {C:.1e}")
        xs = np.geomspace(pts[0][0] / 1.5, pts[-1][0] * 1.5, 100)
        if C in fit.budgets:
            par = fit.parabolas[fit.budgets.index(C)]
            ax1.plot(xs, par(xs), "-", color=color, alpha=0.7)
            ax1.plot([par.argmin], [par.min_loss], "*", color=color, markersize=14)
        elif len(pts) >= 3:  # no usable minimum: the parabola dotted, for the eye
            ax1.plot(xs, scaling.fit_parabola(*zip(*pts))(xs), ":", color=color, alpha=0.7)
    ax1.set_xscale("log")
    ax1.set_xlabel("M (non-embedding FLOPs/token)")
    ax1.set_ylabel("validation loss (nats/token)")
    ax1.set_title("IsoFLOP profiles (star: vertex; dotted: no minimum inside)")
    ax1.legend(fontsize=8)
    cs = np.geomspace(min(budgets) / 2, max(budgets) * 2, 50)
    for law, opts, paper, color, label in ((fit.m_law, fit.m_opt, (scaling.M_COEF, scaling.M_EXP), "C0", "M_opt"),
                                           (fit.d_law, fit.d_opt, (scaling.D_COEF, scaling.D_EXP), "C1", "D_opt")):
        ax2.plot(fit.budgets, opts, "o", color=color)
        if law:
            ax2.plot(cs, law[0] * cs ** law[1], "-", color=color, label=f"{label} fit: {law[0]:.3g} C^{law[1]:.3f}")
        ax2.plot(cs, paper[0] * cs ** paper[1], "--", color=color, alpha=0.6,
                 label=f"{label} paper: {paper[0]} C^{paper[1]}")
    if surface:
        ax2.plot(cs, [surface.m_opt(c) for c in cs], ":", color="C0",
                 label=f"M_opt loss surface: C^{surface.m_exp:.3f}")
    # The best size tried at each budget, fitted or not: where the fits fail this is still the measurement.
    best = [best_per_budget(results)[C] for C in budgets]
    ax2.plot(budgets, [r["M"] for r in best], "x", color="C0", markersize=9, label="M of the best size tried")
    ax2.plot(budgets, [C / r["M"] for C, r in zip(budgets, best)], "x", color="C1", markersize=9,
             label="D of the best size tried")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("compute C = M D (FLOPs)")
    ax2.set_title("optimal model (FLOPs/token) and data (tokens) scale")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.sizes < 3:
        print("nanoseek scaling: --sizes must be at least 3 (a parabola per budget)", file=sys.stderr)
        return 2
    if any(not (C > 0 and math.isfinite(C)) for C in args.budgets) or args.span <= 1:
        print("nanoseek scaling: budgets must be positive and --span > 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    try:
        tok = ensure_tokenizer(run_dir, args.data, args.vocab_size)
        corpus = data.load_corpus(tok, args.data, cache_dir=run_dir / "cache", log=print)
    except (data.DataError, OSError, ValueError) as e:
        print(f"nanoseek scaling: {e}", file=sys.stderr)
        return 2
    points = plan_points(args.budgets, args.sizes, args.span, args.seq_len, tok.vocab_size)
    total_tokens = sum(p["tokens"] for p in points)
    print(f"scaling: {len(points)} points, {total_tokens:,} training tokens in all "
          f"(corpus: {corpus.num_tokens(corpus.train_docs):,} training tokens)")
    for p in points:
        c = p["config"]
        print(f"  {p['name']:34s} M {p['M']:.3g}  {p['steps']:5d} steps x {p['batch_seqs']} x {args.seq_len}  "
              f"lr {p['lr']:.3g}  C {p['compute']:.3g}  ({c.num_experts_per_tok}/{c.n_routed_experts} experts)")
    if args.dry_run:
        return 0
    results = []
    t0 = time.time()
    for i, p in enumerate(points):
        try:
            r = train_point(p, run_dir, tok, corpus, args)
        except RuntimeError as e:  # a diverged point (the guard gave up): report it, fit without it
            print(f"[{i + 1}/{len(points)}] {p['name']}: failed: {e}", flush=True)
            continue
        results.append(r)
        print(f"[{i + 1}/{len(points)}] {r['name']}: val loss {r['loss']:.4f} ({r['seconds']:.0f}s)", flush=True)
    print(f"scaling: points done in {time.time() - t0:.0f}s this invocation "
          f"({sum(r['seconds'] for r in results):.0f}s of training in all)")
    fit = scaling.fit_isoflop(results)
    for C, par in zip(fit.budgets, fit.parabolas):
        print(f"  C {C:.2e}: M_opt {par.argmin:.3g} (loss {par.min_loss:.4f}), D_opt {C / par.argmin:.3g}")
    for C in fit.skipped:
        print(f"  C {C:.2e}: no minimum inside the sizes tried (parabola opens down or vertex far outside); "
              f"left out of the power laws")
    for C, best in best_per_budget(results).items():
        Ms = [r["M"] for r in results if r["budget"] == C]
        where = ("the smallest tried" if best["M"] == min(Ms) else "the largest tried" if best["M"] == max(Ms)
                 else "inside the sizes tried")
        print(f"  C {C:.2e}: best size tried M {best['M']:.3g} (loss {best['loss']:.4f}, {where}); the paper's "
              f"M_opt {scaling.M_COEF * C ** scaling.M_EXP:.3g}")
    if fit.m_law:
        print(f"M_opt = {fit.m_law[0]:.4g} C^{fit.m_law[1]:.4f}   (paper: {scaling.M_COEF} C^{scaling.M_EXP})")
        print(f"D_opt = {fit.d_law[0]:.4g} C^{fit.d_law[1]:.4f}   (paper: {scaling.D_COEF} C^{scaling.D_EXP})")
    else:
        print("scaling: fewer than two budgets with a minimum; no power laws")
    surface = None
    try:
        surface = scaling.fit_loss_surface(results)
    except ValueError as e:
        print(f"loss surface: no fit ({e})")
    if surface:
        print(f"loss surface (Chinchilla's approach 3, all {len(results)} points): L = {surface.E:.3f} + "
              f"{surface.A:.3g} / M^{surface.alpha:.3f} + {surface.B:.3g} / D^{surface.beta:.3f} "
              f"(rms error {surface.rms_rel_error:.1%})")
        print(f"  M_opt ~ C^{surface.m_exp:.4f}, D_opt ~ C^{surface.d_exp:.4f}   (paper: C^{scaling.M_EXP}, "
              f"C^{scaling.D_EXP})" + ("" if surface.identified else
                                       f"; an exponent exceeds {surface.MAX_EXPONENT:g}: that term is a wall, not a "
                                       f"power law, so these only say M_opt does not move with C in this range"))
    (run_dir / "scaling.json").write_text(json.dumps(
        {"points": results, "fit": fit.as_dict(), "surface": surface.as_dict() if surface else None}, indent=2) + "\n")
    plot(fit, results, run_dir / "plots" / "isoflop.png", surface)
    print(f"scaling: wrote {run_dir / 'scaling.json'} and {run_dir / 'plots' / 'isoflop.png'}")
    return 0
