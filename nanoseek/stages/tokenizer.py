"""`nanoseek tokenizer`: train the byte-level BPE tokenizer and tokenise the corpus into the run dir.

Writes DIR/tokenizer/ (loads with transformers.AutoTokenizer) and DIR/cache/corpus-*/ (token ids that
pretraining reads). Running it again on the same DIR reuses both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import data
from ..tokenizer import DEFAULT_VOCAB_SIZE, Tokenizer

DEFAULT_MAX_MB = 50.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, type=Path,
                   help="run folder; the tokenizer goes to RUN_DIR/tokenizer, token ids to RUN_DIR/cache")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE vocabulary size, reserved tokens included (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--data", action="append", default=None, metavar="PATH",
                   help="corpus file or folder (text/source files, .jsonl with a 'text' field, .parquet with "
                        "a 'text' column); repeat for several; default: this Python's standard library")
    p.add_argument("--max-mb", type=float, default=None,
                   help=f"train the tokenizer on the first M MB of training documents (default {DEFAULT_MAX_MB:g}); "
                        "the whole corpus is still tokenised")
    return p.parse_args(argv)


def _check_reuse(info: dict | None, args: argparse.Namespace, tok_dir: Path) -> None:
    """Refuse to silently reuse a tokenizer trained with different options than those asked for now."""
    if info is None:
        return
    asked = {"vocab_size": args.vocab_size, "data": args.data, "max_mb": args.max_mb}
    for name, value in asked.items():
        if value is not None and info.get(name) != value:
            raise data.DataError(f"{tok_dir} was trained with {name}={info.get(name)!r}, "
                             f"but {value!r} was asked; use another --run-dir or delete {tok_dir}")


def train(args: argparse.Namespace, tok_dir: Path) -> Tokenizer:
    vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
    max_mb = args.max_mb if args.max_mb is not None else DEFAULT_MAX_MB
    sources = data.find_sources(args.data)
    print(f"tokenizer: training byte-level BPE, vocab {vocab_size}, on up to {max_mb:g} MB of "
          f"{len(sources)} files ({'--data' if args.data else 'Python standard library'})")
    sample_bytes = 0

    def counted(texts):
        nonlocal sample_bytes
        for text in texts:
            sample_bytes += len(text.encode("utf-8"))
            yield text

    t0 = time.time()
    tok = Tokenizer.train(counted(data.training_texts(sources, int(max_mb * 1e6))), vocab_size)
    seconds = time.time() - t0
    if sample_bytes == 0:
        raise data.DataError(f"empty corpus: no text to train the tokenizer on in {args.data}")
    print(f"tokenizer: trained on {sample_bytes / 1e6:.1f} MB in {seconds:.1f}s; saved to {tok_dir}")
    tok.save(tok_dir, info={"vocab_size": vocab_size, "data": args.data, "max_mb": max_mb,
                            "train_bytes": sample_bytes, "train_seconds": round(seconds, 2)})
    return tok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tok_dir = args.run_dir / "tokenizer"
    try:
        if (tok_dir / "tokenizer.json").is_file():
            _check_reuse(Tokenizer.load_info(tok_dir), args, tok_dir)
            tok = Tokenizer.load(tok_dir)
            print(f"tokenizer: reusing {tok_dir} (vocab {tok.vocab_size}); delete it to retrain")
        else:
            tok = train(args, tok_dir)
        t0 = time.time()
        corpus = data.load_corpus(tok, args.data, args.run_dir / "cache", log=print)
    except data.DataError as e:
        print(f"nanoseek tokenizer: {e}", file=sys.stderr)
        return 2
    val, train_docs = corpus.val_docs, corpus.train_docs
    print(f"summary: vocab {tok.vocab_size} | corpus {len(corpus.ids_N):,} tokens, {corpus.num_docs} documents "
          f"(train {corpus.num_tokens(train_docs):,} tokens, val {corpus.num_tokens(val):,} tokens in {len(val)} "
          f"documents) | bytes/token on val {corpus.bytes_per_token(val):.3f} | corpus ready in {time.time() - t0:.1f}s")
    return 0
