"""Post-training losses as pure tensor functions: GRPO (and its DAPO / Dr. GRPO aggregations), DPO, log-prob
helpers, and distillation. No model here; the stages compute log-probs and call these.

Shape legend: B batch (sequences), T completion tokens, V vocabulary, D embedding width, G group size.
Masks are [B, T], bool or float, 1 on completion tokens that count.

GRPO was checked line by line against TRL's `GRPOTrainer._compute_loss` (trl 1.16.0) and is tested against it.
Differences from TRL:
  - "dr_grpo" divides by B * T with T = mask.shape[1] unless `max_completion_length` is given; TRL always uses
    its config's max_completion_length (equal to ours when completions are padded to that length).
  - "dapo" / "token_mean" divides by the active tokens of this call. TRL's "dapo" divides by the tokens of the
    whole generation batch (`num_items_in_batch`), so that gradient accumulation gives the global token mean;
    a trainer that accumulates over micro-batches must rescale by (tokens here / tokens in the window).
  - no gradient-accumulation division inside the loss (the trainer owns that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOSS_TYPES = ("grpo", "dapo", "token_mean", "dr_grpo")


def _masked_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    return (x_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "grpo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate with optional k3 KL penalty.

    logp, old_logp, ref_logp: per-token log-probs [B, T] of the sampled tokens under the policy being trained,
    the policy that sampled them (None: on-policy, old = logp.detach(), as TRL with one iteration), and the
    reference (needed only when beta > 0). advantages: [B] (or [B, T]). Returns (loss, detached stats).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if logp.dim() != 2 or mask.shape != logp.shape:
        raise ValueError(f"logp and mask must both be [B, T], got {tuple(logp.shape)} and {tuple(mask.shape)}")
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's per-token log-probs); or set beta=0")
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask_BT = mask.to(logp.dtype)
    old_logp = logp.detach() if old_logp is None else old_logp
    adv_BT = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

    # DeepSeekMath eq. 3: min(r A, clip(r, 1 - eps, 1 + eps) A), r = pi / pi_old per token.
    # DAPO sec. 3.1 ("clip-higher") decouples the upper bound: 1 + epsilon_high.
    ratio_BT = torch.exp(logp - old_logp)
    clipped_BT = torch.clamp(ratio_BT, 1 - epsilon_low, 1 + epsilon_high)
    per_token_BT = -torch.min(ratio_BT * adv_BT, clipped_BT * adv_BT)

    kl_BT = None
    if ref_logp is not None:
        # DeepSeekMath eq. 4: unbiased, non-negative k3 estimator of KL(pi || pi_ref).
        kl_BT = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        if beta > 0:
            per_token_BT = per_token_BT + beta * kl_BT

    if loss_type == "grpo":
        # DeepSeekMath eq. 3: 1/G sum_i 1/|o_i| sum_t: mean over each sequence's tokens, then over sequences.
        per_seq_B = (per_token_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)
        loss = per_seq_B.mean()
    elif loss_type in ("dapo", "token_mean"):
        # DAPO eq. 8 (token-level policy gradient): every token weighs the same, whatever its sequence length.
        loss = _masked_mean(per_token_BT, mask_BT)
    else:
        # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): a constant normalizer B * T_max
        # removes the length bias of 1/|o_i|.
        t_max = mask.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token_BT * mask_BT).sum() / (logp.shape[0] * t_max)

    with torch.no_grad():
        # Clipped = the clipped branch is the min, i.e. the token gets no gradient (TRL's definitions).
        low = ((ratio_BT < 1 - epsilon_low) & (adv_BT < 0)).to(mask_BT.dtype)
        high = ((ratio_BT > 1 + epsilon_high) & (adv_BT > 0)).to(mask_BT.dtype)
        stats = {
            "clip_low": _masked_mean(low, mask_BT),
            "clip_high": _masked_mean(high, mask_BT),
            "clip_region": _masked_mean(low + high, mask_BT),  # disjoint: they need opposite advantage signs
            "ratio": _masked_mean(ratio_BT, mask_BT),
        }
        if kl_BT is not None:
            stats["kl"] = _masked_mean(kl_BT, mask_BT)
    return loss, stats


def group_advantages(rewards: Tensor, group_size: int, scale_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath sec. 4.1.2): z-score of each reward within its group of
    `group_size` consecutive samples of the same prompt. The std is the unbiased one (Bessel, n - 1) plus eps,
    as TRL (`nanstd` with count / (count - 1); older TRL used torch.std, also unbiased). scale_std=False is
    Dr. GRPO's mean-centering only."""
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be [B] with B a multiple of group_size={group_size}, got shape {tuple(rewards.shape)}"
        )
    if group_size < 2:
        raise ValueError("group_size must be >= 2: GRPO compares samples of the same prompt with each other")
    grouped_NG = rewards.float().view(-1, group_size)
    adv_NG = grouped_NG - grouped_NG.mean(dim=1, keepdim=True)
    if scale_std:
        adv_NG = adv_NG / (grouped_NG.std(dim=1, keepdim=True) + eps)
    return adv_NG.view(-1)


def dpo_loss(
    policy_chosen_logp: Tensor,
    policy_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO sigmoid loss (Rafailov et al. 2023, eq. 7) on sequence log-probs [B]:
    -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over the batch.
    Stats (as TRL's rewards/*): implicit rewards beta * (pi - ref) of chosen and rejected, accuracy, margin."""
    chosen_B = beta * (policy_chosen_logp - ref_chosen_logp)
    rejected_B = beta * (policy_rejected_logp - ref_rejected_logp)
    loss = -F.logsigmoid(chosen_B - rejected_B).mean()
    with torch.no_grad():
        stats = {
            "reward_chosen": chosen_B.mean(),
            "reward_rejected": rejected_B.mean(),
            "reward_accuracy": (chosen_B > rejected_B).float().mean(),
            "reward_margin": (chosen_B - rejected_B).mean(),
        }
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Log-probs and entropy from logits, in fp32, chunked over tokens. Without grad, only one chunk of fp32
# log-softmax exists at a time. With grad, each chunk is checkpointed: backward recomputes its fp32 softmax
# instead of keeping a full [B*T, V] fp32 copy alive (the logits themselves are kept by the model anyway).


def _chunked(fn, logits_NV: Tensor, *extra: Tensor, chunk_size: int) -> Tensor:
    outs = []
    use_checkpoint = torch.is_grad_enabled() and logits_NV.requires_grad
    for start in range(0, logits_NV.shape[0], chunk_size):
        args = [logits_NV[start : start + chunk_size]] + [x[start : start + chunk_size] for x in extra]
        outs.append(checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args))
    return torch.cat(outs) if outs else logits_NV.new_zeros(0, dtype=torch.float32)


def _token_logprobs(logits_NV: Tensor, targets_N: Tensor) -> Tensor:
    # cross_entropy fuses log_softmax + gather; ignore_index targets (-100) give 0.
    return -F.cross_entropy(logits_NV.float(), targets_N, reduction="none", ignore_index=-100)


def token_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """log p(targets) per token, fp32 [B, T], from logits [B, T, V] (already aligned: logits[:, t] predicts
    targets[:, t]). Targets equal to -100 give 0."""
    B, T, V = logits.shape
    out_N = _chunked(_token_logprobs, logits.reshape(B * T, V), targets.reshape(B * T), chunk_size=chunk_size)
    return out_N.view(B, T)


def sequence_logprobs(logits: Tensor, targets: Tensor, mask: Tensor, chunk_size: int = 1024) -> Tensor:
    """Sum of log p(targets) over masked tokens, fp32 [B] (what DPO compares)."""
    return (token_logprobs(logits, targets, chunk_size) * mask.float()).sum(-1)


def _entropy(logits_NV: Tensor) -> Tensor:
    logp_NV = torch.log_softmax(logits_NV.float(), dim=-1)
    return -(logp_NV.exp() * logp_NV).sum(-1)


def token_entropy(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy of the predictive distribution per token, fp32 [B, T]."""
    B, T, V = logits.shape
    return _chunked(_entropy, logits.reshape(B * T, V), chunk_size=chunk_size).view(B, T)


# ----------------------------------------------------------------------------------------------------------------
# Distillation


def logit_distill_loss(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """T^2 * KL(teacher || student) of the temperature-softened next-token distributions (Hinton et al. 2015;
    T^2 keeps gradient scale independent of T), token mean over the mask.

    Vocabularies may differ in size: both sides are cut to the first min(V_s, V_t) ids and renormalised there.
    This is right when one vocabulary extends the other (same tokenizer, padded embedding), not for unrelated
    tokenizers. The teacher is detached."""
    if student_logits.shape[:2] != teacher_logits.shape[:2] or mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student {tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)} and mask "
            f"{tuple(mask.shape)} must share [B, T]"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = min(student_logits.shape[-1], teacher_logits.shape[-1])
    s_logp_BTV = torch.log_softmax(student_logits[..., :V].float() / temperature, dim=-1)
    t_logp_BTV = torch.log_softmax(teacher_logits[..., :V].detach().float() / temperature, dim=-1)
    kl_BT = (t_logp_BTV.exp() * (t_logp_BTV - s_logp_BTV)).sum(-1)
    return temperature**2 * _masked_mean(kl_BT, mask.float())


def cckd_loss(student_emb: Tensor, teacher_emb: Tensor) -> Tensor:
    """Correlation congruence term of CCKD (Peng et al. 2019, "Correlation Congruence for Knowledge
    Distillation", eq. 7-8): match the B x B correlation matrices of the samples' embeddings,
    (1/B^2) ||C_s - C_t||_F^2. We use the cosine kernel C = norm(E) norm(E)^T (the paper's bilinear-pool kernel
    on L2-normalised features; its Gaussian-RBF Taylor variant is not implemented). Widths D and D' may differ,
    since only B x B matrices are compared. The teacher is detached."""
    if student_emb.dim() != 2 or teacher_emb.dim() != 2 or student_emb.shape[0] != teacher_emb.shape[0]:
        raise ValueError(
            f"embeddings must be [B, D] and [B, D'] with the same B, got {tuple(student_emb.shape)} and "
            f"{tuple(teacher_emb.shape)}"
        )
    s_BD = F.normalize(student_emb.float(), dim=-1)
    t_BD = F.normalize(teacher_emb.detach().float(), dim=-1)
    return ((s_BD @ s_BD.T - t_BD @ t_BD.T) ** 2).mean()
