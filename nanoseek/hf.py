"""Hugging Face format, both directions: config.json + sharded safetensors with the keys DeepSeek's releases use.

nanoseek's own parameter names are the HF ones without the `model.` prefix, except for two things this file
translates: routed experts are one stacked tensor per layer here (`mlp.experts.gate_up_proj` [E, 2F, D],
`mlp.experts.down_proj` [E, D, F]) and one tensor per expert on disk (`mlp.experts.{e}.{gate,up,down}_proj.weight`);
MTP depth k is `mtp.{k-1}.*` here and `model.layers.{num_hidden_layers + k - 1}.*` on disk, where the block's keys sit
beside `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, and copies of the shared `embed_tokens` and
`shared_head.head` (as the V3 checkpoint stores them). V3.2's DSA indexer needs no translation: its keys are
`model.layers.{i}.self_attn.indexer.{wq_b, wk, weights_proj}.weight` and `...indexer.k_norm.{weight, bias}` in both
(the MTP layer has one too); in the FP8 release wq_b and wk carry `weight_scale_inv` like the other linears.
No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ModelConfig

INDEX = "model.safetensors.index.json"
_EXPERT_STACK = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_EXPERT_DISK = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_SPECIAL = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")


class CheckpointFormatError(ValueError):
    """An HF folder that does not match its config: names the key and the shapes."""


# ------------------------------------------------------------------------------------------------ key mapping
def to_hf(config: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """nanoseek state dict -> HF tensors (per-expert split, MTP renumbered, shared copies added)."""
    L = config.num_hidden_layers
    out: dict[str, Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and config.topk_method != "noaux_tc":
            continue  # V2 checkpoints have no routing bias
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            layer = L + int(k)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            hf_name = f"model.layers.{layer}.{rest}"
        elif name == "lm_head.weight":
            hf_name = name
        else:
            hf_name = "model." + name
        m = _EXPERT_STACK.match(hf_name)
        if m:
            prefix, kind = m.groups()
            if kind == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}.{e}.up_proj.weight"] = up[e]
            else:
                for e in range(t.shape[0]):
                    out[f"{prefix}.{e}.down_proj.weight"] = t[e]
            continue
        out[hf_name] = t
    head = state.get("lm_head.weight", state["embed_tokens.weight"])
    for k in range(config.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = head
    return out


def from_hf(config: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors -> nanoseek state dict (inverse of to_hf); experts are stacked again."""
    L = config.num_hidden_layers
    state: dict[str, Tensor] = {}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    for hf_name, t in tensors.items():
        m = _EXPERT_DISK.match(hf_name)
        if m:
            prefix, e, kind = m.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[kind] = t
            continue
        state[_native_name(hf_name, L)] = t
    for prefix, per_expert in experts.items():
        native = _native_name(prefix + ".x", L)[:-2]
        n = max(per_expert) + 1
        missing = [f"{prefix}.{e}.{k}.weight" for e in range(n) for k in ("gate_proj", "up_proj", "down_proj")
                   if k not in per_expert.get(e, {})]
        if missing:
            raise CheckpointFormatError(f"missing expert tensors: {', '.join(missing[:4])}"
                                        + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
        state[f"{native}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]]) for e in range(n)])
        state[f"{native}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
    return state


def _native_name(hf_name: str, num_layers: int) -> str:
    if hf_name == "lm_head.weight":
        return hf_name
    if not hf_name.startswith("model."):
        return "?" + hf_name  # reported as unexpected
    name = hf_name[len("model."):]
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= num_layers:
        k, rest = int(m.group(1)) - num_layers, m.group(2)
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return f"mtp.{k}.{rest}"  # copies of the shared weights, dropped by load_hf
        return f"mtp.{k}.{rest}" if rest.startswith(_MTP_SPECIAL) else f"mtp.{k}.block.{rest}"
    return name


# ------------------------------------------------------------------------------------------------ files
def save_hf(path, config: ModelConfig, state_dict: dict[str, Tensor], *, max_shard_bytes: int = 4 << 30) -> None:
    """Writes config.json and model(-0000i-of-0000n).safetensors (+ index when sharded) into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_hf(config, state_dict).items()}
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    seen: set[int] = set()
    for name in sorted(tensors, key=_layer_order):
        t = tensors[name]
        # safetensors wants every tensor in storage of its own: per-expert slices and the MTP copies of the
        # shared embedding/head are views, so they are cloned here.
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.data_ptr() in seen:
            t = tensors[name] = t.clone()
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname in os.listdir(path):  # stale shards of an earlier save would confuse loaders
        if fname.endswith(".safetensors") or fname == INDEX:
            os.remove(path / fname)
    for fname, shard in zip(names, shards):
        save_file(shard, str(path / fname), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        (path / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    config.save(path / "config.json")


def _layer_order(name: str):
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def read_safetensors(path) -> dict[str, Tensor]:
    """All tensors of an HF folder (single file or sharded with an index)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if (path / INDEX).exists():
        files = sorted({path / f for f in json.loads((path / INDEX).read_text())["weight_map"].values()})
    if not files:
        raise CheckpointFormatError(f"no *.safetensors files in {path}")
    tensors: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    return tensors


def dequantize_fp8(tensors: dict[str, Tensor], block: int = 128) -> dict[str, Tensor]:
    """FP8 checkpoints (V3 as released) store e4m3 weights with `weight_scale_inv` [ceil(out/128), ceil(in/128)]:
    weight = fp8 * scale_inv, per 128x128 block."""
    out = {}
    for k, t in tensors.items():
        if k.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(k[: -len("weight")] + "weight_scale_inv") if k.endswith(".weight") else None
        if scale is not None:
            from .fp8 import dequantize_blocks  # one implementation of the block layout, shared with training

            t = dequantize_blocks(t, scale, block).to(torch.bfloat16)
        out[k] = t
    return out


def load_hf(path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Reads an HF folder into (config, nanoseek state dict), checking every key and shape against the config."""
    from .model import Transformer

    path = Path(path)
    config = ModelConfig.load(path)
    tensors = dequantize_fp8(read_safetensors(path))
    mtp_prefixes = tuple(f"model.layers.{config.num_hidden_layers + k}." for k in range(config.num_nextn_predict_layers))
    if config.num_nextn_predict_layers and not any(k.startswith(mtp_prefixes) for k in tensors):
        # e.g. saved by transformers, which does not keep the MTP module: load the main model without it.
        config = config.replace(num_nextn_predict_layers=0)
    state = from_hf(config, tensors)
    state = {k: v for k, v in state.items()
             if not re.match(r"^mtp\.\d+\.(embed_tokens|shared_head\.head)\.weight$", k)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    if config.topk_method != "noaux_tc":
        for k in [k for k in expected if k.endswith("e_score_correction_bias")]:
            state.setdefault(k, torch.zeros(expected[k], dtype=torch.float32))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        def show(keys):
            return ", ".join(_hf_key(k, config) for k in keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        msg = []
        if missing:
            msg.append(f"missing tensors: {show(missing)}")
        if unexpected:
            msg.append(f"unexpected tensors: {show(unexpected)}")
        raise CheckpointFormatError(f"{path}: checkpoint does not match its config.json: " + "; ".join(msg))
    for k, shape in expected.items():
        if state[k].shape != shape:
            raise CheckpointFormatError(f"{path}: tensor {_hf_key(k, config)} has shape {tuple(state[k].shape)}, "
                                        f"config.json implies {tuple(shape)}")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return config, state


def _hf_key(native: str, config: ModelConfig) -> str:
    if native.startswith("?"):
        return native[1:]
    m = re.match(r"^(.*)\.experts\.(gate_up_proj|down_proj)$", native)
    if m:
        native = f"{m.group(1)}.experts.*.{'gate_proj/up_proj' if m.group(2) == 'gate_up_proj' else 'down_proj'}.weight"
    m = re.match(r"^mtp\.(\d+)\.(block\.)?(.*)$", native)
    if m:
        return f"model.layers.{config.num_hidden_layers + int(m.group(1))}.{m.group(3)}"
    return native if native == "lm_head.weight" else "model." + native
