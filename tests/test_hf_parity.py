"""Logits parity with transformers on random weights, through the files, in both directions."""

import logging

import pytest
import torch

from nanoseek import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

TOL = 1e-4

# Each variant exercises one branch of the architecture against the reference.
VARIANTS = {
    "tiny": {},
    "no_q_lora": {"q_lora_rank": None},
    "one_group": {"n_group": 1, "topk_group": 1},
    "yarn": {"rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.8},
             "max_position_embeddings": 512},
    "all_moe": {"first_k_dense_replace": 0},
    "tied": {"tie_word_embeddings": True},
    "v2_softmax_greedy": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                          "n_group": 1, "topk_group": 1, "q_lora_rank": None, "routed_scaling_factor": 1.5,
                          "num_nextn_predict_layers": 0},
    "v2_group_limited": {"scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
                         "n_group": 4, "topk_group": 2, "num_nextn_predict_layers": 0},
}


def hf_class(config: ModelConfig):
    return transformers.DeepseekV3ForCausalLM if config.scoring_func == "sigmoid" else transformers.DeepseekV2ForCausalLM


def make_config(variant: str) -> ModelConfig:
    return ModelConfig.from_name("tiny", vocab_size=256, **VARIANTS[variant])


def randomize_bias(model: Transformer, seed: int = 0):
    # A non-zero routing bias makes the selection differ from the weights' ranking: parity must hold anyway.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(torch.randn(m.gate.e_score_correction_bias.shape, generator=g) * 0.05)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nanoseek_saves_hf_loads_same_logits(variant, tmp_path):
    torch.manual_seed(0)
    config = make_config(variant)
    ours = Transformer(config).eval()
    if config.topk_method == "noaux_tc":
        randomize_bias(ours)
    ours.save_pretrained(tmp_path)
    theirs = hf_class(config).from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= TOL, f"{variant}: max |logits diff| {diff:.2e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_saves_nanoseek_loads_same_logits(variant, tmp_path):
    torch.manual_seed(1)
    config = make_config(variant)
    hf_config = getattr(transformers, "DeepseekV3Config" if config.scoring_func == "sigmoid" else "DeepseekV2Config")(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")})
    theirs = hf_class(config)(hf_config).eval()
    with torch.no_grad():
        for name, buf in theirs.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    theirs.save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path).eval()
    # transformers keeps no MTP module, so a checkpoint it saved loads without one.
    assert ours.config.num_nextn_predict_layers == 0
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= TOL, f"{variant}: max |logits diff| {diff:.2e}"


def test_bf16_logits_close_to_hf(tmp_path):
    torch.manual_seed(2)
    config = make_config("tiny")
    Transformer(config).save_pretrained(tmp_path)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits.float()
    # bf16 rounds differently along the way; the logits must still agree to bf16 precision.
    assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
    assert ours.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
