"""pass@budget of RMaxTS against best-of-n at equal sample budgets on held-out countdown, and one round of expert
iteration (search on training problems, keep the verified solutions, SFT on them) judged by plain sampling.

    # a model that can do countdown at all: the speedrun's (on countdown), or one made here (~17 min, 1 core)
    nanoseek speedrun --task countdown --difficulty 1 --run-dir runs_out/speedrun_countdown
    python bench/search.py --model runs_out/speedrun_countdown/sft --out runs_out/search_bench
    python bench/search.py --make-model runs_out/search_model --out runs_out/search_bench --threads 1

    # the full measurement: 200 held-out problems, budgets 8..256, then expert iteration on 500 training problems
    python bench/search.py --model M --out runs_out/search_bench --n 200 --budgets 8 16 32 64 128 256 \\
        --expert-iteration --ei-n 500 --ei-budget 32 --ei-steps 100

    # smoke scale
    python bench/search.py --model M --out runs_out/search_smoke --n 16 --budgets 8 16 32 --threads 1 \\
        --expert-iteration --ei-n 32 --ei-budget 16 --ei-steps 20

Both methods run once to the largest budget on the same problems; the search is anytime (its first b samples are
those of a run with budget b), so problem i counts as solved at budget b when its first verified sample has index
<= b. Sample j of problem i has the same seed in both methods, so their first round is the same draw (common random
numbers) and the paired counts (solved by one method only) are less noisy than the two curves. Wilson 95%
intervals. Tokens generated are reported too: a resumed RMaxTS sample only writes the steps after its prefix.

Recorded (session 3, dev/LOG.md): the speedrun's countdown model (`nanoseek speedrun --task countdown --difficulty 1
--run-dir runs_out/speedrun_countdown`, greedy accuracy 0.4%), `python bench/search.py --model
runs_out/speedrun_countdown/grpo --out runs_out/search_bench --n 200 --budgets 8 16 32 64 128 --max-new-tokens 80
--threads 1` (31 min on one core):

    method      @8     @16    @32    @64    @128   tokens
    rmaxts      0.000  0.020  0.040  0.065  0.095    902,856
    best-of-n   0.005  0.010  0.020  0.040  0.105  1,251,299
    solved by one method only (rmaxts / best-of-n): @16 3/1, @32 6/2, @64 9/4, @128 9/11

RMaxTS solves about twice as many problems at budgets 16-64 with 28% fewer tokens; at 128 best-of-n catches up. The
counts are small (the discordant pairs at 32, 6 vs 2, are not significant by a sign test). Budget 256, run as two
`nanoseek eval --search M --budget 256 --n 200` processes (same problems and seeds; 8-128 reproduced exactly):
RMaxTS 0.135, best-of-n 0.180, solved by one only 11 / 20 (p = 0.15), tokens 1.72M vs 2.36M.

Writes OUT/search_bench.json, OUT/pass_at_budget.png and, with --expert-iteration, OUT/expert_iteration.json
(plus OUT/ei/solutions.jsonl and the SFT run dir OUT/ei/sft).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanoseek import posttrain as pt
from nanoseek import search, tasks
from nanoseek.stages import sft, tokenizer


def make_model(root: Path, args) -> Path:
    """A countdown model from nothing: the stdlib tokenizer, then `small` (20M) from random weights fine-tuned on
    countdown worked solutions (--make-steps x 8 x 512 tokens, ~6 s a step on one busy core)."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    steps = [("tokenizer", tokenizer, []),
             ("sft", sft, ["--preset", "small", "--tokenizer", root / "tokenizer" / "tokenizer", "--task",
                           "countdown", "--difficulty", args.difficulty, "--steps", args.make_steps,
                           "--eval-every", "0", "--max-new-tokens", args.max_new_tokens, "--seed", args.seed,
                           "--no-progress", *threads])]
    for name, stage, argv in steps:
        t = time.time()
        if stage.main([str(a) for a in ["--run-dir", root / name, *argv]]) != 0:
            raise SystemExit(f"bench/search.py: {name} failed for {root / name}")
        print(f"  {name}: {time.time() - t:.0f}s", flush=True)
    return root / "sft"


def pass_at_budget_curves(model, tok, args) -> dict:
    task = tasks.make_task(args.task, "eval", args.difficulty)
    problems = pt.eval_problems(task, args.n, args.seed)
    budget = max(args.budgets)
    out: dict = {"task": args.task, "n": args.n, "difficulty": args.difficulty, "budgets": args.budgets,
                 "batch": args.batch, "c": args.c, "gamma": args.gamma, "novelty": args.novelty,
                 "temperature": args.temperature,
                 "seed": args.seed, "max_new_tokens": args.max_new_tokens}
    results = {}
    # (curve name, method, novelty); the ablation is RMaxTS paying its intrinsic reward for any new line
    runs = [("rmaxts", "rmaxts", args.novelty), ("best-of-n", "best-of-n", args.novelty)]
    if args.novelty_ablation:
        other = next(n for n in search.NOVELTY if n != args.novelty)
        runs.append((f"rmaxts-{other}", "rmaxts", other))
    out["curves"] = [name for name, _, _ in runs]
    for name, method, novelty in runs:
        policy = search.EnginePolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        t0 = time.perf_counter()
        results[name] = search.search(problems, policy, budget, method=method, seed=args.seed,
                                      batch=args.batch, c=args.c, gamma=args.gamma, novelty=novelty)
        curve = search.pass_at_budget(results[name], args.budgets)
        out[name] = {"pass_at_budget": {str(b): v for b, v in curve.items()},
                     "samples": sum(r.samples for r in results[name]), "tokens": policy.tokens,
                     "seconds": time.perf_counter() - t0}
        print(f"{name:>12}: " + "  ".join(f"@{b} {v['rate']:.3f}" for b, v in curve.items())
              + f"   ({policy.tokens} tokens, {time.perf_counter() - t0:.0f}s)", flush=True)
    paired = {}
    for b in args.budgets:
        won = [[r.first_solved is not None and r.first_solved <= b for r in results[m]] for m in search.METHODS]
        pairs = list(zip(*won))
        paired[str(b)] = {"both": sum(x and y for x, y in pairs), "rmaxts_only": sum(x and not y for x, y in pairs),
                          "best_of_n_only": sum(y and not x for x, y in pairs)}
    out["paired"] = paired
    print("paired (rmaxts only / best-of-n only): "
          + "  ".join(f"@{b} {v['rmaxts_only']}/{v['best_of_n_only']}" for b, v in paired.items()))
    return out


def plot(path: Path, out: dict) -> None:
    from nanoseek.report import plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name in out.get("curves", search.METHODS):
        curve = out[name]["pass_at_budget"]
        xs = [int(b) for b in curve]
        ax.plot(xs, [curve[b]["rate"] for b in curve], marker="o", ms=3, label=name)
        ax.fill_between(xs, [curve[b]["ci95"][0] for b in curve], [curve[b]["ci95"][1] for b in curve], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("samples per problem (budget)")
    ax.set_ylabel("pass@budget")
    ax.set_title(f"held-out {out['task']} (difficulty {out['difficulty']}), n={out['n']}, Wilson 95%")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plain_sampling(model, tok, args) -> dict:
    """What expert iteration should move: greedy accuracy and sampled pass@1 on held-out problems."""
    task = tasks.make_task(args.task, "eval", args.difficulty)
    greedy = pt.evaluate_task(model, tok, task, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens)
    sampled = pt.evaluate_task(model, tok, task, args.n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                               samples=args.ei_eval_samples, temperature=args.temperature)
    return {"greedy": greedy["accuracy"], "greedy_ci95": greedy["accuracy_ci95"], "sampled_pass1": sampled["accuracy"],
            "pass_at_k": sampled["pass_at_k"], "format": sampled["format"]}


def expert_iteration(model_path: Path, model, tok, args) -> dict:
    ei = args.out / "ei"
    ei.mkdir(parents=True, exist_ok=True)
    solutions = ei / "solutions.jsonl"
    task = tasks.make_task(args.task, "train", args.difficulty)
    problems = task.sample(pt.seed_of(args.seed, "search-prompts"), args.ei_n)
    policy = search.EnginePolicy(model, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    t0 = time.perf_counter()
    results = search.search(problems, policy, args.ei_budget, method="rmaxts", seed=args.seed, batch=args.batch,
                            c=args.c, gamma=args.gamma, max_solutions=args.ei_solutions, novelty=args.novelty)
    rows = search.sft_rows(results)
    solved = sum(bool(r.solutions) for r in results)
    print(f"expert iteration: {solved}/{len(results)} training problems solved, {len(rows)} solutions kept "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    out = {"train_problems": len(results), "solved": solved, "solutions": len(rows), "budget": args.ei_budget,
           "sft_steps": args.ei_steps, "before": plain_sampling(model, tok, args), "after": None}
    if not rows:
        print("expert iteration: no verified solution to train on; SFT skipped (the model cannot do the task yet)")
        return out
    pt.write_jsonl(solutions, rows)
    threads = ["--threads", str(args.threads)] if args.threads else []
    argv = ["--run-dir", ei / "sft", "--init", model_path, "--data", solutions, "--task", args.task,
            "--difficulty", args.difficulty, "--steps", args.ei_steps, "--lr", args.ei_lr, "--warmup", "0",
            "--eval-every", "0", "--max-new-tokens", args.max_new_tokens, "--seed", args.seed, "--no-progress",
            *threads]
    if sft.main([str(a) for a in argv]) != 0:
        raise SystemExit("bench/search.py: SFT on the searched solutions failed")
    after_model, after_tok = pt.load_init(ei / "sft")
    out["after"] = plain_sampling(after_model, after_tok, args)
    for when in ("before", "after"):
        r = out[when]
        print(f"  {when}: greedy {r['greedy']:.3f} {[round(x, 3) for x in r['greedy_ci95']]}, sampled pass@1 "
              f"{r['sampled_pass1']:.3f}, pass@{args.ei_eval_samples} {r['pass_at_k'][str(args.ei_eval_samples)]:.3f}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a countdown model: run dir or HF folder")
    p.add_argument("--make-model", type=Path, metavar="DIR", help="make one in DIR first (see make_model)")
    p.add_argument("--make-steps", type=int, default=1000, help="SFT steps of --make-model (default 1000; 200 "
                   "were not enough, see the top of this file)")
    p.add_argument("--out", type=Path, default=Path("runs_out/search_bench"))
    p.add_argument("--n", type=int, default=200, help="held-out problems (default 200)")
    p.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    p.add_argument("--task", default="countdown", choices=sorted(tasks.STEP_TASKS),
                   help="a task with a step checker (default countdown)")
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="samples per problem per round (default 4)")
    p.add_argument("--c", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--novelty", choices=search.NOVELTY, default="state", help="RMaxTS intrinsic reward for a new "
                   "task state (default) or any new line")
    p.add_argument("--novelty-ablation", action="store_true",
                   help="also run RMaxTS with the other --novelty (a third curve)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=96, help="countdown d1 solutions are ~60 tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expert-iteration", action="store_true", help="also run one round of expert iteration")
    p.add_argument("--ei-n", type=int, default=500, help="training problems searched (default 500)")
    p.add_argument("--ei-budget", type=int, default=32)
    p.add_argument("--ei-solutions", type=int, default=4, help="verified solutions kept per problem (default 4)")
    p.add_argument("--ei-steps", type=int, default=100, help="SFT steps on them (default 100)")
    p.add_argument("--ei-lr", type=float, default=3e-4)
    p.add_argument("--ei-eval-samples", type=int, default=8, help="samples per held-out problem for pass@1")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.model is None) == (args.make_model is None):
        p.error("give --model PATH or --make-model DIR")
    if min(args.budgets) < 1 or args.n < 1:
        p.error("--budgets and --n must be >= 1")
    args.budgets = sorted(set(args.budgets))
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.model or make_model(args.make_model, args)
    try:
        model, tok = pt.load_init(model_path)
    except pt.DataError as e:
        p.error(str(e))
    out = {"model": str(model_path), **pass_at_budget_curves(model, tok, args)}
    (args.out / "search_bench.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(args.out / "pass_at_budget.png", out)
    print(f"wrote {args.out / 'search_bench.json'} and {args.out / 'pass_at_budget.png'}")
    if args.expert_iteration:
        ei = {"model": str(model_path), **expert_iteration(model_path, model, tok, args)}
        (args.out / "expert_iteration.json").write_text(json.dumps(ei, indent=1) + "\n")
        print(f"wrote {args.out / 'expert_iteration.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
