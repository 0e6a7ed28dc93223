"""`nanoseek grpo`: reinforcement learning with rule-based rewards, the DeepSeek-R1-Zero recipe (GRPO, DeepSeekMath
sec. 4.1; R1 sec. 2.2). Per step: --prompts-per-step problems of --task, --group-size completions each at
temperature 1, reward = accuracy + format (tasks.combined_reward, no neural reward model), advantages = the
reward's z-score within its group, clipped-ratio surrogate plus beta * k3 KL to the starting model.

    nanoseek grpo --run-dir runs_out/grpo --init runs_out/sft --task addition --difficulty 2

R1-Zero used 16 samples x 32 prompts, KL 0.001, temperature 1. --beta 0 keeps no reference model (TRL's default).
--loss-type picks how token losses are averaged: grpo (per sequence, then over sequences), dapo (over all tokens)
or dr_grpo (sum / (batch x max new tokens)); with --no-std-scaling that is Dr. GRPO. --mu > 1 reuses each
rollout batch for mu updates, with the rollout policy's log-probs in the ratio. Running the same command again
resumes exactly: the sampling seeds are part of the batch position, and a rollout batch still in use is saved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import posttrain as pt
from .. import tasks
from ..losses import LOSS_TYPES
from ..optim import build_optimizer
from ..trainer import RunDirError, Trainer, prepare_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek grpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--init", type=Path, required=True, help="starting policy (and reference): a run dir or an HF "
                                                            "folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --init)")
    p.add_argument("--task", required=True, help="addition, multiplication, countdown or FILE.jsonl "
                                                 "({prompt, answer} per line)")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (default 1)")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt, G (default 8)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per rollout batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus sampling (default 1: off)")
    p.add_argument("--beta", type=float, default=0.001, help="k3 KL weight to the starting model (default 0.001 "
                                                             "as R1-Zero; 0 keeps no reference)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clip range (default 0.2)")
    p.add_argument("--epsilon-high", type=float, help="upper clip (DAPO clip-higher; default = --epsilon)")
    p.add_argument("--loss-type", default="grpo", choices=[t for t in LOSS_TYPES if t != "token_mean"],
                   help="token-loss aggregation (default grpo)")
    p.add_argument("--no-std-scaling", action="store_true", help="advantages = reward - group mean (Dr. GRPO)")
    p.add_argument("--mu", type=int, default=1, help="policy updates per rollout batch (default 1)")
    p.add_argument("--format-weight", type=float, default=tasks.DEFAULT_WEIGHTS["format"],
                   help=f"weight of the format reward next to accuracy 1.0 (default {tasks.DEFAULT_WEIGHTS['format']})")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval, greedy (default 200)")
    pt.add_system_prompt_arg(p)
    pt.add_train_args(p, steps=100, lr=5e-5, batch_size=None, save_every=20, eval_every=50)
    return p


def build(args) -> dict:
    """Everything a run needs, from parsed options: policy, tokenizer, reference (None when beta is 0), the
    rollout batch source, the loss and the held-out eval."""
    policy, tok = pt.load_init(args.init, args.tokenizer)
    reference = None
    if args.beta > 0:
        reference, _ = pt.load_init(args.init, args.tokenizer)
        reference.requires_grad_(False)
    weights = {"accuracy": 1.0, "format": args.format_weight}

    def reward(problem, completion):
        return tasks.combined_reward(problem, completion, weights)

    train_task = tasks.make_task(args.task, "train", args.difficulty)
    batches = pt.RolloutBatches(policy, tok, train_task, prompts_per_step=args.prompts_per_step,
                                group_size=args.group_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                temperature=args.temperature, top_p=args.top_p, mu=args.mu, reference=reference,
                                reward_fn=reward, scale_std=not args.no_std_scaling,
                                system_prompt=args.system_prompt)
    loss_fn = pt.grpo_loss_fn(loss_type=args.loss_type, epsilon=args.epsilon, epsilon_high=args.epsilon_high,
                              beta=args.beta, max_new_tokens=args.max_new_tokens)
    eval_fn = pt.task_eval_fn(tok, tasks.make_task(args.task, "eval", args.difficulty), args.eval_n,
                              seed=args.seed, max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt)
    return {"policy": policy, "tok": tok, "reference": reference, "batches": batches, "loss_fn": loss_fn,
            "eval_fn": eval_fn}


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.system_prompt = pt.resolve_system_prompt(args.system_prompt)
        if args.group_size < 2:
            raise ValueError("--group-size must be >= 2: GRPO compares completions of the same prompt")
        parts = build(args)
        policy, tok = parts["policy"], parts["tok"]
        resuming = prepare_run_dir(args.run_dir, pt.run_config("grpo", policy, args), may_change=pt.MAY_CHANGE)
        pt.save_tokenizer(tok, args.run_dir)
    except (pt.DataError, RunDirError, ValueError, OSError) as e:
        print(f"nanoseek grpo: {e}", file=sys.stderr)
        return 2
    pt.freeze_mtp(policy)  # the loss does not use it
    optimizer = build_optimizer(policy, args.lr, weight_decay=args.weight_decay)
    print(f"grpo: {policy.param_counts()['total'] / 1e6:.2f}M params, {args.steps} steps x {args.prompts_per_step} "
          f"prompts x {args.group_size} samples (<= {args.max_new_tokens} tokens), beta {args.beta:g}, "
          f"{args.loss_type}, mu {args.mu}, lr {args.lr:g}, run dir {args.run_dir}"
          + (" [resuming]" if resuming else ""))
    t0 = time.time()
    trainer = Trainer(policy, optimizer, parts["batches"], args.run_dir, pt.train_config(args), stage="grpo",
                      loss_fn=parts["loss_fn"], eval_fn=parts["eval_fn"])
    try:
        last = trainer.fit()
    except tasks.RewardError as e:
        print(f"nanoseek grpo: {e}", file=sys.stderr)
        return 1
    if last:
        acc = (f", held-out accuracy {last['eval/accuracy']:.3f} [{last['eval/accuracy_low']:.3f}, "
               f"{last['eval/accuracy_high']:.3f}]" if "eval/accuracy" in last else "")
        print(f"grpo: done, step {trainer.step}, mean reward {last['reward/mean']:.3f}{acc} in "
              f"{time.time() - t0:.0f}s; checkpoint {trainer.ckpt.latest()}")
    return 0
