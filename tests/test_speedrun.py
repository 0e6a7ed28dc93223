"""Smoke test of the whole pipeline on a seconds-scale budget: every stage's artifacts, and a report whose numbers
are the ones in metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.report import fmt
from nanoseek.stages.speedrun import plan

STDLIB = Path(os.__file__).parent


def test_plan_scales_with_budget_and_is_deterministic():
    a, b = plan(20, 500), plan(40, 500)
    assert a == plan(20, 500)
    assert b["pretrain"] == 2 * a["pretrain"] and b["grpo"] == 2 * a["grpo"]
    assert plan(0.1, 500)["pretrain"] >= 4  # every stage runs at least a few steps


SUMMARY_KEYS = ("val_bpb", "fim_exact_match", "accuracy_sft", "accuracy_grpo", "mtp_acceptance")


def smoke_command(tmp_path: Path, run: Path) -> list[str]:
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        corpus.mkdir()
        for name in ("bisect.py", "heapq.py", "textwrap.py", "string.py", "json/decoder.py", "json/encoder.py",
                     "fnmatch.py", "colorsys.py"):
            shutil.copy(STDLIB / name, corpus / name.replace("/", "_"))
    return [sys.executable, "-m", "nanoseek.cli", "speedrun", "--run-dir", str(run), "--budget-minutes", "0.1",
            "--preset", "tiny", "--difficulty", "1", "--data", str(corpus), "--threads", "2"]


def summary_of(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in rows if r.get("kind") == "summary"]
    assert len(summary) == 1
    return summary[0]


def final_grpo_weights(run: Path) -> str:
    ckpt = run / "grpo" / "checkpoints" / (run / "grpo" / "checkpoints" / "latest").read_text().strip()
    return json.loads((ckpt / "manifest.json").read_text())["files"]["model/model.safetensors"]["sha256"]


@pytest.mark.slow
def test_speedrun_smoke(tmp_path):
    run = tmp_path / "run"
    cmd = smoke_command(tmp_path, run)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for stage in ("pretrain", "sft", "grpo"):
        latest = (run / stage / "checkpoints" / "latest").read_text().strip()
        assert (run / stage / "checkpoints" / latest / "model" / "config.json").exists()
        assert (run / stage / "metrics.jsonl").stat().st_size > 0
    report = (run / "report.md").read_text()
    assert "chat:  nanoseek chat --model" in out.stdout and str(run / "report.md") in out.stdout
    plots = sorted(p.name for p in (run / "plots").glob("*.png"))
    for name in ("pretrain_loss.png", "expert_load.png", "grpo_reward.png", "pass_at_k.png", "lr.png"):
        assert name in plots
        assert f"plots/{name}" in report
    s = summary_of(run)
    # every table number is the metrics.jsonl number
    for key in SUMMARY_KEYS:
        assert fmt(s[key]) in report, key
    assert f"{s['cache_bytes_per_token']:,} vs {s['kv_cache_bytes_per_token']:,}" in report
    acc = json.loads((run / "evals" / "accuracy_grpo.json").read_text())
    assert acc["accuracy"] == s["accuracy_grpo"]
    # running it again does no new training and reports the same numbers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    s2 = summary_of(run)
    for key in SUMMARY_KEYS:
        assert s2[key] == s[key]


@pytest.mark.slow
def test_speedrun_killed_mid_grpo_finishes_with_the_numbers_of_an_uninterrupted_run(tmp_path):
    """SIGKILL in the middle of GRPO (after its step-2 checkpoint), then the same command again: the report's
    numbers equal those of a run whose GRPO was never interrupted (the same run dir with GRPO and the evaluations
    deleted, so GRPO runs from scratch on the same SFT model; run dirs record their paths, so it cannot be a copy).
    Pretraining and SFT resume are covered by tests/test_trainer.py."""
    run = tmp_path / "run"
    cmd = smoke_command(tmp_path, run)
    env = {**os.environ, "NANOSEEK_FAULT_CRASH_AT_STEP": "3", "NANOSEEK_FAULT_STAGE": "grpo"}
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert (run / "grpo" / "checkpoints" / "latest").exists() and not (run / "report.md").exists()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "[grpo] resuming from step 2" in resumed.stdout
    after_kill, weights_after_kill = summary_of(run), final_grpo_weights(run)
    for path in (run / "grpo", run / "evals"):
        shutil.rmtree(path)
    fresh = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert fresh.returncode == 0, fresh.stdout[-2000:] + fresh.stderr[-3000:]
    assert "[grpo] resuming" not in fresh.stdout
    uninterrupted = summary_of(run)
    assert final_grpo_weights(run) == weights_after_kill  # sha256 of the final GRPO model: bitwise equal
    for key in SUMMARY_KEYS:
        assert after_kill[key] == uninterrupted[key], key
