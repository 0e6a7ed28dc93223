"""Post-training: SFT masks and packing, greedy held-out accuracy, DPO against hand-computed log-probs, GRPO learning
a scripted reward, zero-variance groups, no reference at beta 0, exact GRPO resume after SIGKILL, rejection sampling,
distillation, eval, and bad input. Tiny preset, a tokenizer trained here on a few KB, a few steps each."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig, Transformer, tasks
from nanoseek import posttrain as pt
from nanoseek.hf import read_safetensors
from nanoseek.stages import distill
from nanoseek.losses import dpo_loss
from nanoseek.tokenizer import Tokenizer
from nanoseek.trainer import read_metrics

THREADS = ["--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts = [tasks.DEFAULT_SYSTEM]
    for name in ("addition", "multiplication", "countdown"):
        texts += [p.prompt + " " + tasks.solution(p) for p in tasks.make_task(name).sample(0, 20)]
    d = tmp_path_factory.mktemp("tok") / "tokenizer"
    Tokenizer.train(texts * 2, vocab_size=512).save(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.load(tok_dir)


def tiny(tok, seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512,
                                             **overrides))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory, tok):
    """An HF-format folder with a tokenizer/ beside it, as --init takes it."""
    root = tmp_path_factory.mktemp("init")
    tiny(tok).save_pretrained(root / "model")
    tok.save(root / "tokenizer")
    return root / "model"


def run_stage(name, argv):
    import importlib

    return importlib.import_module(f"nanoseek.stages.{name}").main([str(a) for a in argv])


# ------------------------------------------------------------------------------------------------ SFT
def test_sft_mask_covers_exactly_assistant_tokens(tok):
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 3?"},
              {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n<answer>5</answer>"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]]
    lengths = [len(tok.render_chat(c)[0]) for c in chats]
    batches = pt.PackedSFTBatches(pt.ExampleStream(chats, seed=0), tok, batch_size=1, seq_len=sum(lengths) + 3)
    inputs, targets = next(batches)
    assert inputs.shape == targets.shape == (1, sum(lengths) + 3)
    ids = inputs[0].tolist()
    trained = [t for t in targets[0].tolist() if t != pt.IGNORE]
    # Both conversations fit one row (in the epoch's order); the targets are exactly the assistant replies and the
    # EOS closing each of them, nothing from system/user turns, role tokens or padding.
    order = [0, 1] if ids[1] == tok.role_ids["system"] else [1, 0]
    expected = []
    for i in order:
        for m in chats[i]:
            if m["role"] == "assistant":
                expected += tok.encode(m["content"]) + [tok.eos_id]
    assert trained == expected
    assert ids[lengths[order[0]]] == tok.bos_id  # the second example starts right after the first
    assert targets[0, sum(lengths) - 1:].eq(pt.IGNORE).all()  # padding
    # The position of every trained target is the token before it: targets[t] == row[t + 1].
    row = ids + [0]
    for t, y in enumerate(targets[0].tolist()):
        if y != pt.IGNORE and t + 1 < len(ids):
            assert row[t + 1] == y


def test_sft_packing_resumes_exactly(tok):
    stream = pt.task_sft_stream(tasks.make_task("addition", difficulty=2), seed=3)
    a = pt.PackedSFTBatches(stream, tok, batch_size=2, seq_len=200)
    next(a)
    state = a.state_dict()
    expected = next(a)
    b = pt.PackedSFTBatches(pt.task_sft_stream(tasks.make_task("addition", difficulty=2), seed=3), tok, 2, 200)
    b.load_state_dict(state)
    got = next(b)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@torch.no_grad()
def naive_greedy(model, prompt, n, eos):
    ids = list(prompt)
    for _ in range(n):
        t = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(t)
        if t == eos:
            break
    return ids[len(prompt):]


def test_sft_loss_falls_and_heldout_accuracy_is_greedy_decoding(tmp_path, tok_dir, tok):
    run = tmp_path / "sft"
    rc = run_stage("sft", ["--run-dir", run, "--preset", "tiny", "--tokenizer", tok_dir, "--task", "addition",
                           "--steps", 30, "--seq-len", 192, "--lr", 3e-3, "--eval-every", 30, "--eval-n", 8,
                           "--max-new-tokens", 24, *THREADS])
    assert rc == 0
    rows = read_metrics(run, "sft")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    last = rows[-1]
    assert {"eval/accuracy", "eval/accuracy_low", "eval/accuracy_high", "eval/format"} <= set(last)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # The metric is computed by decoding: the engine's greedy completions equal naive full-recompute argmax.
    model, tok2 = pt.load_init(run)
    model.eval()
    task = tasks.make_task("addition", "eval")
    problems = task.sample(1, 3)
    prompts = [pt.prompt_ids(tok2, p) for p in problems]
    got = pt.generate(model, tok2, prompts, max_new_tokens=24)
    for prompt, c in zip(prompts, got):
        assert c.ids == naive_greedy(model, prompt, 24, tok2.eos_id)
    # ... and evaluate_task scores exactly those completions with tasks.accuracy_reward.
    r = pt.evaluate_task(model, tok2, task, 8, seed=0, max_new_tokens=24, examples=8)
    for ex in r["examples"]:
        p = next(p for p in task.sample(pt.random.Random(pt.seed_of(0, "eval", "addition")), 8)
                 if p.prompt == ex["prompt"])
        assert ex["correct"] == bool(tasks.accuracy_reward(p, ex["completion"]))
    assert r["accuracy"] == sum(ex["correct"] for ex in r["examples"]) / 8


def test_rejection_samples_need_a_task(tmp_path, init_dir):
    rc = run_stage("sft", ["--run-dir", tmp_path / "x", "--init", init_dir, "--data", tmp_path / "none.jsonl",
                           "--rejection-samples", 2, *THREADS])
    assert rc == 2


# ------------------------------------------------------------------------------------------------ GRPO
def digit_share(problem, completion):
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def test_grpo_learns_a_scripted_reward(tmp_path, tok):
    from nanoseek.optim import build_optimizer
    from nanoseek.trainer import Trainer, TrainConfig

    torch.set_num_threads(1)
    model = tiny(tok)
    batches = pt.RolloutBatches(model, tok, tasks.make_task("addition"), prompts_per_step=4, group_size=8,
                                max_new_tokens=8, seed=0, reward_fn=digit_share)
    cfg = TrainConfig(steps=24, lr=1e-2, progress=False, save_every=1000, mtp_weight=0.0)
    Trainer(model, build_optimizer(model, 1e-2, weight_decay=0.0), batches, tmp_path, cfg, stage="grpo",
            loss_fn=pt.grpo_loss_fn(beta=0.0)).fit()
    rows = read_metrics(tmp_path, "grpo")
    reward = [r["reward/mean"] for r in rows]
    # From ~1% digits (chance) to mostly digits within two dozen steps.
    assert sum(reward[:4]) / 4 < 0.1 and sum(reward[-4:]) / 4 > 0.7, reward
    keys = {"reward/mean", "accuracy", "reward/accuracy", "reward/format", "rollout/zero_variance_groups",
            "rollout/length_mean", "rollout/length_max", "rollout/truncated", "entropy", "loss/clip_low",
            "loss/clip_high", "loss/clip_region", "rollout/tokens_per_s", "train/tokens_per_s"}
    assert keys - {"accuracy", "reward/accuracy", "reward/format"} <= set(rows[-1])  # a float reward: no parts


def test_zero_variance_groups_give_zero_gradient(tok):
    model = tiny(tok, aux_loss_alpha=0.0)  # no balance loss: the policy term is the only source of gradient
    for reward_fn, zero in ((lambda p, c: 0.5, True), (digit_share, False)):
        batches = pt.RolloutBatches(model, tok, tasks.make_task("addition"), prompts_per_step=2, group_size=4,
                                    max_new_tokens=12, seed=1, reward_fn=reward_fn)
        batch = next(batches)
        assert (batch["stats"]["rollout/zero_variance_groups"] == 1.0) == zero
        for loss_type in ("grpo", "dapo", "dr_grpo"):
            model.zero_grad(set_to_none=True)
            loss, _ = pt.grpo_loss_fn(beta=0.0, loss_type=loss_type, max_new_tokens=12)(model, batch, 0.0)
            loss.backward()
            norm = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
            assert (norm == 0.0) == zero, (loss_type, norm)


def grpo_argv(run, init_dir, *extra):
    return ["--run-dir", run, "--init", init_dir, "--task", "addition", "--group-size", 4, "--prompts-per-step", 2,
            "--max-new-tokens", 12, "--eval-every", 0, *THREADS, *extra]


def test_beta_zero_keeps_no_reference(tmp_path, init_dir):
    from nanoseek.stages import grpo

    for beta, has_ref in (("0", False), ("0.001", True)):
        parts = grpo.build(grpo.build_parser().parse_args([str(a) for a in grpo_argv(tmp_path, init_dir,
                                                                                     "--beta", beta)]))
        assert (parts["reference"] is not None) == has_ref
        assert (parts["batches"].reference is not None) == has_ref
        assert ("ref_logp" in next(parts["batches"])) == has_ref


def test_grpo_stage_logs_every_metric(tmp_path, init_dir):
    run = tmp_path / "g"
    assert run_stage("grpo", grpo_argv(run, init_dir, "--steps", 2, "--eval-every", 2, "--eval-n", 4,
                                       "--loss-type", "dapo", "--epsilon-high", "0.28")) == 0
    rows = read_metrics(run, "grpo")
    assert [r["step"] for r in rows] == [1, 2]
    need = {"reward/mean", "reward/accuracy", "reward/format", "accuracy", "rollout/zero_variance_groups",
            "rollout/length_mean", "rollout/length_max", "rollout/truncated", "loss/kl", "entropy",
            "loss/clip_low", "loss/clip_high", "loss/clip_region", "rollout/tokens_per_s", "tokens_per_s",
            "eval/accuracy"}
    assert need <= set(rows[-1]) and "train/tokens_per_s" in rows[-1]


RESUME_SCRIPT = """
import sys, torch
from nanoseek import ModelConfig, Transformer, tasks
from nanoseek import posttrain as pt
from nanoseek.optim import build_optimizer
from nanoseek.tokenizer import Tokenizer
from nanoseek.trainer import Trainer, TrainConfig

def digit_share(problem, completion):
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)

def run(run_dir, tok_dir, steps=6):
    torch.set_num_threads(1)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=512)
    model, reference = Transformer(config), Transformer(config)
    reference.load_state_dict(model.state_dict())
    batches = pt.RolloutBatches(model, tok, tasks.make_task("addition"), prompts_per_step=2, group_size=4,
                                max_new_tokens=8, seed=5, mu=2, reference=reference.eval(), reward_fn=digit_share)
    cfg = TrainConfig(steps=steps, lr=1e-2, progress=False, save_every=3, mtp_weight=0.0)
    pt.freeze_mtp(model)
    Trainer(model, build_optimizer(model, 1e-2), batches, run_dir, cfg, stage="grpo",
            loss_fn=pt.grpo_loss_fn(beta=0.01, max_new_tokens=8)).fit()

if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
"""


def final_weights(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return read_safetensors(run_dir / "checkpoints" / latest / "model")


def test_grpo_resume_after_kill_is_exact(tmp_path, tok_dir):
    """Killed right after the step-3 checkpoint, i.e. half-way through a rollout batch (mu = 2), with a KL
    reference: the rerun ends with the same weights as a run that never stopped."""
    import importlib.util

    script = tmp_path / "grpo_run.py"
    script.write_text(RESUME_SCRIPT)
    spec = importlib.util.spec_from_file_location("grpo_run", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.run(tmp_path / "ref", tok_dir)

    run = tmp_path / "killed"
    env = {**os.environ, "NANOSEEK_FAULT_HANG_AT_STEP": "4", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(run), str(tok_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        latest = run / "checkpoints" / "latest"
        while time.time() < deadline and proc.poll() is None and not (
                latest.exists() and latest.read_text().strip() == "step_000003"
                and len(read_metrics(run, "grpo")) >= 4):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["state"]["data"]["uses"] == 1  # the checkpoint sits inside a rollout batch
    mod.run(run, tok_dir)
    a, b = final_weights(tmp_path / "ref"), final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in read_metrics(run, "grpo")] == list(range(1, 7))


def test_reward_that_raises_names_the_completion(tok):
    def broken(problem, completion):
        raise KeyError("oops")

    batches = pt.RolloutBatches(tiny(tok), tok, tasks.make_task("addition"), prompts_per_step=1, group_size=2,
                                max_new_tokens=6, seed=0, reward_fn=broken)
    with pytest.raises(tasks.RewardError, match=r"broken failed on completion 0 '.*': KeyError"):
        next(batches)


# ------------------------------------------------------------------------------------------------ DPO
PAIRS = [{"prompt": "What is 2 + 3?", "chosen": "<think>2 + 3 = 5</think><answer>5</answer>",
          "rejected": "<think>2 + 3 = 6</think><answer>6</answer>"},
         {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 4 + 4?"}],
          "chosen": "<answer>8</answer>", "rejected": "I do not know"}]


def test_dpo_loss_equals_dpo_loss_on_hand_computed_logprobs(tok):
    policy = tiny(tok, seed=1, aux_loss_alpha=0.0)
    reference = tiny(tok, seed=2).eval()
    pairs = [pt.check_pair(p) for p in PAIRS]
    batch = pt.pair_batch(tok, pairs, max_len=256)
    loss, stats = pt.dpo_loss_fn(reference, beta=0.3)(policy, batch, 0.0)

    @torch.no_grad()
    def by_hand(model, pair, side):
        prompt = tok.render_chat(pair["prompt"], add_generation_prompt=True)[0]
        reply = tok.encode(pair[side]) + [tok.eos_id]
        ids = prompt + reply
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt), len(ids)))

    lp = {(m, s): torch.tensor([by_hand(model, p, s) for p in pairs])
          for m, model in (("pi", policy), ("ref", reference)) for s in ("chosen", "rejected")}
    expected, _ = dpo_loss(lp["pi", "chosen"], lp["pi", "rejected"], lp["ref", "chosen"], lp["ref", "rejected"], 0.3)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert stats["dpo/logp_chosen"].item() == pytest.approx(lp["pi", "chosen"].mean().item(), abs=1e-4)


def test_dpo_stage_runs_from_the_reference(tmp_path, init_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 2))
    run = tmp_path / "dpo"
    assert run_stage("dpo", ["--run-dir", run, "--init", init_dir, "--pairs", pairs, "--steps", 4, "--lr", 1e-3,
                             "--batch-size", 2, *THREADS]) == 0
    rows = read_metrics(run, "dpo")
    # Step 1: policy == reference, so the DPO loss is -log sigmoid(0) = log 2 (+ the tiny MoE balance term).
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=2e-3) and rows[0]["dpo/reward_margin"] == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["dpo/reward_margin"] > 0


# ------------------------------------------------------------------------------------------------ rejection, distill
def oracle(variants):
    """A stand-in for pt.generate: for sample j of a prompt "What is a + b?", variants[j % len] of the worked
    solution ('ok', 'wrong' answer, 'unformatted')."""
    import re

    def fake_generate(model, tok, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seeds=None,
                      max_batch=64):
        out = []
        for j, prompt in enumerate(prompts):
            m = re.search(r"What is (\d+) \+ (\d+)\?", tok.decode(prompt))
            a, b = int(m[1]), int(m[2])
            good = tasks.solution(tasks.Problem("addition", m[0], str(a + b), numbers=(a, b), target=a + b))
            text = {"ok": good, "wrong": good.replace(f"<answer>{a + b}</answer>", f"<answer>{a + b + 1}</answer>"),
                    "unformatted": good.replace("<think>", "")}[variants[j % len(variants)]]
            out.append(pt.Completion(tok.encode(text) + [tok.eos_id], text, False))
        return out
    return fake_generate


def test_rejection_sampling_keeps_verified_deduplicated(tok, monkeypatch):
    monkeypatch.setattr(pt, "generate", oracle(["wrong", "ok", "unformatted", "ok"]))
    problems = tasks.make_task("addition", difficulty=3).sample(0, 5)
    problems.append(problems[0])  # the same problem twice: its trace is still kept once
    rows = pt.rejection_sample(tiny(tok), tok, problems, 4, seed=0, max_new_tokens=64, log=lambda s: None)
    assert len(rows) == 5
    for row, p in zip(rows, problems):
        reply = row["messages"][-1]["content"]
        assert tasks.format_reward(reply) == 1.0 and tasks.accuracy_reward(p, reply) == 1.0
        assert row["messages"][1]["content"] == p.prompt and row["answer"] == p.answer
    assert pt.keep_verified(problems[0], ["x", tasks.solution(problems[0]), tasks.solution(problems[0])]) == [
        tasks.solution(problems[0])]


def test_distill_dense_student_with_logit_kd_and_cckd(tmp_path, init_dir, monkeypatch):
    monkeypatch.setattr(pt, "generate", oracle(["ok", "wrong"]))
    run = tmp_path / "distill"
    rc = run_stage("distill", ["--run-dir", run, "--teacher", init_dir, "--student-preset", "tiny", "--dense",
                               "--task", "addition", "--prompts", 8, "--samples-per-prompt", 2, "--steps", 3,
                               "--seq-len", 192, "--batch-size", 4, "--logit-kd-weight", 0.5, "--temperature", 2.0,
                               "--cckd-weight", 1.0, "--eval-every", 3, "--eval-n", 2, "--max-new-tokens", 8,
                               *THREADS])
    assert rc == 0
    traces = pt.read_chat_jsonl(run / "traces.jsonl")
    assert len(traces) == 8  # one verified trace per problem; the wrong samples were dropped
    rows = read_metrics(run, "distill")
    assert {"loss/lm", "loss/logit_kd", "loss/cckd", "eval/accuracy"} <= set(rows[-1])
    student, _ = pt.load_init(run)
    assert not student.moe_layers() and student.config.n_routed_experts == 0

    # The control: the same (pretrained) student on the same verified problems, reasoning removed.
    def no_teacher_sampling(*a, **k):
        raise AssertionError("--traces must skip the teacher's sampling")

    monkeypatch.setattr(pt, "generate", no_teacher_sampling)
    ctl = tmp_path / "control"
    argv = ["--teacher", init_dir, "--student-init", init_dir, "--task", "addition", "--traces", run / "traces.jsonl",
            "--no-traces", "--steps", 2, "--seq-len", 192, "--batch-size", 4, "--eval-every", 0, *THREADS]
    assert run_stage("distill", ["--run-dir", ctl, *argv]) == 0
    assert not (ctl / "traces.jsonl").exists()
    student, _ = pt.load_init(ctl)
    assert student.config == pt.load_init(init_dir)[0].config  # the pretrained shape, not --student-preset's
    shown = distill.answer_only(traces[0])
    assert shown[:2] == traces[0][:2]
    answer = tasks.extract_answer(traces[0][2]["content"])
    assert "\n" in traces[0][2]["content"].split("</think>")[0].strip()  # the trace had reasoning lines
    assert shown[2]["content"] == f"<think>\n\n</think>\n<answer>{answer}</answer>"
    assert run_stage("distill", ["--run-dir", tmp_path / "bad", *argv[:-len(THREADS)], "--dense", *THREADS]) == 2
    missing = [a if a != run / "traces.jsonl" else tmp_path / "nope.jsonl" for a in argv]
    assert run_stage("distill", ["--run-dir", tmp_path / "bad2", *missing]) == 2
    assert not (tmp_path / "bad2").exists()  # refused before the run dir is made


# ------------------------------------------------------------------------------------------------ system prompt
def test_system_prompt_option_names_file_text_and_bad_values(tmp_path, tok, init_dir, monkeypatch):
    assert pt.resolve_system_prompt("default") == tasks.DEFAULT_SYSTEM
    assert pt.resolve_system_prompt("r1-zero") == tasks.R1_ZERO_SYSTEM
    (tmp_path / "sys.txt").write_text("Answer tersely.\n")
    assert pt.resolve_system_prompt(f"@{tmp_path / 'sys.txt'}") == "Answer tersely."
    for bad in ("@" + str(tmp_path / "missing.txt"), "  "):
        with pytest.raises(pt.DataError, match="--system-prompt"):
            pt.resolve_system_prompt(bad)
    seen = []

    def capture(model, tok_, prompts, **kw):
        seen.extend(tok.decode(p) for p in prompts)
        return [pt.Completion([tok.eos_id], "", False) for _ in prompts]

    monkeypatch.setattr(pt, "generate", capture)
    argv = ["--model", init_dir, "--task", "addition", "--n", 2, "--max-new-tokens", 4, "--run-dir", tmp_path]
    assert run_stage("eval", [*argv, "--system-prompt", "r1-zero"]) == 0
    assert len(seen) == 2 and all(tasks.R1_ZERO_SYSTEM in s for s in seen)
    assert run_stage("eval", [*argv, "--system-prompt", "@" + str(tmp_path / "missing.txt")]) == 2


# ------------------------------------------------------------------------------------------------ eval
def test_eval_stage_writes_accuracy_with_interval_and_pass_at_k(tmp_path, init_dir):
    assert run_stage("eval", ["--model", init_dir, "--task", "addition", "--n", 4, "--samples", 4,
                              "--max-new-tokens", 8, "--run-dir", tmp_path, "--threads", 1]) == 0
    r = json.loads((tmp_path / "eval_addition.json").read_text())
    assert r["n"] == 4 and set(r["pass_at_k"]) == {"1", "2", "4"}
    assert 0 <= r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1] <= 1


# ------------------------------------------------------------------------------------------------ bad input
def test_malformed_jsonl_names_file_and_line(tmp_path, init_dir, capsys):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "\n"
                   '{"messages": [{"role": "user", "content": "hi"}\n')
    assert run_stage("sft", ["--run-dir", tmp_path / "r1", "--init", init_dir, "--data", bad, *THREADS]) == 2
    assert f"{bad}:3: not valid JSON" in capsys.readouterr().err
    no_assistant = tmp_path / "user_only.jsonl"
    no_assistant.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert run_stage("sft", ["--run-dir", tmp_path / "r2", "--init", init_dir, "--data", no_assistant,
                             *THREADS]) == 2
    assert f"{no_assistant}:1: no assistant message" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": "a"}) + "\n")
    assert run_stage("dpo", ["--run-dir", tmp_path / "r3", "--init", init_dir, "--pairs", pairs, *THREADS]) == 2
    assert f'{pairs}:2: "rejected" must be a non-empty string' in capsys.readouterr().err
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r3").exists()  # nothing written on bad input


def test_task_file_without_answers_is_refused(tmp_path, init_dir, capsys):
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"prompt": "What is 1 + 1?", "answer": "2", "reasoning": "1 + 1 = 2"}\n'
                        '{"prompt": "What is the capital of France?"}\n')
    for stage, extra in (("sft", []), ("grpo", [])):
        rc = run_stage(stage, ["--run-dir", tmp_path / stage, "--init", init_dir, "--task", problems, *extra,
                               *THREADS])
        assert rc == 2
        assert f'{problems}:2: missing or empty "answer"' in capsys.readouterr().err
