"""`nanoseek eval`: held-out accuracy of a model on a verifiable task, by decoding. Greedy by default: accuracy with
a Wilson 95% interval. With --samples k: k samples per problem at --temperature, pass@1 and unbiased pass@j for
j = 1, 2, 4, ..., k (Chen et al. 2021). With --search METHOD: pass@--budget of verifier-guided search (RMaxTS or
best-of-n, see `nanoseek search`). Problems come from the task's eval split (disjoint from training by hash).

    nanoseek eval --model runs_out/grpo --task addition --difficulty 2 --n 500
    nanoseek eval --model runs_out/grpo --task addition --n 200 --samples 8 --run-dir runs_out/grpo
    nanoseek eval --model runs_out/sft --task countdown --n 200 --search rmaxts --budget 32

The JSON result goes to RUN_DIR/eval_<task>.json (eval_<task>_<method>.json with --search) when --run-dir is
given, else to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import posttrain as pt
from .. import search, tasks
from .search import add_search_args, check_search_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a run dir or an HF-format folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --model)")
    p.add_argument("--task", required=True, help="addition, multiplication, countdown or FILE.jsonl")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (default 1)")
    p.add_argument("--n", type=int, default=500, help="held-out problems (default 500)")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (1: greedy; k > 1: pass@k)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature when --samples > 1 or --search")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --samples > 1")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit (default 256)")
    p.add_argument("--seed", type=int, default=0, help="which problems, and the sampling seeds")
    p.add_argument("--examples", type=int, default=5, help="completions to include in the output (default 5)")
    p.add_argument("--run-dir", type=Path, help="write eval_<task>.json here instead of printing it")
    add_search_args(p, method=None)
    pt.add_system_prompt_arg(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.system_prompt = pt.resolve_system_prompt(args.system_prompt)
        if args.n < 1 or args.samples < 1:
            raise ValueError("--n and --samples must be >= 1")
        if args.method and args.samples > 1:
            raise ValueError("--search draws its own --budget samples per problem; leave out --samples")
        if args.method:
            check_search_args(args)
        model, tok = pt.load_init(args.model, args.tokenizer)
        task = tasks.make_task(args.task, "eval", args.difficulty)
    except (pt.DataError, ValueError, OSError) as e:
        print(f"nanoseek eval: {e}", file=sys.stderr)
        return 2
    if args.method:
        result, _ = search.evaluate_search(model, tok, task, args.n, method=args.method, budget=args.budget,
                                           seed=args.seed, batch=args.batch, c=args.c, gamma=args.gamma,
                                           max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                           top_p=args.top_p, examples=args.examples, novelty=args.novelty,
                                           system_prompt=args.system_prompt)
    else:
        result = pt.evaluate_task(model, tok, task, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                                  examples=args.examples, system_prompt=args.system_prompt)
    result = {"model": str(args.model), "task": args.task, "difficulty": args.difficulty, "seed": args.seed,
              **result}
    text = json.dumps(result, indent=2) + "\n"
    if args.run_dir is None:
        sys.stdout.write(text)
        return 0
    args.run_dir.mkdir(parents=True, exist_ok=True)
    name = Path(args.task).stem if args.task.endswith(".jsonl") else args.task
    path = args.run_dir / (f"eval_{name}_{args.method}.json" if args.method else f"eval_{name}.json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    lo, hi = result["accuracy_ci95"]
    if args.method:
        print(f"eval: {args.task} (difficulty {args.difficulty}), n={args.n}: {args.method} pass@{args.budget} "
              f"{result['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]; wrote {path}")
        return 0
    extra = f", pass@{args.samples} {result['pass_at_k'][str(args.samples)]:.3f}" if args.samples > 1 else ""
    print(f"eval: {args.task} (difficulty {args.difficulty}), n={args.n}: accuracy {result['accuracy']:.3f} "
          f"[{lo:.3f}, {hi:.3f}]{extra}, format {result['format']:.3f}; wrote {path}")
    return 0
