"""Blockwise FP8 training as in DeepSeek-V3 sec. 3.3: e4m3 everywhere in the linear GEMMs, activations scaled per
1x128 tile, weights per 128x128 block, scale = amax / 448, fp32 accumulation promoted every 128 elements of K.

    model = Transformer(config); swap_to_fp8(model)      # or `nanoseek pretrain --fp8`

What is quantised (the paper's choice): the attention projections (q_a/q_b or q, kv_a, kv_b, o) and the MLP /
shared-expert / routed-expert projections. Not the embedding, the output head, the gate, the norms, the MTP
projection or the attention core (softmax); they stay in the model's precision. The swap only changes classes:
parameters, names and checkpoints (HF format, bf16/fp32 weights) are the same as without --fp8.

The three GEMMs of a swapped nn.Linear, y = x W^T (x [M, K], W [N, K]):
    fprop  y  = Q_1x128(x)  . Q_128x128(W)^T          tiles along K
    dgrad  dx = Q_1x128(dy) . Q_128x128(W^T)^T        tiles along N (dy's rows), W's blocks transposed
    wgrad  dW = Q_1x128(dy^T) . Q_1x128(x^T)^T        tiles along the token dimension M for both operands
Each is `fp8_gemm`: on CPUs (and GPUs without blockwise scaled-mm) it is emulated with the same numerics: every
operand rounded to e4m3 with its fp32 scales, then per 128-wide slice of K an fp32 matmul of the dequantised
values, the partial products summed in fp32 (what the paper's promotion to CUDA cores does). Dequantisation is
exact (an e4m3 value times an fp32 scale), so the emulation differs from the hardware only in the order of the
fp32 additions. On Hopper the fprop/dgrad GEMMs go through torch.nn.functional.scaled_mm with blockwise scales
(not exercised by the CPU test-suite; any failure falls back to the emulation with a warning).

Left simpler than the paper (tractable here, documented in dev/LOG.md): the high-precision x is saved for the
backward instead of its FP8 copy; routed experts quantise their forward operands (x per tile, each expert's
weights per block) and pass gradients straight through, so their backward GEMMs run in the model's precision.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = 128


# --------------------------------------------------------------------------------------------------- quantisers
def quantize_tiles(x: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Per 1 x `block` tile along the last dim: scale = amax / 448 (fp32), q = x / scale in e4m3.
    x [..., K] -> q [..., K] (float8_e4m3fn), scale [..., ceil(K / block)]. An all-zero tile gets scale 1."""
    K = x.shape[-1]
    C = math.ceil(K / block)
    x_f = F.pad(x.float(), (0, C * block - K)).view(*x.shape[:-1], C, block)
    amax = x_f.abs().amax(-1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (x_f / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(*x.shape[:-1], C * block)[..., :K], scale


def dequantize_tiles(q: Tensor, scale: Tensor, block: int = BLOCK) -> Tensor:
    return q.float() * scale.repeat_interleave(block, -1)[..., : q.shape[-1]]


def quantize_blocks(w: Tensor, block: int = BLOCK) -> tuple[Tensor, Tensor]:
    """Per `block` x `block` block of the last two dims: w [..., N, K] -> q e4m3 [..., N, K], scale fp32
    [..., ceil(N / block), ceil(K / block)] (the `weight_scale_inv` of released FP8 checkpoints)."""
    *lead, N, K = w.shape
    R, C = math.ceil(N / block), math.ceil(K / block)
    w_f = F.pad(w.float(), (0, C * block - K, 0, R * block - N)).view(*lead, R, block, C, block)
    amax = w_f.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (w_f / scale[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(*lead, R * block, C * block)[..., :N, :K], scale


def dequantize_blocks(q: Tensor, scale: Tensor, block: int = BLOCK) -> Tensor:
    """q [..., N, K] times its per-block scale [..., ceil(N/block), ceil(K/block)], in fp32. hf.py loads released FP8
    checkpoints (e4m3 weight + weight_scale_inv) through this."""
    N, K = q.shape[-2:]
    s = scale.float().repeat_interleave(block, -2)[..., :N, :].repeat_interleave(block, -1)[..., :K]
    return q.float() * s


def fake_quantize(x: Tensor, blocks: bool = False) -> Tensor:
    """x rounded through e4m3 with its scales and back (per tile, or per block of the last two dims), in fp32."""
    return dequantize_blocks(*quantize_blocks(x)) if blocks else dequantize_tiles(*quantize_tiles(x))


# --------------------------------------------------------------------------------------------------- GEMM
def _chunked_matmul(a_MK: Tensor, b_NK: Tensor, block: int = BLOCK) -> Tensor:
    """a @ b^T in fp32 one 128-wide slice of K at a time, the partial products summed in fp32."""
    M, K = a_MK.shape
    N = b_NK.shape[0]
    C = math.ceil(K / block)
    a = F.pad(a_MK, (0, C * block - K)).view(M, C, block).transpose(0, 1)  # [C, M, 128]
    b = F.pad(b_NK, (0, C * block - K)).view(N, C, block).permute(1, 2, 0)  # [C, 128, N]
    if C * M * N <= 1 << 24:
        return torch.bmm(a, b).sum(0)
    out = torch.zeros(M, N, dtype=torch.float32, device=a_MK.device)
    for c in range(C):
        out += a[c] @ b[c]
    return out


_warned_gpu = False


def fp8_gemm(a_MK: Tensor, b_NK: Tensor, b_blocks: bool) -> Tensor:
    """a @ b^T with a quantised per 1x128 tile and b per 128x128 block (`b_blocks`, a weight) or per 1x128 tile
    (an activation or gradient), both along K; fp32 result."""
    global _warned_gpu
    qa, sa = quantize_tiles(a_MK)
    qb, sb = quantize_blocks(b_NK) if b_blocks else quantize_tiles(b_NK)
    if a_MK.is_cuda and hasattr(F, "scaled_mm") and torch.cuda.get_device_capability(a_MK.device) >= (9, 0):
        try:
            recipe_b = F.ScalingType.BlockWise128x128 if b_blocks else F.ScalingType.BlockWise1x128
            return F.scaled_mm(qa, qb.t(), sa, F.ScalingType.BlockWise1x128, sb, recipe_b,
                               output_dtype=torch.float32).float()
        except (RuntimeError, ValueError, TypeError) as e:  # shapes/layouts this build's kernels do not take
            if not _warned_gpu:
                warnings.warn(f"blockwise scaled_mm unavailable ({e}); using the emulated FP8 GEMM", stacklevel=2)
                _warned_gpu = True
    a = dequantize_tiles(qa, sa)
    b = dequantize_blocks(qb, sb) if b_blocks else dequantize_tiles(qb, sb)
    return _chunked_matmul(a, b)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK: Tensor, w_NK: Tensor) -> Tensor:
        ctx.save_for_backward(x_MK, w_NK)
        return fp8_gemm(x_MK, w_NK, b_blocks=True)  # fprop

    @staticmethod
    def backward(ctx, dy_MN: Tensor):
        x_MK, w_NK = ctx.saved_tensors
        dx = fp8_gemm(dy_MN, w_NK.t(), b_blocks=True) if ctx.needs_input_grad[0] else None  # dgrad
        dw = fp8_gemm(dy_MN.t(), x_MK.t(), b_blocks=False) if ctx.needs_input_grad[1] else None  # wgrad
        return (None if dx is None else dx.to(x_MK.dtype)), (None if dw is None else dw.to(w_NK.dtype))


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear with the three GEMMs in blockwise FP8. Output in the autocast dtype when autocast is on (the paper's
    BF16 outputs), else in x's dtype."""
    y = _FP8Linear.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        y = y + bias.float()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return y.to(dtype)


class FP8Linear(nn.Linear):
    """nn.Linear whose GEMMs run in blockwise FP8 (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, blocks: bool) -> Tensor:
        return fake_quantize(x, blocks).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _grouped_ffn(x_AD: Tensor, offsets_E: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    from .model import grouped_mm

    q = _StraightThrough.apply
    # Each expert's weight [2F, D] / [D, F] in 128x128 blocks (blocks never straddle experts); inputs per 1x128 tile.
    gate_AF, up_AF = grouped_mm(q(x_AD, False), q(w_gate_up, True).transpose(1, 2), offsets_E).chunk(2, dim=-1)
    return grouped_mm(q(F.silu(gate_AF) * up_AF, False), q(w_down, True).transpose(1, 2), offsets_E)


def _experts_class():
    from .model import Experts

    class FP8Experts(Experts):
        """Routed experts whose grouped GEMMs see e4m3-rounded operands (forward); see the module docstring."""

        def ffn(self, x_AD: Tensor, offsets_E: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
            return _grouped_ffn(x_AD, offsets_E, w_gate_up, w_down)

        def forward(self, x_AD: Tensor, offsets_E: Tensor) -> Tensor:
            return _grouped_ffn(x_AD, offsets_E, self.gate_up_proj, self.down_proj)

    return FP8Experts


FP8_LINEARS = {"MLA": ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
               "MLP": ("gate_proj", "up_proj", "down_proj")}


def swap_to_fp8(model: nn.Module) -> int:
    """Switches the linears the paper quantises to FP8Linear and the routed experts to FP8 experts, in place.
    Returns how many modules were switched."""
    from .model import MLA, MLP, Experts

    fp8_experts = _experts_class()
    n = 0
    for module in model.modules():
        names = FP8_LINEARS["MLA"] if isinstance(module, MLA) else FP8_LINEARS["MLP"] if isinstance(module, MLP) \
            else ()
        for name in names:
            lin = getattr(module, name, None)
            if type(lin) is nn.Linear:
                lin.__class__ = FP8Linear
                n += 1
        if type(module) is Experts:
            module.__class__ = fp8_experts
            n += 1
    return n
