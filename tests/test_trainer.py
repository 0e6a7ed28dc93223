"""The shared trainer: exact resume after SIGKILL, anomaly skips, rollback, run-dir safety, watchdog restart."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.hf import read_safetensors
from nanoseek.optim import build_optimizer, lr_at, mtp_weight_at, param_groups
from nanoseek.trainer import RunDirError, Trainer, TrainConfig, prepare_run_dir, read_metrics

STDLIB = Path(os.__file__).parent


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("bisect.py", "heapq.py", "string.py", "textwrap.py", "json/decoder.py", "json/encoder.py"):
        shutil.copy(STDLIB / name, d / name.replace("/", "_"))
    return d


def pretrain_cmd(run_dir, corpus_dir, steps, *extra):
    return [sys.executable, "-m", "nanoseek.cli", "pretrain", "--preset", "tiny", "--run-dir", str(run_dir),
            "--data", str(corpus_dir), "--vocab-size", "384", "--seq-len", "32", "--batch-size", "4",
            "--steps", str(steps), "--save-every", "3", "--eval-every", "0", "--no-progress", "--threads", "1",
            *extra]


def final_weights(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return read_safetensors(run_dir / "checkpoints" / latest / "model")


# ------------------------------------------------------------------------------------------------ schedules
def test_multistep_schedule_points():
    peak, total = 1.0, 1000
    assert lr_at(0, total, peak, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, total, peak, warmup=10) == pytest.approx(1.0)
    assert lr_at(799, total, peak, warmup=10) == 1.0
    assert lr_at(800, total, peak, warmup=10) == pytest.approx(0.316)  # DeepSeek LLM: 31.6% at 80% of steps
    assert lr_at(900, total, peak, warmup=10) == pytest.approx(0.1)  # and 10% at 90%
    assert lr_at(999, total, peak, warmup=0, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1, abs=1e-4)
    assert mtp_weight_at(0, 100) == 0.3 and mtp_weight_at(99, 100) == 0.1


def test_no_decay_on_norms_biases_embeddings():
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") or "embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() == 2 or p.dim() == 3 for p in decay["params"]) and decay["weight_decay"] == 0.1


# ------------------------------------------------------------------------------------------------ exact resume
def test_kill_anywhere_then_resume_is_bitwise_equal(tmp_path, corpus_dir):
    steps = 20
    ref = tmp_path / "ref"
    subprocess.run(pretrain_cmd(ref, corpus_dir, steps), check=True, timeout=300, capture_output=True)
    train_seconds = sum(r["step_s"] for r in read_metrics(ref, "pretrain") if "step_s" in r)
    run = tmp_path / "killed"
    cmd = pretrain_cmd(run, corpus_dir, steps)
    rng = random.Random(0)
    kills = 0
    for attempt in range(6):  # kill at random moments (mid-step, mid-checkpoint-write) while it is training
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = run / "metrics.jsonl"
        seen = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and (
                not metrics.exists() or len(metrics.read_text().splitlines()) <= seen):
            time.sleep(0.02)  # wait for this attempt's first step, so the kill lands inside training
        time.sleep(rng.uniform(0.0, train_seconds / 4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)  # finish (or no-op if it already had)
    assert kills >= 1
    a, b = final_weights(ref), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # metrics read as one run: every step once, in order
    steps_logged = [r["step"] for r in read_metrics(run, "pretrain") if "loss" in r]
    assert steps_logged == list(range(1, steps + 1))


def test_extending_steps_continues_and_other_config_is_refused(tmp_path, corpus_dir):
    run = tmp_path / "run"
    subprocess.run(pretrain_cmd(run, corpus_dir, 3), check=True, timeout=300, capture_output=True)
    out = subprocess.run(pretrain_cmd(run, corpus_dir, 5), timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resuming from step 3" in out.stdout
    assert (run / "checkpoints" / "step_000005").is_dir()
    bad = subprocess.run(pretrain_cmd(run, corpus_dir, 5, "--lr", "0.1"), timeout=300, capture_output=True, text=True)
    assert bad.returncode != 0 and "holds a different run" in bad.stderr + bad.stdout and "lr" in bad.stderr + bad.stdout


def test_prepare_run_dir_names_the_difference(tmp_path):
    prepare_run_dir(tmp_path, {"model": {"hidden_size": 64}, "steps": 10})
    assert prepare_run_dir(tmp_path, {"model": {"hidden_size": 64}, "steps": 20}) is False  # steps may change
    with pytest.raises(RunDirError, match="model"):
        prepare_run_dir(tmp_path, {"model": {"hidden_size": 128}, "steps": 20})


# ------------------------------------------------------------------------------------------------ guard in the loop
class Batches:
    """A deterministic batch source with an exact position; `poison` makes chosen positions produce NaN/huge loss."""

    def __init__(self, vocab=64, B=2, T=16, poison=None):
        self.pos, self.vocab, self.B, self.T, self.poison = 0, vocab, B, T, poison or {}

    def __next__(self):
        g = torch.Generator().manual_seed(self.pos)
        x = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=g)
        kind = self.poison.get(self.pos)
        self.pos += 1
        return x[:, :-1], x[:, 1:], kind

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def poisoned_loss(model, batch, mtp_weight):
    inputs, targets, kind = batch
    loss = model(inputs, targets=targets, mtp_weight=mtp_weight)
    if kind == "nan":
        loss = loss * float("nan")
    elif kind == "huge_grad":
        loss = loss * 1e4 - (loss * 1e4 - loss).detach()  # a 1e4x gradient behind an ordinary-looking loss
    return loss, {}


def make_trainer(run_dir, batches, steps, **cfg):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
    opt = build_optimizer(model, 1e-3)
    config = TrainConfig(steps=steps, lr=1e-3, progress=False, guard_min_history=4, **cfg)
    return Trainer(model, opt, batches, run_dir, config, loss_fn=poisoned_loss, log=lambda s: None)


def test_nan_and_huge_gradient_steps_are_skipped_untouched(tmp_path):
    trainer = make_trainer(tmp_path, Batches(poison={6: "nan", 8: "huge_grad"}), steps=6, clip=0.0)
    trainer.fit()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    trainer.cfg.steps = 7
    trainer.fit()  # the NaN batch
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(opt_before[k], trainer.optimizer.state_dict()["state"][0][k]) for k in opt_before)
    trainer.cfg.steps = 9
    trainer.fit()  # a normal step, then the 1e4x gradient
    rows = read_metrics(tmp_path, "pretrain")
    skipped = {r["step"]: r.get("skipped") for r in rows if r.get("skipped")}
    assert skipped == {7: "nonfinite_loss", 9: "grad_spike"}


def test_rollback_restores_checkpoint_and_skips_bad_batches(tmp_path):
    poison = {p: "nan" for p in range(10, 13)}
    trainer = make_trainer(tmp_path, Batches(poison=poison), steps=16, save_every=4, guard_max_consecutive=3)
    trainer.fit()
    rows = read_metrics(tmp_path)
    events = [r for r in rows if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["to"] == "step_000008"
    assert trainer.step == 16
    assert trainer.guard.counts["rollback"] == 1 and len(trainer.guard.bad_batches) == 3
    # after the rollback the poisoned positions were skipped, so no more anomalies
    assert trainer.guard.counts["nonfinite_loss"] == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------ restart
@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_torchrun_restarts_after_hang_or_crash(tmp_path, corpus_dir, fault):
    """A hung step trips the watchdog (exit 75); a SIGKILLed worker just dies. Either way torchrun restarts the
    worker, which resumes from the checkpoint and finishes equal to an uninterrupted run."""
    steps = 9
    ref = tmp_path / "ref"
    subprocess.run(pretrain_cmd(ref, corpus_dir, steps), check=True, timeout=300, capture_output=True)
    run = tmp_path / fault
    env = dict(os.environ, **{f"NANOSEEK_FAULT_{fault.upper()}_AT_STEP": "5"})  # first attempt only
    port = 29500 + random.Random().randint(0, 2000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--max-restarts", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "nanoseek.cli",
           *pretrain_cmd(run, corpus_dir, steps, "--watchdog", "4")[3:]]
    out = subprocess.run(cmd, timeout=300, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if fault == "hang":
        assert "watchdog: no training progress" in out.stderr
    else:
        assert "exitcode: -9" in out.stderr
    assert "resuming from step 3" in out.stdout
    a, b = final_weights(ref), final_weights(run)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_when_some_parameters_never_had_a_gradient(tmp_path):
    """With the MTP loss weight at 0 the MTP module gets no gradient and so no AdamW state; resuming must still
    work and continue exactly as an uninterrupted run."""
    def run(run_dir, steps, stop_at=None):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
        cfg = TrainConfig(steps=steps, lr=1e-3, progress=False, mtp_weight=0.0, mtp_weight_late=0.0, save_every=2)
        return Trainer(model, build_optimizer(model, 1e-3), Batches(), run_dir, cfg, loss_fn=poisoned_loss,
                       log=lambda s: None)

    ref = run(tmp_path / "ref", 6)
    ref.fit()
    first = run(tmp_path / "b", 4)
    first.fit()
    second = run(tmp_path / "b", 6)  # a new process would do exactly this
    assert second.step == 4
    second.fit()
    for (k, a), (_, b) in zip(ref.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_anomaly_streak_before_any_checkpoint_skips_and_restarts_statistics(tmp_path):
    poison = {p: "nan" for p in range(5, 8)}
    trainer = make_trainer(tmp_path, Batches(poison=poison), steps=10, guard_max_consecutive=3)
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["event"] for r in rows if "event" in r] == ["guard_reset"]
    assert trainer.step == 10 and len(trainer.guard.losses) == 2  # the window restarted after step 8
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
