"""Decode speed of the nanoseek engine (latent cache, absorbed MLA) against transformers' `generate` on the same
weights, prefill time of one prompt, MTP speculative decoding against plain decoding, server throughput with
concurrent clients on loopback, and cache bytes per token. One run, one set of weights (the bench config of bench/model_speed.py plus one MTP
depth, trained for a little while on Python standard-library source so that the MTP drafter means something).

    python bench/decode.py                        # everything (about 10 minutes on 2 busy cores)
    python bench/decode.py --quick                # batch 1 only, shorter runs
    python bench/decode.py --quick --compile      # nanoseek's decode step under torch.compile (transformers eager)

Decode tokens/s exclude prefill: for transformers, the clock between generate's own steps (a stopping criterion
records it after every token); for nanoseek, the engine's own decode-step clock. Runs alternate between the two so that machine
noise hits both; read the ratios. Default 1 torch thread: on a shared 2-core machine a second OpenMP thread makes
tiny matmuls stall for milliseconds (see dev/LOG.md), which hurts both implementations.
"""

import argparse
import concurrent.futures
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_speed import bench_config  # noqa: E402

from nanoseek import Transformer  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


def stdlib_text(max_bytes: int) -> list[str]:
    root = Path(os.__file__).parent
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(errors="replace")
        out.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return out


def train(model: Transformer, ids: torch.Tensor, steps: int, batch: int, seq: int) -> float:
    """A few hundred AdamW steps on random windows; returns the last loss."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts])
        y = torch.stack([ids[s + 1:s + seq + 1] for s in starts])
        loss = model(x, targets=y, mtp_weight=0.3)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def ours_decode(model, prompts, new: int, speculative: bool = False, compile: bool = False) -> tuple[float, Engine]:
    B, ctx = len(prompts), len(prompts[0])
    engine = Engine(model, max_batch=B, max_len=ctx + new + 2, speculative=speculative, compile=compile)
    reqs = engine.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    engine.outputs = [r.output for r in reqs]
    return engine.stats.generated / engine.stats.decode_s, engine


def hf_decode(hf, prompts, new: int) -> float:
    """transformers' generate, timed between its own steps: a stopping criterion that never stops records the
    clock after every generated token, so prefill (before the first) is excluded without subtracting runs."""
    import transformers

    class Clock(transformers.StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kw):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor(prompts)
    clock = Clock()
    with torch.no_grad():
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0,
                    max_new_tokens=new, min_new_tokens=new, stopping_criteria=[clock])
    return len(prompts) * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def hf_cache_bytes_per_token(hf, prompt) -> float:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    total = 0
    for layer in out.past_key_values.layers:
        total += layer.keys.nbytes + layer.values.nbytes
    return total / len(prompt)


class ServerThread:
    def __init__(self, app):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


def server_throughput(model, tok, prompts, clients: int, per_client: int, new: int, speculative: bool,
                      timeout: float) -> dict:
    import openai

    from nanoseek.server import create_app

    engine = Engine(model, tok, max_batch=clients, max_len=len(prompts[0]) + new + 2, speculative=speculative,
                    max_queue=4 * clients)
    srv = ServerThread(create_app(engine, "bench"))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=timeout, max_retries=0)

    def one(i):
        r = client.completions.create(model="bench", prompt=prompts[i % len(prompts)], max_tokens=new,
                                      temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    try:
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            tokens = sum(pool.map(one, range(clients * per_client), timeout=timeout))
        wall = time.perf_counter() - t
    finally:
        srv.stop()
    return {"clients": clients, "requests": clients * per_client, "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "req_s": clients * per_client / wall}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see above)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per measurement (default 32)")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions per cell (median; default 3)")
    p.add_argument("--train-steps", type=int, default=150, help="AdamW steps before measuring (0: random weights)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16], help="concurrent server clients")
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed per server measurement")
    p.add_argument("--quick", action="store_true", help="batch 1, 1 repetition, fewer clients")
    p.add_argument("--compile", action="store_true",
                   help="decode and speculative tables: nanoseek with Engine(compile=True) (compile time printed, "
                        "not timed)")
    args = p.parse_args()
    if args.quick:
        args.batches, args.reps, args.clients, args.train_steps = [1], 1, [1, 4], min(args.train_steps, 60)
    torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    t0 = time.perf_counter()
    texts = stdlib_text(1_000_000)
    config = bench_config(16).replace(num_nextn_predict_layers=1, max_position_embeddings=4096)
    tok = Tokenizer.train(texts, vocab_size=config.vocab_size)
    ids = torch.tensor([t for ids_ in tok.encode_batch(texts) for t in ids_])
    model = Transformer(config)
    loss = train(model, ids, args.train_steps, 8, 128) if args.train_steps else float("nan")
    print(f"# bench config: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.n_routed_experts} experts (top-{config.num_experts_per_tok}), vocab {config.vocab_size}, "
          f"1 MTP depth; trained {args.train_steps} steps on {len(ids)} stdlib tokens (loss {loss:.2f}); "
          f"{args.threads} thread(s); setup {time.perf_counter() - t0:.0f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = Transformer.from_pretrained(tmp).eval()
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)

    def prompts_for(B, ctx):
        starts = torch.randint(0, len(ids) - ctx, (B,), generator=g)
        return [ids[s:s + ctx].tolist() for s in starts]

    # ---- decode tokens/s against transformers
    print("\n| batch | context | nanoseek tok/s | transformers tok/s | ratio |", flush=True)
    print("|---|---|---|---|---|")
    for B in args.batches:
        for ctx in args.contexts:
            prompts = prompts_for(B, ctx)
            new = args.new_tokens if B * ctx <= 4096 else max(8, args.new_tokens // 2)
            reps = args.reps if B * ctx <= 4096 else 1
            ours, theirs = [], []
            for _ in range(reps):
                rate, engine = ours_decode(model, prompts, new, compile=args.compile)
                ours.append(rate)
                theirs.append(hf_decode(hf, prompts, new))
                if args.compile:
                    print(f"# compiled in {engine.compile_s:.1f}s", flush=True)
            o, h = statistics.median(ours), statistics.median(theirs)
            print(f"| {B} | {ctx} | {o:.0f} | {h:.1f} | {o / h:.1f}x |", flush=True)

    # ---- prefill of one prompt: the engine's own prefill clock against transformers' forward over the prompt
    print("\n| context | nanoseek prefill s | transformers prefill s | ratio |", flush=True)
    print("|---|---|---|---|")
    for ctx in args.contexts:
        prompt = prompts_for(1, ctx)[0]
        ours, theirs = [], []
        for _ in range(args.reps):
            engine = Engine(model, max_batch=1, max_len=ctx + 2)
            engine.generate([prompt], SamplingParams(max_tokens=1, ignore_eos=True))
            ours.append(engine.stats.prefill_s)
            t = time.perf_counter()
            with torch.no_grad():
                hf(torch.tensor([prompt]), use_cache=True)
            theirs.append(time.perf_counter() - t)
        o, h = statistics.median(ours), statistics.median(theirs)
        print(f"| {ctx} | {o:.3f} | {h:.3f} | {h / o:.1f}x |", flush=True)

    # ---- speculative vs plain (greedy, so outputs must be identical); both compiled under --compile
    print(f"\n# speculative vs plain, {'compiled' if args.compile else 'eager'} engines")
    print("\n| batch | context | plain tok/s | speculative tok/s | speed-up | acceptance | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        ctx = 128
        prompts = prompts_for(B, ctx)
        new = 4 * args.new_tokens
        plain, spec, acc, same = [], [], [], True
        for _ in range(args.reps):
            r0, e0 = ours_decode(model, prompts, new, compile=args.compile)
            r1, e1 = ours_decode(model, prompts, new, speculative=True, compile=args.compile)
            plain.append(r0)
            spec.append(r1)
            acc.append(e1.stats.acceptance)
            same = same and e0.outputs == e1.outputs
        print(f"| {B} | {ctx} | {statistics.median(plain):.0f} | {statistics.median(spec):.0f} | "
              f"{statistics.median(spec) / statistics.median(plain):.2f}x | {statistics.median(acc):.0%} | "
              f"{same} |", flush=True)

    # ---- server throughput (loopback, /v1/completions, greedy, ignore_eos)
    print("\n| clients | requests | completion tokens | wall s | tok/s | req/s |")
    print("|---|---|---|---|---|---|")
    prompts = prompts_for(32, 64)
    for c in args.clients:
        r = server_throughput(model, tok, prompts, c, per_client=2 if c > 1 else 4, new=args.new_tokens,
                              speculative=False, timeout=args.timeout)
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['req_s']:.2f} |", flush=True)

    # ---- cache bytes per token
    rep = Engine(model, max_batch=1, max_len=8, speculative=True).cache_report()
    hf_bytes = hf_cache_bytes_per_token(hf, prompts_for(1, 64)[0])
    print(f"\ncache bytes/token (fp32, {config.num_hidden_layers} layers): latent {rep['latent_bytes_per_token']}"
          f" (+{rep['mtp_bytes_per_token']} for the MTP layer), per-head K/V {rep['kv_bytes_per_token']} "
          f"({rep['ratio']:.1f}x), transformers' DynamicCache measured {hf_bytes:.0f} "
          f"({hf_bytes / rep['latent_bytes_per_token']:.1f}x)")
    print(f"# total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
