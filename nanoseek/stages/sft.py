"""`nanoseek sft`: supervised fine-tuning on chat data, the loss on assistant tokens only (DeepSeek-R1 sec. 2.3.1
cold start and sec. 2.3.3 SFT). Training examples come from --data (chat JSONL, {"messages": [...]} per line), or
else from --task's generated problems with worked solutions; with --rejection-samples they come from the starting
model itself: N samples per prompt, only verified-correct, de-duplicated completions kept (R1 stage 3).
Examples are packed into rows. With --task, held-out accuracy by greedy decoding is logged at every eval.

    nanoseek sft --run-dir runs_out/sft --init runs_out/pretrain --task addition --difficulty 2
    nanoseek sft --run-dir runs_out/sft --preset tiny --tokenizer runs_out/tok/tokenizer --task addition
    nanoseek sft --run-dir runs_out/rs --init runs_out/grpo --task addition --rejection-samples 8

--init is a run dir (its latest checkpoint and its tokenizer/) or an HF-format folder (tokenizer inside it, beside
it, or given with --tokenizer). Running the same command again resumes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .. import posttrain as pt
from .. import tasks
from ..config import PRESETS
from ..model import Transformer
from ..optim import build_optimizer
from ..tokenizer import Tokenizer
from ..trainer import RunDirError, Trainer, lm_loss, prepare_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek sft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--init", type=Path, help="starting model: a run dir or an HF-format folder")
    p.add_argument("--preset", choices=list(PRESETS), help="start from random weights of this preset instead "
                   "(needs --tokenizer)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --init)")
    p.add_argument("--task", help="addition, multiplication, countdown or FILE.jsonl ({prompt, answer, reasoning}"
                   " per line): worked solutions to train on unless --data is given, and the held-out eval")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (digits; countdown: numbers - 2)")
    p.add_argument("--data", action="append", type=Path, metavar="FILE.jsonl",
                   help='chat examples, {"messages": [{"role", "content"}, ...]} per line; repeatable')
    p.add_argument("--rejection-samples", type=int, default=0, metavar="N",
                   help="sample N completions per --task prompt from the starting model, keep the verified, "
                        "de-duplicated ones (written to RUN_DIR/rejection.jsonl) and train on them")
    p.add_argument("--rejection-prompts", type=int, default=256, help="prompts for --rejection-samples (256)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for rejection sampling")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (default 512)")
    p.add_argument("--mtp-weight", type=float, default=0.1, help="MTP loss weight (default 0.1; 0 disables)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval (default 200)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit for eval and sampling")
    pt.add_system_prompt_arg(p)
    pt.add_train_args(p, steps=200, lr=1e-3, batch_size=8, warmup=10, schedule="cosine")
    return p


def start_model(args) -> tuple[Transformer, Tokenizer]:
    """The model to fine-tune: --init, or random weights of --preset (seeded by --seed)."""
    if (args.init is None) == (args.preset is None):
        raise pt.DataError("give exactly one of --init PATH (a run dir or HF folder) or --preset NAME")
    if args.init is not None:
        return pt.load_init(args.init, args.tokenizer)
    if args.tokenizer is None:
        raise pt.DataError("--preset starts from random weights and needs --tokenizer DIR")
    from .pretrain import model_config_for

    tok = Tokenizer.load(args.tokenizer)
    torch.manual_seed(args.seed)
    return Transformer(model_config_for(args.preset, tok, args.seq_len)), tok


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    try:
        args.system_prompt = pt.resolve_system_prompt(args.system_prompt)
        if args.task is None and not args.data:
            raise pt.DataError("nothing to train on: give --task and/or --data")
        if args.rejection_samples and args.task is None:
            raise pt.DataError("--rejection-samples samples --task prompts; give --task")
        model, tok = start_model(args)
        train_task = tasks.make_task(args.task, "train", args.difficulty) if args.task else None
        eval_task = tasks.make_task(args.task, "eval", args.difficulty) if args.task else None
        examples = [m for path in args.data or [] for m in pt.read_chat_jsonl(path)]
        if isinstance(train_task, tasks.JsonlTask) and not examples and not args.rejection_samples:
            missing = [p.prompt for p in train_task.problems if not p.reasoning.strip()]
            if missing:
                raise pt.DataError(f'{args.task}: {len(missing)} problems have no "reasoning" to train on (e.g. '
                                   f'{missing[0][:60]!r}); add it, or give --data or --rejection-samples')
        resuming = prepare_run_dir(run_dir, pt.run_config("sft", model, args), may_change=pt.MAY_CHANGE)
        pt.save_tokenizer(tok, run_dir)
    except (pt.DataError, RunDirError, ValueError, OSError) as e:
        print(f"nanoseek sft: {e}", file=sys.stderr)
        return 2

    if args.rejection_samples:
        path = run_dir / "rejection.jsonl"
        if not path.exists():
            problems = train_task.sample(pt.seed_of(args.seed, "rejection-prompts"), args.rejection_prompts)
            rows = pt.rejection_sample(model, tok, problems, args.rejection_samples, seed=args.seed,
                                       max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       system_prompt=args.system_prompt)
            if not rows:
                print(f"nanoseek sft: rejection sampling kept no completion of {len(problems)} prompts x "
                      f"{args.rejection_samples}; the model never solves this task yet (SFT it first)",
                      file=sys.stderr)
                return 1
            pt.write_jsonl(path, rows)
        examples += pt.read_chat_jsonl(path)
    if examples:
        stream = pt.ExampleStream(examples, seed=args.seed, name=f"data:{pt.fingerprint(examples)}")
    else:
        stream = pt.task_sft_stream(train_task, args.seed, args.system_prompt)
    batches = pt.PackedSFTBatches(stream, tok, args.batch_size, args.seq_len)
    eval_fn = (pt.task_eval_fn(tok, eval_task, args.eval_n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                               system_prompt=args.system_prompt) if eval_task else None)
    if args.mtp_weight == 0:
        pt.freeze_mtp(model)
    optimizer = build_optimizer(model, args.lr, weight_decay=args.weight_decay)
    counts = model.param_counts()
    source = f"{len(examples)} chat examples" if examples else f"generated {args.task} worked solutions"
    print(f"sft: {counts['total'] / 1e6:.2f}M params, {args.steps} steps x {args.batch_size} x {args.seq_len} "
          f"tokens on {source}, lr {args.lr:g}, run dir {run_dir}" + (" [resuming]" if resuming else ""))
    t0 = time.time()
    trainer = Trainer(model, optimizer, batches, run_dir, pt.train_config(args, mtp_weight=args.mtp_weight),
                      stage="sft", loss_fn=lm_loss, eval_fn=eval_fn, seq_len=args.seq_len)
    last = trainer.fit()
    if last:
        acc = (f", held-out accuracy {last['eval/accuracy']:.3f} [{last['eval/accuracy_low']:.3f}, "
               f"{last['eval/accuracy_high']:.3f}]" if "eval/accuracy" in last else "")
        print(f"sft: done, step {trainer.step}, loss {last['loss']:.3f}{acc} in {time.time() - t0:.0f}s; "
              f"checkpoint {trainer.ckpt.latest()}")
    return 0
