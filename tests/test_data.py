"""Data: sources and their errors, val split, cache, FIM, packing, the resumable sharded loader."""

import json
import random
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoseek import data
from nanoseek.data import DataError, FimPieces, PackedLoader, fim_ids, fim_rng, fim_transform
from nanoseek.tokenizer import Tokenizer

WORDS = "def class return import self lambda yield for in if else while try except with as 0 1 2 x y".split()


def make_doc(i: int) -> str:
    rng = random.Random(i)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 12))]
    return f"# doc {i} ünïcode 🎉\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([make_doc(i) for i in range(50)], vocab_size=300)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(80):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i:03d}.py").write_text(make_doc(i))
    return root


@pytest.fixture(scope="module")
def corpus(tok, corpus_dir, tmp_path_factory):
    return data.load_corpus(tok, [str(corpus_dir)], tmp_path_factory.mktemp("cache"))


# ---- sources, formats, errors ----------------------------------------------------------------------


def test_stdlib_is_the_default_corpus():
    sources = data.find_sources(None)
    keys = [s.key for s in sources]
    assert keys == sorted(keys) and len(keys) > 500
    assert "json/decoder.py" in keys and not any(k.startswith("site-packages/") for k in keys)
    assert all(s.path.is_relative_to(sysconfig.get_paths()["stdlib"]) for s in sources)
    # The split is by file and stable: ~1.5% of files, at least MIN_VAL_DOCS.
    hashes = np.array([data.key_hash(k) for k in keys])
    num_val = int((hashes <= data.val_threshold(hashes)).sum())
    assert data.MIN_VAL_DOCS <= num_val <= 0.03 * len(keys)


def test_val_split_has_a_minimum_and_is_stable():
    hashes = np.array([data.key_hash(f"f{i}.py") for i in range(10)])
    assert (hashes <= data.val_threshold(hashes)).sum() == data.MIN_VAL_DOCS
    assert data.key_hash("f1.py") == data.key_hash("f1.py") != data.key_hash("f2.py")
    with pytest.raises(DataError, match="at least 2"):
        data.val_threshold(hashes[:1])


def test_jsonl_records_can_pin_their_split(tmp_path, tok):
    code = tmp_path / "code"
    code.mkdir()
    for i in range(40):
        (code / f"m{i}.py").write_text(f"x = {i}\n")
    rows = [{"text": f"generated {i}", "split": "train"} for i in range(200)] + [{"text": "probe", "split": "val"}]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = data.load_corpus(tok, [str(code), str(tmp_path / "gen.jsonl")])
    val_texts = {tok.decode(corpus.doc(int(d)).tolist()) for d in corpus.val_docs}
    assert "probe" in val_texts
    assert not any(t.startswith("generated") for t in val_texts)  # 1.5% of 200 would be ~3 by hash
    assert sum(t.startswith("x = ") for t in val_texts) == data.MIN_VAL_DOCS  # code still split by hash

    (tmp_path / "bad.jsonl").write_text('{"text": "a", "split": "test"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'split' must be \"train\" or \"val\""):
        data.load_corpus(tok, [str(tmp_path / "bad.jsonl")])
    (tmp_path / "all_train.jsonl").write_text('{"text": "a", "split": "train"}\n{"text": "b", "split": "train"}\n')
    with pytest.raises(DataError, match="no validation documents"):
        data.load_corpus(tok, [str(tmp_path / "all_train.jsonl")])


def test_text_jsonl_parquet_and_folders(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    pq.write_table(pa.table({"text": ["row one", "row two"], "n": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "bad.bin").write_bytes(b"\x00\x01binary")  # skipped inside folders: looks binary
    (tmp_path / ".hidden").write_text("skipped")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("skipped: hidden folders are not walked")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: U+FFFD, said in docs
    docs = {key: text for key, text, _ in data.iter_documents(data.find_sources([str(tmp_path)]))}
    assert docs == {"a.txt": "plain text", "b.jsonl:1": "first", "b.jsonl:3": "second",
                    "c.parquet:1": "row one", "c.parquet:2": "row two", "latin1.txt": "caf\ufffd"}
    corpus = data.load_corpus(tok, [str(tmp_path)])
    assert corpus.num_docs == 6
    assert tok.decode(corpus.doc(0).tolist()) == "plain text"


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": "ok"\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n\n{"body": "x"}\n', r"bad\.jsonl:3: no 'text' field \(found \['body'\]\)"),
    ('{"text": 5}\n', r"bad\.jsonl:1: 'text' must be a string"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected an object like \{\"text\": \"\.\.\.\"\}, got list"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, tok, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        data.load_corpus(tok, [str(tmp_path / "bad.jsonl")])


def test_bad_parquet_names_file_and_column(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t\.parquet: no 'text' column \(columns: \['content'\]\)"):
        data.load_corpus(tok, [str(tmp_path / "t.parquet")])
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet: row 2: 'text' must be a string"):
        data.load_corpus(tok, [str(tmp_path / "n.parquet")])
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read as parquet"):
        data.load_corpus(tok, [str(tmp_path / "junk.parquet")])


def test_missing_empty_and_unreadable_inputs(tmp_path, tok, monkeypatch):
    with pytest.raises(DataError, match=r"nope\.txt: no such file or folder"):
        data.find_sources([str(tmp_path / "nope.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        data.load_corpus(tok, [str(tmp_path / "empty")])
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        data.load_corpus(tok, [str(tmp_path / "blank.txt")])

    (tmp_path / "locked.txt").write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root ignores chmod, so fake the failure
    with pytest.raises(DataError, match=r"locked\.txt: cannot read \(Permission denied\)"):
        data.load_corpus(tok, [str(tmp_path / "locked.txt")])


# ---- the tokenised corpus and its cache ------------------------------------------------------------


def test_corpus_tokens_decode_to_the_documents(corpus, corpus_dir, tok):
    sources = data.find_sources([str(corpus_dir)])
    texts = [doc.text for doc in data.iter_documents(sources)]
    assert corpus.num_docs == len(texts) == 80
    for d in (0, 41, 79):
        assert tok.decode(corpus.doc(d).tolist()) == texts[d]
        assert corpus.bytes_D[d] == len(texts[d].encode())
    assert data.MIN_VAL_DOCS <= len(corpus.val_docs) < 10
    assert set(corpus.val_docs).isdisjoint(corpus.train_docs)


def test_cache_is_reused_and_invalidated(tmp_path, tok, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.py").write_text(make_doc(i))
    first = data.load_corpus(tok, [str(src)], tmp_path / "cache")

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenised despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(data, "tokenize_corpus", fail)
        again = data.load_corpus(tok, [str(src)], tmp_path / "cache")
    assert np.array_equal(again.ids_N, first.ids_N) and np.array_equal(again.offsets_D1, first.offsets_D1)
    assert again.fingerprint == first.fingerprint

    (src / "0.py").write_text("changed " + make_doc(0))  # size and mtime change -> new fingerprint
    changed = data.load_corpus(tok, [str(src)], tmp_path / "cache")
    assert changed.fingerprint != first.fingerprint
    assert tok.decode(changed.doc(0).tolist()).startswith("changed ")


# ---- fill-in-the-middle ----------------------------------------------------------------------------


def test_fim_pieces_reassemble_and_layout_is_psm(tok):
    text = make_doc(7)
    for seed in range(50):
        pieces = fim_transform(text, random.Random(seed), rate=1.0)
        assert pieces.prefix + pieces.middle + pieces.suffix == text
    pieces = FimPieces("def f(", "x", "):\n")
    assert fim_ids(pieces, tok) == ([tok.fim_begin_id] + tok.encode("def f(") + [tok.fim_hole_id]
                                    + tok.encode("):\n") + [tok.fim_end_id] + tok.encode("x"))
    assert fim_transform(text, random.Random(0), rate=0.0) is None


def test_fim_rate_and_determinism():
    text = "0123456789" * 10
    picks = [fim_transform(text, fim_rng(1, 0, d)) for d in range(4000)]
    rate = sum(p is not None for p in picks) / len(picks)
    assert 0.47 < rate < 0.53
    assert picks == [fim_transform(text, fim_rng(1, 0, d)) for d in range(4000)]
    assert picks != [fim_transform(text, fim_rng(1, 1, d)) for d in range(4000)]  # new draw per epoch
    cuts = [len(p.prefix) for p in picks if p]
    assert min(cuts) < 10 and max(cuts) > 60  # split points spread over the document


# ---- packing and the loader ------------------------------------------------------------------------


def batches(loader, n):
    return [next(loader) for _ in range(n)]


def test_packing_is_documents_in_seeded_order_joined_by_eos(corpus, tok):
    loader = PackedLoader(corpus, tok, batch_size=2, seq_len=16, seed=3, fim_rate=0.0)
    order = np.random.default_rng([3, 0]).permutation(corpus.train_docs)
    expected = np.concatenate([np.append(corpus.doc(d), tok.eos_id) for d in order[:5]]).astype(np.int64)
    rows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches(loader, 20)])  # [R, T + 1]
    stream = rows.flatten().numpy()
    assert len(stream) == 20 * 2 * 17 > len(expected)
    assert np.array_equal(stream[:len(expected)], expected)
    x, y = next(loader)
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.long
    assert x.is_contiguous() and y.is_contiguous()  # callers may .view(-1) the targets
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_loader_is_deterministic_and_seeded(corpus, tok):
    a = batches(PackedLoader(corpus, tok, 4, 32, seed=0), 5)
    b = batches(PackedLoader(corpus, tok, 4, 32, seed=0), 5)
    c = batches(PackedLoader(corpus, tok, 4, 32, seed=1), 5)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_loader_applies_fim_at_about_half_the_documents(corpus, tok):
    def fim_docs(rate):
        loader = PackedLoader(corpus, tok, 8, 64, seed=0, fim_rate=rate)
        tokens = torch.cat([x.flatten() for x, _ in batches(loader, 40)])
        return int((tokens == tok.fim_begin_id).sum()), int((tokens == tok.eos_id).sum())

    fim, docs = fim_docs(0.5)
    assert 0.3 < fim / docs < 0.7
    assert fim_docs(0.0)[0] == 0


def test_ranks_get_disjoint_rows_that_add_up_to_the_single_rank_stream(corpus, tok):
    single = batches(PackedLoader(corpus, tok, batch_size=6, seq_len=16, seed=5), 4)
    ranks = [batches(PackedLoader(corpus, tok, batch_size=2, seq_len=16, seed=5, rank=r, world_size=3), 4)
             for r in range(3)]
    for step in range(4):
        x_single = single[step][0]
        for r in range(3):
            assert torch.equal(ranks[r][step][0], x_single[r::3])  # rank r: rows r, r + 3, ...
        rows = {tuple(row.tolist()) for r in range(3) for row in ranks[r][step][0]}
        assert len(rows) == 6  # disjoint


@pytest.mark.parametrize("consumed", [1, 7, 60])  # 60 steps crosses an epoch boundary
def test_resume_from_state_dict_gives_the_same_batches(corpus, tok, consumed):
    loader = PackedLoader(corpus, tok, batch_size=3, seq_len=32, seed=11, rank=1, world_size=2)
    batches(loader, consumed)
    state = json.loads(json.dumps(loader.state_dict()))  # plain JSON values
    expected = batches(loader, 5)

    resumed = PackedLoader(corpus, tok, batch_size=3, seq_len=32, seed=11, rank=1, world_size=2)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(expected, batches(resumed, 5)):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    if consumed == 60:
        assert state["epoch"] >= 1

    other = PackedLoader(corpus, tok, batch_size=3, seq_len=32, seed=12)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_state_is_shared_by_all_ranks(corpus, tok):
    states = []
    for r in range(2):
        loader = PackedLoader(corpus, tok, batch_size=2, seq_len=16, seed=0, rank=r, world_size=2)
        batches(loader, 9)
        states.append(loader.state_dict())
    assert states[0] == states[1]


# ---- validation ------------------------------------------------------------------------------------


def test_validation_batches_are_fixed_and_cover_the_held_out_documents(corpus, tok):
    first = list(data.val_batches(corpus, tok, batch_size=4, seq_len=16))
    second = list(data.val_batches(corpus, tok, batch_size=4, seq_len=16))
    assert len(first) == len(second) > 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    tokens = torch.cat([x.flatten() for x, _ in first])
    assert (tokens == tok.fim_begin_id).sum() == 0
    val_stream = np.concatenate([np.append(corpus.doc(d), tok.eos_id) for d in corpus.val_docs])
    rows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in first]).flatten().numpy()
    assert len(val_stream) - 17 < len(rows) <= len(val_stream)  # all of it but the tail of a row
    assert np.array_equal(rows, val_stream[:len(rows)])
    all_rows = torch.cat([x for x, _ in first])
    assert len(all_rows) % 5 != 0  # so that the ranks below would get unequal shares if not trimmed
    sharded = [list(data.val_batches(corpus, tok, 4, 16, rank=r, world_size=5)) for r in range(5)]
    assert len({len(batches) for batches in sharded}) == 1  # same count on every rank: no collective hangs
    for r in range(5):
        assert torch.equal(torch.cat([x for x, _ in sharded[r]]), all_rows[:len(all_rows) // 5 * 5][r::5])
    assert first[0][0].is_contiguous() and first[0][1].is_contiguous()


def test_val_bytes_per_token_matches_the_text(corpus, tok):
    # Whole rows of the split: every target token counted once, EOS as a token with no bytes.
    val = corpus.val_docs
    num_tokens = corpus.num_tokens(val) + len(val)
    seq_len = num_tokens - 1
    first_token = int(corpus.doc(val[0])[0])  # one row: the stream's first token is no target
    expected = (corpus.bytes_D[val].sum() - tok.token_bytes()[first_token]) / seq_len
    assert data.val_bytes_per_token(corpus, tok, seq_len) == pytest.approx(expected)
    # Shorter rows drop a few tokens (each row's first is never a target) but measure the same text.
    assert data.val_bytes_per_token(corpus, tok, 16) == pytest.approx(corpus.bytes_D[val].sum() / num_tokens, rel=0.1)
    with pytest.raises(DataError, match="validation split"):
        data.val_rows(corpus, tok.eos_id, seq_len=10**7)
