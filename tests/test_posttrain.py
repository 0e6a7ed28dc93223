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
