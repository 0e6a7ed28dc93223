"""The training loop every stage shares: accumulation, clipping, the anomaly guard, the MoE bias update, metrics,
asynchronous checkpoints and exact resume.

A stage builds the model, the optimizer and a batch source, then calls `Trainer(...).fit()`. Running the same
command again on the same run dir resumes from the newest intact checkpoint: model (HF format), optimizer, step,
data position, MoE biases, every RNG and the guard's statistics are state, so the resumed run ends bitwise equal
to one that never stopped (tests/test_trainer.py kills runs at random moments to check it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .checkpoint import (CheckpointManager, capture_rng_state, load_optimizer_state_dict, optimizer_state_dict,
                         restore_rng_state, should_save)
from .guard import Guard
from .model import Transformer, update_expert_bias
from .optim import lr_at, mtp_weight_at, set_lr

WATCHDOG_EXIT = 75  # a hung step: the launcher (torchrun --max-restarts) starts the process again


class RunDirError(RuntimeError):
    """A run dir that belongs to another run (different model or data), or is otherwise unusable."""


@dataclass
class TrainConfig:
    steps: int
    lr: float
    warmup: int = 0
    schedule: str = "multistep"
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0
    bf16: bool = False
    compile: bool = False  # torch.compile the model in place (one-off compile time; faster steps)
    bias_gamma: float = 1e-3  # auxiliary-loss-free balancing speed (V3: 0.001)
    mtp_weight: float = 0.3  # lambda for the first 67.5% of steps, then mtp_weight_late (V3 sec. 4.2)
    mtp_weight_late: float = 0.1
    save_every: int | None = None
    save_minutes: float | None = None
    keep_last: int = 3
    eval_every: int | None = None
    log_every: int = 1
    guard_sigma: float = 6.0
    guard_window: int = 128
    guard_min_history: int = 16
    guard_max_consecutive: int = 5
    watchdog_seconds: float | None = None
    progress: bool = True


# ------------------------------------------------------------------------------------------------ run dir
def prepare_run_dir(run_dir: Path, run_config: dict, *, may_change: tuple[str, ...] = ("steps",)) -> bool:
    """Creates the run dir and its config.json, or checks that an existing one is the same run.

    Returns True when resuming. Keys in `may_change` (e.g. extending --steps) may differ; any other difference is
    an error that names the keys, so a run dir is never silently continued with another model or data."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is not valid JSON ({e}); move the run dir away or fix the file") from None
        new = json.loads(json.dumps(run_config))
        diff = sorted(k for k in set(old) | set(new) if k not in may_change and old.get(k) != new.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            raise RunDirError(f"{run_dir} holds a different run ({detail}). Use another --run-dir, or repeat the "
                              f"original options to resume it.")
    _atomic_write(path, json.dumps(run_config, indent=2, sort_keys=True) + "\n")
    return (run_dir / "checkpoints" / "latest").exists()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Metrics:
    """metrics.jsonl: one JSON object per line, appended and flushed; on resume, lines from after the resumed
    step (written by the run that died) are dropped so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, stage: str | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and not self._after(json.loads(line), resume_step, stage)]
            _atomic_write(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    @staticmethod
    def _after(record: dict, step: int, stage: str | None) -> bool:
        return record.get("stage", stage) == stage and record.get("step", 0) > step

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, default=_jsonable) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_metrics(run_dir, stage: str | None = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if stage is None or r.get("stage") == stage]


# ------------------------------------------------------------------------------------------------ hardware
_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul peak MFU is measured against: the datasheet on GPUs, a measured 1024^3 matmul on CPUs."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _PEAKS.items() if k in name), 989e12)
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):  # the fastest of 10: a busy machine only ever makes a matmul slower
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class Watchdog:
    """Ends the process with WATCHDOG_EXIT when no step finishes for `seconds`, so a launcher with restarts
    (torchrun --max-restarts) starts it again from the last checkpoint (TRANSOM's hang detection, in one thread)."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.last = time.monotonic()
        self.stopped = threading.Event()
        if seconds:
            threading.Thread(target=self._run, daemon=True, name="watchdog").start()

    def ping(self):
        self.last = time.monotonic()

    def stop(self):
        self.stopped.set()

    def _run(self):
        while not self.stopped.wait(min(self.seconds / 4, 5.0)):
            idle = time.monotonic() - self.last
            if idle > self.seconds:
                print(f"\nwatchdog: no training progress for {idle:.0f}s (limit {self.seconds:.0f}s); exiting with "
                      f"code {WATCHDOG_EXIT} so the launcher restarts from the last checkpoint", file=sys.stderr,
                      flush=True)
                os._exit(WATCHDOG_EXIT)


# ------------------------------------------------------------------------------------------------ trainer
LossFn = Callable[[Transformer, Any, float], tuple[torch.Tensor, dict]]


def lm_loss(model: Transformer, batch, mtp_weight: float) -> tuple[torch.Tensor, dict]:
    """Pretraining loss: next-token CE + MTP + balance, on an (inputs, targets) batch. `model` may be a DDP
    wrapper (its forward must be the one called, so gradients are reduced); the loss parts live on the module."""
    inputs, targets = batch
    loss = model(inputs, targets=targets, mtp_weight=mtp_weight)
    return loss, {f"loss/{k}": v for k, v in getattr(model, "module", model).loss_parts.items()}


def batch_tokens(batch) -> int:
    return int(batch[0].numel()) if isinstance(batch, (tuple, list)) else int(batch["input_ids"].numel())


class Trainer:
    """Runs `config.steps` optimizer steps of `loss_fn` over `batches`, resuming from `run_dir` if it holds
    checkpoints. `batches` must be an iterator with state_dict()/load_state_dict() (its exact position).

    With `parallel` (nanoseek.dist.Parallel, after `parallel.wrap(model)`), every rank runs this loop on its own
    shard of each batch: the forward goes through the DDP/FSDP module, the loss, metrics and MoE loads are reduced
    across ranks (so the guard decides the same everywhere), checkpoints are sharded (DCP) and only rank 0 logs and
    writes metrics."""

    def __init__(self, model: Transformer, optimizer: torch.optim.Optimizer, batches: Iterator, run_dir,
                 config: TrainConfig, *, stage: str = "pretrain", loss_fn: LossFn = lm_loss,
                 eval_fn: Callable[[Transformer], dict] | None = None, seq_len: int | None = None,
                 log: Callable[[str], None] = print, parallel=None):
        self.model, self.optimizer, self.batches, self.cfg = model, optimizer, batches, config
        self.parallel = parallel
        self.is_main = parallel is None or parallel.is_main
        self.forward_model = parallel.forward_model if parallel is not None else model
        self.run_dir, self.stage, self.loss_fn, self.eval_fn = Path(run_dir), stage, loss_fn, eval_fn
        self.log = log if self.is_main else (lambda s: None)
        self.seq_len = seq_len
        self.device = next(model.parameters()).device
        self.guard = Guard(sigma=config.guard_sigma, window=config.guard_window,
                           min_history=config.guard_min_history, max_consecutive=config.guard_max_consecutive)
        if parallel is not None:
            self.ckpt = parallel.checkpoint_manager(self.run_dir, keep_last=config.keep_last)
        else:
            self.ckpt = CheckpointManager(self.run_dir, keep_last=config.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.resumed_from: int | None = None
        latest = self.ckpt.latest()
        if latest is not None:
            self._load(latest)
            self.resumed_from = self.step
        self.metrics: Metrics | None = None

    # -------------------------------------------------------------------------------------------- state
    def _state(self) -> dict:
        optimizer = optimizer_state_dict(self.model, self.optimizer) if self.parallel is None else None
        return {"optimizer": optimizer, "rng": capture_rng_state(),
                "data": self.batches.state_dict(), "guard": self.guard.state_dict(),
                "trainer": {"step": self.step, "tokens_seen": self.tokens_seen, "stage": self.stage}}

    def _load(self, path: Path) -> None:
        if self.parallel is None:
            if (path / "dcp").is_dir():
                raise RunDirError(f"{path} was written by a multi-process run (sharded, dcp/); resume it under "
                                  f"torchrun or with --dp (any number of processes), or use a new --run-dir")
            self._restore(self.ckpt.load(path))
            return
        state = self.ckpt.load_distributed(path, self.model, self.optimizer, self.model.config)
        self._restore_state(state)

    def _restore(self, ckpt: dict) -> None:
        own = self.model.state_dict()
        missing = sorted(set(own) - set(ckpt["model_state"]))
        if missing or ckpt["model_meta"] != self.model.config:
            raise RunDirError(f"the checkpoint in {self.run_dir} is for another model config; resume with the "
                              f"options it was started with, or use a new --run-dir")
        with torch.no_grad():
            for k, v in ckpt["model_state"].items():
                own[k].copy_(v)
        state = ckpt["state"]
        load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self._restore_state(state)

    def _restore_state(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])
        self.guard.load_state_dict(state["guard"])
        restore_rng_state(state["rng"])
        self.step = int(state["trainer"]["step"])
        self.tokens_seen = int(state["trainer"]["tokens_seen"])
        for m in self.model.moe_layers():
            m.expert_load.zero_()

    def save(self, *, blocking: bool = False) -> None:
        if self.parallel is not None:  # optimizer through DCP with the model; the rest per rank
            state = {k: v for k, v in self._state().items() if k != "optimizer"}
            self.ckpt.save_distributed(self.step, self.model, self.optimizer, config=self.model.config, state=state,
                                       blocking=blocking)
            return
        self.ckpt.save(self.step, model_state=self.model.state_dict(), model_meta=self.model.config,
                       state=self._state(), blocking=blocking)

    # -------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg = self.cfg
        if self.resumed_from is not None:
            self.log(f"[{self.stage}] resuming from step {self.step} ({self.run_dir / 'checkpoints'})")
        if self.step >= cfg.steps:
            self.log(f"[{self.stage}] already at step {self.step} of {cfg.steps}; nothing to do")
            return {}
        peak = peak_flops(self.device, torch.bfloat16 if cfg.bf16 else torch.float32)
        flops_per_token = self.model.flops_per_token(self.seq_len) if self.seq_len else 0.0
        self.metrics = Metrics(self.run_dir / "metrics.jsonl", self.step, self.stage) if self.is_main else _NoMetrics()
        if cfg.compile and not getattr(self.model, "_compiled_call_impl", None):
            self.model.compile()
        watchdog = Watchdog(cfg.watchdog_seconds)
        bar = _progress(cfg.progress and self.is_main, self.step, cfg.steps, self.stage)
        last_save = time.monotonic()
        last = {}
        self.model.train()
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                position = json.dumps(self.batches.state_dict(), sort_keys=True)
                if self.guard.is_bad_batch(position):
                    self._skip_batches()
                    self.log(f"[{self.stage}] step {self.step}: skipping a batch that caused anomalies before")
                    continue
                record = self._train_step(position)
                if record is None:  # rolled back: state restored, loop again from the checkpoint's step
                    continue
                dt = time.perf_counter() - t0
                record["tokens_per_s"] = record["tokens"] / dt
                record["mfu"] = record["tokens_per_s"] * flops_per_token / peak if flops_per_token else None
                record["step_s"] = dt
                if cfg.eval_every and self.eval_fn and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    record.update(self.evaluate())
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or "val/loss" in record:
                    self.metrics.write(record)
                last = record
                watchdog.ping()
                bar.update(1)
                bar.set_postfix_str(f"loss {record['loss']:.3f} lr {record['lr']:.2e} "
                                    f"{record['tokens_per_s']:.0f} tok/s", refresh=False)
                _fault_injection(self.step, self.stage)
                final = self.step == cfg.steps
                # No checkpoint in the middle of an anomaly streak: a rollback must land before it (PaLM).
                if final or (self.guard.consecutive == 0 and should_save(
                        self.step, every_steps=cfg.save_every, every_minutes=cfg.save_minutes,
                        last_save_time=last_save)):
                    self.save(blocking=final)
                    last_save = time.monotonic()
        finally:
            watchdog.stop()
            bar.close()
            self.ckpt.wait()
            self.metrics.close()
        return last

    def _skip_batches(self) -> None:
        for _ in range(self.cfg.grad_accum):
            next(self.batches)

    def _train_step(self, position: str) -> dict | None:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, cfg.steps, cfg.lr, warmup=cfg.warmup, schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
        set_lr(self.optimizer, lr)
        mtp_w = mtp_weight_at(self.step, cfg.steps, first=cfg.mtp_weight, then=cfg.mtp_weight_late)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext())
        total_loss, parts, tokens = 0.0, {}, 0
        par = self.parallel
        for micro in range(cfg.grad_accum):
            batch = next(self.batches)
            tokens += batch_tokens(batch)
            # DDP/FSDP reduce gradients on the step's last micro-batch only.
            with par.grad_sync(micro == cfg.grad_accum - 1) if par is not None else nullcontext():
                with autocast:
                    loss, extra = self.loss_fn(self.forward_model, batch, mtp_w)
                (loss / cfg.grad_accum).backward()
            total_loss += loss.detach().float() / cfg.grad_accum
            for k, v in extra.items():
                parts[k] = parts.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) / cfg.grad_accum
        if par is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        else:
            grad_norm = par.clip_grad_norm_(model, cfg.clip)
            # One all-reduce for everything logged, so the guard sees the global loss and decides alike everywhere.
            keys = sorted(parts)
            vec = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=self.device).reshape(())
                               for x in [total_loss, float(tokens), *(parts[k] for k in keys)]])
            vec = par.mean_(vec)
            total_loss, tokens = vec[0], round(float(vec[1]) * par.world_size)
            parts = dict(zip(keys, vec[2:]))
        loss_value, grad_value = float(total_loss), float(grad_norm)  # the step's one host sync
        verdict = self.guard.check(loss_value, grad_value, batch=position)
        record = {"stage": self.stage, "step": self.step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                  "mtp_weight": mtp_w, "tokens": tokens, **{k: float(v) for k, v in parts.items()}}
        if verdict.ok:
            self.optimizer.step()
            if par is not None:
                par.reduce_expert_loads(model)  # loads summed across ranks before the bias update
            loads = update_expert_bias(model, cfg.bias_gamma) if model.moe_layers() else None
            if loads is not None and loads.numel():
                record["expert_load"] = loads.tolist()
                record["expert_imbalance"] = (loads.max(1).values / loads.mean(1).clamp_min(1e-9)).tolist()
        else:
            for m in model.moe_layers():
                m.expert_load.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        if verdict.rollback and self._rollback(verdict):
            return None
        self.step += 1
        self.tokens_seen += tokens
        record["tokens_seen"] = self.tokens_seen
        record.update(self.guard.metrics())
        if not verdict.ok:
            record["skipped"] = verdict.reason
            self.log(f"[{self.stage}] step {self.step}: skipped ({verdict.reason}: {verdict.detail})")
        return record

    def _rollback(self, verdict) -> bool:
        self.ckpt.wait()
        path = self.ckpt.latest()
        if path is None:
            # Nothing to roll back to (the anomalies came before the first checkpoint): the steps were skipped;
            # start the statistics afresh so a new regime (e.g. a grown gradient norm) is judged on its own.
            self.guard.losses.clear()
            self.guard.grad_norms.clear()
            self.log(f"[{self.stage}] WARNING: {verdict.detail}, and no checkpoint yet to roll back to; the steps "
                     f"were skipped and the spike statistics restart. If this repeats, lower the learning rate.")
            self.metrics.write({"stage": self.stage, "step": self.step, "event": "guard_reset",
                                "reason": verdict.reason})
            return False
        # Guard.load_state_dict takes the checkpoint's window but merges in the bad batches found since.
        self._load(path)
        self.log(f"[{self.stage}] rollback to {path.name} after {verdict.detail}; the batches that triggered it "
                 f"will be skipped")
        self.metrics.write({"stage": self.stage, "step": self.step, "event": "rollback", "to": path.name,
                            "reason": verdict.reason})
        return True

    @torch.no_grad()
    def evaluate(self) -> dict:
        was_training = self.model.training
        self.model.eval()
        try:
            return self.eval_fn(self.model)
        finally:
            self.model.train(was_training)


def _fault_injection(step: int, stage: str) -> None:
    """Drills for the restart path, in the first attempt of a run only (not after a launcher restart):
    NANOSEEK_FAULT_HANG_AT_STEP=N hangs after step N (the watchdog must end it), NANOSEEK_FAULT_CRASH_AT_STEP=N
    kills the process with SIGKILL after step N, NANOSEEK_FAULT_STOP_AT_STEP=N freezes it with SIGSTOP (a hung
    rank that cannot even run its own watchdog: the other ranks' watchdogs must notice). With
    NANOSEEK_FAULT_RANK=r only rank r (torchrun's RANK) does it, with NANOSEEK_FAULT_STAGE=name only that stage
    (e.g. grpo inside a speedrun). The tests use them end to end; users can run the same drill."""
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if os.environ.get("NANOSEEK_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    if os.environ.get("NANOSEEK_FAULT_STAGE", stage) != stage:
        return
    if os.environ.get("NANOSEEK_FAULT_CRASH_AT_STEP") == str(step):
        os.kill(os.getpid(), 9)
    if os.environ.get("NANOSEEK_FAULT_STOP_AT_STEP") == str(step):
        os.kill(os.getpid(), 19)  # SIGSTOP
    if os.environ.get("NANOSEEK_FAULT_HANG_AT_STEP") == str(step):
        while True:
            time.sleep(3600)


def _progress(enabled: bool, initial: int, total: int, stage: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr)


class _NoMetrics:
    def write(self, record: dict) -> None:
        pass

    def close(self):
        pass


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


def evaluate_lm(model: Transformer, batches: Callable[[], Iterator], bytes_per_token: float | None = None,
                max_batches: int | None = None, parallel=None) -> dict:
    """Validation loss (next-token CE, no MTP) and bits per byte = loss / ln 2 / (bytes per token). With `parallel`
    each rank evaluates its shard of the rows (every rank must call this: FSDP gathers weights in the forward) and
    the sums are reduced."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i, (inputs, targets) in enumerate(batches()):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(inputs.to(device))
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(),
                                                   reduction="sum").item()
        count += targets.numel()
    if parallel is not None:
        sums = parallel.mean_(torch.tensor([total, float(count)], dtype=torch.float64, device=device))
        total, count = float(sums[0]), float(sums[1])
    loss = total / max(count, 1)
    out = {"val/loss": loss}
    if bytes_per_token:
        out["val/bpb"] = loss / math.log(2) / bytes_per_token
    return out
