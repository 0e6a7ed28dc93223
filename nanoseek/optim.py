"""Optimizer groups and schedules: AdamW as DeepSeek trains, the multi-step LR schedule, the MTP weight schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: none on norms, biases or embeddings (DeepSeek LLM sec. 2.3; the usual
    GPT practice). Tied lm_head/embedding weights count once, as an embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.1, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with beta1 0.9, beta2 0.95, weight decay 0.1 (DeepSeek LLM / V3 hyper-parameters)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)


SCHEDULES = ("multistep", "cosine", "constant")


def lr_at(step: int, total: int, peak: float, *, warmup: int, schedule: str = "multistep",
          min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`.

    multistep (DeepSeek LLM sec. 2.3): linear warm-up to the peak, hold it, then 31.6% of the peak after 80% of the
    steps and 10% after 90%. cosine: warm-up then cosine decay to min_ratio * peak. constant: warm-up then flat."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {SCHEDULES}")
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "multistep":
        frac = step / max(total, 1)
        return peak * (1.0 if frac < 0.8 else 0.316 if frac < 0.9 else 0.1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mtp_weight_at(step: int, total: int, *, first: float = 0.3, then: float = 0.1, switch: float = 0.675) -> float:
    """MTP loss weight lambda: 0.3 for the first 10T of V3's 14.8T tokens (67.5%), then 0.1 (V3 sec. 4.2)."""
    return first if step < switch * total else then


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
