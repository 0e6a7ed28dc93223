"""Blockwise FP8 (V3 sec. 3.3): scales and round trips against the formulas, the emulated GEMMs against their
definition, which layers are swapped, and a tiny --fp8 run against the bf16 one."""

import os
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek import fp8
from nanoseek.hf import dequantize_fp8

E4M3_HALF_ULP = 2.0 ** -4  # 3 mantissa bits: nearest rounding is within 1/16 of the value (normal range)
E4M3_MIN_SUBNORMAL = 2.0 ** -9


def within_e4m3(x: torch.Tensor, back: torch.Tensor, scale_per_elem: torch.Tensor) -> bool:
    # |error| <= half an ULP of the value, or half the smallest subnormal step (times the scale) near zero
    bound = torch.maximum(x.abs() * E4M3_HALF_ULP, scale_per_elem * E4M3_MIN_SUBNORMAL / 2) * (1 + 1e-6)
    return bool(((back - x).abs() <= bound).all())


def test_activation_tiles_scale_is_amax_over_448_and_round_trip_is_e4m3_precise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 300, generator=g) * torch.logspace(-3, 3, 6)[:, None]  # rows of very different size
    x[2, 128:256] = 0.0  # an all-zero tile
    q, scale = fp8.quantize_tiles(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (6, 3)
    for t in range(3):
        tile = x[:, t * 128:(t + 1) * 128]
        amax = tile.abs().amax(-1)
        expected = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax))
        assert torch.equal(scale[:, t], expected)
    assert float(q.float().abs().max()) == 448.0  # the largest element of a tile maps to e4m3's max
    back = fp8.dequantize_tiles(q, scale)
    assert within_e4m3(x, back, scale.repeat_interleave(128, -1)[:, :300])
    assert torch.equal(back[2, 128:256], torch.zeros(128))


def test_weight_blocks_scale_per_128x128_and_hf_dequantize_uses_them():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 300, generator=g)
    w[:128, 128:256] *= 1000  # one loud block must not spoil its neighbours' precision
    q, scale = fp8.quantize_blocks(w)
    assert scale.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert scale[i, j] == block.abs().max() / 448.0
    back = fp8.dequantize_blocks(q, scale)
    s_full = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    assert within_e4m3(w, back, s_full)
    # a released FP8 checkpoint stores exactly this: e4m3 weight + weight_scale_inv per block
    loaded = dequantize_fp8({"x.weight": q, "x.weight_scale_inv": scale})
    assert torch.equal(loaded["x.weight"], back.to(torch.bfloat16))


def test_fp8_linear_gemms_follow_the_recipe():
    """fprop, dgrad and wgrad are the chunked fp32 GEMMs of the quantised operands (tiles along K, weight blocks)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 300, generator=g, requires_grad=True)
    w = torch.randn(200, 300, generator=g, requires_grad=True)
    dy = torch.randn(37, 200, generator=g)
    y = fp8.fp8_linear(x, w)
    y.backward(dy)

    def deq_t(a):
        return fp8.dequantize_tiles(*fp8.quantize_tiles(a))

    def deq_b(a):
        return fp8.dequantize_blocks(*fp8.quantize_blocks(a))

    def chunked(a, b):  # a @ b.T, one 128-slice of K at a time, summed in fp32
        return sum(a[:, k:k + 128] @ b[:, k:k + 128].T for k in range(0, a.shape[1], 128))

    xd, wd = x.detach(), w.detach()
    torch.testing.assert_close(y, chunked(deq_t(xd), deq_b(wd)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, chunked(deq_t(dy), deq_b(wd.T)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(w.grad, chunked(deq_t(dy.T), deq_t(xd.T)), rtol=1e-6, atol=1e-5)
    exact = xd @ wd.T  # and all of it close to the unquantised product (a few e4m3 ULPs, averaged)
    assert float((y - exact).detach().norm() / exact.norm()) < 0.06


def test_swap_quantises_projections_only_and_keeps_the_state_dict():
    config = ModelConfig.from_name("tiny", vocab_size=64)
    torch.manual_seed(0)
    model = Transformer(config)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 64, (2, 8))
    n = fp8.swap_to_fp8(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layers.0.self_attn.q_a_proj"] == "FP8Linear" and kinds["layers.0.self_attn.o_proj"] == "FP8Linear"
    assert kinds["layers.0.mlp.down_proj"] == "FP8Linear" and kinds["layers.1.mlp.shared_experts.up_proj"] == "FP8Linear"
    assert kinds["layers.1.mlp.experts"] == "FP8Experts" and kinds["mtp.0.block.self_attn.kv_b_proj"] == "FP8Linear"
    assert kinds["lm_head"] == "Linear" and kinds["embed_tokens"] == "Embedding" and kinds["mtp.0.eh_proj"] == "Linear"
    assert kinds["layers.1.mlp.gate"] == "Gate"
    assert n == sum(v in ("FP8Linear", "FP8Experts") for v in kinds.values())
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    loss = model(x, targets=x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


STDLIB = Path(os.__file__).parent


def train_bytes(use_fp8: bool, steps: int = 80, lr: float = 2e-3, B: int = 8, T: int = 64,
                seed: int = 0) -> tuple[list, float]:
    """The tiny preset on the bytes of a few stdlib modules (vocab 256), AdamW + clipping, bf16 autocast. Returns
    the training losses and the final loss on 16 fixed batches of another module (the less noisy number)."""
    from nanoseek.optim import build_optimizer

    def load(*names):
        text = b"".join((STDLIB / name).read_bytes() for name in names)
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()

    train, held = load("bisect.py", "heapq.py", "textwrap.py", "string.py"), load("json/decoder.py")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=256))
    if use_fp8:
        fp8.swap_to_fp8(model)
    opt = build_optimizer(model, lr)
    g = torch.Generator().manual_seed(0)

    def rows(data, n):
        starts = torch.randint(0, len(data) - T - 1, (n,), generator=g)
        return torch.stack([data[s:s + T + 1] for s in starts])

    losses = []
    for _ in range(steps):
        r = rows(train, B)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(r[:, :-1], targets=r[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    g.manual_seed(1)
    r = rows(held, 16 * B)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        held_loss = float(model(r[:, :-1], targets=r[:, 1:], mtp_weight=0.0))
    return losses, held_loss


def test_fp8_run_tracks_bf16_run():
    """Same data, seeds and steps, bf16 autocast with and without the FP8 swap: mean held-out loss over three seeds
    within 1% relative (V3 reports under 0.25% at scale). One pair of 80-step runs at this size is chaotic: on an
    AMX machine seeds 0 / 1 / 2 gave 1.22% / 0.04% / 0.24% apart, while bf16 alone moved 2% between seeds."""
    torch.set_num_threads(1)
    pairs = [(train_bytes(False, seed=s), train_bytes(True, seed=s)) for s in range(3)]
    for (bf16, held_bf16), (fp8_run, held_fp8) in pairs:
        print(f"train {bf16[0]:.4f} -> {bf16[-1]:.4f} (bf16) / {fp8_run[-1]:.4f} (fp8); held-out {held_bf16:.4f} "
              f"(bf16) {held_fp8:.4f} (fp8), relative {abs(held_fp8 - held_bf16) / held_bf16:.3%}")
        assert held_bf16 < bf16[0] - 2.0 and held_fp8 < fp8_run[0] - 2.0  # both learned something
    mean_bf16 = sum(b[1] for b, _ in pairs) / 3
    mean_fp8 = sum(f[1] for _, f in pairs) / 3
    assert abs(mean_fp8 - mean_bf16) / mean_bf16 < 0.01
