"""Batched generation on the latent cache: continuous batching, sampling, MTP speculative decoding.

Shape legend (suffixes): N active rows (sequences)   V vocab   T new tokens per row   D hidden

How a sequence sits in the engine. The cache (`LatentCache`, one row per slot) holds the latents of every token
of a row at the slot equal to its position. A row's prompt occupies positions 0..L-1; its k-th generated token
sits at position L+k. The newest generated token (`last`) is not in the cache yet: the next step feeds it.

    prefill   fresh prompts, expanded MLA (`prefill=True`), right-padded to the group's longest prompt; the
              padding's latents land in slots that only queries at later positions could see, and those slots
              are rewritten (at their own position) before any such query runs.
    decode    `last` of every active row at its position, absorbed MLA over the cache (`prefill=False`); with
              `compile=True` this forward runs under torch.compile (~4x faster than eager at batch 1 on CPU).
    speculate [last, draft] at [pos, pos+1] in one absorbed forward; the MTP module proposed the draft
              (DeepSeek-V3 sec. 2.2 and 5.4.3). A rejected draft's latents stay in slot pos+1 and are rewritten
              by the next step before any query at a position >= pos+1 reads them. With `compile=True` the
              verify forward and the MTP drafter run compiled, the acceptance rule between them eager.

Active rows are kept compact (rows 0..N-1 of the cache): a finished row is refilled by moving the last row into
it, so every step runs on a view of the cache with no gather (the absorbed path would otherwise copy the cached
latents of the rows it reads, every layer, every step). Requests join between steps (continuous batching).

Per step there is one host sync: the new tokens (and for speculation the accept counts) come back in one
`.tolist()`. Text (detokenisation, stop strings, streaming) is then per request, in Python.
"""

from __future__ import annotations

import collections
import functools
import logging
import secrets
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from . import model as model_lib
from .model import LatentCache, Transformer

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


class QueueFull(RuntimeError):
    """More requests waiting than the engine's max_queue allows; retry later (HTTP 429)."""


# --------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()  # stop strings, matched on decoded text and trimmed from it
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sampling_probs(logits_NV: Tensor, temperature_N: Tensor, top_k_N: Tensor, top_p_N: Tensor,
                   filtered: bool = True) -> Tensor:
    """The distribution each row samples from: softmax(logits / T) restricted to the top-k tokens and to the
    smallest set whose mass reaches top_p (Holtzman et al. 2019), renormalised. Greedy rows (T = 0) get a one-hot
    at the argmax, so greedy and sampled rows share every code path below and greedy stays exact."""
    V = logits_NV.shape[-1]
    greedy_N = temperature_N <= 0
    x_NV = logits_NV.float() / torch.where(greedy_N, 1.0, temperature_N)[:, None]
    if filtered:
        sorted_NV, order_NV = x_NV.sort(-1, descending=True)
        rank_V = torch.arange(V, device=x_NV.device)
        drop_NV = rank_V >= torch.where(top_k_N > 0, top_k_N, V)[:, None]
        p_NV = sorted_NV.masked_fill(drop_NV, float("-inf")).softmax(-1)
        drop_NV |= (p_NV.cumsum(-1) - p_NV) >= top_p_N[:, None]  # mass before a token already reaches p
        x_NV = torch.full_like(x_NV, float("-inf")).scatter(-1, order_NV, sorted_NV.masked_fill(drop_NV, float("-inf")))
    probs_NV = x_NV.softmax(-1)
    onehot_NV = F.one_hot(logits_NV.argmax(-1), V).to(probs_NV.dtype)
    return torch.where(greedy_N[:, None], onehot_NV, probs_NV)


def sample_from(probs_NV: Tensor, u_N: Tensor) -> Tensor:
    """Inverse-CDF sampling with one uniform per row: the first token whose cumulative mass exceeds u * total.
    Zero-probability tokens are never chosen; a one-hot row returns its hot index whatever u is."""
    cdf_NV = probs_NV.cumsum(-1)
    idx_N = torch.searchsorted(cdf_NV, (u_N * cdf_NV[:, -1])[:, None].contiguous(), right=True).squeeze(1)
    return idx_N.clamp_max(probs_NV.shape[-1] - 1)


def speculative_accept(p_NV: Tensor, q_NV: Tensor, draft_N: Tensor, u_accept_N: Tensor,
                       u_resample_N: Tensor) -> tuple[Tensor, Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep the draft x ~ q with probability
    min(1, p(x) / q(x)), else draw from norm(max(p - q, 0)). The result is distributed exactly as p.
    Returns (token_N, accepted_N)."""
    pd_N = p_NV.gather(1, draft_N[:, None]).squeeze(1)
    qd_N = q_NV.gather(1, draft_N[:, None]).squeeze(1)
    accepted_N = u_accept_N * qd_N < pd_N  # u < p/q without dividing; q(x) > 0 since x was drawn from q
    residual_NV = (p_NV - q_NV).clamp_min(0)
    residual_NV = torch.where(residual_NV.sum(-1, keepdim=True) > 0, residual_NV, p_NV)
    return torch.where(accepted_N, draft_N, sample_from(residual_NV, u_resample_N)), accepted_N


# --------------------------------------------------------------------------------------------------- requests
class Request:
    """One sequence: its prompt, what it produced so far, and whom to tell. `on_delta(request, text)` gets each
    new piece of decoded text (a stop string is never streamed, not even partly); `on_finish(request)` is called
    once, after the last delta. Both run on the engine's thread: keep them short."""

    def __init__(self, prompt: list[int], params: SamplingParams | None = None, *,
                 on_delta: Callable[[Request, str], None] | None = None,
                 on_finish: Callable[[Request], None] | None = None):
        self.prompt = [int(t) for t in prompt]
        self.params = params or SamplingParams()
        self.on_delta, self.on_finish = on_delta, on_finish
        self.output: list[int] = []
        self.text = ""  # decoded output; a matched stop string and what follows are trimmed
        self.finish_reason: str | None = None
        self.cancelled = False
        self.drafted = self.accepted = 0  # speculative decoding counts for this request
        self.done = threading.Event()
        self.generator = None
        if not self.params.greedy:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed)
        self._emitted = 0  # chars of text delivered through on_delta
        self._prefix = self._read = 0  # incremental detokenisation offsets (as in HF text-generation-inference)

    def cancel(self) -> None:
        """Ask the engine to drop this request; it frees the slot before its next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _uniforms(self, k: int) -> Tensor:
        if self.generator is None:
            return torch.zeros(k)
        return torch.rand(k, generator=self.generator)

    def _detok(self, tokenizer) -> str:
        # Decode a window that starts a few tokens back so that merges across token boundaries are right, and hold
        # back while the text ends in an incomplete UTF-8 sequence (byte-level BPE splits characters).
        ids = self.output
        before = tokenizer.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        after = tokenizer.decode(ids[self._prefix:], skip_special_tokens=True)
        if after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return after[len(before):]

    def _append(self, tokens: list[int], eos_id: int | None, tokenizer, max_len: int) -> None:
        p = self.params
        for t in tokens:
            if self.finished:
                break
            if t == eos_id and not p.ignore_eos:
                self._finish(FINISH_STOP)
                break
            self.output.append(t)
            if tokenizer is not None:
                start = max(0, len(self.text) - max((len(s) for s in p.stop), default=1) + 1)
                self.text += self._detok(tokenizer)
                hits = [i for i in (self.text.find(s, start) for s in p.stop) if i >= 0]
                if hits:
                    self.text = self.text[:min(hits)]
                    self._finish(FINISH_STOP)
                    break
            if len(self.output) >= p.max_tokens or len(self.prompt) + len(self.output) >= max_len:
                self._finish(FINISH_LENGTH)
        self._deliver()

    def _finish(self, reason: str) -> None:
        if not self.finished:
            self.finish_reason = reason

    def _deliver(self) -> None:
        safe = len(self.text)
        if not self.finished:  # hold back a tail that could be the start of a stop string
            for s in self.params.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        if safe > self._emitted and self.on_delta is not None:
            self.on_delta(self, self.text[self._emitted:safe])
        self._emitted = max(self._emitted, safe)
        if self.finished and not self.done.is_set():
            if self.on_finish is not None:
                self.on_finish(self)
            self.done.set()


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    generated: int = 0  # tokens produced by decode steps (prefill's first token not counted)
    drafted: int = 0
    accepted: int = 0
    finished: collections.Counter = field(default_factory=collections.Counter)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "finished"}
        return {**d, "finished": dict(self.finished), "acceptance": self.acceptance}


# --------------------------------------------------------------------------------------------------- the engine
class Engine:
    """A fixed number of slots (`max_batch`) over one preallocated latent cache of `max_len` positions per slot.
    `submit` queues requests (thread-safe); `step` admits waiting requests into free slots (prefill) and advances
    every active one by one decode (or speculative) step. Run `step` yourself (`generate`, `stream`) or let
    `start()` run it on a background thread (the server)."""

    def __init__(self, model: Transformer, tokenizer=None, *, max_batch: int = 8, max_len: int | None = None,
                 speculative: bool = False, max_queue: int | None = None, prefill_tokens: int = 8192,
                 compile: bool = False):
        self.model = model.eval()
        self.config = c = model.config
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id if tokenizer is not None else c.eos_token_id
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.max_len = int(max_len or c.max_position_embeddings)
        if speculative and not model.mtp:
            raise ValueError("speculative decoding drafts with the MTP module, and this model has none "
                             "(num_nextn_predict_layers = 0); run without speculation")
        self.speculative = speculative
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # +1 slot: a speculative step writes its draft one position past the last token it may keep.
        self.cache = LatentCache.allocate(c, max_batch, self.max_len + 1, dtype=self.dtype, device=self.device,
                                          with_mtp=speculative)
        z = lambda dt: torch.zeros(max_batch, dtype=dt, device=self.device)  # noqa: E731
        self.last, self.pos, self.draft = z(torch.long), z(torch.long), z(torch.long)
        self.temperature, self.top_k, self.top_p = z(torch.float32), z(torch.long), z(torch.float32)
        self.draft_q = torch.zeros(max_batch, c.vocab_size if speculative else 1, device=self.device)
        self.rows: list[Request] = []  # active requests; rows[i] owns cache row i
        self.compile_s = 0.0
        self.fused_attention = False  # decode attention through nanoseek.kernels (compiled fp32 CPU decode)
        self._decode_logits, self._verify, self._draft = (functools.partial(f, model) for f in
                                                          (decode_logits, verify_forward, draft_forward))
        if compile:
            self._compile_decode()
        self.waiting: collections.deque[Request] = collections.deque()
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------------------------------------ public
    def submit(self, *requests: Request) -> None:
        """Queue requests (all or none). Raises ValueError for a prompt that does not fit, QueueFull when more than
        max_queue requests would be left waiting for a free slot."""
        for r in requests:
            if not r.prompt:
                raise ValueError("empty prompt: give at least one token")
            if len(r.prompt) >= self.max_len:
                raise ValueError(f"prompt of {len(r.prompt)} tokens does not fit the context of {self.max_len} "
                                 f"tokens (at least one must be left to generate)")
            if max(r.prompt) >= self.config.vocab_size or min(r.prompt) < 0:
                raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        with self._cv:
            free = self.max_batch - len(self.rows)
            if self.max_queue is not None and len(self.waiting) + len(requests) - free > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting for a slot (max_queue={self.max_queue})")
            self.waiting.extend(requests)
            self._cv.notify_all()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Request]:
        """Run prompts to completion on the calling thread (or wait for the background loop) and return them."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [Request(p, sp) for p, sp in zip(prompts, params)]
        self.submit(*reqs)
        while not all(r.finished for r in reqs):
            if self._thread is None:
                self.step()
            else:
                next(r for r in reqs if not r.finished).wait(1.0)
        return reqs

    def stream(self, request: Request) -> Iterator[str]:
        """Text deltas of `request` as they are produced (its on_delta/on_finish are taken over); closing the
        iterator early cancels the request and frees its slot."""
        import queue

        q: queue.SimpleQueue = queue.SimpleQueue()
        request.on_delta, request.on_finish = (lambda r, d: q.put(d)), (lambda r: q.put(None))
        self.submit(request)
        try:
            while True:
                if self._thread is None and q.empty():
                    self.step()
                    continue
                delta = q.get()
                if delta is None:
                    return
                yield delta
        finally:
            request.cancel()

    def start(self) -> None:
        """Run the scheduler on a background thread until stop()."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.rows:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception:  # a failed step must not leave clients waiting forever: fail what was in flight
                traceback.print_exc()
                with self._cv:
                    failed = self.rows + list(self.waiting)
                    self.rows, self.waiting = [], collections.deque()
                for r in failed:
                    self.stats.finished[FINISH_ERROR] += 1
                    self._end(r, FINISH_ERROR)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def cache_report(self) -> dict:
        """Cache bytes per token over all main layers, against a per-head K/V cache of the same model and dtype."""
        c = self.config
        elt = self.cache.kv.element_size()
        latent = c.latent_cache_dim * elt * c.num_hidden_layers
        per_head = c.kv_cache_dim * elt * c.num_hidden_layers
        return {"latent_bytes_per_token": latent, "kv_bytes_per_token": per_head, "ratio": per_head / latent,
                "mtp_bytes_per_token": c.latent_cache_dim * elt * (self.cache.kv.shape[0] - c.num_hidden_layers),
                "allocated_bytes": self.cache.kv.nbytes + self.cache.pe.nbytes}

    # ------------------------------------------------------------------------------------------------ scheduler
    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, admit waiting ones into free slots, advance every active row once."""
        with self._cv:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self.stats.finished[FINISH_CANCELLED] += 1
                self._end(r, FINISH_CANCELLED)
            for r in self.rows:
                if r.cancelled and not r.finished:
                    self._end(r, FINISH_CANCELLED)
            self._compact()
            admit = []
            while self.waiting and len(self.rows) + len(admit) < self.max_batch:
                admit.append(self.waiting.popleft())
        if admit:
            self._prefill(admit)
            self._compact()
        if self.rows:
            self._speculate() if self.speculative else self._decode()
            self._compact()

    def _end(self, r: Request, reason: str) -> None:
        r._finish(reason)
        r._deliver()

    def _view(self, start: int, stop: int, span: int | None = None) -> LatentCache:
        """Cache rows start..stop, slots 0..span-1 (all slots when None): absorbed attention scores every slot of
        the view it gets, so decode passes the span its rows can see."""
        c = self.cache
        return LatentCache(c.kv[:, start:stop, :span], c.pe[:, start:stop, :span],
                           None if c.idx is None else c.idx[:, start:stop, :span])

    def _span(self, ahead: int) -> int:
        """Slots the next step's queries can see: active rows feed `last` at position len(prompt) + len(output) - 1
        (speculation also the draft, `ahead` = 1 position further)."""
        return max(len(r.prompt) + len(r.output) for r in self.rows) + ahead

    # ------------------------------------------------------------------------------------------------ compiled decode
    def _compile_decode(self) -> None:
        """The decode forwards under torch.compile (inductor, C++ wrapper): one graph whose kernels fuse the ~1,000
        small ops of an eager batch-1 step (dev/LOG.md). Plain decode compiles `decode_logits`; speculation compiles
        its two forwards, the main model's verify of [last, draft] and the MTP drafter, with the acceptance rule
        between them left eager. Replaces the forwards this engine runs; the others stay eager.

        The span S is a dynamic dimension and so is the number of rows past 1, so a server compiles twice per
        forward (1 row, more rows), here and now rather than mid-request; three times where max_batch reaches past
        model.ROWWISE_MAX_ROWS routed assignments (64: 16 rows at top-4, 8 when speculating), where the routed
        experts leave the row-by-row path for grouped_mm."""
        if self.config.index_topk is not None:
            raise ValueError("compile covers dense MLA; run models with sparse attention (index_topk set) without it")
        # Attention over the cache in one fused pass where it can (fp32 on CPU): 3.5x less time than its three
        # library products at 2,048 slots; products of 2-16 rows through one read of each weight (nanoseek.kernels;
        # dev/LOG.md).
        self.fused_attention = fused = (self.cache.kv.dtype == torch.float32 and self.cache.kv.device.type == "cpu"
                                        and next(self.model.parameters()).dtype == torch.float32 and kernels.load())
        options = decode_compile_options(self.config.vocab_size, few_rows=fused)

        def compiled(forward: Callable) -> Callable:
            # Compiled code is cached per function (up to torch._dynamo's recompile limit), not per engine: engines
            # on models of one config share it.
            fn = torch.compile(forward, dynamic=False, options=options)

            def run(*args):
                *rowed, kv, pe, _idx = args
                torch._dynamo.mark_dynamic(kv, 2)
                torch._dynamo.mark_dynamic(pe, 2)
                if kv.shape[1] > 1:
                    for t in (kv, pe):
                        torch._dynamo.mark_dynamic(t, 1)
                    for t in rowed:
                        torch._dynamo.mark_dynamic(t, 0)
                return fn(self.model, *rowed, kv, pe, None, fused)
            return run

        # Every graph a step can need: 1 row, 2+ rows, and the first row count past the rowwise-experts limit.
        tokens_per_row = 2 if self.speculative else 1
        counts = {1, min(2, self.max_batch)}
        past_rowwise = model_lib.ROWWISE_MAX_ROWS // max(1, self.config.num_experts_per_tok * tokens_per_row) + 1
        if self.config.n_routed_experts and self.max_batch >= past_rowwise:
            counts.add(past_rowwise)
        t0 = time.perf_counter()
        cache = self.cache
        with torch.inference_mode():  # warm-up writes slots 0-1 of the first rows; a prompt rewrites them before use
            if self.speculative:
                verify, draft = compiled(verify_forward), compiled(draft_forward)
                for n in sorted(counts):
                    # Built as _speculate builds them (contiguous stacks): the warmed stance skips stride guards.
                    ids = torch.stack([self.last[:n], self.draft[:n]], dim=1)
                    pos = torch.stack([self.pos[:n], self.pos[:n] + 1], dim=1)
                    kv, pe = cache.kv[:, :n, :2], cache.pe[:, :n, :2]
                    _, h = verify(ids, pos, kv, pe, None)
                    draft(h, ids, pos, torch.zeros_like(self.pos[:n]), kv, pe, None)
                self._verify, self._draft = _warmed(verify), _warmed(draft)
            else:
                decode = compiled(decode_logits)
                for n in sorted(counts):
                    decode(self.last[:n, None], self.pos[:n, None], cache.kv[:, :n, :2], cache.pe[:, :n, :2], None)
                self._decode_logits = _warmed(decode)
        self.compile_s = time.perf_counter() - t0

    def _compact(self) -> None:
        """Keep active rows at 0..N-1: move the last live rows into the holes finished ones left."""
        rows = self.rows
        for r in rows:
            if r.finished:
                self.stats.finished[r.finish_reason] += 1
        keep = [i for i, r in enumerate(rows) if not r.finished]
        n = len(keep)
        if n == len(rows):
            return
        holes = [i for i in range(n) if rows[i].finished]
        movers = [j for j in keep if j >= n]
        if movers:
            src = torch.tensor(movers, device=self.device)
            dst = torch.tensor(holes, device=self.device)
            S = max(len(rows[j].prompt) + len(rows[j].output) for j in movers) + 1
            self.cache.kv[:, dst, :S] = self.cache.kv[:, src, :S]
            self.cache.pe[:, dst, :S] = self.cache.pe[:, src, :S]
            if self.cache.idx is not None:  # DSA indexer keys
                self.cache.idx[:, dst, :S] = self.cache.idx[:, src, :S]
            for t in (self.last, self.pos, self.draft, self.temperature, self.top_k, self.top_p, self.draft_q):
                t[dst] = t[src]
        new = rows[:n]
        for i, j in zip(holes, movers):
            new[i] = rows[j]
        self.rows = new

    def _uniforms(self, rows: list[Request], k: int) -> Tensor:
        # One torch.Generator per request keeps seeded output reproducible whatever else shares the batch; a
        # tensor op cannot draw from several generators, hence this loop over requests (not over tokens).
        if all(r.generator is None for r in rows):
            return torch.zeros(len(rows), k, device=self.device)
        return torch.stack([r._uniforms(k) for r in rows]).to(self.device)

    def _probs(self, logits_NV: Tensor, a: int, b: int, rows: list[Request], repeat: int = 1) -> Tensor:
        filtered = any(not r.params.greedy and (r.params.top_k > 0 or r.params.top_p < 1) for r in rows)
        rep = lambda t: t[a:b].repeat_interleave(repeat)  # noqa: E731
        return sampling_probs(logits_NV, rep(self.temperature), rep(self.top_k), rep(self.top_p), filtered)

    def _pick(self, logits_NV: Tensor, a: int, b: int, rows: list[Request], u_N: Tensor) -> tuple[Tensor, Tensor | None]:
        """Next tokens for rows a..b (and their distributions, when speculation needs them)."""
        if all(r.generator is None for r in rows):
            return logits_NV.argmax(-1), None
        probs_NV = self._probs(logits_NV, a, b, rows)
        return sample_from(probs_NV, u_N), probs_NV

    def _prefill(self, admit: list[Request]) -> None:
        # Groups of prompts padded to their longest, bounded by prefill_tokens (the logits are [B, T, V]).
        admit = sorted(admit, key=lambda r: len(r.prompt))
        groups, cur = [], []
        for r in admit:
            if cur and (len(cur) + 1) * len(r.prompt) > self.prefill_tokens:
                groups.append(cur)
                cur = []
            cur.append(r)
        groups.append(cur)
        for group in groups:
            self._prefill_group(group)

    def _prefill_group(self, group: list[Request]) -> None:
        t0 = time.perf_counter()
        a, k = len(self.rows), len(group)
        b = a + k
        self.rows.extend(group)
        for i, r in enumerate(group):
            p = r.params
            self.temperature[a + i], self.top_k[a + i], self.top_p[a + i] = (
                0.0 if p.greedy else p.temperature, p.top_k, p.top_p)
        lens = torch.tensor([len(r.prompt) for r in group], device=self.device)
        T = int(max(len(r.prompt) for r in group))
        ids_BT = torch.zeros(k, T, dtype=torch.long, device=self.device)
        for i, r in enumerate(group):
            ids_BT[i, : len(r.prompt)] = torch.tensor(r.prompt)
        pos_BT = torch.arange(T, device=self.device).expand(k, T)
        view = self._view(a, b)
        logits_BTV, h_BTD = self.model(ids_BT, positions=pos_BT, cache=view, prefill=True, return_hidden=True)
        ar = torch.arange(k, device=self.device)
        u = self._uniforms(group, 2)
        first, _ = self._pick(logits_BTV[ar, lens - 1], a, b, group, u[:, 0])
        self.last[a:b], self.pos[a:b] = first, lens
        if self.speculative:
            # The MTP module needs its own cache layer filled over the prompt: pairs (h_j, t_{j+1}), j < L, where
            # t_L is the token just sampled. Its prediction at j = L-1 is the draft for position L+1.
            nxt_BT = torch.cat([ids_BT[:, 1:], ids_BT[:, :1]], dim=1)
            nxt_BT[ar, lens - 1] = first
            mtp_logits, _ = self.model.mtp_forward(1, h_BTD, nxt_BT, pos_BT, cache=view, prefill=True,
                                                   pick_B=lens - 1)
            self.draft[a:b], q = self._pick(mtp_logits[:, 0], a, b, group, u[:, 1])
            if q is not None:
                self.draft_q[a:b] = q
        tokens = first.tolist()
        self.stats.prefill_tokens += int(sum(len(r.prompt) for r in group))
        self.stats.prefill_s += time.perf_counter() - t0
        for r, t in zip(group, tokens):
            r._append([t], self.eos_id, self.tokenizer, self.max_len)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows, n = self.rows, len(self.rows)
        view = self._view(0, n, self._span(0))
        logits_NV = self._decode_logits(self.last[:n, None], self.pos[:n, None], view.kv, view.pe, view.idx)
        nxt, _ = self._pick(logits_NV, 0, n, rows, self._uniforms(rows, 1)[:, 0])
        self.last[:n] = nxt
        self.pos[:n] += 1
        tokens = nxt.tolist()
        self.stats.decode_steps += 1
        self.stats.generated += n
        self.stats.decode_s += time.perf_counter() - t0
        for r, t in zip(rows, tokens):
            r._append([t], self.eos_id, self.tokenizer, self.max_len)

    def _speculate(self) -> None:
        """One draft token per row from MTP depth 1, verified by the main model in one absorbed forward over
        [last, draft]; then the MTP module runs on the two new positions to draft the next step."""
        t0 = time.perf_counter()
        rows, n = self.rows, len(self.rows)
        view = self._view(0, n, self._span(1))
        last, pos, draft, q_NV = self.last[:n], self.pos[:n], self.draft[:n], self.draft_q[:n]
        pos_N2 = torch.stack([pos, pos + 1], dim=1)
        logits_N2V, h_N2D = self._verify(torch.stack([last, draft], dim=1), pos_N2, view.kv, view.pe, view.idx)
        u = self._uniforms(rows, 4)
        if all(r.generator is None for r in rows):  # all greedy: exact argmax comparisons, no distributions
            target_N2 = logits_N2V.argmax(-1)
            first, bonus = target_N2[:, 0], target_N2[:, 1]
            accepted = first == draft
        else:
            # Greedy rows keep no draft distribution: theirs is the one-hot at their (argmax) draft.
            greedy_N = (self.temperature[:n] <= 0)[:, None]
            q_NV = torch.where(greedy_N, F.one_hot(draft, q_NV.shape[-1]).to(q_NV.dtype), q_NV)
            p_N2V = self._probs(logits_N2V.flatten(0, 1), 0, n, rows, repeat=2).view(n, 2, -1)
            first, accepted = speculative_accept(p_N2V[:, 0], q_NV, draft, u[:, 0], u[:, 1])
            bonus = sample_from(p_N2V[:, 1], u[:, 2])  # p(. | last, draft): kept only when the draft was accepted
        n_new = 1 + accepted.long()
        # MTP at pos (h_pos, t_{pos+1}) and pos+1 (h_{pos+1}, t_{pos+2}); the second is garbage for rejected rows
        # (its latents are rewritten next step) and the draft comes from the last position actually kept.
        mtp_logits = self._draft(h_N2D, torch.stack([first, bonus], dim=1), pos_N2, n_new - 1, view.kv, view.pe,
                                 view.idx)
        new_draft, new_q = self._pick(mtp_logits, 0, n, rows, u[:, 3])
        self.last[:n] = torch.where(accepted, bonus, first)
        self.pos[:n] += n_new
        self.draft[:n] = new_draft
        if new_q is not None:
            self.draft_q[:n] = new_q
        out = torch.stack([first, bonus, n_new], dim=1).tolist()
        self.stats.decode_steps += 1
        self.stats.decode_s += time.perf_counter() - t0
        for r, (t1, t2, k) in zip(rows, out):
            before = len(r.output)
            r.drafted += 1
            r.accepted += k - 1
            r._append([t1, t2][:k], self.eos_id, self.tokenizer, self.max_len)
            self.stats.generated += len(r.output) - before
        self.stats.drafted += n
        self.stats.accepted += int(sum(o[2] for o in out)) - n


def decode_compile_options(vocab_size: int, few_rows: bool = False) -> dict:
    """Inductor options of the compiled decode step: the C++ wrapper (no Python between kernels) and inductor's
    memory-bound-mm pass, which on CPU turns a product with one row, x [1, K] @ W [K, N], into a fused
    multiply-and-sum kernel that streams W once, in place of a library GEMV call per weight. A batch-1 decode step
    is ~48 such products, memory-bound (dev/LOG.md: 5.3 -> 3.2 ms a step at context 2,048). The pass reads its
    size limit (N <= 2,048 on CPU) when it is first imported; it is raised here to cover the LM head. `few_rows`
    (the caller has loaded nanoseek.kernels): the products left, those with 2-16 rows (a speculative verify, small
    batches), go to the kernels' few-row GEMM, which reads each weight once for all rows."""
    from torch._inductor.fx_passes import decompose_mem_bound_mm as pass_

    limit = max(vocab_size, pass_.CPU_MAX_OTHER_DIMENSION_DECOMPOSITION)
    pass_.cpu_max_other_dimension_decomposition = max(pass_.cpu_max_other_dimension_decomposition, limit)
    # The pass reads the module global above; the limit in the options only puts it into inductor's cache key.
    options = {"cpp_wrapper": True,
               "post_grad_fusion_options": {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": limit}}}
    if few_rows:
        options["post_grad_custom_post_pass"] = kernels.few_rows_pass()
    return options


def decode_logits(model: Transformer, ids_N1: Tensor, pos_N1: Tensor, kv: Tensor, pe: Tensor,
                  idx: Tensor | None = None, fused: bool = False) -> Tensor:
    """Next-token logits [N, V] of one decode step on the cache view (kv, pe, idx); `fused`: attention through
    the fused CPU kernel (nanoseek.kernels, loaded by the caller)."""
    return model(ids_N1, positions=pos_N1, cache=LatentCache(kv, pe, idx, fused))[:, 0]


def verify_forward(model: Transformer, ids_N2: Tensor, pos_N2: Tensor, kv: Tensor, pe: Tensor,
                   idx: Tensor | None = None, fused: bool = False) -> tuple[Tensor, Tensor]:
    """A speculative step's check: logits [N, 2, V] and last hidden states [N, 2, D] of [last, draft] at
    [pos, pos + 1], in one absorbed forward of the main model on the cache view."""
    return model(ids_N2, positions=pos_N2, cache=LatentCache(kv, pe, idx, fused), return_hidden=True)


def draft_forward(model: Transformer, h_N2D: Tensor, tokens_N2: Tensor, pos_N2: Tensor, pick_N: Tensor, kv: Tensor,
                  pe: Tensor, idx: Tensor | None = None, fused: bool = False) -> Tensor:
    """The MTP drafter (depth 1) on the two verified positions (both write its cache layer): logits [N, V] of the
    next draft, from position pick_N of each row, the last one kept (the LM head runs on that one only)."""
    return model.mtp_forward(1, h_N2D, tokens_N2, pos_N2, cache=LatentCache(kv, pe, idx, fused), pick_B=pick_N)[0][:, 0]


def _warmed(run: Callable) -> Callable:
    """A compiled forward whose graphs exist: decode inputs vary only along their dynamic dimensions, so Dynamo
    need only tell the graphs apart, not re-check every parameter's guards (0.48 -> 0.13 ms a step, dev/LOG.md)."""

    def warmed(*args):
        try:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return run(*args)
        except RuntimeError as e:  # an input no warm-up covered: Dynamo refuses to compile under that stance
            if "skip_guard_eval_unsafe" not in str(e):
                raise
        log.warning("compiled decode: a step needed a graph the warm-up did not build; compiling it now")
        return run(*args)

    return warmed


# --------------------------------------------------------------------------------------------------- loading
def resolve_model_dir(path: str | Path) -> tuple[Path, Path | None]:
    """(HF model folder, tokenizer folder or None) from either an HF folder or a run dir (whose
    `checkpoints/latest` names `checkpoints/step_NNNNNN/`, with the HF folder in `model/` and the tokenizer in
    the run dir's `tokenizer/`)."""
    path = Path(path)
    # A run dir first: its own config.json is the run's configuration, not a model's.
    if (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        model_dir = path
    elif (path / "checkpoints").is_dir():
        ckpts = path / "checkpoints"
        named = (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else ""
        candidates = ([ckpts / named] if named else []) + sorted(ckpts.glob("step_*"), reverse=True)
        model_dir = next((c / "model" for c in candidates if (c / "model" / "config.json").is_file()), None)
        if model_dir is None:
            raise FileNotFoundError(f"{path} is a run dir but none of its checkpoints has a model/config.json; "
                                    f"train first or pass an HF model folder")
    else:
        raise FileNotFoundError(f"{path}: expected an HF model folder (config.json + *.safetensors) or a run dir "
                                f"(with checkpoints/latest)")
    tok = None
    for d in [model_dir, *list(model_dir.parents)[:4]]:
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                tok = cand
                break
        if tok is not None:
            break
    return model_dir, tok


def load(path: str | Path, *, tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
         device: str = "cpu"):
    """(model, tokenizer) from an HF folder or a run dir; the tokenizer is looked up beside the model unless given."""
    from .tokenizer import Tokenizer

    model_dir, tok_dir = resolve_model_dir(path)
    tok_dir = Path(tokenizer) if tokenizer is not None else tok_dir
    if tok_dir is None:
        raise FileNotFoundError(f"no tokenizer.json found beside {model_dir}; pass --tokenizer DIR")
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device=device).eval()
    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer at {tok_dir} has {tok.vocab_size} ids but the model only {model.config.vocab_size}")
    return model, tok


# --------------------------------------------------------------------------------------------------- CLI helpers
def add_engine_arguments(p, batching: bool = True) -> None:
    """Options `nanoseek chat` and `nanoseek serve` share."""
    p.add_argument("--model", required=True,
                   help="an HF model folder (config.json + *.safetensors) or a run dir (uses checkpoints/latest)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder (default: beside the model, or the run dir's tokenizer/)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights, activations and latent cache dtype (default float32)")
    if batching:
        p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (cache slots; default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="context per sequence, prompt + completion (default: the model's max_position_embeddings)")
    p.add_argument("--speculative", action="store_true",
                   help="draft one token per step with the MTP module, verified by the main model")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (~4x faster than eager at batch 1 on CPU; compiles for up "
                        "to a few minutes at start; not with sparse attention)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def engine_from_args(args, **kw) -> Engine:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args.model, tokenizer=args.tokenizer, dtype=getattr(torch, args.dtype))
    max_len = args.max_len or model.config.max_position_embeddings
    return Engine(model, tok, max_batch=getattr(args, "max_batch", 1), max_len=max_len, speculative=args.speculative,
                  compile=args.compile, **kw)
