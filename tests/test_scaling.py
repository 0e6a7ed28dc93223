"""Scaling laws: M against a hand count, the laws against the paper's own 7B/67B settings, the config search, the
fits on synthetic data with known exponents, and the plan CLI."""

import json
import math

import numpy as np
import pytest

from nanoseek import scaling
from nanoseek.config import ModelConfig
from nanoseek.stages import plan as plan_stage

# d 32, 2 layers, 2 heads of nope 8 + rope 4 (K = 12), v 8, kv-LoRA 16, no q-LoRA, dense FFN 64, no MTP.
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            num_nextn_predict_layers=0, first_k_dense_replace=1)
SEQ = 16


def test_m_dense_hand_count():
    config = ModelConfig(**BASE, n_routed_experts=0)
    # Per layer: q_proj 32*2*12 = 768, kv_a 32*(16+4) = 640, kv_b 16*2*(8+8) = 512, o_proj 2*8*32 = 512
    # -> attention 2432; SwiGLU 3*32*64 = 6144; layer 8576, two layers 17152 matmul weights (norms, embedding and
    # lm_head excluded). Training: 6 * 17152 = 102912. Causal attention, 3 x (QK^T + AV) / 2:
    # 3 * H * (K + O) * l * layers = 3 * 2 * 20 * 16 * 2 = 3840. M = 106752.
    assert scaling.model_scale(config, SEQ) == 106752
    # The full count the trainer's MFU uses adds the lm_head (6 * 64 * 32) and the other causal half.
    assert scaling.hardware_flops_per_token(config, SEQ) == 106752 + 6 * 64 * 32 + 3840


def test_m_moe_hand_count_counts_active_experts_only():
    config = ModelConfig(**BASE, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                         moe_intermediate_size=16, n_group=1, topk_group=1)
    # Layer 0 dense as above: 8576. Layer 1: attention 2432 + gate 4*32 = 128 + shared expert 3*32*16 = 1536
    # + 2 of 4 routed experts 2*3*32*16 = 3072 -> 7168. 6 * (8576 + 7168) = 94464, + attention 3840 = 98304.
    assert scaling.model_scale(config, SEQ) == 98304
    more_experts = config.replace(n_routed_experts=16)  # more experts, same top-k: M grows only by the gate
    assert scaling.model_scale(more_experts, SEQ) - 98304 == 6 * 12 * 32


def test_paper_formula_for_its_dense_models():
    # DeepSeek LLM sec. 3.2: M = 72 n_layer d^2 + 6 n_layer d l_seq.
    assert scaling.deepseek_m(30, 4096, 4096) == 72 * 30 * 4096**2 + 6 * 30 * 4096 * 4096


@pytest.mark.parametrize("layers, width, lr, batch_seqs", [(30, 4096, 4.2e-4, 2304), (95, 8192, 3.2e-4, 4608)])
def test_laws_give_back_the_papers_7b_and_67b_settings(layers, width, lr, batch_seqs):
    # DeepSeek LLM Table 2: 7B (30 layers, d 4096) lr 4.2e-4, batch 2304 x 4096; 67B (95, 8192) lr 3.2e-4,
    # batch 4608 x 4096; both trained on 2T tokens. C = M * D with M from sec. 3.2.
    C = scaling.deepseek_m(layers, width, 4096) * 2e12
    assert scaling.lr_opt(C) == pytest.approx(lr, rel=0.03)
    assert scaling.batch_opt(C) == pytest.approx(batch_seqs * 4096, rel=0.10)


def test_law_values_and_consistency():
    C = 1e20
    assert scaling.lr_opt(C) == pytest.approx(0.3118 * 10**-2.5)
    assert scaling.batch_opt(C) == pytest.approx(0.2920 * 10 ** (20 * 0.3271))
    assert scaling.m_opt(C) == pytest.approx(0.1715 * 10 ** (20 * 0.5243))
    assert scaling.d_opt(C) == pytest.approx(5.8316 * 10 ** (20 * 0.4757))
    for C in (1e17, 1e20, 1e24):  # M_opt * D_opt = C (M_base * D_base = 1.0001, a + b = 1)
        assert scaling.m_opt(C) * scaling.d_opt(C) == pytest.approx(C, rel=1e-3)
    assert scaling.in_fitted_range(1e18) and not scaling.in_fitted_range(1e12)


def test_hparams_for_fixed_steps_solve_the_batch_law():
    M, steps, seq = 3e7, 500, 256
    hp = scaling.hparams_for_steps(M, steps, seq)
    B = hp.batch_tokens
    assert B == pytest.approx(scaling.batch_opt(M * steps * B), rel=1e-9)  # B = B_opt(C) with C = M * S * B
    assert hp.batch_seqs == round(B / seq) and hp.compute == M * steps * hp.batch_seqs * seq
    assert hp.lr == min(scaling.lr_opt(hp.compute), scaling.LR_MAX) and not hp.in_range


def test_pretrain_defaults_come_from_the_laws():
    tiny = ModelConfig.from_name("tiny")
    lr, batch, hp = scaling.pretrain_hparams(tiny, 200, 128, grad_accum=2)
    assert lr == hp.lr <= scaling.LR_MAX and batch == math.ceil(hp.batch_seqs / 2)
    assert hp.lr_law > hp.lr  # tiny CPU budgets lie ~6 decades below the fitted range: the cap binds


@pytest.mark.parametrize("target, seq", [(2e6, 128), (5e8, 4096), (2e10, 4096)])
def test_search_config_hits_target(target, seq):
    cand = scaling.search_config(target, seq_len=seq, vocab_size=4096)
    assert abs(cand.M / target - 1) <= 0.10  # the stated tolerance
    assert cand.M == scaling.model_scale(cand.config, seq)  # the extrapolation in depth is exact
    aspect = cand.config.hidden_size / cand.config.num_hidden_layers
    assert 16 <= aspect <= 256


def test_search_below_the_smallest_shape_returns_it():
    cand = scaling.search_config(1.0, seq_len=128)
    assert (cand.config.hidden_size, cand.config.num_hidden_layers) == (scaling.WIDTHS[0], 2) and cand.miss > 1


def test_power_law_fit_recovers_exponent():
    x = np.geomspace(1e12, 1e20, 7)
    rng = np.random.default_rng(0)
    y = 0.1715 * x**0.5243 * np.exp(rng.normal(0, 0.01, x.size))
    coef, exp = scaling.fit_power_law(x, y)
    assert exp == pytest.approx(0.5243, abs=0.005) and coef == pytest.approx(0.1715, rel=0.15)


def test_parabola_and_isoflop_fit_recover_known_optimum():
    # Synthetic IsoFLOP profiles: loss = 0.05 (ln M - ln M*(C))^2 + 3 - 0.1 ln(C / 1e12), M* = 0.05 C^0.6.
    points = []
    for C in (1e12, 1e13, 1e14):
        m_star = 0.05 * C**0.6
        for M in m_star * np.geomspace(0.2, 3.0, 5):
            points.append({"budget": C, "M": M, "loss": 0.05 * math.log(M / m_star) ** 2 + 3 - 0.1 * math.log(C / 1e12)})
    fit = scaling.fit_isoflop(points)
    assert fit.skipped == [] and len(fit.budgets) == 3
    for C, m in zip(fit.budgets, fit.m_opt):
        assert m == pytest.approx(0.05 * C**0.6, rel=1e-6)
    assert fit.m_law[1] == pytest.approx(0.6, abs=1e-6) and fit.d_law[1] == pytest.approx(0.4, abs=1e-6)
    assert fit.m_law[0] == pytest.approx(0.05, rel=1e-4)
    # A budget whose loss only falls with M (no minimum inside) is left out, not extrapolated.
    points += [{"budget": 1e15, "M": M, "loss": 5 - 0.01 * math.log(M)} for M in (1e6, 1e7, 1e8)]
    assert scaling.fit_isoflop(points).skipped == [1e15]


def test_loss_surface_fit_recovers_known_exponents_and_flags_a_wall():
    """Chinchilla's approach 3 on points from a known L(M, D): exponents, M_opt(C) and the fit error come back."""
    true = scaling.LossSurface(1.8, 400.0, 0.34, 2000.0, 0.28, 0.0)
    points = [{"budget": C, "M": M, "loss": float(true(M, C / M))}
              for C in (1e15, 1e16, 1e17) for M in np.geomspace(1e6, 1e9, 5)]
    fit = scaling.fit_loss_surface(points)
    assert (fit.alpha, fit.beta) == (pytest.approx(0.34, abs=1e-4), pytest.approx(0.28, abs=1e-4))
    assert fit.m_exp == pytest.approx(0.28 / 0.62, abs=1e-4) and fit.identified and fit.rms_rel_error < 1e-6
    assert fit.m_opt(1e16) == pytest.approx(true.m_opt(1e16), rel=1e-3)
    # m_opt is the minimum of L along the IsoFLOP line
    Ms = np.geomspace(1e5, 1e10, 20001)
    assert true.m_opt(1e16) == pytest.approx(Ms[np.argmin(true(Ms, 1e16 / Ms))], rel=2e-3)
    # The session-3 CPU sweep (dev/LOG.md): the best size is the smallest or next-smallest at every budget, so
    # the M term becomes a wall (alpha runs away) and the fit says so.
    sizes = (73728, 140544, 279552, 611328, 1276416)
    sweep = {1e11: (sizes, (5.1936, 5.2769, 5.6690, 6.0458, 6.5751)),
             3e11: (sizes, (4.8393, 4.7393, 5.1989, 5.4927, 5.8070)),
             1e12: ((73728, 180864, 364032, 611328, 1276416), (4.4474, 4.4784, 4.7713, 5.0356, 5.1168))}
    walls = [{"budget": C, "M": M, "loss": loss} for C, (Ms, losses) in sweep.items() for M, loss in zip(Ms, losses)]
    wall = scaling.fit_loss_surface(walls)
    assert not wall.identified and wall.alpha > wall.MAX_EXPONENT and wall.rms_rel_error < 0.03
    with pytest.raises(ValueError, match="at least 5 points"):
        scaling.fit_loss_surface(points[:4])


def test_plan_cli_json(capsys):
    assert plan_stage.main(["--compute", "1e20", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("compute", "M_opt", "D_opt", "model", "tokens", "lr", "batch_sequences", "steps", "hours", "mfu"):
        assert key in plan
    assert plan["M_opt"] == pytest.approx(scaling.m_opt(1e20)) and plan["in_fitted_range"]
    assert abs(plan["model"]["M_over_M_opt"] - 1) <= 0.10
    assert plan["model"]["M"] * plan["tokens"] == pytest.approx(1e20)
    assert plan["lr"] == pytest.approx(scaling.lr_opt(1e20))
    assert plan["batch_sequences"] == round(scaling.batch_opt(1e20) / 4096)
    # hours = hardware FLOPs / (peak * mfu): the count MFU uses, not M
    hw = plan["model"]["hardware_flops_per_token"] * plan["tokens"]
    assert plan["hours"] == pytest.approx(hw / (989e12 * plan_stage.DEFAULT_MFU) / 3600)


def test_plan_cli_hours_text_and_from_run(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "mfu": 0.3}) + "\n" for i in range(20)))
    assert plan_stage.main(["--hours", "24", "--gpus", "8", "--from-run", str(tmp_path),
                            "--save-config", str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert "M_opt" in out and "lr" in out and "wall time              24 h on 8 x h100" in out
    assert "MFU 0.300 (measured in" in out
    assert ModelConfig.load(tmp_path / "config.json").is_moe
    assert plan_stage.main(["--compute", "-1"]) == 2


def test_scaling_stage_end_to_end_and_resume(tmp_path, capsys):
    import os
    import shutil
    from pathlib import Path

    from nanoseek.stages import scaling as scaling_stage

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(os.__file__).parent
    for name in ("bisect.py", "heapq.py", "string.py", "textwrap.py", "json/decoder.py", "json/encoder.py"):
        shutil.copy(stdlib / name, corpus / name.replace("/", "_"))
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--data", str(corpus), "--vocab-size", "384", "--seq-len", "32",
            "--budgets", "6e8", "1.2e9", "--sizes", "3", "--span", "2", "--eval-batches", "2", "--threads", "1"]
    assert scaling_stage.main(argv) == 0
    results = sorted(run.glob("points/*/result.json"))
    assert len(results) == 6
    r = json.loads(results[0].read_text())
    assert r["compute"] == pytest.approx(r["budget"], rel=0.25) and math.isfinite(r["loss"])
    summary = json.loads((run / "scaling.json").read_text())
    assert len(summary["points"]) == 6 and summary["fit"]["paper"]["m_law"] == [0.1715, 0.5243]
    assert {"alpha", "beta", "m_exp", "identified"} <= set(summary["surface"])
    assert (run / "plots" / "isoflop.png").stat().st_size > 0
    capsys.readouterr()
    mtimes = [p.stat().st_mtime for p in results]
    assert scaling_stage.main(argv) == 0  # again: every point is skipped, only the fits are redone
    assert [p.stat().st_mtime for p in results] == mtimes
    assert "6 points" in capsys.readouterr().out
