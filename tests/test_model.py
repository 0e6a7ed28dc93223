"""Model core: config rules, presets' sizes, MLA's two paths, MoE routing and balancing, MTP, HF-format errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import ModelConfig, Transformer
from nanoseek.config import ConfigError
from nanoseek.hf import CheckpointFormatError, read_safetensors
from nanoseek.model import (SEGMENT_PAD, Experts, Gate, LatentCache, MoE, causal_attention_blocked, pad_segments,
                            update_expert_bias)


def tiny(**kw) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=128, **kw)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, words", [
    ({"n_routed_experts": 10, "n_group": 4}, ["n_routed_experts (10)", "n_group (4)"]),
    ({"topk_group": 3}, ["topk_group (3)", "n_group=2"]),
    ({"num_experts_per_tok": 5}, ["num_experts_per_tok (5)", "hold only 4"]),
    ({"qk_rope_head_dim": 7}, ["qk_rope_head_dim must be even"]),
    ({"first_k_dense_replace": 9}, ["first_k_dense_replace"]),
    ({"scoring_func": "relu"}, ["scoring_func"]),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, ["rope_scaling type must be 'yarn'"]),
    ({"hidden_size": 0}, ["hidden_size must be a positive integer"]),
])
def test_config_errors_name_field_and_rule(overrides, words):
    with pytest.raises(ConfigError) as e:
        tiny(**overrides)
    for w in words:
        assert w in str(e.value)


def test_config_reads_both_rope_spellings():
    released = {"model_type": "deepseek_v3", "rope_theta": 10000, "num_nextn_predict_layers": 1,
                "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    hf5 = {"model_type": "deepseek_v3", "num_nextn_predict_layers": 1,
           "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, "factor": 40,
                               "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                               "mscale": 1.0, "mscale_all_dim": 1.0}}
    a, b = ModelConfig.from_hf_dict(released), ModelConfig.from_hf_dict(hf5)
    assert a == b and a.yarn["factor"] == 40
    assert abs(a.softmax_scale / a.qk_head_dim ** -0.5 - 1.874) < 1e-3  # m^2 for V3 (REFERENCE.md)
    assert ModelConfig.from_hf_dict(a.to_hf_dict()) == a


def test_v3_671b_counts_on_meta_device():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("v3-671b"))
    counts = model.param_counts()
    assert 670e9 < counts["total"] < 672e9  # 671B main model (the MTP module is counted apart)
    assert 36.5e9 < counts["active"] < 38e9  # ~37B activated per token
    assert 11e9 < counts["mtp_total"] < 12.5e9


def test_flops_per_token_hand_count():
    config = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
                         num_hidden_layers=2, num_attention_heads=2, n_shared_experts=1, n_routed_experts=4,
                         num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=4,
                         qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, first_k_dense_replace=1,
                         num_nextn_predict_layers=0)
    model = Transformer(config)
    D, H, K, O, C, R = 8, 2, 4, 2, 4, 2
    attn_w = D * H * K + D * (C + R) + C * H * (2 + O) + H * O * D  # q, kv_a, kv_b, o
    dense = 3 * D * 16
    moe = D * 4 + 3 * D * 4 + 2 * 3 * D * 4  # gate, shared expert, 2 of 4 routed experts
    matmul = 2 * attn_w + dense + moe + D * 100  # + lm_head
    T = 10
    attn = 2 * H * (K + O) * T * 2
    assert model.flops_per_token(T, training=False) == 2 * matmul + attn
    assert model.flops_per_token(T) == 3 * (2 * matmul + attn)


# ------------------------------------------------------------------------------------------------ MLA
@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None}, {
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                     "mscale_all_dim": 1.0}}])
def test_absorbed_decode_matches_expanded(overrides):
    torch.manual_seed(0)
    model = Transformer(tiny(**overrides)).eval()
    B, P, steps = 3, 7, 6
    ids = torch.randint(0, 128, (B, P + steps))
    with torch.no_grad():
        full = model(ids)  # expanded MLA over the whole sequence
        cache = LatentCache.allocate(model.config, B, P + steps)
        pos = torch.arange(P).expand(B, P)
        prefill = model(ids[:, :P], positions=pos, cache=cache, prefill=True)
        outs = [prefill]
        for t in range(P, P + steps):  # token by token on the latent cache (absorbed MLA)
            outs.append(model(ids[:, t:t + 1], positions=torch.full((B, 1), t), cache=cache))
    got = torch.cat(outs, dim=1)
    assert (got - full).abs().max().item() < 1e-5


def test_absorbed_chunk_and_ragged_positions():
    # Rows at different lengths (continuous batching): each query sees only its own row's past.
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    a, b = torch.randint(0, 128, (1, 9)), torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        ref_a, ref_b = model(a)[:, -1], model(b)[:, -1]
        cache = LatentCache.allocate(model.config, 2, 16)
        model(a[:, :8], positions=torch.arange(8)[None], cache=cache, rows=torch.tensor([0]), prefill=True)
        model(b[:, :3], positions=torch.arange(3)[None], cache=cache, rows=torch.tensor([1]), prefill=True)
        # Row 1 then takes two tokens in one absorbed call (as speculative verification does).
        out1 = model(b[:, 3:5], positions=torch.tensor([[3, 4]]), cache=cache, rows=torch.tensor([1]))
        out0 = model(a[:, 8:9], positions=torch.tensor([[8]]), cache=cache, rows=torch.tensor([0]))
    assert (out0[:, -1] - ref_a).abs().max() < 1e-5
    assert (out1[:, -1] - ref_b).abs().max() < 1e-5


def test_latent_cache_size():
    config = ModelConfig.from_name("v3-671b")
    assert config.latent_cache_dim == 576 and config.kv_cache_dim == 40960
    cache = LatentCache.allocate(tiny(), 1, 4, dtype=torch.bfloat16)
    assert cache.bytes_per_token() == (32 + 8) * 2


# ------------------------------------------------------------------------------------------------ gate / MoE
def test_v3_gate_hand_example():
    config = tiny(n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    gate = Gate(config)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([0.0, 1.0, 2.0, -1.0])
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.9]))
    x = torch.zeros(1, config.hidden_size)
    x[0, 0] = 1.0
    w, idx, scores = gate(x)
    s = torch.sigmoid(torch.tensor([0.0, 1.0, 2.0, -1.0]))
    # Groups {0,1} and {2,3}; biased top-2 sums: s0+s1 = 1.23, s2+s3+0.9 = 2.05 -> group 1 wins.
    # Inside it both experts are taken (k = 2), though expert 3 only got there through its bias.
    assert sorted(idx[0].tolist()) == [2, 3]
    expected = torch.stack([s[2], s[3]]) / (s[2] + s[3]) * 2.0  # unbiased scores, normalised, scaled
    got = w[0][idx[0].argsort()]
    assert torch.allclose(got, expected, atol=1e-6)


def test_bias_steers_selection_only():
    config = tiny(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1)
    gate = Gate(config)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(64, config.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([10.0, 0, 0, 0]))
    w, idx, scores = gate(x)
    assert (idx == 0).all()  # the bias decides the choice...
    assert torch.allclose(w[:, 0], torch.ones(64))  # ...normalised unbiased weight of a single expert is 1


def test_bias_update_hand_example():
    model = Transformer(tiny())
    moe = model.moe_layers()[0]
    moe.expert_load.copy_(torch.tensor([10.0, 0, 2, 4, 4, 4, 4, 4]))  # mean 4
    loads = update_expert_bias(model, gamma=1e-3)
    assert loads[0].tolist() == [10.0, 0, 2, 4, 4, 4, 4, 4]
    assert torch.equal(moe.gate.e_score_correction_bias, torch.tensor([-1e-3, 1e-3, 1e-3, 0, 0, 0, 0, 0]))
    assert moe.expert_load.sum() == 0  # counters reset for the next step


def test_loads_accumulate_over_micro_batches():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, 128, (2, 8))
    model(x)
    model(x)
    loads = model.expert_loads()
    assert loads.shape == (2, 8)  # the main stack's MoE layer, then the MTP block's
    assert loads[0].sum().item() == 2 * 2 * 8 * model.config.num_experts_per_tok
    assert loads[1].sum().item() == 0  # MTP runs only with targets


def test_sequence_balance_loss_hand_example():
    config = tiny(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1, aux_loss_alpha=0.5)
    moe = MoE(config)
    scores = torch.tensor([[[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.4, 0.4]]])  # B=1, T=2 (already sum to 1)
    idx = torch.tensor([[[0], [2]]])
    # f = E/(kT) * counts = 4/2 * [1,0,1,0] = [2,0,2,0]; P = mean_t = [0.35, 0.15, 0.25, 0.25]
    # loss = alpha * (2*0.35 + 2*0.25) = 0.5 * 1.2
    assert abs(moe.sequence_balance_loss(scores, idx).item() - 0.6) < 1e-6


def test_moe_matches_per_expert_loop():
    torch.manual_seed(0)
    config = tiny()
    moe = Transformer(config).layers[1].mlp
    x = torch.randn(2, 5, config.hidden_size)
    out = moe(x)
    w, idx, _ = moe.gate(x.view(-1, config.hidden_size))
    ref = moe.shared_experts(x).view(-1, config.hidden_size).clone()
    F_ = config.moe_intermediate_size
    for t in range(10):
        for j in range(config.num_experts_per_tok):
            e = idx[t, j]
            gu = moe.experts.gate_up_proj[e] @ x.view(-1, config.hidden_size)[t]
            h = torch.nn.functional.silu(gu[:F_]) * gu[F_:]
            ref[t] += w[t, j] * (moe.experts.down_proj[e] @ h)
    assert torch.allclose(out.view(-1, config.hidden_size), ref, atol=1e-5)


def test_pad_segments_hand_example():
    # experts' segments [0,3) [3,3) [3,40) [40,41) padded to multiples of 32: [0,32) [32,32) [32,96) [96,128)
    dest, ends = pad_segments(torch.tensor([3, 3, 40, 41], dtype=torch.int32), 41, 32)
    assert ends.tolist() == [32, 32, 96, 128] and ends.dtype == torch.int32
    assert dest.tolist() == [0, 1, 2] + list(range(32, 69)) + [96]


def test_bf16_experts_pad_segments_and_match_unpadded(monkeypatch):
    torch.manual_seed(0)
    config = tiny(hidden_size=64, moe_intermediate_size=32)
    experts = Experts(config)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1), torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts = experts.bfloat16()
    A, E = 300, config.n_routed_experts
    offsets = torch.bincount(torch.randint(0, E, (A,)), minlength=E).cumsum(0).to(torch.int32)
    x = torch.randn(A, 64, dtype=torch.bfloat16, requires_grad=True)
    seen = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: seen.append(offs.clone()) or real(a, b, offs=offs))
    out = experts(x, offsets)
    assert seen and all((o.diff(prepend=o.new_zeros(1)) % SEGMENT_PAD == 0).all() for o in seen)
    ref = experts._ffn(x, offsets)
    assert torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
    out.float().square().sum().backward()
    g, experts.gate_up_proj.grad = experts.gate_up_proj.grad, None
    ref.float().square().sum().backward()
    assert torch.allclose(g.float(), experts.gate_up_proj.grad.float(), atol=1e-1, rtol=2e-2)


@pytest.mark.parametrize("T, blocks", [(1, 2), (7, 2), (64, 2), (65, 4)])
def test_causal_attention_blocked_matches_sdpa(T, blocks):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, T, 12), torch.randn(2, 3, T, 12), torch.randn(2, 3, T, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert torch.allclose(causal_attention_blocked(q, k, v, 0.3, blocks), ref, atol=1e-5)


def test_compiled_training_loss_uses_blocked_attention_and_matches_eager(monkeypatch):
    import nanoseek.model as model_mod

    torch.manual_seed(0)
    model = Transformer(tiny()).train()
    ids = torch.randint(0, 128, (2, 24))
    traced = []
    real = model_mod.causal_attention_blocked
    monkeypatch.setattr(model_mod, "causal_attention_blocked", lambda *a, **kw: traced.append(1) or real(*a, **kw))
    eager = model(ids, targets=ids)
    assert not traced  # eager keeps SDPA
    torch._dynamo.reset()
    # aot_eager: Dynamo and AOTAutograd trace the model as inductor would get it, without the C++ build (seconds)
    compiled = torch.compile(model, backend="aot_eager")(ids, targets=ids)
    assert traced  # the compiled CPU graph takes the blocked path
    assert abs(compiled.item() - eager.item()) < 1e-5

def test_cpu_prefill_runs_flash_sdpa_with_v_padded_to_the_key_width():
    # v_head_dim (16) < qk_head_dim (24): without padding v, CPU SDPA takes its math path over the full T x T
    # scores (prefill at 2,048 tokens 2.3 -> 0.9 s, dev/LOG.md). Same logits as with grad on (unpadded path).
    from torch.profiler import profile

    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad(), profile() as prof:
        padded = model(ids)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    torch.testing.assert_close(padded, model(ids).detach(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ training
def test_every_parameter_gets_gradient_and_bias_none():
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, 128, (2, 16))
    model(x, targets=torch.roll(x, -1, 1)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient for {missing}"
    for m in model.moe_layers():
        assert not m.gate.e_score_correction_bias.requires_grad and m.gate.e_score_correction_bias.grad is None
    assert set(model.loss_parts) == {"lm", "mtp", "balance"}


def test_mtp_learns_repetitive_sequence():
    torch.manual_seed(0)
    model = Transformer(tiny())
    pattern = torch.tensor([5, 17, 42, 99, 3, 64, 7, 88])
    x = pattern.repeat(4)[None].repeat(4, 1)
    inputs, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(inputs, targets=targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or dict(model.loss_parts)
    assert model.loss_parts["mtp"] < 0.2 * first["mtp"]
    assert model.loss_parts["lm"] < 0.2 * first["lm"]


def test_mtp_uses_the_token_two_ahead():
    # MTP depth 1 at position i must predict targets[i+1]: with the main loss off, it alone learns a sequence
    # whose next-next token is determined by the current one.
    torch.manual_seed(0)
    model = Transformer(tiny())
    x = torch.randint(0, 128, (8, 12))
    loss = model(x[:, :-1], targets=x[:, 1:])
    assert model.loss_parts["mtp"].shape == ()
    logits, h = model(x[:, :-1], return_hidden=True)
    mtp_logits, _ = model.mtp_forward(1, h[:, :-1], x[:, 1:-1], torch.arange(10).expand(8, 10))
    ce = torch.nn.functional.cross_entropy(mtp_logits.flatten(0, 1), x[:, 2:].flatten())
    assert torch.allclose(ce, model.loss_parts["mtp"], atol=1e-5)
    assert loss.requires_grad


# ------------------------------------------------------------------------------------------------ HF files
def test_mtp_keys_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny())
    model.save_pretrained(tmp_path)
    keys = set(read_safetensors(tmp_path))
    L = model.config.num_hidden_layers
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "shared_head.head.weight",
              "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.experts.3.down_proj.weight",
              "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{k}" in keys
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    loaded = Transformer.from_pretrained(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_sharded_save_loads(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    from nanoseek.hf import save_hf
    save_hf(tmp_path, model.config, model.state_dict(), max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = torch.randint(0, 128, (1, 8))
    assert torch.equal(Transformer.from_pretrained(tmp_path).eval()(ids), model(ids))


def _resave(path, fn):
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_missing_unexpected_misshaped_are_named(tmp_path):
    Transformer(tiny()).save_pretrained(tmp_path)
    _resave(tmp_path, lambda t: t.pop("model.layers.0.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"missing tensors: model\.layers\.0\.self_attn\.o_proj\.weight"):
        Transformer.from_pretrained(tmp_path)

    Transformer(tiny()).save_pretrained(tmp_path)
    _resave(tmp_path, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointFormatError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        Transformer.from_pretrained(tmp_path)

    Transformer(tiny()).save_pretrained(tmp_path)
    _resave(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointFormatError, match=r"model\.norm\.weight has shape \(65,\), config.json implies \(64,\)"):
        Transformer.from_pretrained(tmp_path)

    Transformer(tiny()).save_pretrained(tmp_path)
    _resave(tmp_path, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointFormatError, match=r"experts\.5\.up_proj"):
        Transformer.from_pretrained(tmp_path)


def test_bad_config_json_is_clear(tmp_path):
    Transformer(tiny()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Transformer.from_pretrained(tmp_path)
    d = tiny().to_hf_dict()
    d["n_group"] = 3
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="n_group"):
        Transformer.from_pretrained(tmp_path)


def test_fp8_checkpoint_dequantised(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    model.save_pretrained(tmp_path)
    name = "model.layers.0.self_attn.kv_b_proj.weight"

    def quantise(t):
        w = t[name]
        scale = w.abs().amax().clamp(min=1e-12) / 448.0  # one 128x128 block covers this small matrix
        t[name] = (w / scale).to(torch.float8_e4m3fn)
        t[name.replace("weight", "weight_scale_inv")] = scale.reshape(1, 1).float()
    _resave(tmp_path, quantise)
    loaded = Transformer.from_pretrained(tmp_path)
    w0 = model.layers[0].self_attn.kv_b_proj.weight
    w1 = loaded.layers[0].self_attn.kv_b_proj.weight.float()
    scale = w0.abs().max() / 448
    # e4m3 keeps 3 mantissa bits (relative error <= 2^-4), then bf16 rounding; subnormals below the scale.
    assert ((w0 - w1).abs() <= w0.abs() * 0.07 + scale).all()
    assert (w0 - w1).abs().max() > 0  # it really went through FP8
