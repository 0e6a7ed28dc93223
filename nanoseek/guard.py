"""Anomaly guard: skip steps with a non-finite or spiking loss / grad norm; roll back when they persist.

What the big runs do (REFERENCE.md, "Training system numbers"):
- OLMo 2 (arXiv 2501.00656; olmo_core.optim.SkipStepOptimizer) skips the update of a step whose loss or
  gradient norm is more than 6 standard deviations above the mean of the last 128 steps.
- PaLM (arXiv 2204.02311, section 5.1) restarted from a checkpoint ~100 steps before a spike and skipped
  200-500 batches around it: spikes came from the combination of batch and parameter state.

The guard decides BEFORE the optimizer step, so a skipped step leaves parameters and optimizer state
(moments, step count) untouched. Intended use in a trainer:

    loss = model(x, targets=y); loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)   # norm before clipping
    verdict = guard.check(loss.item(), grad_norm.item(), batch=data_position,
                          grads_finite=grads_finite(model.parameters()))
    if verdict.ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)      # on skip: the gradient is dropped, nothing else changes
    if verdict.rollback:
        restore the last checkpoint (CheckpointManager.load), then `guard.load_state_dict(saved_guard_state)`:
        the bad batches recorded since are kept (see load_state_dict), and the data loop skips every batch
        for which `guard.is_bad_batch(position)` is true.

Only accepted steps enter the rolling window, so a spike cannot raise the bar for the next one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch

REASONS = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike")


@dataclass(frozen=True)
class Verdict:
    action: str  # "ok" | "skip" | "rollback"
    reason: str | None = None  # one of REASONS when not ok
    detail: str = ""  # human-readable numbers for the log line

    @property
    def ok(self) -> bool:
        return self.action == "ok"

    @property
    def skip(self) -> bool:
        # A rollback also skips the current step's update.
        return self.action != "ok"

    @property
    def rollback(self) -> bool:
        return self.action == "rollback"


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """True if every gradient is finite, with one host sync in all (not one per parameter).

    The grad norm alone can miss nothing non-finite but can flag too much: a fp32 norm of huge finite
    values overflows to inf. This looks at the values themselves.
    """
    checks = [p.grad.isfinite().all() for p in params if p.grad is not None]
    if not checks:
        return True
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for c in checks:
        by_device.setdefault(c.device, []).append(c)
    return all(bool(torch.stack(cs).all()) for cs in by_device.values())


def _mean_std(values) -> tuple[float, float]:
    # Population std over the window, recomputed from the stored values each time (128 floats: cheap)
    # so that the decision depends only on the window's content, which state_dict restores exactly.
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / n
    return mean, math.sqrt(var)


class Guard:
    """Decides per step: ok, skip (with a reason) or rollback (after `max_consecutive` anomalies in a row).

    sigma, window: a spike is a value above mean + sigma * std of the last `window` accepted values
    (one-sided: a drop in loss is never an anomaly). min_history: spike detection starts once this many
    steps were accepted (non-finite checks are always on); the first steps of a run move too fast for a
    window to mean anything.
    """

    def __init__(self, *, sigma: float = 6.0, window: int = 128, min_history: int = 16,
                 max_consecutive: int = 5):
        if not (sigma > 0 and window >= 2 and 2 <= min_history <= window and max_consecutive >= 1):
            raise ValueError(
                f"Guard needs sigma > 0, window >= 2, 2 <= min_history <= window and max_consecutive >= 1; "
                f"got sigma={sigma}, window={window}, min_history={min_history}, max_consecutive={max_consecutive}"
            )
        self.sigma, self.window, self.min_history, self.max_consecutive = sigma, window, min_history, max_consecutive
        self.losses: deque[float] = deque(maxlen=window)
        self.grad_norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.counts = {reason: 0 for reason in REASONS} | {"ok": 0, "rollback": 0}
        self.bad_batches: list = []  # data positions of anomalous steps (ints or strings), kept across rollbacks

    def check(self, loss: float, grad_norm: float, *, batch=None, grads_finite: bool = True) -> Verdict:
        """Verdict for one step. `batch` is the step's data position (any JSON value), recorded if anomalous."""
        loss, grad_norm = float(loss), float(grad_norm)
        reason, detail = self._anomaly(loss, grad_norm, grads_finite)
        if reason is None:
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            self.consecutive = 0
            self.counts["ok"] += 1
            return Verdict("ok")

        self.counts[reason] += 1
        self.consecutive += 1
        if batch is not None:
            if batch not in self.bad_batches:
                self.bad_batches.append(batch)
        if self.consecutive < self.max_consecutive:
            return Verdict("skip", reason, detail)
        # PaLM-style: the anomaly persists, so the state itself is suspect. The trainer restores the last
        # checkpoint; the counter starts over so the restored run gets a fresh budget.
        self.consecutive = 0
        self.counts["rollback"] += 1
        return Verdict("rollback", reason, f"{self.max_consecutive} anomalies in a row; last: {detail}")

    def _anomaly(self, loss: float, grad_norm: float, grads_ok: bool) -> tuple[str | None, str]:
        if not math.isfinite(loss):
            return "nonfinite_loss", f"loss={loss}"
        if not grads_ok or not math.isfinite(grad_norm):
            return "nonfinite_grad", f"grad_norm={grad_norm}"
        if len(self.losses) < self.min_history:
            return None, ""
        for name, value, history in (("loss", loss, self.losses), ("grad", grad_norm, self.grad_norms)):
            mean, std = _mean_std(history)
            threshold = mean + self.sigma * std
            if value > threshold:  # OLMo: value - mean > sigma * std over the rolling window
                return f"{name}_spike", f"{name}={value:.6g} > {threshold:.6g} (mean {mean:.6g} + {self.sigma} x std {std:.3g})"
        return None, ""

    def is_bad_batch(self, batch) -> bool:
        return batch in self.bad_batches

    def metrics(self) -> dict:
        """Counters for metrics.jsonl: skips by reason, accepted steps and rollbacks."""
        return {f"guard/{k}": v for k, v in self.counts.items()}

    # -- state -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": {"sigma": self.sigma, "window": self.window, "min_history": self.min_history,
                       "max_consecutive": self.max_consecutive},
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "consecutive": self.consecutive,
            "counts": dict(self.counts),
            "bad_batches": list(self.bad_batches),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the window exactly; MERGE the bad batches and counters (they never go backwards).

        On rollback the trainer loads the guard state saved with the checkpoint, which predates the
        anomalies: the window must be that one, but the batches found bad since must still be skipped (and
        written into every later checkpoint, so a crash after the rollback does not replay them), and the
        metrics must still show the skips and the rollback. Into a fresh Guard (a resume) this is a plain
        restore. The configuration is the constructor's: a changed sigma or window applies from now on.
        """
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.window)
        self.grad_norms = deque((float(v) for v in state["grad_norms"]), maxlen=self.window)
        self.consecutive = int(state["consecutive"])
        for key, value in state["counts"].items():
            self.counts[key] = max(self.counts.get(key, 0), int(value))
        for batch in state["bad_batches"]:
            if batch not in self.bad_batches:
                self.bad_batches.append(batch)
