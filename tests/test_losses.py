"""Post-training losses: parity with TRL's GRPOTrainer where TRL is importable, and hand-worked values always."""

import math
import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from nanoseek.losses import (
    cckd_loss,
    dpo_loss,
    grpo_loss,
    group_advantages,
    logit_distill_loss,
    sequence_logprobs,
    token_entropy,
    token_logprobs,
)


# ---------------------------------------------------------------------------------------------------------------
# GRPO: hand-worked golden values (always run)


def golden_inputs():
    # B=2, T=3, eps=0.2. Ratios r = exp(logp - old) are chosen directly; the masked token has r=3 and A>0, so
    # it would count as high-clipped (and add to the loss) if the mask were ignored.
    r = torch.tensor([[1.5, 1.0, 3.0], [0.5, 1.1, 1.3]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    logp = old + r.log()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0])
    return logp, old, advantages, mask


def test_grpo_golden_values_by_hand():
    logp, old, adv, mask = golden_inputs()
    # per-token loss -min(r A, clip(r, 0.8, 1.2) A):
    #   seq 0 (A=+1): r=1.5 -> -min(1.5, 1.2) = -1.2 ; r=1.0 -> -1.0 ; (masked)
    #   seq 1 (A=-1): r=0.5 -> -min(-0.5, -0.8) = 0.8 ; r=1.1 -> 1.1 ; r=1.3 -> -min(-1.3, -1.2) = 1.3
    # grpo:    mean(-2.2/2, 3.2/3) = (-1.1 + 1.0666667) / 2 = -0.0166667
    # dapo:    (-2.2 + 3.2) / 5 active tokens = 0.2
    # dr_grpo: 1.0 / (B * T) = 1.0 / 6 = 0.1666667
    expected = {"grpo": -1 / 60, "dapo": 0.2, "token_mean": 0.2, "dr_grpo": 1 / 6}
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(logp, old, None, adv, mask, loss_type=loss_type)
        assert loss.item() == pytest.approx(value, abs=1e-6), loss_type
    # Dr. GRPO with a fixed max completion length of 4: 1.0 / (2 * 4)
    loss, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo", max_completion_length=4)
    assert loss.item() == pytest.approx(1 / 8, abs=1e-6)
    # DAPO clip-higher, eps_high = 0.4: seq 0 token 0 becomes -min(1.5, 1.4) = -1.4; seq 1 token 2 is unchanged
    # (A < 0 takes the unclipped branch for r > 1): (-2.4 + 3.2) / 5 = 0.16
    loss, _ = grpo_loss(logp, old, None, adv, mask, loss_type="dapo", epsilon_high=0.4)
    assert loss.item() == pytest.approx(0.16, abs=1e-6)


def test_grpo_clip_fractions_and_ratio_by_hand():
    logp, old, adv, mask = golden_inputs()
    _, stats = grpo_loss(logp, old, None, adv, mask)
    # low-clipped: r < 0.8 with A < 0 -> seq 1 token 0. high-clipped: r > 1.2 with A > 0 -> seq 0 token 0.
    # seq 1 token 2 (r = 1.3, A < 0) is not clipped; the masked r = 3 does not count. 5 active tokens.
    assert stats["clip_low"].item() == pytest.approx(1 / 5)
    assert stats["clip_high"].item() == pytest.approx(1 / 5)
    assert stats["clip_region"].item() == pytest.approx(2 / 5)
    assert stats["ratio"].item() == pytest.approx((1.5 + 1.0 + 0.5 + 1.1 + 1.3) / 5)
    assert "kl" not in stats  # no reference given
    _, stats = grpo_loss(logp, old, None, adv, mask, epsilon_high=0.6)  # 1.5 < 1.6: nothing high-clipped
    assert stats["clip_high"].item() == 0.0 and stats["clip_region"].item() == pytest.approx(1 / 5)


def test_grpo_k3_kl_term_by_hand():
    # d = ref - logp = [ln 2, 0, -ln 2]; k3 = e^d - d - 1 = [1 - ln 2, 0, ln 2 - 1/2]; the sum is exactly 0.5.
    logp = torch.tensor([[-1.0, -1.0, -1.0]])
    ref = logp + torch.tensor([[math.log(2), 0.0, -math.log(2)]])
    mask = torch.ones(1, 3)
    zero_adv = torch.zeros(1)  # isolates the KL term: the surrogate is -min(0, 0) = 0
    loss, stats = grpo_loss(logp, logp, ref, zero_adv, mask, beta=0.5)
    assert stats["kl"].item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 0.5 / 3, abs=1e-6)
    loss, stats = grpo_loss(logp, logp, ref, zero_adv, mask, beta=0.0)  # KL monitored but not added
    assert loss.item() == 0.0 and stats["kl"].item() == pytest.approx(0.5 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, None, zero_adv, mask, beta=0.1)


def test_grpo_on_policy_gradient_is_advantage_weighted_score():
    # With old = logp.detach() the ratio is 1 and d(loss)/d(logp) = -A / |o_i| / B for "grpo".
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = grpo_loss(logp, None, None, torch.tensor([2.0, -3.0]), mask)
    loss.backward()
    expected = torch.tensor([[-2 / 2 / 2, -2 / 2 / 2, 0.0], [3 / 3 / 2] * 3])
    torch.testing.assert_close(logp.grad, expected)


def test_grpo_rejects_bad_arguments():
    logp, old, adv, mask = golden_inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        grpo_loss(logp, old, None, adv, mask[:, :2])


# ---------------------------------------------------------------------------------------------------------------
# GRPO: parity with TRL's GRPOTrainer._compute_loss, called unbound on a stub trainer (skipped without TRL)


def trl_compute_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len):
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    accelerator = types.SimpleNamespace(
        num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x, gather_for_metrics=lambda x: x
    )
    stub = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=accelerator,
        _metrics=defaultdict(lambda: defaultdict(list)), aux_loss_enabled=False, _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )  # fmt: skip
    B, T = logp.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 0, dtype=torch.long), "prompt_mask": torch.zeros(B, 0, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask, "advantages": adv,
        "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum(),
    }  # fmt: skip
    loss = grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[0] for k, v in stub._metrics["eval"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_matches_trl(loss_type, beta, eps_high):
    torch.manual_seed(0)
    B, T = 6, 7
    base = torch.randn(B, T) * 0.3 - 1
    old = base + torch.randn(B, T) * 0.3  # big enough that both clip sides are hit
    ref = base + torch.randn(B, T) * 0.2
    adv = torch.randn(B)
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1
    logp_trl = base.clone().requires_grad_()
    want, metrics = trl_compute_loss(logp_trl, old, ref, adv, mask, loss_type, 0.2, eps_high, beta, T)
    want.backward()
    logp = base.clone().requires_grad_()
    got, stats = grpo_loss(
        logp, old, ref, adv, mask, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, beta=beta
    )
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logp.grad, logp_trl.grad, rtol=1e-6, atol=1e-7)
    assert stats["clip_region"].item() > 0  # the example exercises clipping
    for ours, theirs in [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                         ("clip_region", "clip_ratio/region_mean")]:  # fmt: skip
        assert stats[ours].item() == pytest.approx(metrics[theirs], abs=1e-7)
    if beta > 0:
        assert stats["kl"].item() == pytest.approx(metrics["kl"], rel=1e-6)


def test_group_advantages_match_trl():
    utils = pytest.importorskip("trl.trainer.utils")
    torch.manual_seed(0)
    rewards = torch.randint(0, 3, (24,)).float()
    grouped = rewards.view(-1, 8)
    trl = (grouped - grouped.mean(1, keepdim=True)) / (utils.nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 8), trl.view(-1))


# ---------------------------------------------------------------------------------------------------------------
# Advantages and DPO by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # group 0: mean 0.25, unbiased var (0.75^2 + 3 * 0.25^2) / 3 = 0.25, std 0.5 (the biased std would be 0.433)
    # group 1: all equal -> advantage 0 (zero-variance groups carry no signal)
    expected = torch.tensor([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4), expected)
    centered = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    torch.testing.assert_close(group_advantages(rewards, 4, scale_std=False), centered)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(rewards, 1)


def test_dpo_loss_by_hand():
    # pair 0: chosen reward 0.5 * (-1 - -1.5) = 0.25, rejected 0.5 * (-2 - -1.5) = -0.25, logit 0.5
    #         loss = log(1 + e^-0.5) = 0.474077
    # pair 1: chosen 0.5 * (-3 - -2) = -0.5, rejected 0.5 * (-1 - -2) = 0.5, logit -1, loss = log(1 + e) = 1.313262
    loss, stats = dpo_loss(
        torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0]),
        beta=0.5,
    )
    assert loss.item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-5)
    assert stats["reward_chosen"].item() == pytest.approx((0.25 - 0.5) / 2)
    assert stats["reward_rejected"].item() == pytest.approx((-0.25 + 0.5) / 2)
    assert stats["reward_accuracy"].item() == 0.5
    assert stats["reward_margin"].item() == pytest.approx((0.5 - 1.0) / 2)


# ---------------------------------------------------------------------------------------------------------------
# Log-probs, entropy


def test_token_logprobs_chunked_match_log_softmax_gather_with_grads():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 4))
    targets[1, 3] = -100  # ignored position
    got = token_logprobs(logits, targets, chunk_size=3)  # 8 tokens in chunks of 3, 3, 2
    ref_logits = logits.detach().clone().requires_grad_()
    want = torch.log_softmax(ref_logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    want = want * (targets != -100)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(sequence_logprobs(logits, targets, mask, chunk_size=5), (want * mask).sum(-1))
    # low-precision logits are upcast: the result is fp32
    assert token_logprobs(logits.detach().bfloat16(), targets).dtype == torch.float32


def test_token_entropy_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    want = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(token_entropy(logits, chunk_size=4), want)


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def test_logit_distill_matches_kl_div_and_truncates_vocab():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 10, requires_grad=True)
    teacher = torch.randn(2, 3, 12)  # larger vocabulary: only the first 10 ids are compared
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    T = 2.0
    got = logit_distill_loss(student, teacher, mask, temperature=T)
    kl_BT = F.kl_div(
        F.log_softmax(student / T, -1), F.log_softmax(teacher[..., :10] / T, -1), reduction="none", log_target=True
    ).sum(-1)
    want = T**2 * (kl_BT * mask).sum() / mask.sum()
    torch.testing.assert_close(got, want)
    got.backward()
    assert student.grad.abs().sum() > 0
    assert logit_distill_loss(teacher[..., :10], teacher, mask, temperature=T).item() == pytest.approx(0, abs=1e-6)


def test_cckd_by_hand_and_invariance():
    # student rows orthogonal: C_s = I; teacher rows identical: C_t = ones; (C_s - C_t)^2 has two 1s of four.
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert cckd_loss(student, teacher).item() == pytest.approx(0.5)
    # a teacher that is the student mapped by a norm-preserving 4 -> 6 map has the same correlations: loss 0
    torch.manual_seed(0)
    s = torch.randn(5, 4)
    q, _ = torch.linalg.qr(torch.randn(6, 4))  # 6 x 4, orthonormal columns
    assert cckd_loss(s, s @ q.T).item() == pytest.approx(0.0, abs=1e-6)
    assert cckd_loss(s, torch.randn(5, 6)).item() > 0.01
