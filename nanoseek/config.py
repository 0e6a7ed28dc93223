"""ModelConfig: one frozen dataclass with the Hugging Face DeepSeek field names, plus named presets.

V2 (softmax routing, optional q-LoRA, no bias) and V3 (sigmoid, group-limited, bias-corrected, MTP) are values
of these fields, not subclasses. Field names and defaults follow `DeepseekV3Config` so that a config.json from
either family reads and writes without translation tables.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


class ConfigError(ValueError):
    """A model config that breaks a rule; the message names the field and the rule."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (the first `first_k_dense_replace` layers)
    moe_intermediate_size: int = 2048  # width of each routed / shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    q_lora_rank: int | None = 1536  # None: a single q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    first_k_dense_replace: int = 3
    num_nextn_predict_layers: int = 1  # MTP depth D
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_bias: bool = False
    aux_loss_alpha: float = 1e-4  # sequence-wise balance loss weight (V3 eq. 17-20); 0 disables it
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # DeepSeek Sparse Attention (V3.2) indexer; index_topk None means dense attention.
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int | None = None

    def __post_init__(self):
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling))
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        # MTP layers are numbered after the main stack (V3 stores its MTP block as layer 61, an MoE layer).
        return self.is_moe and layer_idx >= self.first_k_dense_replace

    @property
    def yarn(self) -> dict | None:
        rs = self.rope_scaling
        return rs if rs is not None and rs.get("type") == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """(nope + rope)^-0.5, times m^2 with m = 0.1 * mscale_all_dim * ln(factor) + 1 when YaRN is active."""
        scale = self.qk_head_dim**-0.5
        y = self.yarn
        if y is not None and y.get("mscale_all_dim"):
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer by absorbed MLA: the latent c_KV plus the shared rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values a per-head K/V cache of the same model would hold per token per layer."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size",
                     "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0,
                 f"{name} must be a positive integer, got {getattr(self, name)!r}")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             f"q_lora_rank must be None (no query compression) or a positive integer, got {self.q_lora_rank!r}")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
             f"got {self.first_k_dense_replace}")
        need(self.num_nextn_predict_layers >= 0,
             f"num_nextn_predict_layers must be >= 0, got {self.num_nextn_predict_layers}")
        need(self.aux_loss_alpha >= 0, f"aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
        if self.is_moe:
            E, G = self.n_routed_experts, self.n_group
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when n_routed_experts > 0")
            need(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
            need(self.scoring_func in SCORING_FUNCS,
                 f"scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
            need(self.topk_method in TOPK_METHODS,
                 f"topk_method must be one of {TOPK_METHODS}, got {self.topk_method!r}")
            need(G >= 1 and E % G == 0,
                 f"n_routed_experts ({E}) must divide into n_group ({G}) equal groups")
            need(1 <= self.topk_group <= G, f"topk_group ({self.topk_group}) must be in [1, n_group={G}]")
            reachable = self.topk_group * (E // G) if self.topk_method != "greedy" else E
            need(1 <= self.num_experts_per_tok <= reachable,
                 f"num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, {reachable}]: the "
                 f"{self.topk_group} selected groups of {E // G} experts hold only {reachable}")
            if self.topk_method == "noaux_tc":
                need(E // G >= 2, f"topk_method 'noaux_tc' ranks groups by their top-2 scores, so each group "
                                  f"needs >= 2 experts (n_routed_experts / n_group = {E // G})")
        y = self.yarn
        if self.rope_scaling is not None:
            need(y is not None, f"rope_scaling type must be 'yarn' (the only scaling DeepSeek uses), "
                                f"got {self.rope_scaling.get('type')!r}")
            need(y["factor"] >= 1.0, f"rope_scaling.factor must be >= 1, got {y['factor']}")
            need(y["original_max_position_embeddings"] > 0,
                 "rope_scaling.original_max_position_embeddings must be positive")
        if self.index_topk is not None:
            need(self.index_topk > 0, f"index_topk must be positive or None (dense), got {self.index_topk}")
            need(self.index_n_heads > 0, f"index_n_heads must be positive, got {self.index_n_heads}")
            need(self.index_head_dim >= self.qk_rope_head_dim,
                 f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): "
                 f"the indexer's heads carry the same rotary part")

    # -------------------------------------------------------------- HF format
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as DeepSeek's releases and transformers 5.x read it (both rope field spellings)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        v3 = self.scoring_func == "sigmoid"
        d["model_type"] = "deepseek_v3" if v3 else "deepseek_v2"
        d["architectures"] = ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"]
        if self.index_topk is not None:  # V3.2: V3 plus the DSA indexer
            d["model_type"], d["architectures"] = "deepseek_v32", ["DeepseekV32ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads
        d["moe_layer_freq"] = 1
        d["rope_interleave"] = True
        d["torch_dtype"] = "float32"
        rp = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.yarn is not None:
            rp.update({k: v for k, v in self.yarn.items() if k != "type"}, rope_type="yarn")
        d["rope_parameters"] = rp
        if self.index_topk is None:
            for k in ("index_n_heads", "index_head_dim", "index_topk"):
                d.pop(k)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Reads configs written by DeepSeek (`rope_scaling` + `rope_theta`) or by transformers 5.x
        (`rope_parameters` with `rope_type`). Unknown keys (architectures, quantization_config, ...) are ignored."""
        d = dict(d)
        rp = d.pop("rope_parameters", None)
        if rp is not None and not d.get("rope_scaling"):
            rp = dict(rp)
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            d["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        if d.get("rope_scaling") and "rope_type" in d["rope_scaling"]:
            rs = dict(d["rope_scaling"])
            rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = None if rs["type"] == "default" else rs
        if d.get("n_routed_experts") is None:
            d["n_routed_experts"] = 0
        for k in ("n_group", "topk_group"):
            if d.get(k) is None:
                d[k] = 1
        if d.get("eos_token_id") is not None and isinstance(d["eos_token_id"], list):
            d["eos_token_id"] = d["eos_token_id"][0]
        if d.get("num_nextn_predict_layers") is None:
            d["num_nextn_predict_layers"] = d.get("num_mtp_layers", 0) if d.get("model_type") == "deepseek_v3" else 0
        if d.get("model_type") == "deepseek_v2" and "scoring_func" not in d:
            d["scoring_func"] = "softmax"
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}: expected an HF-format model folder") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature, m = 0.1 * mscale * ln(factor) + 1 (DeepSeek-V2 appendix, YaRN paper eq. 22)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalise_rope_scaling(rs: dict) -> dict:
    rs = dict(rs)
    kind = rs.pop("type", rs.pop("rope_type", None))
    if kind != "yarn":
        return {"type": kind, **rs}
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        raise ConfigError("rope_scaling of type 'yarn' needs 'factor' and 'original_max_position_embeddings'")
    out = {"type": "yarn", "factor": float(rs["factor"]),
           "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
           "beta_fast": float(rs.get("beta_fast") or 32), "beta_slow": float(rs.get("beta_slow") or 1),
           "mscale": float(rs.get("mscale") or 1.0), "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0)}
    return out


# ----------------------------------------------------------------------------- presets
_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, ModelConfig] = {
    # Trains on a laptop CPU in seconds; every feature on (q-LoRA, groups, bias, dense + MoE layers, MTP).
    "tiny": ModelConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, routed_scaling_factor=1.0, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=2048),
    # The one-command run's model: MoE + MLA + MTP, ~20M total / ~8M active parameters.
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=8, n_shared_experts=1, n_routed_experts=32, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=1.0, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, first_k_dense_replace=1, num_nextn_predict_layers=1,
        max_position_embeddings=4096),
    # DeepSeek-V2-Lite (16B total / 2.4B active): softmax greedy routing, no q-LoRA, no MTP.
    "v2-lite": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        n_group=1, topk_group=1, routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
        norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        aux_loss_alpha=0.001, bos_token_id=100000, eos_token_id=100001),
    # A V3-style 16B-total / ~3B-active shape (V2-Lite's width and depth with V3 routing and MTP).
    "v3-16b": ModelConfig(
        vocab_size=129280, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, q_lora_rank=768, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
        num_nextn_predict_layers=1, max_position_embeddings=163840, rope_scaling=_V3_YARN),
    # DeepSeek-V3 / R1 as released (671B total / 37B active).
    "v3-671b": ModelConfig(max_position_embeddings=163840, rope_scaling=_V3_YARN),
}
