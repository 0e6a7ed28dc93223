"""DeepSeek Sparse Attention (DeepSeek-V3.2 sec. 2): the lightning indexer, top-k selection, and the indexer's
KL loss for its two training stages. MLA (model.py) calls into this file; the indexer is a submodule of each MLA
layer (`self_attn.indexer`, the V3.2 checkpoint's keys: `wq_b`, `wk`, `k_norm`, `weights_proj`).

Shape legend, as model.py plus:
    J indexer heads (index_n_heads)   I index_head_dim   k selected keys per query (min(index_topk, S))

The indexer scores every past token s for query t with a few small ReLU heads, one key shared by all of them:

    I[t, s] = sum_j w[t, j] * ReLU(q[t, j] . k[s])                                    (V3.2 eq. 1)

q from c_Q (the query latent; from h when q_lora_rank is None) through `wq_b`, k from h through `wk` and a
LayerNorm, w from h through `weights_proj`. The first qk_rope_head_dim dims of q and k carry RoPE, rotated
half-split (x_i with x_{i+R/2}), not interleaved as MLA's rotary part is (transformers' deepseek_v32 and
DeepSeek's fixed inference code). The scales head_dim^-0.5 and J^-0.5 are folded into w. The main attention of
each query then sees only its top-k keys (2048 in V3.2).

Training (sec. 2.1.1): first a dense warm-up, main attention unchanged, in which only the indexer learns to match
the main attention's distribution, p[t, :] = head-sum of the attention probabilities L1-normalised over keys:

    L_I = sum_t KL(p[t, :] || softmax(I[t, :]))

then sparse training of everything, the KL restricted to the selected keys. Both stages detach the indexer's
input, so the indexer learns only from L_I and the main model only from the language-modelling loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig

MODES = ("sparse", "warmup")


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation of the rotary part (pairs (x_i, x_{i+R/2})), x: [B, T, (J,) R]; cos/sin [B, T, R/2]."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Indexer(nn.Module):
    """The lightning indexer of one attention layer. `mode` is "sparse" (main attention restricted to the top-k)
    or "warmup" (main attention dense; the indexer only learns). `kl` holds the last training forward's L_I."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.rope, self.topk = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim, \
            c.index_topk
        self.wq_b = nn.Linear(c.q_lora_rank or c.hidden_size, c.index_n_heads * c.index_head_dim, bias=False)
        self.wk = nn.Linear(c.hidden_size, c.index_head_dim, bias=False)
        self.k_norm = nn.LayerNorm(c.index_head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)
        self.mode = "sparse"
        self.kl: Tensor | None = None

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x_rope, x_pass = x.split([self.rope, self.head_dim - self.rope], dim=-1)
        return torch.cat([apply_rope_half(x_rope, cos, sin), x_pass], dim=-1)

    def keys(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """k [B, T, I]: the one key all indexer heads share (what the indexer key cache stores)."""
        return self._rope(self.k_norm(self.wk(x_BTD)), cos, sin)

    def queries(self, q_in: Tensor, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, T, J, I] and the head weights w [B, T, J] (fp32, scales folded in)."""
        B, T, _ = x_BTD.shape
        q_BTJI = self._rope(self.wq_b(q_in).view(B, T, self.n_heads, self.head_dim), cos, sin)
        w_BTJ = self.weights_proj(x_BTD).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q_BTJI, w_BTJ


def index_scores(q_BTJI: Tensor, w_BTJ: Tensor, k_BSI: Tensor, *, max_elems: int = 1 << 25) -> Tensor:
    """I [B, T, S] in fp32 (eq. 1). The per-head products [B, T, J, S] are built a block of queries at a time,
    at most `max_elems` values each, so long prefills do not hold J full score matrices."""
    B, T, J, _ = q_BTJI.shape
    S = k_BSI.shape[1]
    step = max(1, max_elems // max(B * J * S, 1))
    k = k_BSI.float()
    out = [torch.einsum("btj,btjs->bts", w_BTJ[:, t:t + step],
                        torch.einsum("btji,bsi->btjs", q_BTJI[:, t:t + step].float(), k).relu())
           for t in range(0, T, step)]
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def select_topk(scores_BTS: Tensor, visible_BTS: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """The top-k visible keys per query: indices [B, T, k] and whether each is visible [B, T, k] (a query with
    fewer than k visible keys gets some invisible ones, which attention must mask). k = min(topk, S)."""
    k = min(topk, scores_BTS.shape[-1])
    # A stable descending sort, not topk: ReLU-gated scores tie often (at 0), and topk breaks ties differently for
    # different S, so prefill, decode and full recompute would pick different keys. Stable: the earliest key wins.
    idx_BTk = scores_BTS.masked_fill(~visible_BTS, float("-inf")).sort(dim=-1, descending=True,
                                                                        stable=True).indices[..., :k]
    return idx_BTk, visible_BTS.gather(-1, idx_BTk)


def topk_mask(scores_BTS: Tensor, visible_BTS: Tensor, topk: int) -> Tensor:
    """The same selection as a [B, T, S] mask (selected and visible), for the expanded (training/prefill) form."""
    idx_BTk, valid_BTk = select_topk(scores_BTS, visible_BTS, topk)
    return torch.zeros_like(visible_BTS).scatter_(-1, idx_BTk, valid_BTk)


def indexer_kl(scores_BTS: Tensor, target_BTS: Tensor, keep_BTS: Tensor) -> Tensor:
    """mean over queries of KL(p || softmax(I)) over the keys in `keep` (all visible keys in the warm-up, the
    selected ones in sparse training); p = the main attention's head-averaged probabilities, zero outside keep."""
    log_q = scores_BTS.masked_fill(~keep_BTS, float("-inf")).log_softmax(-1)
    p = target_BTS.float()
    kl = torch.where(keep_BTS & (p > 0), p * (p.clamp_min(1e-30).log() - log_q), torch.zeros_like(p))
    return kl.sum(-1).mean()


# ------------------------------------------------------------------------------------------------ training stages
def indexers(model: nn.Module) -> list[Indexer]:
    return [m for m in model.modules() if isinstance(m, Indexer)]


def set_mode(model: nn.Module, mode: str) -> None:
    """'warmup': dense main attention, only the indexers train (everything else frozen, as V3.2's warm-up);
    'sparse': main attention over the top-k keys, everything trains (the indexer from its KL only)."""
    if mode not in MODES:
        raise ValueError(f"DSA mode must be one of {MODES}, got {mode!r}")
    found = indexers(model)
    if not found:
        raise ValueError("the model has no indexer (index_topk is None): set index_topk to add one")
    for m in found:
        m.mode = mode
    if mode == "warmup":
        model.requires_grad_(False)
        for m in found:
            m.requires_grad_(True)
    else:
        model.requires_grad_(True)


def take_indexer_loss(model: nn.Module) -> Tensor | None:
    """Sum over layers of the last training forward's L_I, and clear them (like the MoE balance losses)."""
    kls = [m.kl for m in indexers(model) if m.kl is not None]
    for m in indexers(model):
        m.kl = None
    return torch.stack(kls).sum() if kls else None


def with_indexer(config: ModelConfig, topk: int, n_heads: int | None = None, head_dim: int | None = None) -> ModelConfig:
    """The config of the same model plus a DSA indexer (V3.1 -> V3.2: new indexer weights, nothing else changes)."""
    return config.replace(index_topk=topk, index_n_heads=n_heads or config.index_n_heads,
                          index_head_dim=head_dim or config.index_head_dim)

