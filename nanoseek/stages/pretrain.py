"""`nanoseek pretrain`: next-token + MTP pretraining on code (DeepSeek LLM / Coder recipe) with the fault-tolerant
trainer. The default corpus is this Python's standard library; add your own with --data.

    nanoseek pretrain --preset tiny --steps 200 --run-dir runs_out/tiny

Running the same command again on the same --run-dir resumes from the newest intact checkpoint; a larger --steps
extends a finished run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from .. import data, scaling
from ..config import PRESETS, ModelConfig
from ..model import Transformer
from ..optim import SCHEDULES, build_optimizer
from ..tokenizer import Tokenizer
from ..trainer import Trainer, TrainConfig, evaluate_lm, prepare_run_dir

# Per-preset defaults: short sequences on a CPU. Learning rate and batch size come from DeepSeek LLM's scaling laws
# for the model's M and --steps (nanoseek.scaling.pretrain_hparams) unless given, or from the run dir when resuming.
DEFAULTS = {
    "tiny": dict(seq_len=128, warmup=20),
    "small": dict(seq_len=256, warmup=50),
}
FALLBACK = dict(seq_len=1024, warmup=2000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model preset (default tiny)")
    p.add_argument("--init", type=Path, help="start from this HF-format checkpoint instead of random weights")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the scaling law's batch for "
                                                   "this model and --steps, see nanoseek plan)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (preset default)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the scaling law's, capped at 3e-3)")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (preset default)")
    p.add_argument("--schedule", default="multistep", choices=SCHEDULES,
                   help="LR schedule after warm-up: DeepSeek LLM's multi-step (default), cosine or constant")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip (0 disables)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (about a minute to compile on a "
                                                          "CPU, then faster steps; for long runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and FIM")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="corpus file/folder (.txt/.py/..., .jsonl with 'text', .parquet with 'text'); repeatable; "
                        "default: the Python standard library")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary when it is trained here (default 4096)")
    p.add_argument("--fim-rate", type=float, default=data.FIM_RATE, help="fill-in-the-middle rate (default 0.5)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--save-minutes", type=float, default=5.0, help="and every M minutes (default 5)")
    p.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss and bits/byte every N steps")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per eval (default 8)")
    p.add_argument("--mtp-weight", type=float, default=0.3, help="MTP loss weight for the first 67.5%% of steps")
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="MoE bias update speed (0 disables)")
    p.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                   help="exit with code 75 if no step finishes for this long (for torchrun --max-restarts)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("scale-out (under torchrun; --batch-size is per process)")
    g.add_argument("--dp", choices=("ddp", "fsdp"), help="data parallelism: DDP, or FSDP2 (fully_shard per block); "
                                                         "default ddp when torchrun starts more than one process")
    g.add_argument("--ep", type=int, default=1, help="expert parallelism: routed experts sharded over this many "
                                                     "processes, tokens moved by all-to-all (with --dp fsdp)")
    g.add_argument("--hierarchical", action="store_true",
                   help="DDP gradients through the two-level (HFReduce-style) allreduce: in node, across, broadcast")
    g.add_argument("--node-size", type=int, help="processes per node for --hierarchical (default LOCAL_WORLD_SIZE; "
                                                 "smaller values simulate several nodes on one machine)")
    g.add_argument("--fp8", action="store_true", help="blockwise FP8 GEMMs in attention and expert/MLP projections "
                                                      "(V3 sec. 3.3; emulated on CPUs)")
    return p


def _setup_parallel(args):
    import os

    if args.dp is None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return None  # the single-process path, unchanged
    from ..dist import Parallel

    return Parallel.setup(args.dp or "ddp", ep=args.ep, node_size=args.node_size, hierarchical=args.hierarchical)


def _setup_verdict(parallel, ok: bool | None = None) -> bool:
    """Rank 0 prepares the run dir, tokenizer and data cache alone and broadcasts whether it could; the other ranks
    wait for that, then read what it wrote."""
    import torch.distributed as dist

    box = [ok]
    dist.broadcast_object_list(box, src=0, group=parallel.ckpt_group)
    return bool(box[0])


def ensure_tokenizer(run_dir: Path, data_paths, vocab_size) -> Tokenizer:
    from . import tokenizer as tokenizer_stage

    argv = ["--run-dir", str(run_dir)]
    for d in data_paths or []:
        argv += ["--data", str(d)]
    if vocab_size:
        argv += ["--vocab-size", str(vocab_size)]
    rc = tokenizer_stage.main(argv)
    if rc:
        raise SystemExit(rc)
    return Tokenizer.load(run_dir / "tokenizer")


def model_config_for(preset: str, tok: Tokenizer, seq_len: int) -> ModelConfig:
    base = PRESETS[preset]
    return dataclasses.replace(base, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                               pad_token_id=tok.pad_id,
                               max_position_embeddings=max(base.max_position_embeddings, seq_len))


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    defaults = DEFAULTS.get(args.preset, FALLBACK)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    parallel = _setup_parallel(args)
    if parallel is not None and not parallel.is_main and not _setup_verdict(parallel):
        return 2
    ok = False
    try:
        tok = ensure_tokenizer(run_dir, args.data, args.vocab_size)
        if args.init:
            init_config = ModelConfig.load(args.init)
            config = init_config
        else:
            config = model_config_for(args.preset, tok, args.seq_len)
        if config.vocab_size < tok.vocab_size:
            raise SystemExit(f"the model's vocab_size {config.vocab_size} is smaller than the tokenizer's "
                             f"{tok.vocab_size}")
        if args.lr is None or args.batch_size is None:  # resuming keeps what the run started with (--steps may grow)
            started = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
            lr, batch_size, hp = scaling.pretrain_hparams(config, args.steps, args.seq_len, args.grad_accum)
            args.lr = args.lr or started.get("lr") or lr
            args.batch_size = args.batch_size or started.get("batch_size") or batch_size
            if not started:
                print(f"pretrain: scaling laws (DeepSeek LLM sec. 3.1) for C = {hp.compute:.3g}: batch "
                      f"{hp.batch_tokens:.0f} tokens, lr {hp.lr_law:.3g}" + (" (capped)" if hp.lr < hp.lr_law else "")
                      + ("" if hp.in_range else " [C below the fitted 1e17..3e20: extrapolated]"))
        run_config = {"stage": "pretrain", "model": config.to_hf_dict(), **{
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("run_dir", "no_progress", "threads", "compile", "save_every", "save_minutes", "keep_last",
                         "watchdog", "eval_every", "eval_batches", "dp", "ep", "hierarchical", "node_size")}}
        resuming = prepare_run_dir(run_dir, run_config)
        corpus = data.load_corpus(tok, args.data, cache_dir=run_dir / "cache", log=print)
        ok = True
    except (data.DataError, OSError, ValueError) as e:
        print(f"nanoseek pretrain: {e}", file=sys.stderr)
        return 2
    finally:
        if parallel is not None and parallel.is_main:
            _setup_verdict(parallel, ok)
    rank, world = (parallel.rank, parallel.world_size) if parallel is not None else (0, 1)
    torch.manual_seed(args.seed)
    model = Transformer.from_pretrained(args.init) if args.init else Transformer(config)
    if args.fp8:
        from ..fp8 import swap_to_fp8

        swap_to_fp8(model)
    if parallel is not None:
        parallel.wrap(model)  # before the optimizer: FSDP2 replaces the parameters with sharded ones
    optimizer = build_optimizer(model, args.lr, weight_decay=args.weight_decay)
    loader = data.PackedLoader(corpus, tok, args.batch_size, args.seq_len, seed=args.seed, fim_rate=args.fim_rate,
                               rank=rank, world_size=world)
    bpt = data.val_bytes_per_token(corpus, tok, args.seq_len)

    def eval_fn(m):
        return evaluate_lm(m, lambda: data.val_batches(corpus, tok, args.batch_size, args.seq_len, rank, world), bpt,
                           max_batches=args.eval_batches, parallel=parallel)

    cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, schedule=args.schedule,
                      grad_accum=args.grad_accum, clip=args.clip, bf16=args.bf16, compile=args.compile, bias_gamma=args.bias_gamma,
                      mtp_weight=args.mtp_weight, mtp_weight_late=min(args.mtp_weight, 0.1),
                      save_every=args.save_every, save_minutes=args.save_minutes, keep_last=args.keep_last,
                      eval_every=args.eval_every, watchdog_seconds=args.watchdog, progress=not args.no_progress)
    counts = model.param_counts()
    if parallel is not None and not parallel.is_main:
        sys.stdout = open("/dev/null" if sys.platform != "win32" else "nul", "w")  # only rank 0 talks
    print(f"pretrain: {args.preset} ({counts['total'] / 1e6:.1f}M params, {counts['active'] / 1e6:.1f}M active), "
          f"{args.steps} steps x {args.grad_accum * args.batch_size} x {args.seq_len} tokens, lr {args.lr:g} "
          f"({args.schedule}), run dir {run_dir}" + (" [resuming]" if resuming else ""))
    t0 = time.time()
    trainer = Trainer(model, optimizer, loader, run_dir, cfg, stage="pretrain", eval_fn=eval_fn, seq_len=args.seq_len,
                      parallel=parallel)
    last = trainer.fit()
    if last:
        val = f", val loss {last['val/loss']:.3f} ({last['val/bpb']:.3f} bits/byte)" if "val/loss" in last else ""
        print(f"pretrain: done, step {trainer.step}, loss {last['loss']:.3f}{val} in {time.time() - t0:.0f}s; "
              f"checkpoint {trainer.ckpt.latest()}")
    if parallel is not None:
        parallel.barrier()
        parallel.close()
    return 0

