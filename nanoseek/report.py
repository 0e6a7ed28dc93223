"""metrics -> report.md with plots (PNG). Every number in the report is read from the run's own files: the stages'
metrics.jsonl and the summary records the speedrun appends to the top-level metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .trainer import read_metrics  # noqa: E402


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r.get(key) is not None
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_lines(path: Path, title: str, curves: list[tuple[str, list[int], list[float]]], *, ylabel: str = "",
               xlabel: str = "step", logy: bool = False) -> str | None:
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, xs, ys in curves:
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 15 else None, ms=3)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return _save(fig, path)


def plot_expert_load(path: Path, rows: list[dict]) -> str | None:
    """Heatmap per MoE layer: the fraction of routed tokens each expert got, over steps (V3's balance, visible)."""
    rows = [r for r in rows if r.get("expert_load")]
    if not rows:
        return None
    layers = len(rows[0]["expert_load"])
    fig, axes = plt.subplots(layers, 1, figsize=(6.4, 1.3 * layers + 0.6), squeeze=False)
    for i in range(layers):
        mat = [[v / max(sum(r["expert_load"][i]), 1) for v in r["expert_load"][i]] for r in rows]
        ax = axes[i][0]
        im = ax.imshow(list(map(list, zip(*mat))), aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=[rows[0]["step"], rows[-1]["step"], len(mat[0]) - 0.5, -0.5])
        ax.set_ylabel(f"MoE layer {i}\nexpert", fontsize=7)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[0][0].set_title("expert load (fraction of routed tokens) over steps")
    axes[-1][0].set_xlabel("step")
    return _save(fig, path)


def plot_bars(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> str | None:
    if not groups:
        return None
    labels = sorted({k for g in groups.values() for k in g}, key=lambda k: (len(k), k))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(groups)
    for i, (name, g) in enumerate(groups.items()):
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [g.get(k, 0.0) for k in labels], width, label=name)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_report(run_dir: Path, summary: dict, stage_dirs: dict[str, Path], title: str = "nanoseek speedrun") -> Path:
    """report.md + plots/*.png. `summary` holds the table's numbers (already in the top-level metrics.jsonl);
    `stage_dirs` maps stage name -> its run dir, whose metrics.jsonl feeds the curves."""
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    m = {name: read_metrics(d, name) for name, d in stage_dirs.items()}
    pre, sft, grpo = m.get("pretrain", []), m.get("sft", []), m.get("grpo", [])
    figs: list[tuple[str, str | None]] = [
        ("Pretraining loss", plot_lines(plots / "pretrain_loss.png", "pretraining loss", [
            ("train (next token)", *_series(pre, "loss/lm")), ("validation", *_series(pre, "val/loss"))],
            ylabel="nats/token")),
        ("MTP loss", plot_lines(plots / "mtp_loss.png", "multi-token prediction loss (depth 1)", [
            ("pretrain", *_series(pre, "loss/mtp")), ("sft", *_series(sft, "loss/mtp"))], ylabel="nats/token")),
        ("Learning rate", plot_lines(plots / "lr.png", "learning rate", [
            (s, *_series(rows, "lr")) for s, rows in m.items()], logy=True)),
        ("Gradient norm", plot_lines(plots / "grad_norm.png", "gradient norm (before clipping)", [
            (s, *_series(rows, "grad_norm")) for s, rows in m.items()], logy=True)),
        ("Expert load", plot_expert_load(plots / "expert_load.png", pre)),
        ("SFT", plot_lines(plots / "sft.png", "SFT: loss and held-out accuracy", [
            ("loss", *_series(sft, "loss")), ("held-out accuracy", *_series(sft, "eval/accuracy"))])),
        ("GRPO reward and accuracy", plot_lines(plots / "grpo_reward.png", "GRPO", [
            ("mean reward", *_series(grpo, "reward/mean")), ("rollout accuracy", *_series(grpo, "reward/accuracy")),
            ("held-out accuracy (greedy)", *_series(grpo, "eval/accuracy"))])),
        ("Completion length", plot_lines(plots / "completion_length.png", "GRPO completion length (tokens)", [
            ("mean", *_series(grpo, "rollout/length_mean")), ("max", *_series(grpo, "rollout/length_max"))])),
        ("pass@k", plot_bars(plots / "pass_at_k.png", "pass@k on held-out problems",
                             {k: v for k, v in (("after SFT", summary.get("pass_at_k_sft")),
                                                ("after GRPO", summary.get("pass_at_k_grpo"))) if v},
                             "pass@k")),
        ("Throughput", plot_bars(plots / "throughput.png", "training tokens/s per stage (median step)",
                                 {"tokens/s": {s: v for s, v in summary.get("tokens_per_s", {}).items() if v}},
                                 "tokens/s")),
    ]
    lines = [f"# {title}", ""]
    if summary.get("header"):
        lines += [summary["header"], ""]
    lines += ["## Results", "", "| measure | value |", "|---|---|"]
    for label, value in summary.get("table", []):
        lines.append(f"| {label} | {value} |")
    lines.append("")
    for name, text in summary.get("stages", []):
        lines += [f"### {name}", "", text, ""]
    lines += ["## Plots", ""]
    for caption, fname in figs:
        if fname:
            lines += [f"**{caption}**", "", f"![{caption}](plots/{fname})", ""]
    if summary.get("footer"):
        lines += [summary["footer"], ""]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
