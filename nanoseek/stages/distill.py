"""`nanoseek distill`: a smaller student learns from a teacher's verified reasoning traces, as DeepSeek-R1's
distilled models (R1 sec. 2.4: SFT on ~800k teacher samples, no RL). The teacher samples --samples-per-prompt
completions for --prompts problems of --task; the correct, well-formatted, de-duplicated ones (RUN_DIR/traces.jsonl)
are the student's SFT data. Optionally the student also matches the teacher's softened next-token distribution
on those tokens (--logit-kd-weight, --temperature) and the correlation structure of the rows' representations
(--cckd-weight, CCKD).

    nanoseek distill --run-dir runs_out/distill --teacher runs_out/grpo --student-preset tiny --dense --task addition

The student uses the teacher's tokenizer; --dense makes it a dense model (n_routed_experts = 0, SwiGLU in every
layer), as the R1 distilled Qwen/Llama models are dense. --student-init starts it from a pretrained checkpoint
instead of random weights (R1 distilled into pretrained Qwen and Llama models). Running the same command again
resumes.

The control R1's claim needs, the same student trained on the same verified problems without the reasoning:

    nanoseek distill --run-dir runs_out/distill_ctl --traces runs_out/distill/traces.jsonl --no-traces ...

--traces reuses another run's verified traces (no teacher sampling, so both runs see the same problems); with
--no-traces every assistant turn keeps only its verified answer, `<think>\n\n</think>\n<answer>A</answer>`.
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
from ..trainer import RunDirError, Trainer, lm_loss, prepare_run_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--teacher", type=Path, required=True, help="the teacher: a run dir or an HF folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --teacher)")
    p.add_argument("--student-preset", default="tiny", choices=list(PRESETS), help="student shape (default tiny)")
    p.add_argument("--dense", action="store_true", help="dense student: no routed experts")
    p.add_argument("--task", required=True, help="addition, multiplication, countdown or FILE.jsonl")
    p.add_argument("--difficulty", type=int, default=1, help="task difficulty (default 1)")
    p.add_argument("--prompts", type=int, default=512, help="problems the teacher solves (default 512)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="teacher samples per problem (default 4)")
    p.add_argument("--sample-temperature", type=float, default=1.0, help="teacher sampling temperature (1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation limit (default 256)")
    p.add_argument("--logit-kd-weight", type=float, default=0.0, help="weight of logit distillation (0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="softening temperature of logit distillation")
    p.add_argument("--cckd-weight", type=float, default=0.0, help="weight of the CCKD correlation term (0: off)")
    p.add_argument("--student-init", type=Path, help="pretrained student (run dir or HF folder) with the teacher's "
                   "tokenizer, instead of random weights of --student-preset")
    p.add_argument("--traces", type=Path, help="verified traces JSONL from an earlier run (skips teacher sampling)")
    p.add_argument("--no-traces", action="store_true", help="the control: train on the verified answers only, "
                   "with the reasoning removed")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row (default 512)")
    p.add_argument("--eval-n", type=int, default=200, help="held-out problems per eval (default 200)")
    pt.add_system_prompt_arg(p)
    pt.add_train_args(p, steps=200, lr=1e-3, batch_size=8, warmup=10, schedule="cosine")
    return p


def answer_only(messages: list[dict]) -> list[dict]:
    """The conversation with each assistant turn reduced to its final answer (an empty think block)."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            answer = tasks.extract_answer(m["content"])
            if answer is None:
                raise pt.DataError(f"--no-traces: an assistant turn has no <answer>...</answer>: {m['content'][:80]!r}")
            m = {**m, "content": tasks.format_completion([], answer.strip())}
        out.append(m)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        args.system_prompt = pt.resolve_system_prompt(args.system_prompt)
        if args.traces and not args.traces.is_file():
            raise pt.DataError(f"--traces {args.traces} does not exist")
        teacher, tok = pt.load_init(args.teacher, args.tokenizer)
        teacher.requires_grad_(False)
        train_task = tasks.make_task(args.task, "train", args.difficulty)
        eval_task = tasks.make_task(args.task, "eval", args.difficulty)
        from .pretrain import model_config_for

        if args.student_init:
            if args.dense:
                raise ValueError("--dense shapes a new student; --student-init brings its own shape")
            student, student_tok = pt.load_init(args.student_init)
            if student_tok.fingerprint() != tok.fingerprint():
                raise ValueError(f"--student-init {args.student_init} has another tokenizer than the teacher; "
                                 "distillation needs the teacher's vocabulary")
        else:
            config = model_config_for(args.student_preset, tok, args.seq_len)
            if args.dense:
                config = config.replace(n_routed_experts=0, n_shared_experts=0)
            torch.manual_seed(args.seed)
            student = Transformer(config)
        resuming = prepare_run_dir(args.run_dir, pt.run_config("distill", student, args), may_change=pt.MAY_CHANGE)
        pt.save_tokenizer(tok, args.run_dir)
    except (pt.DataError, RunDirError, ValueError, OSError) as e:
        print(f"nanoseek distill: {e}", file=sys.stderr)
        return 2
    path = args.traces or args.run_dir / "traces.jsonl"
    if not path.exists():
        problems = train_task.sample(pt.seed_of(args.seed, "distill-prompts"), args.prompts)
        rows = pt.rejection_sample(teacher, tok, problems, args.samples_per_prompt, seed=args.seed,
                                   max_new_tokens=args.max_new_tokens, temperature=args.sample_temperature,
                                   system_prompt=args.system_prompt)
        if not rows:
            print(f"nanoseek distill: the teacher solved none of {len(problems)} problems x "
                  f"{args.samples_per_prompt} samples; there is nothing to distill", file=sys.stderr)
            return 1
        pt.write_jsonl(path, rows)
    try:
        traces = pt.read_chat_jsonl(path)
        if args.no_traces:
            traces = [answer_only(t) for t in traces]
    except pt.DataError as e:
        print(f"nanoseek distill: {e}", file=sys.stderr)
        return 2
    stream = pt.ExampleStream(traces, seed=args.seed, name=f"data:{pt.fingerprint(traces)}")
    batches = pt.PackedSFTBatches(stream, tok, args.batch_size, args.seq_len)
    kd = args.logit_kd_weight > 0 or args.cckd_weight > 0
    loss_fn = (pt.distill_loss_fn(teacher, logit_kd_weight=args.logit_kd_weight, temperature=args.temperature,
                                  cckd_weight=args.cckd_weight) if kd else lm_loss)
    counts, t_counts = student.param_counts(), teacher.param_counts()
    name = args.student_init or f"{args.student_preset}{' dense' if args.dense else ''}"
    print(f"distill: teacher {t_counts['total'] / 1e6:.2f}M -> student {name} {counts['total'] / 1e6:.2f}M params, "
          f"{len(traces)} verified {'answers (reasoning removed)' if args.no_traces else 'traces'}, "
          f"{args.steps} steps, logit KD {args.logit_kd_weight:g}, CCKD {args.cckd_weight:g}, run dir {args.run_dir}"
          + (" [resuming]" if resuming else ""))
    t0 = time.time()
    if kd:
        pt.freeze_mtp(student)  # distill_loss_fn trains the main head only
    optimizer = build_optimizer(student, args.lr, weight_decay=args.weight_decay)
    trainer = Trainer(student, optimizer, batches, args.run_dir, pt.train_config(args, mtp_weight=0.0 if kd else 0.1),
                      stage="distill", loss_fn=loss_fn, seq_len=args.seq_len,
                      eval_fn=pt.task_eval_fn(tok, eval_task, args.eval_n, seed=args.seed,
                                              max_new_tokens=args.max_new_tokens, system_prompt=args.system_prompt))
    last = trainer.fit()
    if last:
        acc = (f", held-out accuracy {last['eval/accuracy']:.3f} [{last['eval/accuracy_low']:.3f}, "
               f"{last['eval/accuracy_high']:.3f}]" if "eval/accuracy" in last else "")
        print(f"distill: done, step {trainer.step}, loss {last['loss']:.3f}{acc} in {time.time() - t0:.0f}s; "
              f"checkpoint {trainer.ckpt.latest()}")
    return 0
