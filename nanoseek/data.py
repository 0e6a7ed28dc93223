"""Corpora, the tokenised cache, fill-in-the-middle, packing and the resumable loader.

Flow: sources (paths) -> documents (key, text, split) -> TokenizedCorpus (ids cached on disk, split into
train/val by a hash of each document's key, unless a JSONL record pins its "split") -> PackedLoader (shuffle
per epoch, FIM, pack into rows, shard rows across ranks) and val_batches (fixed, no FIM).

Shape legend: B batch rows, T sequence length, R packed rows, D documents, N tokens.

The default corpus is the running interpreter's standard library (`*.py`, tests included: they are
62% of its Python, ordinary idiomatic code, and a small model needs the tokens; a handful of them are
deliberately not UTF-8 and are decoded with errors="replace" like any other text).
site-packages is skipped: it differs from machine to machine.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import sysconfig
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .tokenizer import Tokenizer

VAL_FRACTION = 0.015  # documents held out, by a hash of their key
MIN_VAL_DOCS = 3
FIM_RATE = 0.5  # DeepSeek-Coder 3.1.2: PSM at document level with rate 0.5
CACHE_VERSION = 2  # 2: JSONL records may pin their split
_ENCODE_CHUNK_BYTES = 2 << 20  # text per encode_batch call: enough to keep cores busy; peak RSS
                               # for the stdlib ~460 MB (720 MB with 8 MB chunks), torch included

Log = Callable[[str], None]


class DataError(ValueError):
    """Bad corpus input; the message names the file (and line) and says what to fix."""


# ---- sources: which files, read how ----------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # stable name for the val split: path relative to the folder given (or the file name)
    kind: str  # "text" | "jsonl" | "parquet"


def _kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def stdlib_sources() -> list[Source]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    return [Source(p, p.relative_to(root).as_posix(), "text") for p in sorted(files)]


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _walk(folder: Path) -> Iterator[Path]:
    """Files under `folder` in sorted order, not descending into hidden folders (.git) or __pycache__."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            if not name.startswith(".") and os.path.isfile(os.path.join(root, name)):
                yield Path(root, name)


def find_sources(paths: list[str] | None = None) -> list[Source]:
    """Files behind `paths` (None: the stdlib; the word "stdlib" among paths adds it). Folders are walked
    recursively in sorted order, skipping hidden entries, __pycache__ and files that look binary (a NUL byte in
    the first 8 KiB); a file named explicitly is always read."""
    if not paths:
        return stdlib_sources()
    sources = []
    for raw in paths:
        if str(raw) == "stdlib":
            sources.extend(stdlib_sources())
            continue
        path = Path(raw).expanduser()
        if path.is_file():
            sources.append(Source(path, path.name, _kind(path)))
        elif path.is_dir():
            for p in _walk(path):
                if _kind(p) == "text" and _looks_binary(p):
                    continue
                sources.append(Source(p, p.relative_to(path).as_posix(), _kind(p)))
        else:
            raise DataError(f"{raw}: no such file or folder (give text/source files, folders, .jsonl or .parquet)")
    return sources


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); fix its permissions or leave it out") from e


class Document(NamedTuple):
    key: str  # stable name: the hash of it decides the split
    text: str
    split: str | None = None  # "train" / "val" pinned by the record itself; None: by the hash of key


def iter_jsonl(path, *, example: str, errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-blank line of a JSONL file. A line that is not JSON, or not an object,
    is a DataError naming file and line and showing `example` (what a line should look like). errors="replace"
    decodes bad UTF-8 as U+FFFD (corpora: a long run should not stop over one bad byte); "strict" refuses the file
    (task, chat and pair files are small and hand-made)."""
    path = Path(path)
    try:
        text = _read_bytes(path).decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one object "
                            f"like {example}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object like {example}, got {type(record).__name__}")
        yield lineno, record


def _jsonl_records(source: Source) -> Iterator[Document]:
    for lineno, record in iter_jsonl(source.path, example='{"text": "..."}', errors="replace"):
        where = f"{source.path}:{lineno}"
        if "text" not in record:
            raise DataError(f"{where}: no 'text' field (found {sorted(record)}); each line needs {{\"text\": \"...\"}}")
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: 'text' must be a string, got {type(record['text']).__name__}")
        split = record.get("split")
        if split not in (None, "train", "val"):
            raise DataError(f"{where}: 'split' must be \"train\" or \"val\" (or left out), got {split!r}")
        yield Document(f"{source.key}:{lineno}", record["text"], split)


def _parquet_records(source: Source) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises several types for unreadable or non-parquet files
        raise DataError(f"{source.path}: cannot read as parquet ({e})") from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{source.path}: no 'text' column (columns: {pf.schema_arrow.names}); rename the text column to 'text'")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                raise DataError(f"{source.path}: row {row}: 'text' must be a string, got {type(value).__name__}")
            yield Document(f"{source.key}:{row}", value)


def iter_documents(sources: list[Source]) -> Iterator[Document]:
    """Every document, in source order. Text files are one document each, decoded as UTF-8 with
    errors="replace" (U+FFFD for bad bytes); JSONL lines and parquet rows one each. A JSONL record may pin
    its split with "split": "train" or "val" (e.g. generated data that must never be validation)."""
    for source in sources:
        if source.kind == "jsonl":
            yield from _jsonl_records(source)
        elif source.kind == "parquet":
            yield from _parquet_records(source)
        else:
            yield Document(source.key, _read_bytes(source.path).decode("utf-8", errors="replace"))


# ---- train / validation split ----------------------------------------------------------------------


def key_hash(key: str) -> float:
    """A stable uniform number in [0, 1) for a document key (not Python's salted hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def val_threshold(hashes: np.ndarray) -> float:
    """Documents with key_hash <= this are validation: VAL_FRACTION of them, but at least a few."""
    n = len(hashes)
    if n < 2:
        raise DataError(f"the corpus has {n} document(s); need at least 2 (some are held out for validation)")
    k = min(MIN_VAL_DOCS, n - 1)
    return max(VAL_FRACTION, float(np.partition(hashes, k - 1)[k - 1]))


_PIN = {None: 0, "train": 1, "val": 2}


def validation_mask(hashes_D: np.ndarray, pinned_D: np.ndarray) -> np.ndarray:
    """Which documents are validation: pinned ones (pinned_D 1 train, 2 val) as pinned, the others by
    val_threshold over their own hashes."""
    free = pinned_D == 0
    is_val = pinned_D == 2
    if free.sum() >= 2 or not (~free).any():
        is_val = is_val | (free & (hashes_D <= val_threshold(hashes_D[free])))
    if not is_val.any():
        raise DataError("no validation documents: every document is pinned to \"split\": \"train\"; add documents "
                        "without a pin (or pinned to \"val\")")
    return is_val


def training_texts(sources: list[Source], max_bytes: int) -> Iterator[str]:
    """The first `max_bytes` (UTF-8) of documents outside the validation hash range, in source order:
    a deterministic sample for tokenizer training. (Only documents that val_threshold adds to reach
    MIN_VAL_DOCS in a tiny corpus can slip in; it avoids reading the corpus twice.)"""
    seen = 0
    for key, text, split in iter_documents(sources):
        if seen >= max_bytes:
            return
        if text and split != "val" and (split == "train" or key_hash(key) > VAL_FRACTION):
            seen += len(text.encode("utf-8"))
            yield text


# ---- the tokenised corpus, cached ------------------------------------------------------------------


@dataclass
class TokenizedCorpus:
    """All documents' token ids back to back (no EOS), with per-document offsets, bytes and split."""

    ids_N: np.ndarray  # uint16/uint32 token ids
    offsets_D1: np.ndarray  # int64, document d is ids_N[offsets[d]:offsets[d+1]]
    bytes_D: np.ndarray  # int64 UTF-8 bytes of each document's text
    is_val_D: np.ndarray  # bool
    fingerprint: str  # identifies sources + tokenizer; loaders refuse a state from another corpus

    @property
    def num_docs(self) -> int:
        return len(self.bytes_D)

    @property
    def train_docs(self) -> np.ndarray:
        return np.flatnonzero(~self.is_val_D)

    @property
    def val_docs(self) -> np.ndarray:
        return np.flatnonzero(self.is_val_D)

    def doc(self, d: int) -> np.ndarray:
        return self.ids_N[self.offsets_D1[d]:self.offsets_D1[d + 1]]

    def num_tokens(self, docs: np.ndarray) -> int:
        return int((self.offsets_D1[docs + 1] - self.offsets_D1[docs]).sum())

    def bytes_per_token(self, docs: np.ndarray) -> float:
        """Tokenizer compression on `docs` (EOS separators not counted)."""
        return float(self.bytes_D[docs].sum()) / max(1, self.num_tokens(docs))


_ARRAYS = ("ids_N", "offsets_D1", "bytes_D", "is_val_D")


def corpus_fingerprint(sources: list[Source], tokenizer: Tokenizer) -> str:
    """Changes when any file's path/size/mtime, the split rule or the tokenizer changes."""
    files = []
    for s in sources:
        try:
            st = s.path.stat()
        except OSError as e:
            raise DataError(f"{s.path}: cannot read ({e.strerror or e})") from e
        files.append([str(s.path.resolve()), s.key, s.kind, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CACHE_VERSION, "val": [VAL_FRACTION, MIN_VAL_DOCS],
                       "tokenizer": tokenizer.fingerprint(), "files": files})
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_corpus(sources: list[Source], tokenizer: Tokenizer, log: Log | None = None) -> TokenizedCorpus:
    """Read and tokenise every document (encode_batch in chunks of ~2 MB of text)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    # Flat arrays rather than per-document objects: JSONL corpora can hold millions of documents.
    pieces, lengths, nbytes, hashes, pinned = [], array("q"), array("q"), array("d"), array("b")
    chunk, chunk_bytes, t0, last_log = [], 0, time.time(), time.time()

    def flush():
        ids_per_doc = tokenizer.encode_batch(chunk)
        lengths.extend(map(len, ids_per_doc))
        pieces.append(np.fromiter(itertools.chain.from_iterable(ids_per_doc), dtype=dtype))
        chunk.clear()

    for key, text, split in iter_documents(sources):
        if not text:
            continue  # nothing to learn from; would only add an EOS
        chunk.append(text)
        nbytes.append(len(text.encode("utf-8")))
        hashes.append(key_hash(key))
        pinned.append(_PIN[split])
        chunk_bytes += nbytes[-1]
        if chunk_bytes >= _ENCODE_CHUNK_BYTES:
            flush()
            chunk_bytes = 0
            if log and time.time() - last_log > 5:
                log(f"  tokenised {len(lengths)} documents, {sum(nbytes) / 1e6:.1f} MB, {time.time() - t0:.1f}s")
                last_log = time.time()
    flush()
    if not lengths:
        where = ", ".join(str(s.path) for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise DataError(f"empty corpus: no non-empty documents in {where or 'the paths given'}")
    hashes_D = np.frombuffer(hashes, dtype=np.float64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    return TokenizedCorpus(
        ids_N=np.concatenate(pieces),
        offsets_D1=offsets,
        bytes_D=np.frombuffer(nbytes, dtype=np.int64).copy(),
        is_val_D=validation_mask(hashes_D, np.frombuffer(pinned, dtype=np.int8)),
        fingerprint=corpus_fingerprint(sources, tokenizer),
    )


def load_corpus(tokenizer: Tokenizer, data: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
                log: Log | None = None) -> TokenizedCorpus:
    """The tokenised corpus for `data` paths (None: the stdlib), from `cache_dir` when it is there.

    The cache is keyed by corpus_fingerprint, so an edited file or another tokenizer re-tokenises.
    """
    sources = find_sources(data)
    if not sources:
        raise DataError(f"empty corpus: no files found under {data}")
    fingerprint = corpus_fingerprint(sources, tokenizer)
    folder = Path(cache_dir) / f"corpus-{fingerprint[:16]}" if cache_dir else None
    if folder and (folder / "meta.json").is_file():
        if log:
            log(f"corpus: reusing tokenised cache {folder}")
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
        return TokenizedCorpus(**arrays, fingerprint=fingerprint)
    if log:
        log(f"corpus: tokenising {len(sources)} files")
    t0 = time.time()
    corpus = tokenize_corpus(sources, tokenizer, log)
    if log:
        log(f"corpus: {len(corpus.ids_N):,} tokens in {corpus.num_docs} documents "
            f"({len(corpus.val_docs)} held out) in {time.time() - t0:.1f}s")
    if folder:
        _save_corpus(corpus, folder)
    return corpus


def _save_corpus(corpus: TokenizedCorpus, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(corpus, name))
    # meta.json is written last: its presence is what marks the cache complete.
    (tmp / "meta.json").write_text(json.dumps({"fingerprint": corpus.fingerprint, "version": CACHE_VERSION}) + "\n")
    tmp.chmod(0o755)  # mkdtemp makes it private
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ---- fill-in-the-middle (DeepSeek-Coder 3.1.2; Bavarian et al. 2022, "Efficient Training of Language
# Models to Fill in the Middle") --------------------------------------------------------------------


class FimPieces(NamedTuple):
    prefix: str
    middle: str
    suffix: str


def fim_transform(text: str, rng: random.Random, rate: float = FIM_RATE) -> FimPieces | None:
    """With probability `rate`, split `text` at two uniform character positions into
    prefix/middle/suffix (any may be empty); None means: keep the document as it is."""
    if rng.random() >= rate:
        return None
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return FimPieces(text[:i], text[i:j], text[j:])


def fim_ids(pieces: FimPieces, tokenizer: Tokenizer) -> list[int]:
    """PSM layout: <fim_begin> prefix <fim_hole> suffix <fim_end> middle. Each piece is tokenised on
    its own, as at inference, where the model sees exactly these boundaries."""
    prefix, suffix, middle = tokenizer.encode_batch([pieces.prefix, pieces.suffix, pieces.middle])
    return ([tokenizer.fim_begin_id] + prefix + [tokenizer.fim_hole_id] + suffix
            + [tokenizer.fim_end_id] + middle)


def fim_rng(seed: int, epoch: int, doc: int) -> random.Random:
    # str seeds go through sha512 inside random.Random: the same on every machine and process.
    return random.Random(f"fim:{seed}:{epoch}:{doc}")


# ---- packing and the resumable loader --------------------------------------------------------------


class PackedLoader:
    """Infinite stream of (inputs, targets) LongTensor batches [B, T] from the training documents.

    One global token stream: per epoch the training documents in a seeded order, each (FIM applied
    with `fim_rate`) followed by EOS; cut into rows of T + 1 tokens (inputs = row[:-1], targets =
    row[1:]). A step takes world_size * B consecutive rows and rank r keeps rows r, r + W, ... So
    ranks get disjoint rows, and the rows of one step are the same for any world size.

    The position (epoch, document, token within it) sits at a step boundary and is the same on every
    rank, so state_dict() from any rank resumes any rank, even with another world size or B.
    """

    def __init__(self, corpus: TokenizedCorpus, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, fim_rate: float = FIM_RATE):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if len(corpus.train_docs) == 0:
            raise DataError("the corpus has no training documents")
        self.corpus, self.tokenizer = corpus, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size, self.fim_rate = seed, rank, world_size, fim_rate
        self.train_docs = corpus.train_docs
        self.epoch = self.doc_pos = self.token_pos = 0
        self._order_epoch, self._order = -1, None
        self._cached_key, self._cached_tokens = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.train_docs)
            self._order_epoch = epoch
        return self._order

    def document_tokens(self, epoch: int, pos: int) -> np.ndarray:
        """Tokens of the pos-th document of `epoch`, FIM applied, EOS appended (int64)."""
        if self._cached_key != (epoch, pos):
            d = int(self._epoch_order(epoch)[pos])
            ids = self.corpus.doc(d)
            pieces = fim_transform(self.tokenizer.decode(ids.tolist()), fim_rng(self.seed, epoch, d), self.fim_rate) \
                if self.fim_rate > 0 else None
            if pieces is not None:
                ids = fim_ids(pieces, self.tokenizer)
            self._cached_tokens = np.append(np.asarray(ids, dtype=np.int64), self.tokenizer.eos_id)
            self._cached_key = (epoch, pos)
        return self._cached_tokens

    def _take(self, n: int) -> np.ndarray:
        """The next n tokens of the stream; advances the position."""
        out_N = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            tokens = self.document_tokens(self.epoch, self.doc_pos)
            part = tokens[self.token_pos:self.token_pos + n - filled]
            out_N[filled:filled + len(part)] = part
            filled += len(part)
            self.token_pos += len(part)
            if self.token_pos == len(tokens):
                self.token_pos, self.doc_pos = 0, self.doc_pos + 1
                if self.doc_pos == len(self.train_docs):
                    self.epoch, self.doc_pos = self.epoch + 1, 0
        return out_N

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        rows_RT1 = self._take(self.world_size * self.batch_size * (T + 1)).reshape(-1, T + 1)
        rows_BT1 = torch.from_numpy(rows_RT1[self.rank::self.world_size])
        return rows_BT1[:, :-1].contiguous(), rows_BT1[:, 1:].contiguous()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc_pos": self.doc_pos, "token_pos": self.token_pos,
                "seed": self.seed, "fim_rate": self.fim_rate, "corpus": self.corpus.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "fim_rate": self.fim_rate, "corpus": self.corpus.fingerprint}
        for name, value in mine.items():
            if state[name] != value:
                raise ValueError(f"loader state is for {name}={state[name]!r} but this loader has {value!r}; "
                                 "resume with the same data, tokenizer, seed and FIM rate")
        if not (0 <= state["doc_pos"] < len(self.train_docs)):
            raise ValueError(f"loader state doc_pos {state['doc_pos']} is outside this corpus' "
                             f"{len(self.train_docs)} training documents")
        self.epoch, self.doc_pos, self.token_pos = state["epoch"], state["doc_pos"], state["token_pos"]


# ---- validation ------------------------------------------------------------------------------------


def val_rows(corpus: TokenizedCorpus, eos_id: int, seq_len: int, world_size: int = 1) -> np.ndarray:
    """The held-out documents in corpus order, EOS after each, as rows [R, T + 1]; the tail is
    dropped, and R is a multiple of world_size so every rank runs the same number of batches."""
    docs = corpus.val_docs
    stream_N = np.concatenate([np.append(corpus.doc(d).astype(np.int64), eos_id) for d in docs])
    num_rows = len(stream_N) // (seq_len + 1) // world_size * world_size
    if num_rows == 0:
        raise DataError(f"the validation split has {len(stream_N)} tokens, fewer than {world_size} row(s) of "
                        f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a larger corpus")
    return stream_N[:num_rows * (seq_len + 1)].reshape(num_rows, seq_len + 1)


def val_batches(corpus: TokenizedCorpus, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every validation row once, no FIM, same order every time; rank r takes rows r, r + W, ..."""
    rows_RT1 = torch.from_numpy(val_rows(corpus, tokenizer.eos_id, seq_len, world_size)[rank::world_size])
    for start in range(0, len(rows_RT1), batch_size):
        rows_BT1 = rows_RT1[start:start + batch_size]
        yield rows_BT1[:, :-1].contiguous(), rows_BT1[:, 1:].contiguous()


def val_bytes_per_token(corpus: TokenizedCorpus, tokenizer: Tokenizer, seq_len: int, world_size: int = 1) -> float:
    """UTF-8 bytes per target token over exactly the rows val_batches yields (all ranks together);
    control tokens (EOS) count as tokens with 0 bytes. bits/byte = mean loss / ln 2 / this."""
    targets = val_rows(corpus, tokenizer.eos_id, seq_len, world_size)[:, 1:]
    return float(np.asarray(tokenizer.token_bytes(), dtype=np.int64)[targets].sum()) / targets.size
