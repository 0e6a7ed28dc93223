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


@pytest.mark.slow
def test_speedrun_smoke(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("bisect.py", "heapq.py", "textwrap.py", "string.py", "json/decoder.py", "json/encoder.py",
                 "fnmatch.py", "colorsys.py"):
        shutil.copy(STDLIB / name, corpus / name.replace("/", "_"))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek.cli", "speedrun", "--run-dir", str(run), "--budget-minutes", "0.1",
           "--preset", "tiny", "--difficulty", "1", "--data", str(corpus), "--threads", "2"]
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
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if json.loads(line).get("kind") == "summary"]
    assert len(summary) == 1
    s = summary[0]
    # every table number is the metrics.jsonl number
    for key in ("val_bpb", "fim_exact_match", "accuracy_sft", "accuracy_grpo", "mtp_acceptance"):
        assert fmt(s[key]) in report, key
    assert f"{s['cache_bytes_per_token']:,} vs {s['kv_cache_bytes_per_token']:,}" in report
    acc = json.loads((run / "evals" / "accuracy_grpo.json").read_text())
    assert acc["accuracy"] == s["accuracy_grpo"]
    # running it again does no new training and reports the same numbers
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    s2 = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
          if json.loads(line).get("kind") == "summary"][0]
    for key in ("val_bpb", "fim_exact_match", "accuracy_sft", "accuracy_grpo", "mtp_acceptance"):
        assert s2[key] == s[key]
