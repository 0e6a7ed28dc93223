"""`nanoseek extend`: YaRN configs for the extension phases, the passkey task and its metric, the mixed batch stream's
resume, and the stage end to end (YaRN phase, then DSA warm-up and sparse training) on a tiny model."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import ModelConfig, Transformer
from nanoseek.stages import extend
from nanoseek.tokenizer import Tokenizer
from nanoseek.trainer import read_metrics


@pytest.fixture(scope="module")
def tok():
    texts = [p.read_text() for p in sorted(Path(json.__file__).parent.glob("*.py"))]
    return Tokenizer.train(texts, vocab_size=384)


@pytest.fixture(scope="module")
def init_dir(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id)
    Transformer(config).save_pretrained(root / "model")
    tok.save(root / "model" / "tokenizer")
    return root / "model"


# ------------------------------------------------------------------------------------------------ configs
def test_extension_phases_share_one_yarn_config():
    base = ModelConfig.from_name("tiny")
    phase1 = extend.extended_config(base, 512, 64, 32.0, mscale=1.0, mscale_all_dim=1.0)
    y = phase1.yarn
    assert (y["factor"], y["original_max_position_embeddings"], y["beta_fast"], y["beta_slow"]) == (32.0, 64, 32, 1)
    assert phase1.max_position_embeddings == 2048 and phase1.softmax_scale > base.softmax_scale  # m^2 > 1
    # V3's second phase (32K -> 128K) keeps the factor-40 config; nanoseek's default keeps it as well.
    phase2 = extend.extended_config(phase1, 2048, extend.original_length(phase1, Path("nowhere"), None), None)
    assert phase2.yarn == y
    assert extend.extended_config(base, 256, 64, None).yarn["factor"] == 4.0  # default: seq_len / original
    assert extend.extended_config(base, 256, 64, 1.0).rope_scaling is None  # factor 1: RoPE unchanged


def test_rebuild_keeps_weights_and_adds_a_fresh_indexer():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name("tiny", vocab_size=64))
    new = extend.rebuild(model, extend.dsa.with_indexer(model.config, 8, 2, 16))
    own = new.state_dict()
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())
    assert any(".indexer." in k for k in own)


# ------------------------------------------------------------------------------------------------ passkey task
def test_passkey_example_layout(tok):
    task = extend.PasskeyTask(tok, digits=5)
    rng = random.Random(0)
    for T in (task.min_len(), 200):
        ids, a = task.example(rng, T)
        assert len(ids) == T + 1 and a == 5
        text = tok.decode(ids)
        key = text[-5:]
        assert key.isdigit() and f"The pass key is{key}. Remember it." in text
    inputs, targets = task.batch(rng, 3, 64, answer_only=True)
    assert inputs.shape == targets.shape == (3, 64)
    assert ((targets != extend.IGNORE).sum(1) == 5).all()
    with pytest.raises(ValueError, match="passkey examples need"):
        task.example(rng, task.min_len() - 1)


class Oracle(torch.nn.Module):
    """Reads the key after "The pass key is" and predicts it at the answer positions: accuracy must be 1."""

    def __init__(self, task, vocab):
        super().__init__()
        self.task, self.vocab = task, vocab

    def forward(self, inputs):
        B, T = inputs.shape
        logits = torch.zeros(B, T, self.vocab)
        n, before = self.task.digits, self.task.before
        for b, row in enumerate(inputs.tolist()):
            s = next(i + len(before) for i in range(T) if row[i:i + len(before)] == before)
            key = row[s:s + n]
            for j in range(n):
                logits[b, T - n + j, key[j]] = 1.0
        return logits


def test_passkey_accuracy_measures_retrieval(tok):
    task = extend.PasskeyTask(tok)
    assert extend.passkey_accuracy(Oracle(task, tok.vocab_size), task, 80, n=10) == 1.0
    torch.manual_seed(0)
    random_model = Transformer(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size))
    assert extend.passkey_accuracy(random_model, task, 80, n=10) == 0.0


def test_mixed_batches_resume_exactly(tok):
    task = extend.PasskeyTask(tok)
    fake = iter(lambda: (torch.zeros(2, 64, dtype=torch.long), torch.zeros(2, 64, dtype=torch.long)), None)

    class Loader:  # a corpus loader stand-in with a position
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            return next(fake)

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, s):
            self.n = s["n"]

    a = extend.MixedBatches(Loader(), task, 0.5, 2, 64, seed=3)
    kinds = [bool(next(a)[0].any()) for _ in range(20)]
    assert 3 <= sum(kinds) <= 17  # both kinds appear
    state = a.state_dict()
    want = [next(a) for _ in range(5)]
    b = extend.MixedBatches(Loader(), task, 0.5, 2, 64, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(want, (next(b) for _ in range(5))))
    with pytest.raises(ValueError, match="passkey-rate"):
        extend.MixedBatches(None, task, 0.25, 2, 64, seed=3).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ the stage
def run(argv) -> int:
    return extend.main([str(a) for a in argv] + ["--no-progress", "--threads", "1"])


def test_extend_yarn_then_dsa_warmup_then_sparse(init_dir, tmp_path, capsys):
    common = ["--passkey-rate", "1", "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--eval-n", "2"]
    yarn = tmp_path / "yarn"
    assert run(["--init", init_dir, "--run-dir", yarn, "--seq-len", 128, "--original-length", 64,
                "--eval-lengths", "64,128", "--guard-sigma", "inf", *common]) == 0  # inf: no spike skipping
    model_dir = next((yarn / "checkpoints").glob("step_*")) / "model"
    config = ModelConfig.load(model_dir)
    assert config.yarn["factor"] == 2.0 and config.yarn["original_max_position_embeddings"] == 64
    rows = read_metrics(yarn, "extend")
    assert {"passkey/acc@64", "passkey/acc@128"} <= set(rows[-1])
    assert run(["--init", init_dir, "--run-dir", yarn, "--seq-len", 128, "--original-length", 64,
                "--eval-lengths", "64,128", "--guard-sigma", "inf", *common]) == 0  # the same command again: finished, nothing to do
    assert "nothing to do" in capsys.readouterr().out

    warm = tmp_path / "warm"
    assert run(["--init", yarn, "--run-dir", warm, "--seq-len", 128, "--dsa", "warmup", "--index-topk", 16,
                *common]) == 0
    before = load_file(str(next(model_dir.glob("*.safetensors"))))
    after = load_file(str(next((warm / "checkpoints").glob("step_*/model/model.safetensors"))))
    moved = {k for k in after if k not in before or not torch.equal(after[k], before[k])}
    assert moved and all(".indexer." in k for k in moved)  # warm-up: only the indexer trains
    warm_config = ModelConfig.load(next((warm / "checkpoints").glob("step_*/model")))
    assert warm_config.index_topk == 16 and warm_config.yarn == config.yarn  # the second phase kept YaRN
    assert read_metrics(warm, "extend")[-1]["loss/indexer"] > 0

    sparse = tmp_path / "sparse"
    assert run(["--init", warm, "--run-dir", sparse, "--seq-len", 128, "--dsa", "sparse", *common]) == 0
    after2 = load_file(str(next((sparse / "checkpoints").glob("step_*/model/model.safetensors"))))
    assert not torch.equal(after2["model.layers.0.self_attn.kv_b_proj.weight"],
                           after["model.layers.0.self_attn.kv_b_proj.weight"])  # everything trains now


def test_extend_errors_speak(init_dir, tmp_path, capsys):
    assert run(["--init", init_dir, "--run-dir", tmp_path / "a", "--seq-len", 128, "--dsa", "warmup",
                "--passkey-rate", "1"]) == 2
    assert "--index-topk" in capsys.readouterr().err
    assert run(["--init", init_dir, "--run-dir", tmp_path / "b", "--seq-len", 16, "--passkey-rate", "1"]) == 2
    assert "passkey examples need at least" in capsys.readouterr().err
