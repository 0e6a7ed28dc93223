"""`nanoseek dpo`: direct preference optimisation (Rafailov et al. 2023) on preference pairs, one
{"prompt": str or [messages], "chosen": str, "rejected": str} per line. The reference is the starting model,
frozen; the loss is losses.dpo_loss on the summed log-probs of each reply (its tokens and closing EOS).

    nanoseek dpo --run-dir runs_out/dpo --init runs_out/sft --pairs pairs.jsonl --beta 0.1

Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import posttrain as pt
from ..optim import build_optimizer
from ..trainer import RunDirError, Trainer, prepare_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek dpo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--init", type=Path, required=True, help="starting policy and reference: a run dir or HF folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --init)")
    p.add_argument("--pairs", type=Path, required=True, help="preference pairs JSONL")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta, the implicit KL strength (default 0.1)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per prompt + reply; longer replies are cut")
    pt.add_train_args(p, steps=100, lr=1e-5, batch_size=4, warmup=0, save_every=50, eval_every=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pairs = pt.read_pairs_jsonl(args.pairs)
        policy, tok = pt.load_init(args.init, args.tokenizer)
        reference, _ = pt.load_init(args.init, args.tokenizer)
        reference.requires_grad_(False)
        config = {**pt.run_config("dpo", policy, args), "pairs_sha256": pt.fingerprint(pairs)}
        resuming = prepare_run_dir(args.run_dir, config, may_change=pt.MAY_CHANGE)
        pt.save_tokenizer(tok, args.run_dir)
    except (pt.DataError, RunDirError, ValueError, OSError) as e:
        print(f"nanoseek dpo: {e}", file=sys.stderr)
        return 2
    stream = pt.ExampleStream(pairs, seed=args.seed, name=f"pairs:{pt.fingerprint(pairs)}")
    batches = pt.PairBatches(stream, tok, args.batch_size, args.max_len)
    pt.freeze_mtp(policy)  # the loss does not use it
    optimizer = build_optimizer(policy, args.lr, weight_decay=args.weight_decay)
    print(f"dpo: {policy.param_counts()['total'] / 1e6:.2f}M params, {len(pairs)} pairs, {args.steps} steps x "
          f"{args.batch_size} pairs, beta {args.beta:g}, lr {args.lr:g}, run dir {args.run_dir}"
          + (" [resuming]" if resuming else ""))
    t0 = time.time()
    trainer = Trainer(policy, optimizer, batches, args.run_dir, pt.train_config(args), stage="dpo",
                      loss_fn=pt.dpo_loss_fn(reference, args.beta))
    try:
        last = trainer.fit()
    except ValueError as e:  # a prompt too long for --max-len
        print(f"nanoseek dpo: {e}", file=sys.stderr)
        return 2
    if last:
        print(f"dpo: done, step {trainer.step}, loss {last['loss']:.4f}, reward accuracy "
              f"{last['dpo/reward_accuracy']:.2f}, margin {last['dpo/reward_margin']:.3f} in {time.time() - t0:.0f}s; "
              f"checkpoint {trainer.ckpt.latest()}")
    return 0
