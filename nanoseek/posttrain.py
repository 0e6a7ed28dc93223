"""Post-training library shared by the sft, dpo, grpo, distill and eval stages: loading a model to start from,
chat data with loss masks and packing, resumable example and rollout streams, GRPO rollouts, task evaluation by
decoding, and rejection sampling (DeepSeek-R1 sec. 2.3.3).

Shape legend: B rows (sequences)   T tokens per row (inputs; targets are the next tokens)   V vocab
              P prompts per rollout batch   G completions per prompt (the GRPO group)

Every batch source here is an iterator with state_dict()/load_state_dict() holding its exact position (and for
rollouts the seed and, mid-way through mu updates, the rollout batch itself), so `Trainer` resumes exactly.
Randomness comes from the position alone: example i of a stream, and the sampling seed of completion j of
rollout batch k, are pure functions of (seed, i) or (seed, k, j); no hidden RNG is consumed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import tasks
from .data import DataError, iter_jsonl
from .engine import Engine, SamplingParams
from .engine import load as load_model_and_tokenizer
from .losses import (cckd_loss, dpo_loss, group_advantages, grpo_loss, logit_distill_loss, sequence_logprobs,
                     token_entropy, token_logprobs)
from .model import Transformer
from .optim import SCHEDULES
from .tokenizer import Tokenizer
from .trainer import TrainConfig

IGNORE = -100  # target id that no loss sees (torch cross_entropy's ignore_index)


# ------------------------------------------------------------------------------------------------ starting point
def load_init(path, tokenizer=None) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) from `--init`: a run dir (its checkpoints/latest -> model/, and its tokenizer/) or an
    HF-format folder (the tokenizer given, or found in the folder or a `tokenizer/` beside it)."""
    path = Path(path)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():  # a run dir: its own config.json is the run's, not a model's, so look here first
        path = path / "checkpoints" / latest.read_text().strip() / "model"
    try:
        model, tok = load_model_and_tokenizer(path, tokenizer=tokenizer)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    return model, tok


def save_tokenizer(tok: Tokenizer, run_dir: Path) -> None:
    """The run dir carries its tokenizer, so it can be the --init of the next stage."""
    dest = Path(run_dir) / "tokenizer"
    if not (dest / "tokenizer.json").is_file() or Tokenizer.load(dest).fingerprint() != tok.fingerprint():
        tok.save(dest)


# ------------------------------------------------------------------------------------------------ JSONL inputs
def read_jsonl(path, check: Callable[[dict], object], example: str) -> list:
    """check(row) for every non-blank line (data.iter_jsonl); a line that is not a JSON object, or that check
    rejects with ValueError, is a DataError naming the file and the line."""
    out = []
    for lineno, row in iter_jsonl(path, example=example):
        try:
            out.append(check(row))
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
    if not out:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return out


def check_messages(messages, need_assistant: bool = True) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f'message {i}: "role" must be system, user or assistant')
        if not isinstance(m.get("content"), str):
            raise ValueError(f'message {i}: "content" must be a string')
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: SFT trains only on assistant turns, so this line teaches nothing")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_chat_jsonl(path) -> list[list[dict]]:
    """SFT conversations, one {"messages": [{"role", "content"}, ...]} per line."""
    return read_jsonl(path, lambda row: check_messages(row.get("messages")),
                      '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')


def check_pair(row: dict) -> dict:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = check_messages(prompt, need_assistant=False) if prompt else None
    if prompt is None:
        raise ValueError('"prompt" must be a non-empty string or a list of messages')
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise ValueError(f'"{key}" must be a non-empty string (the assistant reply)')
    return {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]}


def read_pairs_jsonl(path) -> list[dict]:
    """DPO preference pairs, one {"prompt": str or messages, "chosen": str, "rejected": str} per line."""
    return read_jsonl(path, check_pair, '{"prompt": "...", "chosen": "...", "rejected": "..."}')


def write_jsonl(path, rows: list[dict]) -> None:
    """Atomic: a crash leaves the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ example streams
def seed_of(*parts) -> int:
    """A 63-bit seed from any parts (sha256, so the same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class ExampleStream:
    """Item i of an endless, reproducible stream: a finite list in a fresh seeded order each epoch, or
    `make(rng)` for generated items (rng seeded by (seed, i))."""

    def __init__(self, items: list | None = None, make: Callable[[random.Random], object] | None = None,
                 seed: int = 0, name: str = ""):
        if (items is None) == (make is None):
            raise ValueError("give either items or make")
        self.items, self.make, self.seed, self.name = items, make, seed, name
        self._order: tuple[int, list[int]] | None = None

    def __getitem__(self, i: int):
        if self.make is not None:
            return self.make(random.Random(seed_of(self.seed, i)))
        epoch, k = divmod(i, len(self.items))
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.items)))
            random.Random(seed_of(self.seed, "epoch", epoch)).shuffle(order)
            self._order = (epoch, order)
        return self.items[self._order[1][k]]


def task_sft_stream(task: tasks.Task, seed: int, system_prompt: str = tasks.DEFAULT_SYSTEM) -> ExampleStream:
    """Generated problems with their worked solutions as the assistant turn (tasks.sft_example)."""
    return ExampleStream(make=lambda rng: tasks.sft_example(task.sample(rng, 1)[0], system_prompt), seed=seed,
                         name=f"task:{task.name}:{task.difficulty}")


class PackedSFTBatches:
    """(inputs, targets) [B, T] from chat examples rendered by `Tokenizer.render_chat`, packed: each row takes
    whole examples while they fit, then padding; targets are the next token where it is assistant content or
    the EOS closing an assistant turn, IGNORE elsewhere (and on padding). An example longer than a row is cut.
    Attention is causal over the whole row (no per-example mask), as in nanochat's SFT packing; every example
    starts with BOS."""

    def __init__(self, stream: ExampleStream, tok: Tokenizer, batch_size: int, seq_len: int):
        self.stream, self.tok, self.batch_size, self.seq_len = stream, tok, batch_size, seq_len
        self.next_example = 0
        self.truncated = 0
        self._cache: dict[int, tuple[list[int], list[int]]] = {}

    def _encoded(self, i: int) -> tuple[list[int], list[int]]:
        if i not in self._cache:
            if len(self._cache) > 4 * self.batch_size:
                self._cache.clear()
            self._cache[i] = self.tok.render_chat(self.stream[i])
        return self._cache[i]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        L = self.seq_len + 1
        ids_BL = torch.full((self.batch_size, L), self.tok.pad_id, dtype=torch.long)
        keep_BL = torch.zeros((self.batch_size, L), dtype=torch.bool)
        for b in range(self.batch_size):
            filled = 0
            while True:
                ids, mask = self._encoded(self.next_example)
                if filled and filled + len(ids) > L:
                    break  # starts the next row
                if len(ids) > L:
                    ids, mask = ids[:L], mask[:L]
                    self.truncated += 1
                ids_BL[b, filled:filled + len(ids)] = torch.tensor(ids)
                keep_BL[b, filled:filled + len(ids)] = torch.tensor(mask, dtype=torch.bool)
                filled += len(ids)
                self.next_example += 1
                if filled == L:
                    break
        targets_BT = ids_BL[:, 1:].masked_fill(~keep_BL[:, 1:], IGNORE)
        return ids_BL[:, :-1].contiguous(), targets_BT.contiguous()

    def state_dict(self) -> dict:
        return {"next_example": self.next_example, "seed": self.stream.seed, "stream": self.stream.name}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.stream.seed), ("stream", self.stream.name)):
            if state[key] != mine:
                raise ValueError(f"batch state is for {key}={state[key]!r}, this run has {mine!r}; resume with "
                                 f"the same data and seed")
        self.next_example = int(state["next_example"])


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ generation
@dataclass
class Completion:
    ids: list[int]  # generated tokens, with the closing EOS when the model stopped by itself
    text: str  # decoded, without the EOS
    truncated: bool  # hit max_new_tokens before EOS


@contextlib.contextmanager
def side_effect_free(model: Transformer):
    """Inference inside a training run: keep the train/eval mode, and leave the MoE load counters (which feed
    the bias update of the next optimizer step) and pending balance losses as they were."""
    was_training = model.training
    saved = [(m, m.expert_load.clone(), m.aux_loss) for m in model.moe_layers()]
    try:
        yield
    finally:
        model.train(was_training)
        for m, load, aux in saved:
            m.expert_load.copy_(load)
            m.aux_loss = aux


def generate(model: Transformer, tok: Tokenizer, prompts: list[list[int]], *, max_new_tokens: int | list[int],
             temperature: float = 0.0, top_p: float = 1.0, seeds: list[int] | None = None,
             max_batch: int = 64) -> list[Completion]:
    """Completions of `prompts` with nanoseek.engine (latent cache, absorbed MLA decode, stop at EOS).
    temperature 0 is greedy; otherwise completion i samples with its own generator seeded by seeds[i], so a
    completion does not depend on what else shares its batch. max_new_tokens: one limit, or one per prompt."""
    if temperature > 0 and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt (reproducible rollouts)")
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(prompts)} prompts; give one, or one per prompt")
    with side_effect_free(model):
        engine = Engine(model, None, max_batch=max(1, min(max_batch, len(prompts))),
                        max_len=max(len(p) + m for p, m in zip(prompts, limits)))
        engine.eos_id = tok.eos_id
        params = [SamplingParams(max_tokens=limits[i], temperature=temperature, top_p=top_p,
                                 seed=None if temperature == 0 else seeds[i]) for i in range(len(prompts))]
        requests = engine.generate(prompts, params)
    out = []
    for r in requests:
        stopped = r.finish_reason == "stop"
        out.append(Completion(r.output + ([tok.eos_id] if stopped else []), tok.decode(r.output), not stopped))
    return out


def prompt_ids(tok: Tokenizer, problem: tasks.Problem, system_prompt: str = tasks.DEFAULT_SYSTEM) -> list[int]:
    return tok.render_chat(tasks.to_messages(problem, system_prompt), add_generation_prompt=True)[0]


# ------------------------------------------------------------------------------------------------ evaluation
def eval_problems(task: tasks.Task, n: int, seed: int) -> list[tasks.Problem]:
    """The n problems an evaluation with this seed uses (draws with replacement from the task's split)."""
    return task.sample(random.Random(seed_of(seed, "eval", task.name)), n)


@torch.no_grad()
def evaluate_task(model: Transformer, tok: Tokenizer, task: tasks.Task, n: int, *, seed: int = 0,
                  max_new_tokens: int = 256, samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                  system_prompt: str = tasks.DEFAULT_SYSTEM, examples: int = 0) -> dict:
    """Accuracy on n problems of the task's split (draws with replacement, deterministic in seed), by decoding.

    samples == 1: greedy decoding; accuracy with a Wilson 95% interval. samples == k > 1: k samples per problem
    at `temperature`; pass@1 (mean over samples, Wilson interval on the first sample of each problem, which are
    independent) and unbiased pass@j for j = 1, 2, 4, ..., k (Chen et al. 2021)."""
    problems = eval_problems(task, n, seed)
    prompts = [prompt_ids(tok, p, system_prompt) for p in problems for _ in range(samples)]
    greedy = samples == 1
    seeds = None if greedy else [seed_of(seed, "eval-sample", i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    completions = generate(model, tok, prompts, max_new_tokens=max_new_tokens,
                           temperature=0.0 if greedy else temperature, top_p=top_p, seeds=seeds)
    seconds = time.perf_counter() - t0
    acc = [tasks.accuracy_reward(problems[i // samples], c.text) for i, c in enumerate(completions)]
    fmt = [tasks.format_reward(c.text) for c in completions]
    first = [acc[i * samples] for i in range(n)]
    lo, hi = tasks.wilson_interval(int(sum(first)), n)
    out = {"n": n, "samples": samples, "accuracy": sum(acc) / len(acc), "accuracy_ci95": [lo, hi],
           "format": sum(fmt) / len(fmt), "mean_length": sum(len(c.ids) for c in completions) / len(completions),
           "truncated": sum(c.truncated for c in completions) / len(completions),
           "decode": "greedy" if greedy else f"sampled T={temperature} top_p={top_p}",
           "tokens_per_s": sum(len(c.ids) for c in completions) / max(seconds, 1e-9)}
    if not greedy:
        correct = [int(sum(acc[i * samples:(i + 1) * samples])) for i in range(n)]
        ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= samples} | {samples})
        out["pass_at_k"] = {str(k): sum(tasks.pass_at_k(samples, c, k) for c in correct) / n for k in ks}
        lo_k, hi_k = tasks.wilson_interval(sum(c > 0 for c in correct), n)
        out["pass_at_k_ci95"] = {str(samples): [lo_k, hi_k]}
    if examples:
        out["examples"] = [{"prompt": problems[i // samples].prompt, "answer": problems[i // samples].answer,
                            "completion": completions[i].text, "correct": bool(acc[i])}
                           for i in range(min(examples, len(completions)))]
    return out


def task_eval_fn(tok: Tokenizer, task: tasks.Task, n: int, *, seed: int, max_new_tokens: int,
                 system_prompt: str = tasks.DEFAULT_SYSTEM):
    """Trainer eval_fn: held-out accuracy by greedy decoding, as eval/* metrics."""
    def eval_fn(model: Transformer) -> dict:
        r = evaluate_task(model, tok, task, n, seed=seed, max_new_tokens=max_new_tokens, system_prompt=system_prompt)
        return {"eval/accuracy": r["accuracy"], "eval/accuracy_low": r["accuracy_ci95"][0],
                "eval/accuracy_high": r["accuracy_ci95"][1], "eval/format": r["format"],
                "eval/mean_length": r["mean_length"], "eval/n": n}
    return eval_fn


# ------------------------------------------------------------------------------------------------ rejection sampling
def keep_verified(problem: tasks.Problem, texts: list[str]) -> list[str]:
    """The completions worth training on (R1 sec. 2.3.3): correct answer, exact format, each text once."""
    kept, seen = [], set()
    for text in texts:
        if text in seen:
            continue
        seen.add(text)
        if tasks.format_reward(text) == 1.0 and tasks.accuracy_reward(problem, text) == 1.0:
            kept.append(text)
    return kept


def sft_row(problem: tasks.Problem, text: str, system_prompt: str = tasks.DEFAULT_SYSTEM) -> dict:
    """A verified completion as an SFT line: {"messages": [system, user, assistant], "task", "answer"}."""
    return {"messages": tasks.to_messages(problem, system_prompt) + [{"role": "assistant", "content": text}],
            "task": problem.task, "answer": problem.answer}


def rejection_sample(model: Transformer, tok: Tokenizer, problems: list[tasks.Problem], samples: int, *,
                     seed: int, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                     system_prompt: str = tasks.DEFAULT_SYSTEM, log: Callable[[str], None] = print) -> list[dict]:
    """`samples` completions per problem, kept if verified and new (per problem key); SFT rows
    {"messages": [...], "task", "answer"} ready for write_jsonl / read_chat_jsonl."""
    rows, seen = [], set()
    chunk = max(1, 256 // samples)  # problems per generate call
    t0, total = time.perf_counter(), 0
    for start in range(0, len(problems), chunk):
        part = problems[start:start + chunk]
        prompts = [prompt_ids(tok, p, system_prompt) for p in part for _ in range(samples)]
        seeds = [seed_of(seed, "rejection", start * samples + j) for j in range(len(prompts))]
        completions = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seeds=seeds)
        total += len(completions)
        for i, p in enumerate(part):
            for text in keep_verified(p, [c.text for c in completions[i * samples:(i + 1) * samples]]):
                if (p.key, text) not in seen:
                    seen.add((p.key, text))
                    rows.append(sft_row(p, text, system_prompt))
    log(f"rejection sampling: kept {len(rows)} of {total} completions ({len(problems)} prompts x {samples}) in "
        f"{time.perf_counter() - t0:.0f}s")
    return rows


# ------------------------------------------------------------------------------------------------ GRPO rollouts
def pad_rows(seqs: list[list[int]], pad_id: int) -> Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> dict:
    """Rows prompt + completion, right-padded: input_ids [B, T], targets [B, T] (the completion tokens, IGNORE
    elsewhere) and mask [B, T] (True where the target is a completion token)."""
    ids_BL = pad_rows([p + c for p, c in zip(prompts, completions)], pad_id)
    keep_BL = torch.zeros_like(ids_BL, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        keep_BL[i, len(p):len(p) + len(c)] = True
    targets_BT = ids_BL[:, 1:].masked_fill(~keep_BL[:, 1:], IGNORE)
    return {"input_ids": ids_BL[:, :-1].contiguous(), "targets": targets_BT.contiguous(), "mask": keep_BL[:, 1:]}


def take_balance_loss(model: Transformer) -> Tensor | float:
    """The MoE sequence-balance losses of the last forward (train mode), which `model(ids)` without targets
    leaves on the layers; consumed here so a loss can include them as `model(ids, targets=...)` does."""
    aux = [m.aux_loss for m in model.moe_layers() if m.aux_loss is not None]
    for m in model.moe_layers():
        m.aux_loss = None
    return torch.stack(aux).sum() if aux else 0.0


@torch.no_grad()
def completion_logprobs(model: Transformer, batch: dict) -> Tensor:
    with side_effect_free(model):
        return token_logprobs(model(batch["input_ids"]), batch["targets"])


def with_components(reward_fn: Callable, sink: list) -> Callable:
    """reward_fn that also records the components of a (total, components) result in `sink`."""
    @functools.wraps(reward_fn)
    def scored(problem, completion):
        r = reward_fn(problem, completion)
        sink.append(r[1] if isinstance(r, tuple) else {})
        return r
    return scored


class RolloutBatches:
    """GRPO batches: P problems of the task, G completions each from the current policy (temperature 1 as in
    R1-Zero), rule rewards, group-normalised advantages; each rollout batch is handed out `mu` times (mu policy
    updates per rollout, DeepSeekMath Alg. 1), with the rollout policy's log-probs as old_logp when mu > 1.

    Resumable: problems and sampling seeds are functions of (seed, rollout index). A rollout batch that is
    part-way through its mu updates is stored in the state (as lists, since the trainer also uses the state as
    a JSON key), because the policy that sampled it no longer exists after a crash."""

    def __init__(self, policy: Transformer, tok: Tokenizer, task: tasks.Task, *, prompts_per_step: int,
                 group_size: int, max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                 mu: int = 1, reference: Transformer | None = None, reward_fn: Callable = tasks.combined_reward,
                 scale_std: bool = True, system_prompt: str = tasks.DEFAULT_SYSTEM):
        if group_size < 2:
            raise ValueError("group_size must be >= 2: GRPO compares completions of the same prompt")
        if mu < 1:
            raise ValueError(f"mu (updates per rollout batch) must be >= 1, got {mu}")
        self.policy, self.tok, self.task, self.reference, self.reward_fn = policy, tok, task, reference, reward_fn
        self.P, self.G, self.max_new_tokens, self.seed = prompts_per_step, group_size, max_new_tokens, seed
        self.temperature, self.top_p, self.mu, self.scale_std = temperature, top_p, mu, scale_std
        self.system_prompt = system_prompt
        self.index = 0  # next rollout batch to generate
        self.uses = 0  # times the current batch was handed out
        self.current: dict | None = None
        self._handed_at: float | None = None
        self._handed_tokens = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        now = time.perf_counter()
        train_s = now - self._handed_at if self._handed_at is not None else None
        if self.current is None or self.uses >= self.mu:
            self.current, self.uses = self.rollout(self.index), 0
            self.index += 1
        else:
            self.current["stats"]["rollout/seconds"] = 0.0
        self.uses += 1
        batch = self.current
        if train_s is not None:
            # The previous step's update (forward, backward, optimizer, logging): the trainer runs backward
            # after the loss function returns, so this is where its duration can be seen.
            batch["stats"]["train/tokens_per_s"] = self._handed_tokens / train_s
        else:
            batch["stats"].pop("train/tokens_per_s", None)
        self._handed_at, self._handed_tokens = time.perf_counter(), batch["input_ids"].numel()
        return batch

    def rollout(self, index: int) -> dict:
        t0 = time.perf_counter()
        problems = self.task.sample(random.Random(seed_of(self.seed, "rollout", index)), self.P)
        group_problems = [p for p in problems for _ in range(self.G)]
        prompts = [prompt_ids(self.tok, p, self.system_prompt) for p in group_problems]
        seeds = [seed_of(self.seed, "sample", index, j) for j in range(len(prompts))]
        completions = generate(self.policy, self.tok, prompts, max_new_tokens=self.max_new_tokens,
                               temperature=self.temperature, top_p=self.top_p, seeds=seeds)
        gen_s = time.perf_counter() - t0
        components: list[dict] = []
        rewards = tasks.score_completions(group_problems, [c.text for c in completions],
                                          with_components(self.reward_fn, components))
        batch = completion_batch(prompts, [c.ids for c in completions], self.tok.pad_id)
        rewards_B = torch.tensor(rewards, dtype=torch.float32)
        batch["advantages"] = advantages_B = group_advantages(rewards_B, self.G, scale_std=self.scale_std)
        if self.mu > 1:
            batch["old_logp"] = completion_logprobs(self.policy, batch)
        if self.reference is not None:
            batch["ref_logp"] = completion_logprobs(self.reference, batch)
        lengths = [len(c.ids) for c in completions]
        generated = sum(lengths)
        stats = {"reward/mean": float(rewards_B.mean()), "reward/std": float(rewards_B.std()),
                 "rollout/zero_variance_groups": float((rewards_B.view(-1, self.G).std(1) == 0).float().mean()),
                 "rollout/length_mean": generated / len(lengths), "rollout/length_max": float(max(lengths)),
                 "rollout/truncated": sum(c.truncated for c in completions) / len(completions),
                 "rollout/seconds": time.perf_counter() - t0, "rollout/tokens_per_s": generated / max(gen_s, 1e-9),
                 "rollout/advantage_abs": float(advantages_B.abs().mean())}
        for key in sorted({k for c in components for k in c}):
            stats[f"reward/{key}"] = sum(c.get(key, 0.0) for c in components) / len(components)
        if "reward/accuracy" in stats:
            stats["accuracy"] = stats["reward/accuracy"]
        batch["stats"] = stats
        return batch

    _TENSORS = {"input_ids": torch.long, "targets": torch.long, "mask": torch.bool, "advantages": torch.float32,
                "old_logp": torch.float32, "ref_logp": torch.float32}

    def state_dict(self) -> dict:
        state = {"index": self.index, "uses": self.uses, "seed": self.seed, "task": self.task.name,
                 "G": self.G, "P": self.P, "mu": self.mu, "current": None}
        if self.current is not None and self.uses < self.mu:
            cur = self.current
            state["current"] = {**{k: cur[k].tolist() for k in self._TENSORS if k in cur},
                                "stats": cur["stats"]}
        return state

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "task": self.task.name, "G": self.G, "P": self.P, "mu": self.mu}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"rollout state is for {key}={state[key]!r}, this run has {value!r}; resume with "
                                 f"the same options")
        self.index, self.uses = int(state["index"]), int(state["uses"])
        cur = state["current"]
        self.current = None if cur is None else {
            **{k: torch.tensor(cur[k], dtype=dt) for k, dt in self._TENSORS.items() if k in cur},
            "stats": dict(cur["stats"])}
        self._handed_at = None


def grpo_loss_fn(*, loss_type: str = "grpo", epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.001, max_new_tokens: int | None = None):
    """Trainer loss_fn on RolloutBatches batches: losses.grpo_loss on per-token log-probs of the completions,
    plus the MoE balance term. Logs the loss's stats (clip fractions, ratio, KL), the token entropy and the
    rollout's stats."""
    def loss_fn(model: Transformer, batch: dict, mtp_weight: float) -> tuple[Tensor, dict]:
        logits_BTV = model(batch["input_ids"])
        logp_BT = token_logprobs(logits_BTV, batch["targets"])
        loss, stats = grpo_loss(logp_BT, batch.get("old_logp"), batch.get("ref_logp"), batch["advantages"],
                                batch["mask"], loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high,
                                beta=beta, max_completion_length=max_new_tokens)
        balance = take_balance_loss(model)
        with torch.no_grad():
            mask_BT = batch["mask"].float()
            entropy = (token_entropy(logits_BTV.detach()) * mask_BT).sum() / mask_BT.sum().clamp(min=1)
        out = {f"loss/{k}": v for k, v in stats.items()}
        out["entropy"] = entropy
        out["completion_tokens"] = float(mask_BT.sum())
        if torch.is_tensor(balance):
            out["loss/balance"] = balance.detach()
        out.update(batch["stats"])
        return loss + balance, out
    return loss_fn


# ------------------------------------------------------------------------------------------------ DPO
def pair_batch(tok: Tokenizer, pairs: list[dict], max_len: int) -> dict:
    """2B rows: the chosen replies of B pairs, then the rejected ones, each after its rendered prompt and closed
    by EOS (as an assistant turn is in SFT); completions cut to fit max_len tokens."""
    prompts, completions = [], []
    for side in ("chosen", "rejected"):
        for pair in pairs:
            prompt = tok.render_chat(pair["prompt"], add_generation_prompt=True)[0]
            if len(prompt) >= max_len:
                raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for its reply within "
                                 f"--max-len {max_len}: {tok.decode(prompt)[:80]!r}")
            prompts.append(prompt)
            completions.append((tok.encode(pair[side]) + [tok.eos_id])[:max_len + 1 - len(prompt)])
    return completion_batch(prompts, completions, tok.pad_id)


class PairBatches:
    """DPO batches of `batch_size` preference pairs (pair_batch), in a fresh seeded order each epoch."""

    def __init__(self, stream: ExampleStream, tok: Tokenizer, batch_size: int, max_len: int):
        self.stream, self.tok, self.batch_size, self.max_len = stream, tok, batch_size, max_len
        self.next_example = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        pairs = [self.stream[self.next_example + i] for i in range(self.batch_size)]
        self.next_example += self.batch_size
        return pair_batch(self.tok, pairs, self.max_len)

    state_dict = PackedSFTBatches.state_dict
    load_state_dict = PackedSFTBatches.load_state_dict


def dpo_loss_fn(reference: Transformer, beta: float):
    """Trainer loss_fn on PairBatches batches: losses.dpo_loss on the summed completion log-probs of the policy and
    of the frozen reference (the starting model), plus the MoE balance term."""
    def loss_fn(model: Transformer, batch: dict, mtp_weight: float) -> tuple[Tensor, dict]:
        logp_B = sequence_logprobs(model(batch["input_ids"]), batch["targets"], batch["mask"])
        balance = take_balance_loss(model)
        ref_B = (completion_logprobs(reference, batch) * batch["mask"]).sum(-1)
        n = logp_B.shape[0] // 2
        loss, stats = dpo_loss(logp_B[:n], logp_B[n:], ref_B[:n], ref_B[n:], beta=beta)
        out = {f"dpo/{k}": v for k, v in stats.items()}
        out["dpo/logp_chosen"], out["dpo/logp_rejected"] = logp_B[:n].detach().mean(), logp_B[n:].detach().mean()
        if torch.is_tensor(balance):
            out["loss/balance"] = balance.detach()
        return loss + balance, out
    return loss_fn


# ------------------------------------------------------------------------------------------------ distillation
def distill_loss_fn(teacher: Transformer, *, logit_kd_weight: float = 0.0, temperature: float = 1.0,
                    cckd_weight: float = 0.0):
    """Trainer loss_fn on packed (inputs, targets) trace batches: next-token CE on the teacher's verified traces
    (R1's distilled models are this term alone) + logit_kd_weight * T^2 KL(teacher || student) on the same
    tokens (Hinton et al. 2015) + cckd_weight * the CCKD correlation term on each row's mean final hidden
    state over its trained tokens (Peng et al. 2019). The MTP head is not trained here."""
    def loss_fn(model: Transformer, batch, mtp_weight: float) -> tuple[Tensor, dict]:
        inputs_BT, targets_BT = batch
        logits_BTV, h_BTD = model(inputs_BT, return_hidden=True)
        ce = F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE)
        loss, parts = ce, {"loss/lm": ce.detach()}
        balance = take_balance_loss(model)
        if torch.is_tensor(balance):
            loss, parts["loss/balance"] = loss + balance, balance.detach()
        mask_BT = targets_BT != IGNORE
        with torch.no_grad(), side_effect_free(teacher):
            t_logits_BTV, t_h_BTD = teacher(inputs_BT, return_hidden=True)
        if logit_kd_weight > 0:
            kd = logit_distill_loss(logits_BTV, t_logits_BTV, mask_BT, temperature)
            loss, parts["loss/logit_kd"] = loss + logit_kd_weight * kd, kd.detach()
        if cckd_weight > 0:
            def pooled(norm, h_BTD):
                w_BT1 = mask_BT.unsqueeze(-1).to(h_BTD.dtype)
                return (norm(h_BTD) * w_BT1).sum(1) / w_BT1.sum(1).clamp(min=1)
            cc = cckd_loss(pooled(model.norm, h_BTD), pooled(teacher.norm, t_h_BTD))
            loss, parts["loss/cckd"] = loss + cckd_weight * cc, cc.detach()
        return loss, parts
    return loss_fn


# ------------------------------------------------------------------------------------------------ stage plumbing
SYSTEM_PROMPTS = {"default": tasks.DEFAULT_SYSTEM, "r1-zero": tasks.R1_ZERO_SYSTEM}


def add_system_prompt_arg(p: argparse.ArgumentParser) -> None:
    """--system-prompt, for the stages that build prompts from tasks (resolve with resolve_system_prompt)."""
    p.add_argument("--system-prompt", default="default", metavar="NAME|@FILE|TEXT",
                   help="system turn of every task prompt: 'default' (a 20-token instruction), 'r1-zero' "
                        "(R1-Zero's template), @FILE (the file's text) or the text itself; evaluate with the prompt "
                        "the model was trained with")


def resolve_system_prompt(value: str) -> str:
    """The text --system-prompt names; DataError for an unreadable or empty file or an empty text."""
    if value in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[value]
    if value.startswith("@"):
        try:
            value = Path(value[1:]).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise DataError(f"--system-prompt {value}: cannot read the file ({e.strerror})") from None
    if not value.strip():
        raise DataError(f"--system-prompt is empty; give text, @FILE or one of {sorted(SYSTEM_PROMPTS)}")
    return value


def add_train_args(p: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int | None, warmup: int = 0,
                   schedule: str = "constant", save_every: int = 50, eval_every: int = 50) -> None:
    """Options every post-training stage shares (the loop, checkpoints, logging)."""
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"linear warm-up steps (default {warmup})")
    p.add_argument("--schedule", default=schedule, choices=SCHEDULES, help=f"LR schedule (default {schedule})")
    if batch_size is not None:
        p.add_argument("--batch-size", type=int, default=batch_size, help=f"rows per step (default {batch_size})")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0 disables; default 1)")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="MoE bias update speed (0 disables)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, sampling and any fresh weights")
    p.add_argument("--save-every", type=int, default=save_every, help=f"checkpoint every N steps ({save_every})")
    p.add_argument("--save-minutes", type=float, default=5.0, help="and every M minutes (default 5)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--eval-every", type=int, default=eval_every,
                   help=f"held-out evaluation every N steps and at the end (0: never; default {eval_every})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# Options that may change between runs on one run dir: how long, how often, how verbose.
MAY_CHANGE = ("steps", "save_every", "save_minutes", "keep_last", "eval_every", "eval_n", "threads", "no_progress")


def freeze_mtp(model: Transformer) -> None:
    """For stages whose loss does not use the MTP module (GRPO, DPO, logit distillation, SFT with --mtp-weight 0):
    freeze it, so the optimizer holds only parameters that get gradients. Also needed for resume: loading an
    optimizer state in which some parameters never had a step fails in torch.distributed.checkpoint's
    set_optimizer_state_dict (AdamW.__setstate__ gets {} for their 'step')."""
    model.mtp.requires_grad_(False)


def train_config(args, *, mtp_weight: float = 0.0) -> TrainConfig:
    return TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule, clip=args.clip,
                       bias_gamma=args.bias_gamma, mtp_weight=mtp_weight, mtp_weight_late=mtp_weight,
                       save_every=args.save_every, save_minutes=args.save_minutes, keep_last=args.keep_last,
                       eval_every=args.eval_every or None, progress=not args.no_progress)


def run_config(stage: str, model: Transformer, args) -> dict:
    def plain(v):  # paths as strings, also inside lists (sft's repeatable --data)
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v
    return {"stage": stage, "model": model.config.to_hf_dict(),
            **{k: plain(v) for k, v in vars(args).items() if k != "run_dir"}}
