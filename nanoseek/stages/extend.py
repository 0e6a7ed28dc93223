"""`nanoseek extend`: long-context continued training. Two procedures from the DeepSeek papers, alone or together:

YaRN context extension (V3 sec. 4.3): continue training at a longer --seq-len with rope_scaling = yarn (--factor,
original length, beta_fast/slow, mscale/mscale_all_dim). V3 extends 4K -> 32K -> 128K in two phases that share one
YaRN config (factor 40 over 4K), so a second phase without --factor keeps the first phase's scaling:

    nanoseek extend --init runs_out/base --run-dir runs_out/ext32 --seq-len 512 --factor 32
    nanoseek extend --init runs_out/ext32 --run-dir runs_out/ext128 --seq-len 2048

DeepSeek Sparse Attention (V3.2 sec. 2.1): --dsa warmup adds a lightning indexer (--index-topk, --index-heads,
--index-head-dim) and trains only it, attention still dense, to match the main attention (KL; lr 1e-3 in the
paper); --dsa sparse then trains everything with attention restricted to each query's top-k keys:

    nanoseek extend --init runs_out/ext32 --run-dir runs_out/dsa_warm --seq-len 512 --dsa warmup --index-topk 64
    nanoseek extend --init runs_out/dsa_warm --run-dir runs_out/dsa --seq-len 512 --dsa sparse --lr 1e-4

The data is the pretraining corpus (--data, default the standard library) packed at the new length, with
passkey-retrieval batches mixed in at --passkey-rate: a key of random digits hidden at a random depth of filler
text and asked for at the end. Code alone gives little signal about whether distant
positions are usable (most tokens depend on the last hundred), so the passkey batches supply a dependency across
the whole window and an exact metric, `passkey/acc@T`, logged at every eval for each of --eval-lengths.
--passkey-rate 1 trains on passkey batches alone (no corpus is read).

--init is a run dir (its latest checkpoint and tokenizer/) or an HF-format folder. Running the same command again
on the same --run-dir resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from .. import data, dsa
from .. import posttrain as pt
from ..config import ModelConfig
from ..model import Transformer
from ..optim import build_optimizer
from ..tokenizer import Tokenizer
from ..trainer import RunDirError, Trainer, evaluate_lm, prepare_run_dir

IGNORE = -100


# ------------------------------------------------------------------------------------------------ passkey task
class PasskeyTask:
    """Passkey retrieval (Mohtashami & Jaggi 2023, the test in YaRN and DeepSeek's needle-in-a-haystack plots):

        <bos> [filler] The pass key is 71432. Remember it. [filler] What was the pass key? The pass key is 71432

    exactly T + 1 tokens. Digits are encoded one by one (one byte-level token each, whatever the BPE merges)."""

    def __init__(self, tok: Tokenizer, digits: int = 5, max_period: int = 16):
        self.tok, self.digits = tok, digits
        self.intro = [tok.bos_id]
        self.before, self.after = tok.encode(" The pass key is"), tok.encode(". Remember it.")
        # Filler: a random phrase of 3..max_period words repeated, drawn afresh per example. Its repeats train the
        # copying (induction) heads that retrieval needs, which a tiny model does not find from 5 answer tokens per
        # row; the random period stops it from copying by a fixed offset instead of by content. The words, like
        # the question's, share no token with the " is" that precedes the key.
        words = tok.encode(" Grass grows green. Skies stay blue. Suns shine bright. Here we go. There and back again")
        special = set(self.before) | set(self.after) | {i for d in range(10) for i in tok.encode(str(d))}
        self.words = sorted(set(words) - special)
        self.max_period = max_period
        self.question = tok.encode("\nWhat was the pass key? The pass key is")
        self.digit_ids = [tok.encode(str(d)) for d in range(10)]

    def min_len(self) -> int:
        key = self.digits * max(len(d) for d in self.digit_ids)
        return len(self.intro) + len(self.before) + len(self.after) + len(self.question) + 2 * key - 1

    def example(self, rng: random.Random, seq_len: int) -> tuple[list[int], int]:
        """(ids of length seq_len + 1, number of answer tokens at the end)."""
        key = [i for _ in range(self.digits) for i in self.digit_ids[rng.randrange(10)]]
        needle = self.before + key + self.after
        n_fill = seq_len + 1 - (len(self.intro) + len(needle) + len(self.question) + len(key))
        if n_fill < 0:
            raise ValueError(f"passkey examples need seq_len >= {self.min_len()}, got {seq_len}")
        phrase = [rng.choice(self.words) for _ in range(rng.randint(3, self.max_period))]
        fill = (phrase * (n_fill // len(phrase) + 1))[:n_fill]
        depth = rng.randint(0, n_fill)  # where the needle sits, uniform over the filler
        return self.intro + fill[:depth] + needle + fill[depth:] + self.question + key, len(key)

    def batch(self, rng: random.Random, batch_size: int, seq_len: int, answer_only: bool = False):
        """(inputs, targets) [B, T]. Training rows are ordinary documents (loss on every token: the repeated
        filler is what teaches a small model to copy); with answer_only the targets are IGNORE but the answer."""
        rows, answer = zip(*(self.example(rng, seq_len) for _ in range(batch_size)))
        ids = torch.tensor(rows)
        targets = ids[:, 1:].clone()
        if answer_only:
            targets.fill_(IGNORE)
            for b, a in enumerate(answer):
                targets[b, -a:] = ids[b, -a:]
        return ids[:, :-1].contiguous(), targets


@torch.no_grad()
def passkey_accuracy(model: Transformer, task: PasskeyTask, seq_len: int, n: int = 64, *, seed: int = 0,
                     batch_size: int = 8) -> float:
    """Fraction of n examples whose every answer token is the argmax: exactly what greedy decoding would produce
    (each answer token is predicted from the true previous ones, which greedy decoding also has when right)."""
    was_training = model.training
    model.eval()
    rng = random.Random(pt.seed_of("passkey-eval", seed, seq_len))
    correct = 0
    try:
        for start in range(0, n, batch_size):
            inputs, targets = task.batch(rng, min(batch_size, n - start), seq_len, answer_only=True)
            answer = targets != IGNORE
            right = (model(inputs).argmax(-1) == targets) | ~answer
            correct += int(right.all(dim=1).sum())
    finally:
        model.train(was_training)
    return correct / n


class MixedBatches:
    """Corpus batches with passkey batches mixed in: batch i is a passkey batch with probability `rate`, decided
    and generated from (seed, i) alone, so the position (i and the corpus loader's state) is the whole state."""

    def __init__(self, loader: data.PackedLoader | None, task: PasskeyTask, rate: float, batch_size: int,
                 seq_len: int, seed: int):
        self.loader, self.task, self.rate = loader, task, rate
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = random.Random(pt.seed_of(self.seed, "passkey", self.index))
        self.index += 1
        if self.loader is None or rng.random() < self.rate:
            return self.task.batch(rng, self.batch_size, self.seq_len)
        return next(self.loader)

    def state_dict(self) -> dict:
        return {"index": self.index, "rate": self.rate, "loader": self.loader.state_dict() if self.loader else None}

    def load_state_dict(self, state: dict) -> None:
        if state["rate"] != self.rate:
            raise ValueError(f"the run was started with --passkey-rate {state['rate']}, not {self.rate}")
        self.index = state["index"]
        if self.loader is not None:
            self.loader.load_state_dict(state["loader"])


# ------------------------------------------------------------------------------------------------ configs
def original_length(config: ModelConfig, init: Path, given: int | None) -> int:
    """The length the model was trained at: --original-length, else the YaRN config's, else the init run's
    --seq-len, else max_position_embeddings."""
    if given:
        return given
    if config.yarn is not None:
        return config.yarn["original_max_position_embeddings"]
    run_config = Path(init) / "config.json"
    if (Path(init) / "checkpoints").is_dir() and run_config.is_file():
        seq_len = json.loads(run_config.read_text()).get("seq_len")
        if seq_len:
            return int(seq_len)
    return config.max_position_embeddings


def extended_config(config: ModelConfig, seq_len: int, original: int, factor: float | None, *,
                    beta_fast: float = 32, beta_slow: float = 1, mscale: float = 1.0,
                    mscale_all_dim: float = 1.0) -> ModelConfig:
    """The model config for training at `seq_len`: YaRN with `factor` over `original` (None: keep the model's
    YaRN if it reaches seq_len, else seq_len / original); factor 1 keeps the RoPE as it is."""
    y = config.yarn
    if factor is None:
        if y is not None and y["factor"] * original >= seq_len:
            factor = y["factor"]
        else:
            factor = max(1.0, seq_len / original)
    if factor <= 1.0:
        return config.replace(max_position_embeddings=max(config.max_position_embeddings, seq_len))
    rope = {"type": "yarn", "factor": float(factor), "original_max_position_embeddings": original,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    return config.replace(rope_scaling=rope, max_position_embeddings=max(int(original * factor), seq_len))


def rebuild(model: Transformer, config: ModelConfig) -> Transformer:
    """The same weights under a new config (new RoPE/YaRN, or an added indexer, which keeps its fresh init)."""
    new = Transformer(config)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    bad = [k for k in missing if ".indexer." not in k] + list(unexpected)
    if bad:
        raise ValueError(f"cannot carry the weights over to the new config: {bad[:4]}")
    return new


# ------------------------------------------------------------------------------------------------ stage
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek extend", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, required=True, help="folder for everything this run writes")
    p.add_argument("--init", type=Path, required=True, help="starting model: a run dir or an HF-format folder")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: found with --init)")
    p.add_argument("--seq-len", type=int, required=True, help="training sequence length (the extended context)")
    y = p.add_argument_group("YaRN (rope_scaling)")
    y.add_argument("--factor", type=float, help="YaRN scale s (default: keep the model's YaRN if it reaches "
                   "--seq-len, else seq-len / original length); 1 trains at the new length with RoPE unchanged")
    y.add_argument("--original-length", type=int, help="original_max_position_embeddings (default: the model's "
                   "YaRN value, else the --init run's --seq-len, else max_position_embeddings)")
    y.add_argument("--beta-fast", type=float, default=32.0, help="YaRN beta (alpha in V3's notation; default 32)")
    y.add_argument("--beta-slow", type=float, default=1.0, help="YaRN beta_slow (default 1)")
    y.add_argument("--mscale", type=float, default=1.0, help="YaRN mscale (default 1.0 as V3)")
    y.add_argument("--mscale-all-dim", type=float, default=1.0, help="YaRN mscale_all_dim (default 1.0 as V3)")
    s = p.add_argument_group("DeepSeek Sparse Attention")
    s.add_argument("--dsa", choices=dsa.MODES, help="warmup: add/train only the indexer, attention dense; "
                   "sparse: train everything with top-k attention")
    s.add_argument("--index-topk", type=int, help="keys kept per query (V3.2: 2048); needed to add an indexer")
    s.add_argument("--index-heads", type=int, help="indexer heads when adding one (default: half the attention heads)")
    s.add_argument("--index-head-dim", type=int, help="indexer head dim when adding one (default qk_nope_head_dim)")
    d = p.add_argument_group("data")
    d.add_argument("--data", action="append", metavar="PATH", help="pretraining corpus (default: the stdlib)")
    d.add_argument("--fim-rate", type=float, default=data.FIM_RATE, help="fill-in-the-middle rate (default 0.5)")
    d.add_argument("--passkey-rate", type=float, default=0.25,
                   help="fraction of batches that are passkey retrieval (default 0.25; 1: passkey only)")
    d.add_argument("--passkey-digits", type=int, default=5, help="digits in a passkey (default 5)")
    d.add_argument("--eval-lengths", help="comma-separated lengths for the passkey eval (default: --seq-len)")
    d.add_argument("--eval-n", type=int, default=64, help="passkey examples per length per eval (default 64)")
    p.add_argument("--mtp-weight", type=float, default=0.1, help="MTP loss weight (default 0.1)")
    p.add_argument("--guard-sigma", type=float, default=6.0,
                   help="skip steps whose loss or grad norm is this many sigma over the recent window (default 6; "
                        "inf disables: a small model learning to copy has real grad-norm jumps the guard would skip)")
    pt.add_train_args(p, steps=200, lr=3e-4, batch_size=4, warmup=0, schedule="constant")
    for action in p._actions:
        if action.dest == "lr":
            action.default, action.help = None, "peak learning rate (default 3e-4; 1e-3 with --dsa warmup, as V3.2)"
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.lr is None:
        args.lr = 1e-3 if args.dsa == "warmup" else 3e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = args.run_dir
    try:
        if not 0 <= args.passkey_rate <= 1:
            raise ValueError(f"--passkey-rate must be in [0, 1], got {args.passkey_rate}")
        model, tok = pt.load_init(args.init, args.tokenizer)
        original = original_length(model.config, args.init, args.original_length)
        config = extended_config(model.config, args.seq_len, original, args.factor, beta_fast=args.beta_fast,
                                 beta_slow=args.beta_slow, mscale=args.mscale, mscale_all_dim=args.mscale_all_dim)
        if args.dsa and config.index_topk is None and args.index_topk is None:
            raise ValueError("--dsa needs --index-topk K to add an indexer to a model that has none")
        if args.index_topk is not None:
            if config.index_topk is None:  # a new indexer: V3.2 has 64 x 128 beside 128 heads of 128 + 64
                heads = args.index_heads or max(1, config.num_attention_heads // 2)
                dim = args.index_head_dim or max(config.qk_nope_head_dim, config.qk_rope_head_dim)
            else:
                heads, dim = config.index_n_heads, config.index_head_dim
            config = dsa.with_indexer(config, args.index_topk, heads, dim)
        if config != model.config:
            torch.manual_seed(args.seed)  # a new indexer's initial weights
            model = rebuild(model, config)
        task = PasskeyTask(tok, args.passkey_digits)
        lengths = [int(x) for x in args.eval_lengths.split(",")] if args.eval_lengths else [args.seq_len]
        if min(lengths + [args.seq_len]) < task.min_len() and (args.passkey_rate > 0 or args.eval_lengths):
            raise ValueError(f"passkey examples need at least {task.min_len()} tokens; raise --seq-len/--eval-lengths")
        resuming = prepare_run_dir(run_dir, pt.run_config("extend", model, args), may_change=pt.MAY_CHANGE)
        pt.save_tokenizer(tok, run_dir)
        corpus = None if args.passkey_rate >= 1 else data.load_corpus(tok, args.data, cache_dir=run_dir / "cache",
                                                                        log=print)
    except (data.DataError, RunDirError, ValueError, OSError) as e:
        print(f"nanoseek extend: {e}", file=sys.stderr)
        return 2
    if args.dsa:
        dsa.set_mode(model, args.dsa)
        if args.dsa == "warmup":
            args.bias_gamma = 0.0  # the main model is frozen: its routing biases too
    loader = (data.PackedLoader(corpus, tok, args.batch_size, args.seq_len, seed=args.seed, fim_rate=args.fim_rate)
              if corpus is not None else None)
    batches = MixedBatches(loader, task, args.passkey_rate, args.batch_size, args.seq_len, args.seed)

    def eval_fn(m: Transformer) -> dict:
        out = {}
        if corpus is not None:
            bpt = data.val_bytes_per_token(corpus, tok, args.seq_len)
            out.update(evaluate_lm(m, lambda: data.val_batches(corpus, tok, args.batch_size, args.seq_len), bpt,
                                   max_batches=4))
        for T in lengths:
            out[f"passkey/acc@{T}"] = passkey_accuracy(m, task, T, args.eval_n, seed=args.seed)
        return out

    optimizer = build_optimizer(model, args.lr, weight_decay=args.weight_decay)
    y = config.yarn
    rope = (f"YaRN x{y['factor']:g} over {y['original_max_position_embeddings']}" if y else "RoPE unchanged")
    sparse = f", DSA {args.dsa} top-{config.index_topk}" if args.dsa else ""
    print(f"extend: {args.steps} steps x {args.batch_size} x {args.seq_len} tokens, {rope}{sparse}, lr {args.lr:g}, "
          f"passkey rate {args.passkey_rate:g}, run dir {run_dir}" + (" [resuming]" if resuming else ""))
    t0 = time.time()
    cfg = pt.train_config(args, mtp_weight=args.mtp_weight)
    cfg.guard_sigma = args.guard_sigma
    trainer = Trainer(model, optimizer, batches, run_dir, cfg, stage="extend", eval_fn=eval_fn, seq_len=args.seq_len)
    last = trainer.fit()
    if last:
        acc = ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in last.items() if k.startswith("passkey/"))
        print(f"extend: done, step {trainer.step}, loss {last['loss']:.3f}" + (f", passkey {acc}" if acc else "")
              + f" in {time.time() - t0:.0f}s; checkpoint {trainer.ckpt.latest()}")
    return 0
