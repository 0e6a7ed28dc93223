"""Scaling laws (DeepSeek LLM, arXiv 2401.02954, sec. 3): hyperparameters and model/data scale from the compute
budget, M for a nanoseek model, a config search near a target M, and the fits of an IsoFLOP sweep.

Symbols as in the paper: C compute budget (FLOPs), M model scale = non-embedding FLOPs per token (forward +
backward, attention included, vocabulary excluded), D data scale (tokens), C = M * D.

M for a nanoseek model (`model_scale`) is built on Transformer.flops_per_token, which counts 2 FLOPs per active
matmul weight (routed experts at top-k / n_routed, MLA in its expanded training form, the lm_head included),
attention scores + values over the whole sequence (no causal discount, as MFU is reported), times 3 for
training. DeepSeek's M (sec. 3.2: M = 72 n_layer d^2 + 6 n_layer d l_seq for their dense models) differs
from that in three ways, so model_scale takes them out:
  - no lm_head: M includes attention but not the vocabulary computation (the paper contrasts it with 6 N_1,
    non-embedding parameters, and 6 N_2, which adds the vocabulary's 6 n_vocab d);
  - causal attention: 6 n_layer d l_seq is 3 x (QK^T + AV = 4 d l_seq per token) / 2, the half of the score
    matrix a causal mask keeps; flops_per_token counts the full matrix;
  - the main model only: MTP modules are an auxiliary objective that the paper's dense models did not have.
The wall-time estimate in `nanoseek plan` uses the full flops_per_token (lm_head, MTP, full attention): it is
the count MFU is measured against, so MFU x peak x time gives back exactly those FLOPs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig

# ------------------------------------------------------------------------------------------------ the laws
# DeepSeek LLM sec. 3.1: eta_opt = 0.3118 C^-0.1250, B_opt = 0.2920 C^0.3271 (B in tokens). Checked by giving back
# the paper's own settings (tests/test_scaling.py): 7B lr 4.2e-4 / batch 2304 x 4096 and 67B 3.2e-4 / 4608 x 4096
# come out within 3% / 10% with C = M * 2T tokens.
LR_COEF, LR_EXP = 0.3118, -0.1250
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271
# Sec. 3.2: M_opt = 0.1715 C^0.5243, D_opt = 5.8316 C^0.4757 (M_base * D_base = 1.0001 and a + b = 1, so M D = C).
M_COEF, M_EXP = 0.1715, 0.5243
D_COEF, D_EXP = 5.8316, 0.4757
# Budgets the paper fitted on: its hyperparameter and IsoFLOP experiments span roughly 1e17 .. 3e20 FLOPs (its
# figures for sec. 3.1-3.2); everything outside is extrapolation. A CPU run here is 1e11 .. 1e15.
FITTED_RANGE = (1e17, 3e20)
# Clamp for extrapolated learning rates: eta_opt grows as C shrinks (0.0122 for the tiny preset's 200 steps,
# C = 1.8e11). Measured there (tiny, 200 steps x 11 x 128, dev/LOG.md issue 11): val loss 6.345 at lr 1e-2 (a grad
# spike skipped), 5.979 at 5e-3, 5.956 at 3e-3. So we cap at 3e-3, which binds below C ~ 1.4e16.
LR_MAX = 3e-3


def lr_opt(C: float) -> float:
    return LR_COEF * C**LR_EXP


def batch_opt(C: float) -> float:
    """Optimal batch size in tokens."""
    return BATCH_COEF * C**BATCH_EXP


def m_opt(C: float) -> float:
    return M_COEF * C**M_EXP


def d_opt(C: float) -> float:
    return D_COEF * C**D_EXP


def in_fitted_range(C: float) -> bool:
    return FITTED_RANGE[0] <= C <= FITTED_RANGE[1]


def deepseek_m(n_layer: int, d_model: int, seq_len: int) -> float:
    """The paper's M for its dense (LLaMA-like) models, sec. 3.2."""
    return 72 * n_layer * d_model**2 + 6 * n_layer * d_model * seq_len


# ------------------------------------------------------------------------------------------------ M for a config
def meta_model(config: ModelConfig):
    from .model import Transformer

    with torch.device("meta"):
        return Transformer(config)


def model_scale(config: ModelConfig, seq_len: int, model=None) -> float:
    """DeepSeek's M for a nanoseek config: non-embedding training FLOPs per token of the main model, active
    experts only, causal attention, no lm_head (see the module docstring). Built on the meta device: no memory."""
    model = model if model is not None else meta_model(config)
    c = config
    full = model.flops_per_token(seq_len, training=True, include_mtp=False)
    lm_head = 0 if c.tie_word_embeddings else 6 * c.vocab_size * c.hidden_size  # tied: already not counted
    masked_half = 3 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len * c.num_hidden_layers
    return full - lm_head - masked_half


def hardware_flops_per_token(config: ModelConfig, seq_len: int, model=None) -> float:
    """What the trainer's MFU counts: Transformer.flops_per_token (lm_head, MTP, full attention)."""
    model = model if model is not None else meta_model(config)
    return model.flops_per_token(seq_len, training=True)


# ------------------------------------------------------------------------------------------------ config family
def experts_for_width(d: int) -> int:
    """Routed experts grow with width (the presets: tiny 64 -> 8, small 256 -> 32; V2-Lite/V3-16B 2048 -> 64)."""
    return 8 if d < 128 else 16 if d < 256 else 32 if d < 1024 else 64


def v3_shape(hidden_size: int, num_layers: int, n_routed_experts: int | None = None, *, vocab_size: int = 129280,
             seq_len: int = 4096, mtp: int = 1) -> ModelConfig:
    """A V3-style MoE + MLA model from two dials; the rest is derived from the ratios of the presets (small,
    V2-Lite, V3): head dim 16/32/64/128 by width with the rotary part half of it, d / head_dim heads, kv-LoRA
    d/4 (<= 512), q-LoRA d/2 (<= 1536), expert width d/2, dense FFN 3d, experts_for_width(d) routed experts with
    top-k = E/8 (>= 2) plus 1 shared, one dense first layer, sigmoid group-limited routing (4 groups of which 2;
    2 of which 1 for E = 8), MTP depth 1."""
    d = hidden_size
    E = n_routed_experts or experts_for_width(d)
    head = 16 if d < 128 else 32 if d < 512 else 64 if d < 2048 else 128
    groups = 2 if E < 16 else 4
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=d, intermediate_size=3 * d, moe_intermediate_size=max(8, d // 2 // 8 * 8),
        num_hidden_layers=num_layers, num_attention_heads=max(1, d // head), n_shared_experts=1, n_routed_experts=E,
        num_experts_per_tok=max(2, E // 8), n_group=groups, topk_group=groups // 2, routed_scaling_factor=1.0,
        q_lora_rank=min(1536, max(16, d // 2)), kv_lora_rank=min(512, max(16, d // 4)), qk_nope_head_dim=head,
        qk_rope_head_dim=head // 2, v_head_dim=head, first_k_dense_replace=1, num_nextn_predict_layers=mtp,
        max_position_embeddings=max(4096, seq_len))


WIDTHS = ((16, 24) + tuple(range(32, 256, 16)) + tuple(range(256, 2048, 64)) + tuple(range(2048, 8192, 256))
          + tuple(range(8192, 16385, 512)))


@functools.lru_cache(maxsize=4096)
def _scale_by_depth(d: int, E: int | None, seq_len: int) -> tuple[float, float]:
    """(M at 2 layers, M per extra layer) for v3_shape(d, ., E): every layer after the dense first one is the same
    MoE block, so M is linear in depth. The vocabulary does not enter M, so a small one keeps the build cheap."""
    m2 = model_scale(v3_shape(d, 2, E, vocab_size=256, seq_len=seq_len, mtp=0), seq_len)
    m3 = model_scale(v3_shape(d, 3, E, vocab_size=256, seq_len=seq_len, mtp=0), seq_len)
    return m2, m3 - m2


@dataclass
class Candidate:
    config: ModelConfig
    M: float
    target: float

    @property
    def miss(self) -> float:
        """M / target."""
        return self.M / self.target


def search_config(target_M: float, *, seq_len: int = 4096, vocab_size: int = 129280, mtp: int = 1,
                  n_routed_experts: int | None = None, aspect: float = 64.0, tol: float = 0.10,
                  max_layers: int = 128) -> Candidate:
    """The v3_shape config whose M is nearest `target_M` over widths 32..16384 and depths 2..max_layers (the
    nearest, however far, when none is within `tol`). Among those within `tol` (relative) of the target, the one
    whose width/depth is nearest `aspect` wins (64: nanochat's rule; DeepSeek LLM 7B/67B have 137/86), so the
    shape stays sensible rather than 2 layers of width 2048. The winner is built once more for its exact M."""
    best: tuple | None = None
    for d in WIDTHS:
        m2, per_layer = _scale_by_depth(d, n_routed_experts, seq_len)
        if m2 > target_M * (1 + tol) and best is not None:
            break  # wider only grows M
        L = min(max_layers, max(2, round(2 + (target_M - m2) / per_layer)))
        for depth in {L, max(2, L - 1), min(max_layers, L + 1)}:
            M = m2 + (depth - 2) * per_layer
            miss = abs(math.log(M / target_M))
            inside = miss <= math.log1p(tol)
            key = (not inside, abs(math.log(d / depth / aspect)) if inside else miss, miss)
            if best is None or key < best[0]:
                best = (key, d, depth)
    _, d, depth = best
    config = v3_shape(d, depth, n_routed_experts, vocab_size=vocab_size, seq_len=seq_len, mtp=mtp)
    return Candidate(config, model_scale(config, seq_len), target_M)


# ------------------------------------------------------------------------------------------------ hyperparameters
@dataclass
class Hparams:
    compute: float  # C = M * D (DeepSeek's definition; no lm_head, no MTP)
    lr: float
    lr_law: float  # before the clamp
    batch_tokens: float  # the law's B_opt
    batch_seqs: int  # sequences per optimizer step actually used
    in_range: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def hparams_for_steps(M: float, steps: int, seq_len: int) -> Hparams:
    """Learning rate and batch from the laws when the number of steps is fixed (nanoseek pretrain --steps S).

    C = M * D and D = S * B, and B = 0.2920 C^0.3271, so B = 0.2920 (M S B)^0.3271 solves in closed form:
    B = (0.2920 (M S)^0.3271)^(1 / (1 - 0.3271)). The batch is rounded to whole sequences (at least one); C is then
    recomputed with that batch and eta = 0.3118 C^-0.125, capped at LR_MAX (tiny CPU budgets are ~6 decades below
    the fitted range, where the law's learning rate keeps growing)."""
    if M <= 0 or steps <= 0 or seq_len <= 0:
        raise ValueError(f"M ({M}), steps ({steps}) and seq_len ({seq_len}) must be positive")
    B = (BATCH_COEF * (M * steps) ** BATCH_EXP) ** (1.0 / (1.0 - BATCH_EXP))
    seqs = max(1, round(B / seq_len))
    C = M * steps * seqs * seq_len
    return Hparams(compute=C, lr=min(lr_opt(C), LR_MAX), lr_law=lr_opt(C), batch_tokens=B, batch_seqs=seqs,
                   in_range=in_fitted_range(C))


def hparams_for_budget(C: float, seq_len: int) -> Hparams:
    """Learning rate and batch (whole sequences) for a given compute budget C."""
    B = batch_opt(C)
    return Hparams(compute=C, lr=min(lr_opt(C), LR_MAX), lr_law=lr_opt(C), batch_tokens=B,
                   batch_seqs=max(1, round(B / seq_len)), in_range=in_fitted_range(C))


def pretrain_hparams(config: ModelConfig, steps: int, seq_len: int, grad_accum: int = 1) -> tuple[float, int, Hparams]:
    """(peak lr, sequences per micro-batch, the law's numbers) for `nanoseek pretrain` when --lr / --batch-size are
    not given: hparams_for_steps for this model's M, the batch split over grad_accum micro-batches."""
    hp = hparams_for_steps(model_scale(config, seq_len), steps, seq_len)
    return hp.lr, max(1, math.ceil(hp.batch_seqs / grad_accum)), hp


# ------------------------------------------------------------------------------------------------ fits
def fit_power_law(x, y) -> tuple[float, float]:
    """y = coef * x^exp by least squares on log y against log x; returns (coef, exp)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("a power-law fit needs at least two points with positive x and y")
    exp, log_coef = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_coef)), float(exp)


@dataclass
class Parabola:
    a: float  # loss = a (log M)^2 + b log M + c, natural log
    b: float
    c: float

    @property
    def has_minimum(self) -> bool:
        return self.a > 0

    @property
    def argmin(self) -> float:
        """M at the vertex (only meaningful when has_minimum; inf for a nearly straight line, a ~ 0)."""
        x = -self.b / (2 * self.a)
        return math.exp(x) if x < 700 else math.inf

    @property
    def min_loss(self) -> float:
        x = -self.b / (2 * self.a)
        return self.a * x * x + self.b * x + self.c

    def __call__(self, M):
        x = np.log(np.asarray(M, dtype=np.float64))
        return self.a * x * x + self.b * x + self.c


def fit_parabola(M, loss) -> Parabola:
    """The IsoFLOP fit of sec. 3.2 (as Chinchilla's approach 2): loss against log M, one parabola per budget."""
    M, loss = np.asarray(M, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(M) < 3:
        raise ValueError("a parabola needs at least three model sizes per budget")
    a, b, c = np.polyfit(np.log(M), loss, 2)
    return Parabola(float(a), float(b), float(c))


@dataclass
class IsoFlopFit:
    budgets: list[float]
    parabolas: list[Parabola]
    m_opt: list[float]  # vertex of each budget's parabola
    d_opt: list[float]  # C / M_opt
    m_law: tuple[float, float] | None  # (coef, exp) of M_opt = coef C^exp, None with < 2 usable budgets
    d_law: tuple[float, float] | None
    skipped: list[float]  # budgets whose parabola opens downward or whose vertex lies outside the sizes tried

    def as_dict(self) -> dict:
        return {"budgets": self.budgets, "m_opt": self.m_opt, "d_opt": self.d_opt,
                "parabolas": [dataclasses.asdict(p) for p in self.parabolas],
                "m_law": self.m_law, "d_law": self.d_law, "skipped": self.skipped,
                "paper": {"m_law": [M_COEF, M_EXP], "d_law": [D_COEF, D_EXP]}}


def fit_isoflop(points: list[dict], *, extrapolate: float = 2.0) -> IsoFlopFit:
    """points: dicts with 'budget', 'M', 'loss'. A parabola per budget; its vertex is M_opt(C) when the parabola
    opens upward and the vertex lies within `extrapolate` x of the sizes tried; then power laws through them."""
    by_budget: dict[float, list[dict]] = {}
    for p in points:
        by_budget.setdefault(float(p["budget"]), []).append(p)
    budgets, parabolas, ms, ds, skipped = [], [], [], [], []
    for C in sorted(by_budget):
        pts = by_budget[C]
        if len(pts) < 3:
            skipped.append(C)
            continue
        Ms = [p["M"] for p in pts]
        par = fit_parabola(Ms, [p["loss"] for p in pts])
        if not par.has_minimum or not (min(Ms) / extrapolate <= par.argmin <= max(Ms) * extrapolate):
            skipped.append(C)
            continue
        budgets.append(C)
        parabolas.append(par)
        ms.append(par.argmin)
        ds.append(C / par.argmin)
    m_law = fit_power_law(budgets, ms) if len(budgets) >= 2 else None
    d_law = fit_power_law(budgets, ds) if len(budgets) >= 2 else None
    return IsoFlopFit(budgets, parabolas, ms, ds, m_law, d_law, skipped)


@dataclass
class LossSurface:
    """L(M, D) = E + A / M^alpha + B / D^beta fitted to every point of a sweep (Chinchilla's approach 3, with
    DeepSeek's M in place of parameters). Minimising it at fixed C = M D gives M_opt = G C^(beta / (alpha + beta))
    with G = (alpha A / (beta B))^(1 / (alpha + beta)), and D_opt = C / M_opt, so it yields exponents even when no
    IsoFLOP parabola has its vertex inside the sizes tried."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    rms_rel_error: float  # of the fitted losses against the measured ones

    @property
    def m_exp(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def d_exp(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def m_opt(self, C: float) -> float:
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * C**self.m_exp

    @property
    def identified(self) -> bool:
        """False when an exponent ran away (> MAX_EXPONENT): that term is a wall, not a power law, and the
        exponents of M_opt and D_opt then only say that the optimum does not move with C in the range swept."""
        return self.alpha <= self.MAX_EXPONENT and self.beta <= self.MAX_EXPONENT

    MAX_EXPONENT = 3.0  # Chinchilla's are ~0.3; anything past this is a degenerate fit

    def __call__(self, M, D):
        logM, logD = np.log(np.asarray(M, dtype=np.float64)), np.log(np.asarray(D, dtype=np.float64))
        return (self.E + np.exp(math.log(self.A) - self.alpha * logM)
                + np.exp(math.log(self.B) - self.beta * logD))

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "m_exp": self.m_exp, "d_exp": self.d_exp, "identified": self.identified}


def fit_loss_surface(points: list[dict]) -> LossSurface:
    """Least Huber error (delta 1e-3) between log predicted and log measured loss, L-BFGS from a grid of starts
    (as Chinchilla, sec. D.2); points: dicts with 'budget', 'M', 'loss'. Needs at least 5 points over 2 budgets."""
    import itertools

    import torch

    if len(points) < 5 or len({p["budget"] for p in points}) < 2:
        raise ValueError("a loss-surface fit needs at least 5 points over at least 2 budgets")
    M = torch.tensor([float(p["M"]) for p in points], dtype=torch.float64)
    logM, logD = M.log(), (torch.tensor([float(p["budget"]) for p in points], dtype=torch.float64) / M).log()
    logL = torch.tensor([float(p["loss"]) for p in points], dtype=torch.float64).log()
    m0, d0 = logM.mean(), logD.mean()  # centred logs: A and B at the sweep's centre, a far better conditioned fit

    def objective(x):  # x = (log E, log A at m0, log B at d0, alpha, beta)
        pred = torch.logsumexp(torch.stack([x[0].expand_as(logM), x[1] - x[3] * (logM - m0),
                                            x[2] - x[4] * (logD - d0)]), 0)
        return torch.nn.functional.huber_loss(pred, logL, delta=1e-3, reduction="sum")

    best = None
    top = logL.max().item()
    for start in itertools.product([top - 2.0, top - 0.5], [top - 2.0, top - 0.5], [top - 2.0, top - 0.5],
                                   [0.2, 0.8], [0.2, 0.8]):
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([x], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = objective(x)
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            value = objective(x).item()
        if math.isfinite(value) and x[3] > 0 and x[4] > 0 and (best is None or value < best[0]):
            best = (value, x.detach().clone())
    if best is None:
        raise ValueError("the loss-surface fit found no solution with positive exponents")
    log_e, log_a, log_b, alpha, beta = best[1].tolist()
    log_a, log_b = log_a + alpha * m0.item(), log_b + beta * d0.item()
    surface = LossSurface(math.exp(log_e), math.exp(log_a), alpha, math.exp(log_b), beta, 0.0)
    measured = np.array([p["loss"] for p in points])
    fitted = surface([p["M"] for p in points], [p["budget"] / p["M"] for p in points])
    surface.rms_rel_error = float(np.sqrt(np.mean((fitted / measured - 1) ** 2)))
    return surface
