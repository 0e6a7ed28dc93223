"""The DeepSeek-V2/V3 architecture, readable top to bottom: RMSNorm, RoPE/YaRN, MLA, Gate, MoE, Block, MTP, Transformer.

Shape legend (suffixes on tensor names):
    B batch   T query tokens   S key tokens (cache)   D hidden_size   H heads   V vocab_size
    N qk_nope_head_dim   R qk_rope_head_dim   K = N + R   O v_head_dim   C kv_lora_rank   Q q_lora_rank
    E routed experts   k experts per token   F expert width   M = B*T tokens   A = M*k routed assignments
    J indexer heads   I index_head_dim   k' keys selected per query by DSA (dsa.py)

Module and parameter names are the Hugging Face ones (minus the `model.` prefix), so hf.py only has to split the
stacked experts per expert and renumber the MTP layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .config import ModelConfig, yarn_mscale
from .dsa import Indexer, index_scores, indexer_kl, select_topk, take_indexer_loss, topk_mask


# --------------------------------------------------------------------------------------------------- norms, RoPE
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype, as the reference implementations do.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies of the decoupled rotary key, with YaRN's ramp between corr_dim(beta_fast) and
    corr_dim(beta_slow) (YaRN paper sec. 3.2; DeepSeek-V2 appendix B), and the cos/sin attention factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = config.yarn
    if y is None:
        return inv_freq, 1.0
    factor, orig = y["factor"], y["original_max_position_embeddings"]

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(y["beta_fast"])), 0)
    high = min(math.ceil(corr_dim(y["beta_slow"])), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)  # interpolate low frequencies, keep high ones
    attention_factor = 1.0
    if y.get("mscale") and y.get("mscale_all_dim"):
        attention_factor = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
    return inv_freq, attention_factor


def rope_cos_sin(inv_freq: Tensor, attention_factor: float, positions: Tensor) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [*positions.shape, R/2] in fp32."""
    angles = positions.float()[..., None] * inv_freq
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates interleaved pairs (x0, x1), (x2, x3), ... as the released weights expect, x: [B, T, (H,) R].

    The output lists the rotated even elements, then the odd ones. Queries and keys get the same permutation, so
    their dot products are those of the interleaved rotation (this is what transformers' `rope_interleave` does)."""
    if x.dim() == 4:  # per-head queries: broadcast cos/sin [B, T, R/2] over heads
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------------- MLA
@dataclass
class LatentCache:
    """The absorbed-MLA cache: per layer (main stack, then MTP layers) the normalised latent c_KV and the rotated
    shared key k_pe, kv_lora_rank + qk_rope_head_dim values per token (576 for V3 against 40,960 for per-head K/V).
    Slot s of row b holds the token at position s of that row's sequence. With DSA (index_topk set) the indexer's
    keys sit beside them, index_head_dim more values per token (V3.2: 576 + 128)."""

    kv: Tensor  # [L, B, S, C]
    pe: Tensor  # [L, B, S, R]
    idx: Tensor | None = None  # [L, B, S, I] indexer keys, DSA only
    # Dense absorbed decode through nanoseek.kernels' fused CPU kernel (fp32 only; the caller has loaded it).
    fused: bool = False

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, max_len: int, *, dtype=torch.float32, device="cpu",
                 with_mtp: bool = True) -> "LatentCache":
        layers = config.num_hidden_layers + (config.num_nextn_predict_layers if with_mtp else 0)
        kv = torch.zeros(layers, batch, max_len, config.kv_lora_rank, dtype=dtype, device=device)
        pe = torch.zeros(layers, batch, max_len, config.qk_rope_head_dim, dtype=dtype, device=device)
        idx = (None if config.index_topk is None else
               torch.zeros(layers, batch, max_len, config.index_head_dim, dtype=dtype, device=device))
        return cls(kv, pe, idx)

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in one layer."""
        idx = 0 if self.idx is None else self.idx.shape[-1]
        return (self.kv.shape[-1] + self.pe.shape[-1] + idx) * self.kv.element_size()


def _row_matmul(a_BMK: Tensor, b_BKN: Tensor) -> Tensor:
    """a @ b per batch row; at batch 1 a plain mm (see MLA._attend_absorbed)."""
    if a_BMK.shape[0] == 1:
        return (a_BMK[0] @ b_BKN[0]).unsqueeze(0)
    return a_BMK @ b_BKN


def causal_attention_blocked(q_BHTK: Tensor, k_BHTK: Tensor, v_BHTO: Tensor, scale: float, blocks: int = 4) -> Tensor:
    """Causal attention as explicit matmuls with an fp32 softmax, the queries cut into `blocks` row blocks that
    each score only the keys up to their own end: the score blocks above the diagonal are never computed (3/8 of
    the work for 4 blocks). For torch.compile on CPU, where SDPA with v_head_dim != qk_head_dim falls back to its
    math path over the full T x T scores; inductor fuses mask, scale and softmax here (the attention of a bf16
    training step 4x faster, dev/LOG.md). Equal to causal SDPA up to rounding."""
    T = q_BHTK.shape[2]
    bounds = [T * i // blocks for i in range(blocks + 1)]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        scores = (q_BHTK[:, :, a:b] @ k_BHTK[:, :, :b].transpose(-1, -2)).float() * scale
        future = torch.arange(b, device=q_BHTK.device) > torch.arange(a, b, device=q_BHTK.device)[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(-1).to(v_BHTO.dtype)
        outs.append(probs @ v_BHTO[:, :, :b])
    return torch.cat(outs, dim=2)


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 sec. 2.1). Keys and values are compressed into c_KV (kv_lora_rank)
    plus one rotary key shared by all heads; queries optionally through c_Q (q_lora_rank)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.n_heads, self.nope, self.rope, self.v_dim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                          c.qk_rope_head_dim, c.v_head_dim)
        self.kv_rank = c.kv_lora_rank
        self.scale = c.softmax_scale
        H, K = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * K, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)  # eps 1e-6 as released, not rms_norm_eps
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * K, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        # DeepSeek Sparse Attention (V3.2): the lightning indexer choosing each query's keys; None = dense MLA.
        self.indexer = Indexer(c) if c.index_topk is not None else None

    def _queries(self, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head queries [B, T, H, K], and what they were projected from (c_Q, or h without q-LoRA), which the
        indexer's queries share."""
        if hasattr(self, "q_proj"):
            q_in = x_BTD
            q = self.q_proj(x_BTD)
        else:
            q_in = self.q_a_layernorm(self.q_a_proj(x_BTD))
            q = self.q_b_proj(q_in)
        B, T, _ = x_BTD.shape
        return q.view(B, T, self.n_heads, self.nope + self.rope), q_in

    def _latents(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        kv_BTC, pe_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        return self.kv_a_layernorm(kv_BTC), apply_rope(pe_BTR, cos, sin)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, cache: LatentCache | None = None,
                positions_BT: Tensor | None = None, rows_B: Tensor | None = None, prefill: bool = False) -> Tensor:
        q_BTHK, q_in = self._queries(x_BTD)
        q_nope, q_pe = q_BTHK.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        kv_BTC, pe_BTR = self._latents(x_BTD, cos, sin)
        if cache is not None:
            self._write_cache(cache, kv_BTC, pe_BTR, positions_BT, rows_B)
        if self.indexer is not None:
            out_BTHO = self._attend_sparse(x_BTD, q_in, q_nope, q_pe, kv_BTC, pe_BTR, cos, sin, cache, positions_BT,
                                           rows_B, prefill)
        elif cache is None or prefill:
            out_BTHO = self._attend_expanded(q_nope, q_pe, kv_BTC, pe_BTR)
        else:
            out_BTHO = self._attend_absorbed(q_nope, q_pe, cache, positions_BT, rows_B)
        return self.o_proj(out_BTHO.flatten(2))

    def _attend_expanded(self, q_nope, q_pe, kv_BTC, pe_BTR, keep_BTS: Tensor | None = None) -> Tensor:
        """Training / prefill: expand c_KV into per-head keys and values and run causal SDPA (with DSA: over the
        keys in keep_BTS, [B, T, T], the masked form of the sparse attention)."""
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(kv_BTC).view(B, T, H, self.nope + self.v_dim).split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, pe_BTR.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1).transpose(1, 2)
        if keep_BTS is None and q.device.type == "cpu" and torch.compiler.is_compiling():
            return causal_attention_blocked(q, k, v.transpose(1, 2), self.scale).transpose(1, 2)
        mask = None if keep_BTS is None else keep_BTS.unsqueeze(1)
        v = v.transpose(1, 2)
        pad = q.shape[-1] - self.v_dim
        if pad > 0 and q.device.type == "cpu" and not torch.is_grad_enabled():
            # Prefill: SDPA's CPU flash kernel wants v as wide as q and k, else it takes the math path over the full
            # T x T scores. Zero columns cost 50% more v work and save the rest: 2,048 tokens 306 -> 53 ms a layer.
            v = F.pad(v, (0, pad))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return out[..., :self.v_dim].transpose(1, 2)

    def _attend_sparse(self, x_BTD, q_in, q_nope, q_pe, kv_BTC, pe_BTR, cos, sin, cache, positions_BT, rows_B,
                       prefill) -> Tensor:
        """DSA (V3.2 sec. 2.1): the indexer scores the visible keys, each query keeps its top-k, and MLA attends over
        those only: masked in the expanded form, gathered from the latent cache in the absorbed one. In the
        warm-up mode attention stays dense. In training the indexer's KL to the main attention is left in
        `indexer.kl` (its input detached: it learns from that KL alone, the main model from the LM loss alone)."""
        ix = self.indexer
        x_in, q_in = x_BTD.detach(), q_in.detach()
        k_BTI = ix.keys(x_in, cos, sin)
        if cache is not None:
            if cache.idx is None:
                raise ValueError("this model uses sparse attention (index_topk is set): its LatentCache needs the "
                                 "indexer key cache; allocate it with LatentCache.allocate(config, ...)")
            rows = torch.arange(x_BTD.shape[0], device=x_BTD.device) if rows_B is None else rows_B
            cache.idx[self.layer_idx][rows[:, None], positions_BT] = k_BTI.to(cache.idx.dtype)
        learn = self.training and torch.is_grad_enabled()
        if cache is None or prefill:
            T = x_BTD.shape[1]
            if ix.mode == "warmup" and not learn:
                return self._attend_expanded(q_nope, q_pe, kv_BTC, pe_BTR)
            q_BTJI, w_BTJ = ix.queries(q_in, x_in, cos, sin)
            scores_BTS = index_scores(q_BTJI, w_BTJ, k_BTI)
            visible_BTS = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril().expand_as(scores_BTS)
            keep_BTS = visible_BTS if ix.mode == "warmup" else topk_mask(scores_BTS, visible_BTS, ix.topk)
            if learn:
                target_BTS = self._attention_probs(q_nope, q_pe, kv_BTC, pe_BTR, keep_BTS)
                ix.kl = indexer_kl(scores_BTS, target_BTS, keep_BTS)
            return self._attend_expanded(q_nope, q_pe, kv_BTC, pe_BTR, None if ix.mode == "warmup" else keep_BTS)
        if ix.mode == "warmup":
            return self._attend_absorbed(q_nope, q_pe, cache, positions_BT, rows_B)
        idx_cache = cache.idx[self.layer_idx] if rows_B is None else cache.idx[self.layer_idx][rows_B]
        S = int(positions_BT.max()) + 1 if positions_BT.numel() else 1
        q_BTJI, w_BTJ = ix.queries(q_in, x_in, cos, sin)
        scores_BTS = index_scores(q_BTJI, w_BTJ, idx_cache[:, :S])
        visible_BTS = torch.arange(S, device=x_BTD.device) <= positions_BT[:, :, None]
        return self._attend_absorbed(q_nope, q_pe, cache, positions_BT, rows_B,
                                     select=select_topk(scores_BTS, visible_BTS, ix.topk))

    @torch.no_grad()
    def _attention_probs(self, q_nope, q_pe, kv_BSC, pe_BSR, keep_BTS) -> Tensor:
        """The main attention's probabilities over keys, averaged over heads (= head-summed, L1-normalised): the
        indexer's target p[t, :]. Computed on the latents (absorbed form), equal to the expanded scores."""
        w_uk, _ = self.absorbed_weights()
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)
        scores_BHTS = (torch.einsum("bthc,bsc->bhts", q_lat_BTHC, kv_BSC)
                       + torch.einsum("bthr,bsr->bhts", q_pe, pe_BSR)).float() * self.scale
        return scores_BHTS.masked_fill(~keep_BTS.unsqueeze(1), float("-inf")).softmax(-1).mean(1)

    def _write_cache(self, cache, kv_BTC, pe_BTR, positions_BT, rows_B):
        B = kv_BTC.shape[0]
        rows = torch.arange(B, device=kv_BTC.device) if rows_B is None else rows_B
        # One index_put_ on the whole cache, not on this layer's view of it: torch.compile then writes in place
        # (through a view it copied the cache in and out, every layer of every step).
        at_BT = (torch.full_like(positions_BT, self.layer_idx), rows[:, None], positions_BT)
        cache.kv.index_put_(at_BT, kv_BTC.to(cache.kv.dtype))
        cache.pe.index_put_(at_BT, pe_BTR.to(cache.pe.dtype))

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """W_UK [H, N, C] and W_UV [H, O, C]: the key and value blocks of kv_b_proj, per head."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.kv_rank)
        return w[:, : self.nope], w[:, self.nope:]

    def _attend_absorbed(self, q_nope, q_pe, cache, positions_BT, rows_B, select=None) -> Tensor:
        """Decode: fold W_UK into the query and W_UV after attention, attending over the cached latents directly
        (DeepSeek-V2 sec. 2.1.2). Key slot s is visible to a query at position p iff s <= p. Every slot of the
        cache given is scored and the invisible ones masked, so callers pass a cache trimmed to the longest visible
        prefix (the engine does, from lengths it knows on the host): no host sync and no data-dependent shape here,
        which torch.compile needs. With DSA, `select` is (indices [B, T, k'], valid [B, T, k']) and each query
        attends over its k' gathered latents only."""
        w_uk, w_uv = self.absorbed_weights()
        if select is not None:
            return self._attend_gathered(torch.einsum("bthn,hnc->bthc", q_nope, w_uk), q_pe, cache, rows_B, *select,
                                         w_uv)
        kv_cache, pe_cache = cache.kv[self.layer_idx], cache.pe[self.layer_idx]
        if rows_B is not None:
            kv_cache, pe_cache = kv_cache[rows_B], pe_cache[rows_B]
        S = kv_cache.shape[1]
        kv_BSC, pe_BSR = kv_cache.to(q_nope.dtype), pe_cache.to(q_nope.dtype)
        B, T, H, _ = q_nope.shape
        # The T x H queries of a row as the rows of one matrix product against that row's cache: an mm at batch 1,
        # which torch.compile keeps as a library GEMM (a batch-1 bmm its CPU decode pass turns into a slow
        # reduction over the span, 0.6 ms a layer at 2,048 in bf16; dev/LOG.md).
        q_lat_BMC = torch.einsum("bthn,hnc->bthc", q_nope, w_uk).reshape(B, T * H, self.kv_rank)
        if cache.fused and kv_BSC.dtype == q_lat_BMC.dtype == torch.float32 and kv_BSC.device.type == "cpu":
            out_lat_BMC = kernels.latent_decode_attention(q_lat_BMC, q_pe.reshape(B, T * H, self.rope), kv_BSC,
                                                          pe_BSR, positions_BT, self.scale)
            return torch.einsum("bthc,hoc->btho", out_lat_BMC.view(B, T, H, self.kv_rank), w_uv)
        scores_BMS = (_row_matmul(q_lat_BMC, kv_BSC.transpose(1, 2))
                      + _row_matmul(q_pe.reshape(B, T * H, self.rope), pe_BSR.transpose(1, 2))).float() * self.scale
        visible_BT1S = torch.arange(S, device=q_nope.device) <= positions_BT[:, :, None, None]
        probs_BTHS = scores_BMS.view(B, T, H, S).masked_fill(~visible_BT1S, float("-inf")).softmax(-1)
        out_lat_BMC = _row_matmul(probs_BTHS.to(q_nope.dtype).view(B, T * H, S), kv_BSC)
        return torch.einsum("bthc,hoc->btho", out_lat_BMC.view(B, T, H, self.kv_rank), w_uv)

    def _attend_gathered(self, q_lat_BTHC, q_pe, cache, rows_B, idx_BTk, valid_BTk, w_uv) -> Tensor:
        """Sparse absorbed attention: gather each query's k' selected latents and attend over them alone, so the
        cost per query is O(k') whatever the context length (V3.2 sec. 2.1, "MQA mode" of MLA)."""
        kv_cache, pe_cache = cache.kv[self.layer_idx], cache.pe[self.layer_idx]  # [rows, max_len, C / R]
        B, T, k = idx_BTk.shape
        rows = torch.arange(B, device=idx_BTk.device) if rows_B is None else rows_B
        # One index_select on the flattened cache (2.3x faster than advanced indexing on CPU, no row copies).
        flat = (idx_BTk + rows[:, None, None] * kv_cache.shape[1]).flatten()
        kv_BTkC = kv_cache.reshape(-1, self.kv_rank).index_select(0, flat).view(B, T, k, -1).to(q_lat_BTHC.dtype)
        pe_BTkR = pe_cache.reshape(-1, self.rope).index_select(0, flat).view(B, T, k, -1).to(q_pe.dtype)
        scores_BHTk = (torch.einsum("bthc,btkc->bhtk", q_lat_BTHC, kv_BTkC)
                       + torch.einsum("bthr,btkr->bhtk", q_pe, pe_BTkR)).float() * self.scale
        probs = scores_BHTk.masked_fill(~valid_BTk.unsqueeze(1), float("-inf")).softmax(-1).to(q_lat_BTHC.dtype)
        out_lat_BTHC = torch.einsum("bhtk,btkc->bthc", probs, kv_BTkC)
        return torch.einsum("bthc,hoc->btho", out_lat_BTHC, w_uv)


# --------------------------------------------------------------------------------------------------- FFN, gate, MoE
class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts (n_shared * moe_intermediate wide)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _keep_fp32(module: nn.Module, name: str) -> None:
    buf = getattr(module, name)
    if buf.is_floating_point() and buf.dtype != torch.float32 and not buf.is_meta:
        setattr(module, name, buf.float())


class Gate(nn.Module):
    """Token-to-expert routing, in fp32. V3 (noaux_tc): sigmoid scores; the bias only steers selection; groups
    ranked by the sum of their two best biased scores; weights are the unbiased scores, normalised, times the
    routed scaling factor (V3 sec. 2.1.2). V2: softmax scores, greedy or group-limited by group maximum."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.scoring_func, self.topk_method, self.norm = c.scoring_func, c.topk_method, c.norm_topk_prob
        self.scaling = c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        # Auxiliary-loss-free balancing bias b_i: no gradient, moved by update_expert_bias once per step.
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        # Node-limited routing (V3 sec. 2.1.2), a training-topology option set by dist.node_limited_routing:
        # (nodes, M) = experts split into `nodes` equal slices, each token sent to at most M of them. None: off.
        self.node_limit: tuple[int, int] | None = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp32(self, "e_score_correction_bias")  # the bias stays fp32 in every dtype, as released
        return self

    def forward(self, x_MD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.autocast(device_type=x_MD.device.type, enabled=False):
            logits_ME = F.linear(x_MD.float(), self.weight.float())
        scores_ME = logits_ME.sigmoid() if self.scoring_func == "sigmoid" else logits_ME.softmax(-1)
        M, E = scores_ME.shape
        choice_ME = scores_ME + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores_ME
        if self.topk_method != "greedy" and self.n_group > 1:
            grouped = choice_ME.view(M, self.n_group, E // self.n_group)
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:  # V2 group_limited_greedy: a group's best expert score
                group_scores = grouped.amax(-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            fill = float("-inf") if self.topk_method == "noaux_tc" else 0.0
            choice_ME = grouped.masked_fill(~keep[..., None], fill).view(M, E)
        if self.node_limit is not None:
            # Nodes ranked by the sum of their K/M highest (biased) scores; experts off the best M nodes masked.
            nodes, max_nodes = self.node_limit
            per_node = choice_ME.view(M, nodes, E // nodes)
            node_scores = per_node.topk(self.top_k // max_nodes, dim=-1).values.sum(-1)
            node_idx = node_scores.topk(max_nodes, dim=-1, sorted=False).indices
            keep = torch.zeros_like(node_scores, dtype=torch.bool).scatter_(1, node_idx, True)
            choice_ME = per_node.masked_fill(~keep[..., None], float("-inf")).view(M, E)
        idx_Mk = choice_ME.topk(self.top_k, dim=-1, sorted=False).indices
        weights_Mk = scores_ME.gather(1, idx_Mk)
        if self.norm:
            weights_Mk = weights_Mk / (weights_Mk.sum(-1, keepdim=True) + 1e-20)
        return weights_Mk * self.scaling, idx_Mk, scores_ME


SEGMENT_PAD, SEGMENT_PAD_MIN_ROWS = 32, 64  # bf16 on CPU: segments padded to a multiple of 32 rows, past 64 rows


class Experts(nn.Module):
    """The routed experts as stacked tensors in the HF orientation (gate and up fused), run with grouped matmul
    over assignments sorted by expert: no Python loop over experts and no host sync."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, F_ = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_AD: Tensor, offsets_E: Tensor) -> Tensor:
        if x_AD.device.type == "cpu" and x_AD.dtype == torch.bfloat16 and x_AD.shape[0] > SEGMENT_PAD_MIN_ROWS:
            # oneDNN compiles a bf16 matmul kernel per new shape: expert segments of a new length every step ran at
            # ~1/3 of the speed of repeated shapes (dev/LOG.md). Segments padded with zero rows to a multiple of
            # SEGMENT_PAD come from a small set of lengths that stay cached.
            dest_A, offsets_pad_E = pad_segments(offsets_E, x_AD.shape[0], SEGMENT_PAD)
            rows = x_AD.shape[0] + offsets_E.shape[0] * (SEGMENT_PAD - 1)  # static bound: no host sync
            x_PD = x_AD.new_zeros(rows, x_AD.shape[1]).index_copy(0, dest_A, x_AD)
            return self._ffn(x_PD, offsets_pad_E).index_select(0, dest_A)
        return self._ffn(x_AD, offsets_E)

    def _ffn(self, x_AD: Tensor, offsets_E: Tensor) -> Tensor:
        gate_AF, up_AF = grouped_mm(x_AD, self.gate_up_proj.transpose(1, 2), offsets_E).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate_AF) * up_AF, self.down_proj.transpose(1, 2), offsets_E)


def pad_segments(offsets_E: Tensor, rows: int, multiple: int) -> tuple[Tensor, Tensor]:
    """Expert segments [offsets[e-1], offsets[e]) of `rows` sorted rows, each padded to a multiple of `multiple`:
    the padded position of every row and the padded end offsets. Rows past the last padded offset belong to no
    expert (grouped_mm leaves them unwritten; nothing reads them)."""
    ends_E = offsets_E.long()
    counts_E = ends_E.diff(prepend=ends_E.new_zeros(1))
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    padded_ends_E = padded_E.cumsum(0)
    shift_E = (padded_ends_E - padded_E) - (ends_E - counts_E)
    rows_A = torch.arange(rows, device=offsets_E.device)
    expert_A = torch.searchsorted(ends_E, rows_A, right=True)
    return rows_A + shift_E[expert_A], padded_ends_E.to(offsets_E.dtype)


ROWWISE_MAX_ROWS = 64  # routed assignments up to which compiled graphs run the experts row by row (_rowwise_mm)


def grouped_mm(x_AI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """Rows [offsets[e-1], offsets[e]) of x times w[e]. torch._grouped_mm where it exists (CPU and Hopper GPUs);
    otherwise a segment loop (correct everywhere, only used on older GPUs)."""
    if x_AI.is_cuda and torch.cuda.get_device_capability(x_AI.device)[0] < 9:
        bounds = [0] + offsets_E.tolist()
        return torch.cat([x_AI[a:b] @ w_EIO[e] for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    if torch.compiler.is_compiling():
        if x_AI.shape[0] <= ROWWISE_MAX_ROWS and (x_AI.dtype != torch.bfloat16 or x_AI.device.type == "cpu"):
            # Decode: a few rows, no graph break. On CPU also in bf16, where inductor's lowering of _grouped_mm runs
            # one matmul per expert, empty ones included (a bf16 decode step 2-3x slower, dev/LOG.md).
            return _rowwise_mm(x_AI, w_EIO, offsets_E)
        if x_AI.dtype != torch.bfloat16:  # its compile-time shape rule knows only bf16
            if not (torch.is_grad_enabled() and (x_AI.requires_grad or w_EIO.requires_grad)):
                # Inference: an opaque op inside the graph. A graph break here would start a resumed graph whose
                # row count is static, which clashes with the decode graph's dynamic rows.
                return _grouped_mm_op(x_AI, w_EIO, offsets_E)
            return _grouped_mm_eager(x_AI, w_EIO, offsets_E)
    return torch._grouped_mm(x_AI, w_EIO.to(x_AI.dtype), offs=offsets_E)


def _rowwise_mm(x_AI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """grouped_mm as one reduction per row over its own expert's weights, for torch.compile: the fused kernel reads
    w[e] where it lies (a decode token's 4 routed experts in ~100 us against ~225 us eager). Eager, w[expert_A]
    would copy the weights, which was slower (dev/LOG.md)."""
    rows_A = torch.arange(x_AI.shape[0], dtype=offsets_E.dtype, device=x_AI.device)
    expert_A = torch.searchsorted(offsets_E, rows_A, right=True)
    return (x_AI[:, :, None] * w_EIO[expert_A].to(x_AI.dtype)).sum(1)


@torch.compiler.disable
def _grouped_mm_eager(x_AI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    return torch._grouped_mm(x_AI, w_EIO.to(x_AI.dtype), offs=offsets_E)


@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=())
def _grouped_mm_op(x_AI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    """torch._grouped_mm as an op torch.compile does not look into (no autograd: inference only)."""
    return torch._grouped_mm(x_AI, w_EIO.to(x_AI.dtype), offs=offsets_E)


@_grouped_mm_op.register_fake
def _(x_AI: Tensor, w_EIO: Tensor, offsets_E: Tensor) -> Tensor:
    return x_AI.new_empty(x_AI.shape[0], w_EIO.shape[-1])


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeekMoE paper; V3 sec. 2.1.2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.aux_alpha = config.aux_loss_alpha
        self.gate = Gate(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        # Tokens routed to each expert since the last bias update, summed over micro-batches (not saved).
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)
        self.aux_loss: Tensor | None = None
        # Expert parallelism (nanoseek/dist.py ExpertParallel): when set, the routed experts live sharded over ranks
        # and tokens travel to them by all-to-all; None runs every expert here.
        self.expert_parallel = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        _keep_fp32(self, "expert_load")  # counts must stay exact past 256 in a bf16 model
        return self

    def forward(self, x_BTD: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        x_MD = x_BTD.reshape(-1, D)
        weights_Mk, idx_Mk, scores_ME = self.gate(x_MD)
        # scatter_add rather than bincount: no host sync on GPUs.
        counts_E = torch.zeros(self.n_experts, dtype=torch.int64, device=x_MD.device).scatter_add_(
            0, idx_Mk.flatten(), torch.ones_like(idx_Mk.flatten()))
        with torch.no_grad():
            self.expert_load += counts_E
        if self.training and self.aux_alpha > 0:
            self.aux_loss = self.sequence_balance_loss(scores_ME.view(B, T, -1), idx_Mk.view(B, T, -1))
        # Sort the M*k assignments by expert, run each expert's contiguous segment, scatter back, mix by weight.
        if self.expert_parallel is not None:
            y_MkD = self.expert_parallel(self.experts, x_MD, idx_Mk, counts_E).view(-1, self.top_k, D)
        else:
            order_A = idx_Mk.flatten().argsort(stable=True)
            offsets_E = counts_E.cumsum(0).to(torch.int32)
            y_AD = self.experts(x_MD[order_A // self.top_k], offsets_E)
            y_MkD = torch.empty_like(y_AD).index_copy_(0, order_A, y_AD).view(-1, self.top_k, D)
        # A weighted sum, not a bmm: [M,1,k] @ [M,k,D] is M tiny matmuls (36x slower on CPU in fp32).
        routed_MD = (weights_Mk.to(y_MkD.dtype).unsqueeze(-1) * y_MkD).sum(1)
        out = routed_MD.view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_BTD)
        return out

    def sequence_balance_loss(self, scores_BTE: Tensor, idx_BTk: Tensor) -> Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged over sequences (V3 eq. 17-20):
        f_i = E / (k T) * #tokens of the sequence routed to i, P_i = mean_t of the scores renormalised per token."""
        B, T, E = scores_BTE.shape
        counts_BE = torch.zeros(B, E, device=scores_BTE.device).scatter_add_(
            1, idx_BTk.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores_BTE.device))
        f_BE = counts_BE * (E / (self.top_k * T))
        p_BE = (scores_BTE / (scores_BTE.sum(-1, keepdim=True) + 1e-20)).mean(1)
        return self.aux_alpha * (f_BE * p_BE).sum(-1).mean()


# --------------------------------------------------------------------------------------------------- blocks
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, **cache_kw) -> Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos, sin, **cache_kw)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class SharedHead(nn.Module):
    """An MTP module's output norm and head. The head shares the main model's lm_head (V3 sec. 2.2); the released
    checkpoint stores a copy of it under each MTP layer, which hf.py writes and reads."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(nn.Module):
    """Multi-token prediction depth k (V3 sec. 2.2): h'_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], one
    Transformer block, the shared output head. The released weights put the embedding half first in eh_proj."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.shared_head = SharedHead(config)

    def forward(self, h_BTD: Tensor, emb_BTD: Tensor, cos: Tensor, sin: Tensor, **cache_kw) -> Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        return self.block(x, cos, sin, **cache_kw)


# --------------------------------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Block(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList([MTPLayer(c, c.num_hidden_layers + k) for k in range(c.num_nextn_predict_layers)])
        inv_freq, self.rope_attention_factor = rope_inv_freq(c)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.loss_parts: dict[str, Tensor] = {}
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, initializer_range) for every matrix, ones for norms, zeros for the routing bias (as HF inits)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or ".norm." in name or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=generator)
        for m in self.moe_layers():
            m.gate.e_score_correction_bias.zero_()
        self.inv_freq.copy_(rope_inv_freq(self.config)[0])

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope_cos_sin(self.inv_freq, self.rope_attention_factor, positions)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, targets: Tensor | None = None, *, mtp_weight: float = 0.3,
                positions: Tensor | None = None, cache: LatentCache | None = None, rows: Tensor | None = None,
                prefill: bool = False, return_hidden: bool = False):
        """Logits [B, T, V] in fp32; with `targets` ([B, T], -100 ignored) the training loss: next-token CE
        + mtp_weight * mean over MTP depths of their CE + the sequence-wise balance losses. Parts are kept in
        `self.loss_parts` (detached) for logging.

        With `cache` the new tokens' latents are written at `positions` ([B, T], default 0..T-1) of cache rows
        `rows` ([B], default 0..B-1); `prefill=True` attends only among the new tokens (expanded MLA), otherwise
        over the cache (absorbed MLA)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.rope(positions)
        cache_kw = {} if cache is None else dict(cache=cache, positions_BT=positions, rows_B=rows, prefill=prefill)
        h_BTD = self.embed_tokens(input_ids)
        for layer in self.layers:
            h_BTD = layer(h_BTD, cos, sin, **cache_kw)
        if targets is None:
            logits = self.lm_head(self.norm(h_BTD)).float()
            return (logits, h_BTD) if return_hidden else logits
        return self._loss(input_ids, h_BTD, targets, mtp_weight, cos, sin)

    def _loss(self, input_ids, h_BTD, targets, mtp_weight: float, cos: Tensor, sin: Tensor) -> Tensor:
        main = self.cross_entropy(self.norm(h_BTD), targets)
        parts = {"lm": main}
        loss = main
        if self.mtp and mtp_weight > 0:
            # Depth k at position i sees t_{i+k} (= input_ids[i+k]) and predicts t_{i+k+1} (= targets[i+k]); the
            # sequence shortens by one per depth. h^0 is the main stack's output before its final norm.
            h, mtp_losses = h_BTD, []
            for k, layer in enumerate(self.mtp, start=1):
                T_k = targets.shape[1] - k
                if T_k <= 0:
                    break
                emb = self.embed_tokens(input_ids[:, k:])
                h = layer(h[:, :T_k], emb, cos[:, :T_k], sin[:, :T_k])
                mtp_losses.append(self.cross_entropy(layer.shared_head.norm(h), targets[:, k:]))
            if mtp_losses:
                parts["mtp"] = torch.stack(mtp_losses).mean()
                loss = loss + mtp_weight * parts["mtp"]
        kl = take_indexer_loss(self)  # DSA: the indexers' KL to the main attention (V3.2 sec. 2.1.1)
        if kl is not None:
            parts["indexer"] = kl
            loss = loss + kl
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        if aux:
            parts["balance"] = torch.stack(aux).sum()
            loss = loss + parts["balance"]
            for m in self.moe_layers():
                m.aux_loss = None
        self.loss_parts = {k: v.detach() for k, v in parts.items()}
        return loss

    def cross_entropy(self, h_BTD: Tensor, targets_BT: Tensor) -> Tensor:
        logits = self.lm_head(h_BTD)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100)

    def mtp_forward(self, depth: int, h_BTD: Tensor, tokens_BT: Tensor, positions: Tensor,
                    cache: LatentCache | None = None, rows: Tensor | None = None, prefill: bool = False,
                    pick_B: Tensor | None = None):
        """One MTP depth at inference (speculative drafting): returns (logits [B, T, V], h^depth [B, T, D]) from the
        previous depth's hidden states and the tokens one step ahead of them. With `pick_B` (a position per row)
        only that position goes through the LM head: logits [B, 1, V]."""
        layer = self.mtp[depth - 1]
        cos, sin = self.rope(positions)
        cache_kw = {} if cache is None else dict(cache=cache, positions_BT=positions, rows_B=rows, prefill=prefill)
        h = layer(h_BTD, self.embed_tokens(tokens_BT), cos, sin, **cache_kw)
        out = h if pick_B is None else h[torch.arange(h.shape[0], device=h.device), pick_B][:, None]
        return self.lm_head(layer.shared_head.norm(out)).float(), h

    # ------------------------------------------------------------------------------------------------ bookkeeping
    def expert_loads(self) -> Tensor:
        """[num MoE layers, E] tokens routed per expert since the last `update_expert_bias`."""
        return torch.stack([m.expert_load for m in self.moe_layers()]) if self.moe_layers() else torch.zeros(0)

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts; the main stack and the MTP modules apart."""
        c = self.config
        out = {"total": 0, "active": 0, "embedding": 0, "mtp_total": 0, "mtp_active": 0}
        frac = c.num_experts_per_tok / c.n_routed_experts if c.is_moe else 1.0
        for name, p in self.named_parameters():
            n = p.numel()
            act = n * frac if ".experts." in name else n
            key = "mtp_" if name.startswith("mtp.") else ""
            out[key + "total"] += n
            out[key + "active"] += int(act)
            if name == "embed_tokens.weight":
                out["embedding"] += n
        return out

    def flops_per_token(self, seq_len: int, *, training: bool = True, include_mtp: bool = True) -> float:
        """Matmul FLOPs per token: 2 per active matmul weight (embedding lookup excluded, lm_head included), plus
        attention scores and values 2 * H * (K + O) * seq_len (no causal discount, as PaLM counts MFU); training
        is 3x the forward (backward = 2x). MLA counted in the expanded form used for training."""
        c = self.config
        counts = self.param_counts()
        matmul = counts["active"] - counts["embedding"] - self._norm_params(exclude_mtp=True)
        attn = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len * c.num_hidden_layers
        fwd = 2 * matmul + attn
        if include_mtp and self.mtp:
            mtp_matmul = counts["mtp_active"] - self._norm_params(only_mtp=True) + c.vocab_size * c.hidden_size
            fwd += 2 * mtp_matmul + attn / c.num_hidden_layers * len(self.mtp)
        return float(3 * fwd if training else fwd)

    def _norm_params(self, exclude_mtp: bool = False, only_mtp: bool = False) -> int:
        n = 0
        for name, p in self.named_parameters():
            is_mtp = name.startswith("mtp.")
            if (exclude_mtp and is_mtp) or (only_mtp and not is_mtp):
                continue
            if p.dim() == 1:
                n += p.numel()
        return n

    # ------------------------------------------------------------------------------------------------ HF format
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "Transformer":
        from .hf import load_hf

        config, state = load_hf(path)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.inv_freq = rope_inv_freq(config)[0]
        for m in model.moe_layers():
            m.expert_load = torch.zeros(config.n_routed_experts)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model = model.to(device)
        return model if dtype is None else model.to(dtype)

    def save_pretrained(self, path) -> None:
        from .hf import save_hf

        save_hf(path, self.config, self.state_dict())


@torch.no_grad()
def update_expert_bias(model: Transformer, gamma: float = 1e-3) -> Tensor:
    """Auxiliary-loss-free balancing (V3 sec. 2.1.2): b_i += gamma * sign(mean load - load_i), once per optimizer
    step from the loads counted over that step (all micro-batches; the trainer all-reduces them across ranks
    first). Returns the loads used [layers, E] and resets the counters."""
    loads = model.expert_loads().clone()
    for m, load_E in zip(model.moe_layers(), loads):
        m.gate.e_score_correction_bias += gamma * torch.sign(load_E.mean() - load_E)
        m.expert_load.zero_()
    return loads
