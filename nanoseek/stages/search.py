"""`nanoseek search`: verifier-guided search on a verifiable task: RMaxTS tree search over reasoning steps, or
best-of-n, with a budget of samples per problem (DeepSeek-Prover-V1.5; see nanoseek/search.py). Prints pass@b for
b = 1, 2, 4, ... up to --budget with Wilson 95% intervals. Problems come from the eval split (the same ones
`nanoseek eval` uses with this seed), or from the train split with --sft-out.

    nanoseek search --model runs_out/sft --task countdown --budget 32
    nanoseek search --model runs_out/sft --task countdown --budget 32 --method best-of-n --n 200
    nanoseek search --model runs_out/sft --task countdown --budget 32 --run-dir runs_out/search --trees 5
    nanoseek search --model runs_out/sft --task countdown --budget 32 --n 500 --sft-out runs_out/ei/solutions.jsonl
    nanoseek sft --run-dir runs_out/ei/sft --init runs_out/sft --data runs_out/ei/solutions.jsonl --task countdown

--sft-out writes the verified solutions (exact format, correct answer, every step valid) as SFT chat JSONL, the
format rejection sampling writes and `nanoseek sft --data` reads: one round of expert iteration is search, then SFT
on what it found. With --run-dir, search_<task>_<method>.json holds the result and trees/ the first --trees trees.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import posttrain as pt
from .. import search, tasks


def add_search_args(p: argparse.ArgumentParser, *, method: str | None) -> None:
    """Options `nanoseek search` and `nanoseek eval --search` share."""
    if method is None:
        p.add_argument("--search", choices=search.METHODS, dest="method",
                       help="score by pass@--budget of this verifier-guided search instead of plain decoding")
    else:
        p.add_argument("--method", choices=search.METHODS, default=method, help=f"search method (default {method})")
    p.add_argument("--budget", type=int, default=32, help="samples per problem for the search (default 32)")
    p.add_argument("--batch", type=int, default=4,
                   help="search: samples per problem per round, generated together (default 4)")
    p.add_argument("--c", type=float, default=1.0, help="RMaxTS: UCB exploration constant (default 1)")
    p.add_argument("--gamma", type=float, default=0.99, help="RMaxTS: discount of the UCB statistics (0.99)")
    p.add_argument("--novelty", choices=search.NOVELTY, default="state",
                   help="RMaxTS: what earns the intrinsic reward, a new task state (default) or any new line")


def check_search_args(args) -> None:
    """ValueError for search options that cannot work, before any model is loaded."""
    if args.budget < 1 or args.batch < 1:
        raise ValueError(f"--budget must be >= 1 (samples per problem) and --batch >= 1, got {args.budget} and "
                         f"{args.batch}")
    if args.method == "rmaxts":
        search.require_step_checker("jsonl" if args.task.endswith(".jsonl") else args.task)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a run dir or an HF-format folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --model)")
    p.add_argument("--task", required=True, help="addition, multiplication or countdown (best-of-n: also "
                                                 "FILE.jsonl)")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (default 1)")
    p.add_argument("--n", type=int, default=20, help="problems (default 20)")
    add_search_args(p, method="rmaxts")
    pt.add_system_prompt_arg(p)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="tokens per completion, a resumed prefix included (default 256)")
    p.add_argument("--seed", type=int, default=0, help="which problems, and the sampling seeds")
    p.add_argument("--split", choices=["eval", "train"], help="problems from (default eval; train with --sft-out)")
    p.add_argument("--sft-out", type=Path, metavar="FILE.jsonl", help="write the verified solutions as SFT chat "
                   "JSONL (train split; the search then continues to --max-solutions per problem)")
    p.add_argument("--max-solutions", type=int, help="stop a problem after this many distinct verified solutions "
                   "(default 1; 4 with --sft-out)")
    p.add_argument("--run-dir", type=Path, help="write search_<task>_<method>.json and trees/ here")
    p.add_argument("--trees", type=int, default=3, help="with --run-dir: RMaxTS trees exported as JSON (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    split = args.split or ("train" if args.sft_out else "eval")
    max_solutions = args.max_solutions or (4 if args.sft_out else 1)
    try:
        args.system_prompt = pt.resolve_system_prompt(args.system_prompt)
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        if args.sft_out and split == "eval":
            raise ValueError("--sft-out writes training data, and eval problems are held out; use --split train")
        task = tasks.make_task(args.task, split, args.difficulty)
        check_search_args(args)
        model, tok = pt.load_init(args.model, args.tokenizer)
    except (pt.DataError, ValueError, OSError) as e:
        print(f"nanoseek search: {e}", file=sys.stderr)
        return 2
    problems = (pt.eval_problems(task, args.n, args.seed) if split == "eval"
                else task.sample(pt.seed_of(args.seed, "search-prompts"), args.n))
    policy = search.EnginePolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_p=args.top_p, system_prompt=args.system_prompt)
    results = search.search(problems, policy, args.budget, method=args.method, seed=args.seed, batch=args.batch,
                            c=args.c, gamma=args.gamma, max_solutions=max_solutions,
                            novelty=args.novelty)
    summary = {"model": str(args.model), "task": args.task, "difficulty": args.difficulty, "split": split,
               "seed": args.seed, **search.summarize(results, args.budget), "tokens": policy.tokens}
    curve = "  ".join(f"@{b} {v:.3f}" for b, v in summary["pass_at_budget"].items())
    print(f"search: {args.method} on {args.n} {split} {args.task} problems (difficulty {args.difficulty}), budget "
          f"{args.budget}: pass {summary['accuracy']:.3f} [{summary['accuracy_ci95'][0]:.3f}, "
          f"{summary['accuracy_ci95'][1]:.3f}]; pass@budget {curve}; {summary['samples_mean']:.1f} samples and "
          f"{policy.tokens / len(results):.0f} tokens per problem")
    if args.sft_out:
        rows = search.sft_rows(results, args.system_prompt)
        args.sft_out.parent.mkdir(parents=True, exist_ok=True)
        pt.write_jsonl(args.sft_out, rows)
        print(f"search: wrote {len(rows)} verified solutions of {sum(bool(r.solutions) for r in results)} solved "
              f"problems to {args.sft_out}")
    if args.run_dir:
        args.run_dir.mkdir(parents=True, exist_ok=True)
        name = Path(args.task).stem if args.task.endswith(".jsonl") else args.task
        path = args.run_dir / f"search_{name}_{args.method}.json"
        write_json(path, summary)
        trees = [r.tree for r in results if r.tree][:args.trees]
        for i, tree in enumerate(trees):
            (args.run_dir / "trees").mkdir(exist_ok=True)
            write_json(args.run_dir / "trees" / f"problem_{i:04d}.json", tree.to_json())
        print(f"search: wrote {path}" + (f" and {len(trees)} trees in {args.run_dir / 'trees'}" if trees else ""))
    else:
        sys.stdout.write(json.dumps(summary) + "\n")
    return 0


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)
