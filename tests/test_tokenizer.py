"""Tokenizer: exact UTF-8 round trips, reserved ids, HF parity, chat template and loss mask, the stage."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.stages import tokenizer as stage
from nanoseek.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, TEXT_TOKENS, Tokenizer, split_reasoning

SAMPLE = [
    "def add(a, b):\n    return a + b  # 2024 tests\n",
    "class Foo:\n    \"\"\"Docstring.\"\"\"\n\n    def __init__(self):\n        self.x = [1, 2, 3]\n",
    "héllo wörld, 你好世界, emoji 🎉🚀, tabs\tand\r\nCRLF\n",
    "<think>2 + 2 is 4</think><answer>4</answer>",
] * 20

TRICKY = [
    "", " ", "\x00", "a\x00b", "\r\n\r\n", "\t \t", " " * 300, "\n" * 50, "🎉", "👩‍👩‍👧‍👦", "你好世界",
    "\ufeffBOM", "\U0010ffff", "x = 1 .", "a <think> b", "<think></think>", "<|eos|>", "don't  stop",
    "  leading", "trailing  ", "1234567890", "\u0301combining", "e\u0301", "Ω≈ç√∫",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(SAMPLE, vocab_size=400)


@pytest.fixture(scope="module")
def hf_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tokenizer"
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def hf(hf_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(hf_dir)


def test_reserved_tokens_have_fixed_ids(tok):
    names = SPECIAL_TOKENS + TEXT_TOKENS
    assert [tok.id_to_token(i) for i in range(len(names))] == names
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert (tok.fim_begin_id, tok.fim_hole_id, tok.fim_end_id) == (3, 4, 5)
    assert tok.role_ids == {"system": 6, "user": 7, "assistant": 8}
    assert (tok.think_id, tok.think_end_id, tok.answer_id, tok.answer_end_id) == (9, 10, 11, 12)
    assert 269 < tok.vocab_size <= 400


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_no_special_tokens_added_implicitly(tok):
    ids = tok.encode("def add(a, b):")
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.encode("") == []


def test_numbers_split_into_digits(tok):
    # DeepSeek LLM 2.1: digits are never merged, even though "2024" occurs in the training text.
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_reasoning_tags_are_single_tokens_that_survive_decoding(tok):
    text = "<think>a</think><answer>b</answer>"
    ids = tok.encode(text)
    assert ids == [tok.think_id] + tok.encode("a") + [tok.think_end_id, tok.answer_id] + tok.encode("b") + [tok.answer_end_id]
    assert tok.decode(ids + [tok.eos_id], skip_special_tokens=True) == text  # EOS dropped, tags kept
    assert split_reasoning(tok.decode(ids)) == ("a", "b")
    assert split_reasoning("no tags") == (None, None)


def test_token_bytes_count_text_bytes_only(tok):
    lengths = tok.token_bytes()
    text = "héllo 🎉 <think>x</think>"
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode())
    assert lengths[tok.eos_id] == lengths[tok.bos_id] == 0


def test_save_load_round_trip(tok, hf_dir):
    loaded = Tokenizer.load(hf_dir)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode(SAMPLE[2]) == tok.encode(SAMPLE[2])
    with pytest.raises(FileNotFoundError, match="nanoseek tokenizer"):
        Tokenizer.load(hf_dir.parent / "missing")


def test_transformers_loads_it_with_identical_ids(tok, hf, hf_dir):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    assert fast.encode(SAMPLE[2]) == tok.encode(SAMPLE[2]) and fast.eos_token_id == tok.eos_id
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    for text in TRICKY + SAMPLE[:4]:
        ids = tok.encode(text)
        assert hf.encode(text, add_special_tokens=True) == ids, text
        assert hf.decode(ids) == text
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>2 + 2 = 4</think><answer>4</answer>"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "<answer>6</answer>"},
]


def test_render_chat_layout_and_loss_mask(tok):
    ids, mask = tok.render_chat(CONVERSATION[:3])
    system, user, answer = (tok.encode(m["content"]) for m in CONVERSATION[:3])
    assert ids == ([tok.bos_id]
                   + [tok.role_ids["system"]] + system + [tok.eos_id]
                   + [tok.role_ids["user"]] + user + [tok.eos_id]
                   + [tok.role_ids["assistant"]] + answer + [tok.eos_id])
    # Loss only on the assistant's content and the EOS that ends its turn.
    assert mask == [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1)

    prompt, prompt_mask = tok.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == ids[:len(prompt)] and prompt[-1] == tok.role_ids["assistant"]
    assert sum(prompt_mask) == 0
    with pytest.raises(ValueError, match="role"):
        tok.render_chat([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("n, generation_prompt", [(5, False), (4, True), (2, True), (3, False)])
def test_chat_template_matches_transformers(tok, hf, n, generation_prompt):
    ids, mask = tok.render_chat(CONVERSATION[:n], add_generation_prompt=generation_prompt)
    out = hf.apply_chat_template(CONVERSATION[:n], add_generation_prompt=generation_prompt, tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask  # from the template's {% generation %} blocks


def test_tokenizer_config_for_transformers(hf_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["clean_up_tokenization_spaces"] is False
    assert json.loads((hf_dir / "special_tokens_map.json").read_text())["eos_token"] == "<|eos|>"


def test_stage_trains_then_reuses(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.py").write_text(SAMPLE[i % 4] * (i + 1))
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--data", str(corpus), "--vocab-size", "300"]
    assert stage.main(argv) == 0
    first = capsys.readouterr().out
    assert "trained on" in first and "bytes/token on val" in first
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    fingerprint = Tokenizer.load(run / "tokenizer").fingerprint()

    assert stage.main(argv) == 0
    second = capsys.readouterr().out
    assert "reusing" in second and "reusing tokenised cache" in second and "trained on" not in second
    assert Tokenizer.load(run / "tokenizer").fingerprint() == fingerprint

    assert stage.main(["--run-dir", str(run), "--vocab-size", "512"]) == 2
    assert "vocab_size=300" in capsys.readouterr().err


def test_stage_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        stage.main(["--help"])
    out = capsys.readouterr().out
    for option in ("--run-dir", "--vocab-size", "--data", "--max-mb"):
        assert option in out
