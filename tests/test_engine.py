"""Engine: cache-based generation equals naive recompute and transformers' generate; batching, continuous batching,
speculative decoding (greedy exact, sampled distribution unchanged), sampling, seeds, stops, streaming, cancel."""

import logging
import math

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import (Engine, QueueFull, Request, SamplingParams, resolve_model_dir, sample_from,
                             sampling_probs, speculative_accept)
from nanoseek.tokenizer import Tokenizer

# A tiny chat model that memorises three answers (2-3 s on a CPU): deterministic text to test reasoning
# separation, stop strings and streaming, and a drafter worth accepting.
CHATS = [("hi", "<think>say hello back</think><answer>hello there</answer>"),
         ("what is 2+2?", "<think>2 plus 2 is 4</think><answer>4</answer>"),
         ("count", "<think>count up to ten</think><answer>one two three four five six seven eight nine ten</answer>")]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n",
          "hello there, general. one two three four five six seven eight nine ten. say hello back. count up to ten."]


def make_tokenizer() -> Tokenizer:
    return Tokenizer.train((CORPUS + [u + " " + a for u, a in CHATS]) * 4, vocab_size=320)


def train_chat_model(tok: Tokenizer, steps: int = 200) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, max_position_embeddings=256)
    model = Transformer(config)
    seqs = [tok.render_chat([{"role": "user", "content": u}, {"role": "assistant", "content": a}])[0]
            for u, a in CHATS]
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), tok.pad_id)
    targets = torch.full((len(seqs), T), -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        targets[i, :len(s) - 1] = torch.tensor(s[1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        model(ids, targets=targets, mtp_weight=1.0).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def chat_prompt(tok: Tokenizer, text: str) -> list[int]:
    return tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops on a busy 2-core machine stall on OpenMP's second thread (a 2 us bmm takes ms); restored after.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def chat_model(tok):
    return train_chat_model(tok)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=256, max_position_embeddings=128)).eval()


def prompts_of(lengths, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


# ------------------------------------------------------------------------------------------------ greedy parity
def test_greedy_equals_naive_recompute_with_slot_reuse(model):
    prompts = prompts_of([5, 17, 1, 9, 30])
    engine = Engine(model, max_batch=2, max_len=64)  # 5 requests through 2 slots: rows join, leave, get reused
    out = [r.output for r in engine.generate(prompts, GREEDY)]
    assert out == [naive_greedy(model, p, 12) for p in prompts]
    assert not engine.rows and not engine.waiting


def test_batched_equals_one_by_one(model):
    prompts = prompts_of([3, 11, 25, 7], seed=1)
    engine = Engine(model, max_batch=4, max_len=64)
    batched = [r.output for r in engine.generate(prompts, GREEDY)]
    single = [engine.generate([p], GREEDY)[0].output for p in prompts]
    assert batched == single


def test_requests_joining_mid_flight_get_the_same_tokens(model):
    prompts = prompts_of([6, 13, 4], seed=2)
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], GREEDY)[0].output for p in prompts]
    engine = Engine(model, max_batch=3, max_len=64)
    reqs = [Request(p, SamplingParams(max_tokens=12 - 3 * i, ignore_eos=True)) for i, p in enumerate(prompts)]
    engine.submit(reqs[0])
    engine.step(), engine.step()
    engine.submit(reqs[1])
    engine.step()
    engine.submit(reqs[2])
    while engine.busy:
        engine.step()
    assert [r.output for r in reqs] == [a[:12 - 3 * i] for i, a in enumerate(alone)]
    assert [r.finish_reason for r in reqs] == ["length"] * 3


def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    model.save_pretrained(tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    prompt = prompts_of([10], seed=3)[0]
    with torch.no_grad():
        ids = torch.tensor([prompt])  # (an explicit mask: generate would otherwise mask prompt tokens equal to pad)
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = Engine(model, max_batch=2, max_len=64).generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    assert ours[0].output == ref


@pytest.mark.slow
def test_compiled_decode_gives_the_same_greedy_tokens(model):
    # torch.compile of the decode forward (about 30-60 s of compiling: one graph for 1 row, one for more): the
    # same tokens as eager and naive recompute, with rows joining, leaving and the batch shrinking to 1.
    prompts = prompts_of([5, 17, 1, 9, 30], seed=5)
    engine = Engine(model, max_batch=2, max_len=64, compile=True)
    out = [r.output for r in engine.generate(prompts, GREEDY)]
    assert out == [r.output for r in Engine(model, max_batch=2, max_len=64).generate(prompts, GREEDY)]
    assert out == [naive_greedy(model, p, 12) for p in prompts]
    assert engine.compile_s > 0 and engine.fused_attention  # fp32 on CPU: attention in the fused kernel
    # A second compiled engine in the process, on a model of another config: its steps skip Dynamo's full guard
    # check, and must still run its own graphs, not the first model's.
    torch.manual_seed(1)
    other = Transformer(ModelConfig.from_name("tiny", vocab_size=256, max_position_embeddings=128,
                                              num_hidden_layers=1)).eval()
    got = [r.output for r in Engine(other, max_batch=2, max_len=64, compile=True).generate(prompts, GREEDY)]
    assert got == [naive_greedy(other, p, 12) for p in prompts]
    assert [r.output for r in engine.generate(prompts, GREEDY)] == out


@pytest.mark.slow
def test_compiled_decode_past_the_rowwise_expert_limit(model):
    # 34 rows at top-2 are 68 routed assignments, past model.ROWWISE_MAX_ROWS (64): the compiled step then runs the
    # experts through grouped_mm inside the graph, a third graph the engine builds at start. Before, a step with 33+
    # rows asked Dynamo to recompile under the warmed-up stance and raised.
    import nanoseek.model as model_lib

    assert 33 * model.config.num_experts_per_tok > model_lib.ROWWISE_MAX_ROWS
    prompts = prompts_of([3 + i % 5 for i in range(34)], seed=7)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    compiled = [r.output for r in Engine(model, max_batch=34, max_len=16, compile=True).generate(prompts, params)]
    assert compiled == [r.output for r in Engine(model, max_batch=34, max_len=16).generate(prompts, params)]


def test_decode_compile_options_turn_one_row_products_into_fused_kernels():
    # The compiled decode step's GEMVs (one row times a weight, the LM head's 8,192 columns included) become
    # inductor multiply-and-sum kernels; products with more rows stay library GEMMs. Same values either way.
    from torch._dynamo.utils import counters

    from nanoseek.engine import decode_compile_options

    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(lambda x, w: x @ w.t(), dynamic=False, options=decode_compile_options(8192))
    w = torch.randn(8192, 64)
    with torch._inductor.config.patch(fx_graph_cache=False):
        for rows in (1, 3):
            x = torch.randn(rows, 64)
            torch.testing.assert_close(fn(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)
            assert counters["inductor"]["decompose_mm"] == 1  # the 1-row graph only
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ speculation
def test_greedy_speculative_equals_greedy_plain(model, chat_model, tok):
    prompts = prompts_of([4, 19, 8], seed=4)
    plain = [r.output for r in Engine(model, max_batch=2, max_len=64).generate(prompts, GREEDY)]
    spec = Engine(model, max_batch=2, max_len=64, speculative=True)
    assert [r.output for r in spec.generate(prompts, GREEDY)] == plain
    # On the trained model the MTP drafter is right most of the time; output still identical to plain greedy.
    chats = [chat_prompt(tok, u) for u, _ in CHATS]
    sp = SamplingParams(max_tokens=60)
    plain = Engine(chat_model, tok, max_batch=3, max_len=128).generate(chats, sp)
    spec = Engine(chat_model, tok, max_batch=3, max_len=128, speculative=True)
    got = spec.generate(chats, sp)
    assert [r.output for r in got] == [r.output for r in plain]
    assert [r.text for r in got] == [a for _, a in CHATS]
    assert spec.stats.acceptance > 0.8
    assert spec.stats.decode_steps < max(len(r.output) for r in got) * 0.6  # about two tokens per step


def test_speculative_rule_exact_on_crafted_distributions():
    # Over a grid of (u_accept, u_resample) the rule accepts draft x with frequency min(1, p(x)/q(x)) and otherwise
    # lands on norm(max(p - q, 0)); summed over x ~ q the output distribution is p itself.
    p = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
    q = torch.tensor([0.1, 0.4, 0.2, 0.0, 0.3])
    G = 400
    grid = (torch.arange(G) + 0.5) / G
    u_accept, u_resample = grid.repeat_interleave(G), grid.repeat(G)
    total = torch.zeros(5, dtype=torch.float64)
    for x in torch.nonzero(q).flatten().tolist():
        tokens, accepted = speculative_accept(p.expand(G * G, 5), q.expand(G * G, 5), torch.full((G * G,), x),
                                              u_accept, u_resample)
        assert abs(accepted.double().mean().item() - min(1.0, p[x].item() / q[x].item())) <= 1.0 / G
        total += q[x].double() * torch.bincount(tokens, minlength=5).double() / (G * G)
    assert torch.allclose(total, p.double(), atol=3.0 / G), total


def test_speculative_rule_statistically_unchanged():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    q = torch.softmax(torch.randn(6, generator=g) * 2, 0)
    g.manual_seed(1)
    N = 200_000
    draft = torch.multinomial(q, N, replacement=True, generator=g)
    tokens, accepted = speculative_accept(p.expand(N, 6), q.expand(N, 6), draft, torch.rand(N, generator=g),
                                          torch.rand(N, generator=g))
    freq = torch.bincount(tokens, minlength=6).double()
    chi2 = ((freq - N * p.double()) ** 2 / (N * p.double())).sum().item()
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    assert 0.2 < accepted.double().mean() < 0.95  # both branches exercised


def chi2_against(tokens: list[int], probs: torch.Tensor) -> float:
    freq = torch.bincount(torch.tensor(tokens), minlength=probs.numel()).double()
    exp = probs.double() * len(tokens)
    keep = exp > 5  # pool rare cells
    f = torch.cat([freq[keep], freq[~keep].sum()[None]])
    e = torch.cat([exp[keep], exp[~keep].sum()[None]])
    return (((f - e) ** 2) / e.clamp_min(1e-9)).sum().item(), int(keep.sum())


@pytest.mark.slow
def test_compiled_speculative_gives_the_same_greedy_tokens(chat_model, tok):
    # Speculation under torch.compile: the verify forward and the MTP drafter each compile (1 row, 2+ rows), the
    # acceptance rule between them stays eager. Same tokens and the same accepted drafts as eager speculation.
    chats = [chat_prompt(tok, u) for u, _ in CHATS]
    sp = SamplingParams(max_tokens=60)
    eager = Engine(chat_model, tok, max_batch=2, max_len=128, speculative=True)
    want = [r.output for r in eager.generate(chats, sp)]
    engine = Engine(chat_model, tok, max_batch=2, max_len=128, speculative=True, compile=True)
    got = engine.generate(chats, sp)
    assert [r.output for r in got] == want and [r.text for r in got] == [a for _, a in CHATS]
    assert engine.compile_s > 0 and engine.fused_attention
    assert (engine.stats.drafted, engine.stats.accepted) == (eager.stats.drafted, eager.stats.accepted)
    assert engine.stats.acceptance > 0.8


def test_sampled_speculative_engine_keeps_the_distribution():
    # Random weights: the MTP drafter disagrees with the model, so both accept and resample paths run. The second
    # token's marginal must equal the exact sum_t1 p(t1) p(t2 | t1) for plain and speculative engines alike.
    torch.manual_seed(5)
    V = 12
    m = Transformer(ModelConfig.from_name("tiny", vocab_size=V, max_position_embeddings=16)).eval()
    with torch.no_grad():  # sharpen the logits so that the distributions are far from uniform
        m.lm_head.weight.mul_(20)
    prompt = [3, 1, 4, 1]
    with torch.no_grad():
        p1 = m(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = sum(p1[t] * m(torch.tensor([prompt + [t]]))[0, -1].softmax(-1) for t in range(V))
    N = 3000
    params = [SamplingParams(max_tokens=2, temperature=1.0, seed=s, ignore_eos=True) for s in range(N)]
    for spec in (False, True):
        engine = Engine(m, max_batch=N, max_len=8, speculative=spec)
        reqs = engine.generate([prompt] * N, params)
        chi2, cells = chi2_against([r.output[1] for r in reqs], p2)
        assert chi2 < {4: 18.5, 5: 20.5, 6: 22.5, 7: 24.3, 8: 26.1, 9: 27.9, 10: 29.6, 11: 31.3, 12: 32.9}[cells]
        if spec:
            assert 0.1 < engine.stats.acceptance < 0.9, engine.stats.acceptance


# ------------------------------------------------------------------------------------------------ sampling
def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    probs = sampling_probs(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.85, 1.0]))
    assert torch.allclose(probs[0], torch.tensor([0.625, 0.375, 0, 0]))
    assert torch.allclose(probs[1], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)  # 0.5 + 0.3 < 0.85: needs the third
    assert probs[2].tolist() == [0, 0, 0, 1]  # greedy
    assert sample_from(probs, torch.tensor([0.99, 0.0, 0.5])).tolist() == [1, 0, 3]


def test_seeds_reproduce_whatever_the_batch(model):
    prompts = prompts_of([5, 9, 14], seed=6)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=123, ignore_eos=True)
    engine = Engine(model, max_batch=3, max_len=64)
    a = engine.generate(prompts, sp)
    b = engine.generate(prompts[::-1], sp)[::-1]
    alone = engine.generate(prompts[:1], sp)
    assert [r.output for r in a] == [r.output for r in b]
    assert a[0].output == alone[0].output
    other = engine.generate(prompts[:1], SamplingParams(**{**sp.__dict__, "seed": 124}))
    assert other[0].output != a[0].output
    assert len({tuple(r.output) for r in a}) == 3


def test_sampling_params_validate():
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"stop": [""]}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# ------------------------------------------------------------------------------------------------ text, stops, streaming
def test_stops_eos_stop_strings_and_length(chat_model, tok):
    engine = Engine(chat_model, tok, max_batch=4, max_len=128)
    count = chat_prompt(tok, "count")
    r_eos, r_stop, r_len, r_stop2 = engine.generate([count] * 4, [
        SamplingParams(max_tokens=100),
        SamplingParams(max_tokens=100, stop=("four", "seven")),
        SamplingParams(max_tokens=5),
        SamplingParams(max_tokens=100, stop=["</think>"]),
    ])
    full = CHATS[2][1]
    assert (r_eos.text, r_eos.finish_reason) == (full, "stop")
    assert tok.eos_id not in r_eos.output
    assert (r_stop.text, r_stop.finish_reason) == (full[:full.index("four")], "stop")
    assert r_len.finish_reason == "length" and len(r_len.output) == 5 and full.startswith(r_len.text)
    assert r_stop2.text == "<think>count up to ten"


def test_streaming_deltas_never_show_the_stop_string(chat_model, tok):
    engine = Engine(chat_model, tok, max_batch=2, max_len=128, speculative=True)
    req = Request(chat_prompt(tok, "count"), SamplingParams(max_tokens=100, stop=["five six"]))
    deltas = list(engine.stream(req))
    full = CHATS[2][1]
    assert "".join(deltas) == req.text == full[:full.index("five six")]
    assert len(deltas) > 5
    assert not any("five" in d for d in deltas)


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=2, max_len=64)
    keep, drop = Request([1, 2, 3], SamplingParams(max_tokens=20, ignore_eos=True)), Request(
        [4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.submit(keep, drop)
    engine.step(), engine.step()
    assert len(engine.rows) == 2
    drop.cancel()
    engine.step()
    assert engine.rows == [keep] and drop.finish_reason == "cancelled" and drop.done.is_set()
    while engine.busy:
        engine.step()
    assert keep.output == naive_greedy(model, [1, 2, 3], 20)


def test_closing_a_stream_cancels(chat_model, tok):
    engine = Engine(chat_model, tok, max_batch=2, max_len=128)
    req = Request(chat_prompt(tok, "count"), SamplingParams(max_tokens=100))
    stream = engine.stream(req)
    assert next(stream)
    assert engine.rows == [req]
    stream.close()
    engine.step()
    assert not engine.busy and req.finish_reason == "cancelled"


def test_queue_limit_and_bad_prompts(model):
    engine = Engine(model, max_batch=1, max_len=32, max_queue=2)
    engine.submit(Request([1]), Request([2]), Request([3]))  # one gets the free slot, two wait
    with pytest.raises(QueueFull):
        engine.submit(Request([4]))
    with pytest.raises(ValueError, match="does not fit"):
        Engine(model, max_len=8).submit(Request(list(range(8))))
    with pytest.raises(ValueError, match="token ids"):
        Engine(model, max_len=8).submit(Request([999]))
    with pytest.raises(ValueError, match="MTP"):
        Engine(Transformer(model.config.replace(num_nextn_predict_layers=0)), speculative=True)


def test_cache_report_and_run_dir_resolution(model, tmp_path, tok):
    rep = Engine(model, max_batch=1, max_len=16).cache_report()
    c = model.config
    assert rep["latent_bytes_per_token"] == 4 * c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert rep["ratio"] == pytest.approx(c.kv_cache_dim / c.latent_cache_dim)
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000010" / "model").mkdir(parents=True)
    model.save_pretrained(run / "checkpoints" / "step_000010" / "model")
    (run / "checkpoints" / "latest").write_text("step_000010\n")
    tok.save(run / "tokenizer")
    assert resolve_model_dir(run) == (run / "checkpoints" / "step_000010" / "model", run / "tokenizer")
    assert resolve_model_dir(run / "checkpoints" / "step_000010" / "model")[1] == run / "tokenizer"
    with pytest.raises(FileNotFoundError, match="HF model folder"):
        resolve_model_dir(tmp_path)


def test_dsa_model_rows_move_with_their_indexer_keys():
    # V3.2 sparse attention keeps indexer keys in the cache too; compaction must move them with the latents.
    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_name("tiny", vocab_size=256, max_position_embeddings=128, index_topk=4,
                                          index_n_heads=2, index_head_dim=8)).eval()
    prompts = prompts_of([5, 17, 9], seed=7)
    out = [r.output for r in Engine(m, max_batch=2, max_len=64).generate(prompts, GREEDY)]
    assert out == [naive_greedy(m, p, 12) for p in prompts]


def test_resolve_model_dir_prefers_the_run_dirs_checkpoint(tmp_path):
    # A run dir has its own config.json (the run's options); the model is under checkpoints/latest.
    from nanoseek.engine import resolve_model_dir

    model_dir = tmp_path / "checkpoints" / "step_000004" / "model"
    Transformer(ModelConfig.from_name("tiny", vocab_size=64)).save_pretrained(model_dir)
    (tmp_path / "checkpoints" / "latest").write_text("step_000004\n")
    (tmp_path / "config.json").write_text('{"stage": "sft", "steps": 4}')
    assert resolve_model_dir(tmp_path)[0] == model_dir
    assert resolve_model_dir(model_dir)[0] == model_dir
