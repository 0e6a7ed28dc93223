"""Byte-level BPE tokenizer (HF `tokenizers`), special tokens, chat template.

Byte-level BPE as in DeepSeek LLM section 2.1: bytes are mapped to 256 printable symbols before
merging, so every UTF-8 string (emoji, CJK, NUL, CRLF, long whitespace runs) round-trips exactly and
there is never an unknown token. There is no unicode normaliser. Numbers are split into single digits
before merging (DeepSeek LLM 2.1, following LLaMA), which keeps arithmetic tasks tokenised uniformly.

Token ids 0..12 are fixed, in the order of SPECIAL_TOKENS + TEXT_TOKENS, whatever the vocab size:

    <|bos|> <|eos|> <|pad|>                   document / sequence control
    <|fim_begin|> <|fim_hole|> <|fim_end|>    fill-in-the-middle (DeepSeek-Coder 3.1.2, see data.py)
    <|system|> <|user|> <|assistant|>         chat roles
    <think> </think> <answer> </answer>       reasoning markup: ordinary (non-special) added tokens,
                                              so they survive decode(skip_special_tokens=True) and
                                              a reply can be split by string search

Like HF `tokenizers` and transformers, `encode` matches these strings wherever they occur in the text:
"<|eos|>" typed by a user becomes the EOS id. Nothing is added implicitly (no BOS/EOS post-processor).

Chat format (render_chat and the Jinja `chat_template` written by save(), which give the same ids):

    <|bos|> (<|system|>|<|user|>|<|assistant|>) content <|eos|>  ...  [<|assistant|> if generation prompt]

EOS doubles as end-of-turn, so generation simply stops at EOS. The SFT loss mask is 1 on assistant
content tokens and the EOS that closes the assistant turn, 0 elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<|bos|>", "<|eos|>", "<|pad|>",
    "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>",
    "<|system|>", "<|user|>", "<|assistant|>",
]
TEXT_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

DEFAULT_VOCAB_SIZE = 4096
INFO_FILE = "nanoseek_tokenizer.json"

# The same format as render_chat, for transformers' apply_chat_template. The {% generation %} block
# marks what render_chat's loss mask marks, so return_assistant_tokens_mask=True agrees with it too.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}{{ eos_token }}"
    "{% elif message['role'] == 'system' %}<|system|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _empty_bpe() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        # add_prefix_space=False: a leading space would be invented on decode otherwise.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _mark_text_tokens_non_special(tok: HFTokenizer) -> HFTokenizer:
    # The trainer registers every reserved token as special (so they get ids 0..12); flip the
    # reasoning tags to ordinary added tokens so decoding never drops them.
    state = json.loads(tok.to_str())
    for added in state["added_tokens"]:
        if added["content"] in TEXT_TOKENS:
            added["special"] = False
    return HFTokenizer.from_str(json.dumps(state))


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with nanoseek's reserved tokens as attributes."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        for name in SPECIAL_TOKENS + TEXT_TOKENS:
            if tok.token_to_id(name) is None:
                raise ValueError(f"tokenizer lacks the reserved token {name!r}; train it with Tokenizer.train")
        ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS + TEXT_TOKENS}
        self.bos_id, self.eos_id, self.pad_id = ids["<|bos|>"], ids["<|eos|>"], ids["<|pad|>"]
        self.fim_begin_id, self.fim_hole_id, self.fim_end_id = (
            ids["<|fim_begin|>"], ids["<|fim_hole|>"], ids["<|fim_end|>"])
        self.role_ids = {role: ids[token] for role, token in ROLE_TOKENS.items()}
        self.think_id, self.think_end_id = ids["<think>"], ids["</think>"]
        self.answer_id, self.answer_end_id = ids["<answer>"], ids["</answer>"]
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    # ---- training, saving, loading -------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
        """Train byte-level BPE on `texts`: `vocab_size` ids, reserved ones included (fewer if the text runs out of pairs)."""
        minimum = 256 + len(SPECIAL_TOKENS) + len(TEXT_TOKENS)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size {vocab_size} is too small: 256 bytes + 13 reserved tokens need >= {minimum}")
        tok = _empty_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS + TEXT_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(_mark_text_tokens_non_special(tok))

    def save(self, directory: str | os.PathLike, info: dict | None = None) -> None:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json, atomically.

        The folder loads with transformers.AutoTokenizer / PreTrainedTokenizerFast.from_pretrained.
        `info` (how it was trained) goes to nanoseek_tokenizer.json in the same atomic write.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp", dir=directory.parent))
        self.tok.save(str(tmp / "tokenizer.json"))
        special = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                   "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in ("<|bos|>", "<|eos|>", "<|pad|>")]}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            # transformers would otherwise "clean up" spaces before punctuation and break round-trips.
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "model_max_length": 1 << 30,
            "chat_template": CHAT_TEMPLATE,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)  # a crash leaves either no tokenizer or a whole one

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer at {path}; create one with `nanoseek tokenizer --run-dir DIR`")
        return cls(HFTokenizer.from_file(str(path)))

    @staticmethod
    def load_info(directory: str | os.PathLike) -> dict | None:
        path = Path(directory) / INFO_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: changes whenever any id would change."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    # ---- encode / decode -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-side parallel encoding over all cores; the _fast variant skips offsets (~25% quicker).
        return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for: 0 for control tokens, so bits-per-byte counts text only.

        In byte-level BPE every character of a vocab entry stands for exactly one byte.
        """
        lengths = [len(self.tok.id_to_token(i)) for i in range(self.vocab_size)]
        for name in SPECIAL_TOKENS:
            lengths[self.tok.token_to_id(name)] = 0
        for name in TEXT_TOKENS:
            lengths[self.tok.token_to_id(name)] = len(name.encode())
        return lengths

    # ---- chat ------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and the SFT loss mask (1 on assistant content and its closing EOS)."""
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_TOKENS:
                raise ValueError(f"message {i}: role must be one of {sorted(ROLE_TOKENS)}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
            body = self.encode(content) + [self.eos_id]
            trained = 1 if role == "assistant" else 0
            ids += [self.role_ids[role]] + body
            mask += [0] + [trained] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask


def split_reasoning(text: str) -> tuple[str | None, str | None]:
    """(reasoning, answer) from `<think>...</think><answer>...</answer>`; None where a part is missing."""
    return _between(text, "<think>", "</think>"), _between(text, "<answer>", "</answer>")


def _between(text: str, start: str, end: str) -> str | None:
    i = text.find(start)
    if i < 0:
        return None
    j = text.find(end, i + len(start))
    return None if j < 0 else text[i + len(start):j]
