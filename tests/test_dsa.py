"""DeepSeek Sparse Attention: the indexer against eq. 1 and transformers' deepseek_v32, top-k equal to dense MLA when
k covers the context (expanded and absorbed), the sparse absorbed path against the masked expanded one, logits
parity with DeepseekV32ForCausalLM in both directions, and the two training stages' gradients."""

import logging

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek import dsa
from nanoseek.config import ConfigError
from nanoseek.model import LatentCache

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

YARN = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}, "max_position_embeddings": 64}


def dsa_config(topk=4, **kw) -> ModelConfig:
    # 8 indexer heads: a key scoring exactly 0 for every head (a tie) then has odds 2^-8.
    kw = {"index_n_heads": 8, "index_head_dim": 16, **kw}
    return ModelConfig.from_name("tiny", vocab_size=256, index_topk=topk, **kw)


def dense_twin(model: Transformer) -> Transformer:
    """The same weights without the indexer (index_topk None)."""
    twin = Transformer(model.config.replace(index_topk=None)).eval()
    twin.load_state_dict({k: v for k, v in model.state_dict().items() if ".indexer." not in k})
    return twin


def decode_all(model: Transformer, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: expanded prefill of the first tokens, then one token at a time (absorbed)."""
    B, T = ids.shape
    cache = LatentCache.allocate(model.config, B, T)
    outs = [model(ids[:, :prefill], positions=torch.arange(prefill).expand(B, prefill), cache=cache, prefill=True)]
    for t in range(prefill, T):
        outs.append(model(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache))
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------------------------ the indexer
def test_index_scores_follow_eq1_by_hand():
    torch.manual_seed(0)
    q, w, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4), torch.randn(2, 5, 8)
    want = torch.zeros(2, 3, 5)
    for b in range(2):
        for t in range(3):
            for s in range(5):
                want[b, t, s] = sum(w[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(4))
    assert torch.allclose(dsa.index_scores(q, w, k), want, atol=1e-5)
    # Blocked over queries (what long prefills do) gives the same scores.
    assert torch.allclose(dsa.index_scores(q, w, k, max_elems=1), want, atol=1e-5)


def test_topk_keeps_visible_best_and_flags_padding():
    scores = torch.tensor([[[5.0, 9.0, 1.0, 7.0], [3.0, 2.0, 8.0, 0.0]]])
    visible = torch.tensor([[[True, False, False, False], [True, True, True, False]]])
    idx, valid = dsa.select_topk(scores, visible, 2)
    assert set(idx[0, 1].tolist()) == {0, 2} and valid[0, 1].all()
    assert valid[0, 0].sum() == 1 and idx[0, 0][valid[0, 0]].tolist() == [0]  # 9 and 7 are in the future
    keep = dsa.topk_mask(scores, visible, 2)
    assert keep.tolist() == [[[True, False, False, False], [True, False, True, False]]]


def test_indexer_kl_hand_example():
    scores = torch.tensor([[[1.0, 2.0, 0.5]]])
    p = torch.tensor([[[0.25, 0.75, 0.0]]])
    keep = torch.tensor([[[True, True, False]]])
    q = torch.tensor([1.0, 2.0]).softmax(-1)
    want = (p[0, 0, :2] * (p[0, 0, :2].log() - q.log())).sum()
    assert torch.allclose(dsa.indexer_kl(scores, p, keep), want)


def test_indexer_matches_transformers_reference():
    """Our indexer's top-k sets equal DeepseekV32Indexer's on the same weights (half-split RoPE, LayerNorm key,
    weights scaled by J^-0.5 and I^-0.5), with YaRN cos/sin."""
    from transformers.models.deepseek_v32 import modeling_deepseek_v32 as ref

    torch.manual_seed(0)
    config = dsa_config(topk=5, **YARN)
    ours = Transformer(config).eval()
    hf_config = transformers.DeepseekV32Config(**{k: v for k, v in config.to_hf_dict().items()
                                                  if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = ref.DeepseekV32Indexer(hf_config, 0).eval()
    ix = ours.layers[0].self_attn.indexer
    theirs.load_state_dict(ix.state_dict())
    with torch.no_grad():
        theirs.k_norm.bias.normal_()
        ix.k_norm.bias.copy_(theirs.k_norm.bias)
    B, T = 2, 24
    x = torch.randn(B, T, config.hidden_size)
    q_in = torch.randn(B, T, config.q_lora_rank)
    pos = torch.arange(T).expand(B, T)
    rotary = ref.DeepseekV32RotaryEmbedding(hf_config)
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    with torch.no_grad():
        want = theirs(x, q_in, rotary(x, pos), causal, pos)
        cos, sin = ours.rope(pos)
        q, w = ix.queries(q_in, x, cos, sin)
        scores = dsa.index_scores(q, w, ix.keys(x, cos, sin))
        idx, valid = dsa.select_topk(scores, causal, config.index_topk)
    for b in range(B):
        for t in range(T):
            # Rows with fewer than k visible keys fill up with arbitrary future ones in both; compare the visible.
            got = set(idx[b, t][valid[b, t]].tolist())
            ref_set = {s for s in want[b, t].tolist() if s <= t}
            assert got == ref_set, (b, t, got, ref_set)


# ------------------------------------------------------------------------------------------------ sparse == dense
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, YARN])
def test_topk_covering_context_equals_dense(overrides):
    torch.manual_seed(0)
    T = 20
    model = Transformer(dsa_config(topk=T, **overrides)).eval()
    dense = dense_twin(model)
    ids = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        want = dense(ids)
        assert torch.equal(model(ids), want)  # expanded: the top-k mask is the causal mask, bit for bit
        got = decode_all(model, ids, prefill=5)  # absorbed over gathered latents (a different sum order)
        assert (got - want).abs().max().item() < 1e-5
        small = Transformer(model.config.replace(index_topk=4)).eval()
        small.load_state_dict(model.state_dict())
        assert (small(ids) - want).abs().max().item() > 1e-3  # a feature test: k < T does change the output


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}])
def test_sparse_absorbed_decode_matches_masked_expanded(overrides):
    torch.manual_seed(1)
    model = Transformer(dsa_config(topk=4, **overrides)).eval()
    ids = torch.randint(0, 256, (3, 18))
    with torch.no_grad():
        full = model(ids)  # expanded, masked to each query's top-4
        got = decode_all(model, ids, prefill=6)  # indexer key cache + 4 gathered latents per query
    assert (got - full).abs().max().item() < 1e-5


def test_cache_carries_indexer_keys():
    config = dsa_config()
    cache = LatentCache.allocate(config, 1, 4, dtype=torch.bfloat16)
    assert cache.idx.shape == (config.num_hidden_layers + 1, 1, 4, 16)
    assert cache.bytes_per_token() == (32 + 8 + 16) * 2
    model = Transformer(config).eval()
    bare = LatentCache(cache.kv, cache.pe)  # a cache without the indexer keys
    with pytest.raises(ValueError, match="indexer key cache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=bare, prefill=True)


def test_indexer_config_rules():
    with pytest.raises(ConfigError, match="index_head_dim"):
        dsa_config(index_head_dim=4)  # smaller than the rotary part (8)
    assert dsa_config().to_hf_dict()["model_type"] == "deepseek_v32"


# ------------------------------------------------------------------------------------------------ HF parity
@pytest.mark.parametrize("topk, overrides", [(4, {}), (64, {}), (3, YARN)])
def test_nanoseek_saves_deepseek_v32_loads_same_logits(topk, overrides, tmp_path):
    torch.manual_seed(0)
    ours = Transformer(dsa_config(topk=topk, **overrides)).eval()
    ours.save_pretrained(tmp_path)
    theirs, info = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        diff = (ours(ids) - theirs.eval()(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_deepseek_v32_saves_nanoseek_loads_same_logits(tmp_path):
    torch.manual_seed(1)
    config = dsa_config(topk=4)
    hf_config = transformers.DeepseekV32Config(**{k: v for k, v in config.to_hf_dict().items()
                                                  if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = transformers.DeepseekV32ForCausalLM(hf_config).eval()
    with torch.no_grad():  # HF inits LayerNorm bias to 0 and the routing bias to 0: make both matter
        for name, t in theirs.named_parameters():
            if name.endswith("k_norm.bias"):
                t.normal_()
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    theirs.save_pretrained(tmp_path)
    keys = set(__import__("nanoseek.hf", fromlist=["read_safetensors"]).read_safetensors(tmp_path))
    for name in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
        assert f"model.layers.1.self_attn.indexer.{name}" in keys  # the V3.2 checkpoint's names
    ours = Transformer.from_pretrained(tmp_path).eval()
    assert ours.config.index_topk == 4
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------------ training
def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_warmup_trains_only_the_indexer_towards_the_main_attention():
    torch.manual_seed(0)
    model = Transformer(dsa_config(topk=4)).train()
    dsa.set_mode(model, "warmup")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, 256, (2, 32))
    kls = []
    for _ in range(12):
        opt.zero_grad()
        model(ids, targets=ids, mtp_weight=0.0).backward()
        kls.append(float(model.loss_parts["indexer"]))
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert kls[-1] < 0.8 * kls[0], kls
    with torch.no_grad():  # warm-up mode: attention stays dense
        model.eval()
        assert torch.equal(model(ids), dense_twin(model)(ids))


def test_sparse_training_separates_the_two_losses():
    torch.manual_seed(0)
    model = Transformer(dsa_config(topk=4)).train()
    dsa.set_mode(model, "sparse")
    ids = torch.randint(0, 256, (2, 16))
    model(ids, targets=ids)
    lm, kl = model.loss_parts["lm"], model.loss_parts["indexer"]
    assert kl > 0
    # The LM loss alone reaches no indexer weight; the KL alone reaches nothing but indexer weights.
    model.zero_grad()
    model.cross_entropy(model.norm(model(ids, return_hidden=True)[1]), ids).backward()
    dsa.take_indexer_loss(model)
    g = _grads(model)
    assert g and not any(".indexer." in n for n in g)
    model.zero_grad()
    model(ids)
    dsa.take_indexer_loss(model).backward()
    g = _grads(model)
    assert g and all(".indexer." in n for n in g)
    assert torch.isfinite(lm)


def test_set_mode_needs_an_indexer():
    with pytest.raises(ValueError, match="no indexer"):
        dsa.set_mode(Transformer(ModelConfig.from_name("tiny", vocab_size=64)), "warmup")
