"""The CPU kernels (nanoseek.kernels) against the PyTorch paths they replace: the fused decode attention alone on
odd shapes, then inside the model's absorbed decode and the compiled engine; the few-row GEMM against a matrix
product, and inside a compiled graph through its inductor pass."""

import pytest
import torch

from nanoseek import ModelConfig, Transformer, kernels
from nanoseek.model import LatentCache


@pytest.fixture(scope="module", autouse=True)
def built():
    # First build on a machine compiles C++ (~30 s), later runs load the cached library.
    assert kernels.load(), "the CPU kernels must build wherever inductor's C++ compiler works"


def reference(q_lat, q_pe, kv, pe, limit, scale):
    """The PyTorch path of MLA._attend_absorbed: scores, visibility mask, fp32 softmax, weighted latents. limit
    [B, T]: the last visible slot of each query position, shared by its M / T heads."""
    scores = (q_lat @ kv.transpose(1, 2) + q_pe @ pe.transpose(1, 2)) * scale
    per_query = limit.repeat_interleave(q_lat.shape[1] // limit.shape[1], dim=1)
    visible = torch.arange(kv.shape[1]) <= per_query[:, :, None]
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ kv


@pytest.mark.parametrize("B,T,M,C,R,S", [(1, 1, 8, 64, 16, 2048), (3, 2, 6, 12, 4, 45), (2, 19, 19, 40, 8, 300),
                                         (1, 1, 1, 8, 2, 1), (2, 3, 24, 16, 4, 70)])
def test_kernel_equals_the_pytorch_path(B, T, M, C, R, S):
    # Query counts that are not a multiple of the 8 lanes, lane groups spanning two query positions, latent widths
    # not a multiple of 8, spans that are not a multiple of the 32-slot block, cache views with a row stride (a
    # slice of a longer cache), per-position limits (speculation's T > 1, rows of other lengths), some past the
    # span, and a limit tensor with strides (a column of a wider one).
    g = torch.Generator().manual_seed(B * 1000 + S)
    kv = torch.randn(B, S + 5, C, generator=g)[:, :S]
    pe = torch.randn(B, S + 3, R, generator=g)[:, :S]
    q_lat, q_pe = torch.randn(B, M, C, generator=g) * 2, torch.randn(B, M, R, generator=g) * 2
    limit = torch.randint(0, S + 2, (B, T, 2), generator=g)[:, :, 0]
    limit[0, 0] = S - 1
    got = kernels.latent_decode_attention(q_lat, q_pe, kv, pe, limit, 0.3)
    torch.testing.assert_close(got, reference(q_lat, q_pe, kv, pe, limit, 0.3), rtol=1e-5, atol=1e-5)


def test_kernel_on_scores_far_apart_and_an_empty_row():
    # Large score gaps exercise the online softmax's rescaling (a later block's max far above an earlier one's);
    # a query that sees no slot gets NaN, as the softmax over all -inf does.
    g = torch.Generator().manual_seed(3)
    kv = torch.randn(1, 200, 16, generator=g)
    kv[0, 150] *= 40
    pe = torch.randn(1, 200, 4, generator=g)
    q_lat, q_pe = torch.randn(1, 3, 16, generator=g) * 5, torch.randn(1, 3, 4, generator=g)  # 3 positions
    limit = torch.tensor([[199, 100, -1]])
    got = kernels.latent_decode_attention(q_lat, q_pe, kv, pe, limit, 1.0)
    want = reference(q_lat, q_pe, kv, pe, limit, 1.0)
    torch.testing.assert_close(got[:, :2], want[:, :2], rtol=1e-5, atol=1e-5)
    assert got[0, 2].isnan().all() and want[0, 2].isnan().all()


def test_kernel_rejects_what_it_does_not_cover():
    q, kv = torch.randn(1, 8, 16), torch.randn(1, 10, 16)
    qp, pe, lim = torch.randn(1, 8, 4), torch.randn(1, 10, 4), torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="float32 CPU tensors only"):
        kernels.latent_decode_attention(q.bfloat16(), qp, kv, pe, lim, 1.0)
    with pytest.raises(RuntimeError, match="inconsistent shapes"):
        kernels.latent_decode_attention(q, qp, kv[:, :, :8], pe, lim, 1.0)
    with pytest.raises(RuntimeError, match="last dimension must be contiguous"):
        kernels.latent_decode_attention(q, qp, torch.randn(1, 16, 10).transpose(1, 2), pe, lim, 1.0)


def test_model_decode_through_the_kernel_equals_the_pytorch_path(monkeypatch):
    # A batch of 3 rows at different positions, two query positions per row (as speculative verification has):
    # logits with cache.fused equal those without, and the kernel did run, once per layer.
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=128, max_position_embeddings=64)
    model = Transformer(config).eval()
    calls = []
    real = kernels.latent_decode_attention
    monkeypatch.setattr(kernels, "latent_decode_attention", lambda *a: calls.append(1) or real(*a))
    prompts = torch.randint(0, 128, (3, 20))
    lengths = [20, 13, 7]
    logits = {}
    for fused in (False, True):
        cache = LatentCache.allocate(config, 3, 32)
        with torch.no_grad():
            for b, n in enumerate(lengths):  # prefill each row on its own
                model(prompts[b:b + 1, :n], positions=torch.arange(n)[None], cache=cache,
                      rows=torch.tensor([b]), prefill=True)
            cache.fused = fused
            pos = torch.tensor(lengths)[:, None] + torch.arange(2)
            logits[fused] = model(torch.randint(0, 128, (3, 2), generator=torch.Generator().manual_seed(1)),
                                  positions=pos, cache=cache)
    assert len(calls) == config.num_hidden_layers
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ few-row GEMM
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 16, 17])
@pytest.mark.parametrize("K,N", [(256, 96), (37, 5), (100, 1)])
def test_few_rows_mm_equals_a_matrix_product(M, K, N):
    # Row counts through every chunk size (4 rows a pass, a remainder of 1-3) and past the 16-row limit (at::mm);
    # widths that are not a multiple of the vector width; input rows with a stride (a slice of a wider batch) and
    # a weight that is itself a slice of a wider one (row stride > K).
    g = torch.Generator().manual_seed(M * 100 + K)
    x = torch.randn(M, K + 7, generator=g)[:, :K]
    w = torch.randn(N, K + 3, generator=g)[:, :K]
    torch.testing.assert_close(torch.ops.nanoseek.few_rows_mm(x, w.t()), x @ w.t(), rtol=1e-5, atol=1e-5)


def test_few_rows_mm_hands_other_layouts_to_a_library_product():
    x = torch.randn(3, 20)
    w_KN = torch.randn(20, 9)  # contiguous [K, N]: not the transposed weight the loop reads
    torch.testing.assert_close(torch.ops.nanoseek.few_rows_mm(x, w_KN), x @ w_KN)
    torch.testing.assert_close(torch.ops.nanoseek.few_rows_mm(x.double(), w_KN.double()), x.double() @ w_KN.double())
    with pytest.raises(RuntimeError, match="expected x"):
        torch.ops.nanoseek.few_rows_mm(x, torch.randn(21, 9))


def test_few_rows_pass_puts_the_kernel_into_compiled_products():
    # Under decode_compile_options(few_rows=True) a 2-row product runs nanoseek::few_rows_mm inside the compiled
    # graph, with the same values; without the option it does not.
    from torch.profiler import profile

    from nanoseek.engine import decode_compile_options

    w, x = torch.randn(300, 64), torch.randn(2, 64)
    for few_rows in (True, False):
        torch._dynamo.reset()
        fn = torch.compile(lambda a, b: torch.relu(a @ b.t()), dynamic=False,
                           options=decode_compile_options(300, few_rows=few_rows))
        with torch._inductor.config.patch(fx_graph_cache=False):
            fn(x, w)
            with profile() as prof:
                got = fn(x, w)
        torch.testing.assert_close(got, torch.relu(x @ w.t()), rtol=1e-5, atol=1e-5)
        ran = any(e.key == "nanoseek::few_rows_mm" for e in prof.key_averages())
        assert ran == few_rows
    torch._dynamo.reset()
