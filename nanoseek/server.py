"""OpenAI-compatible HTTP API over the engine: GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(streamed as server-sent events or not), GET /health.

One engine, one background thread running its scheduler; every HTTP request becomes one engine request per
choice (`n`), queued, batched with whatever else is running, and fed back to the event loop through
`call_soon_threadsafe`. A client that goes away (mid-stream or while waiting for a plain response) has its
requests cancelled, which frees their slots before the engine's next step.

Reasoning, as DeepSeek's API returns it: a chat reply `<think>R</think>A` comes back as `reasoning_content` = R
and `content` = A with the `<answer>`/`</answer>` tags removed (the tags are nanoseek's training markup, not
part of the answer); a reply without `<think>` is all content and `reasoning_content` is null. /v1/completions
returns the raw text. Extensions beside OpenAI's fields: `top_k`, `ignore_eos` (as vLLM).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 bad input (malformed JSON,
bad field, prompt or max_tokens beyond the context), 401 bad API key, 404 unknown model or route, 429 queue full.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueueFull, Request, SamplingParams

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
MAX_N = 16
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


# --------------------------------------------------------------------------------------------------- reasoning
def _held(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags` (it may still become one)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best


def split_reply(text: str, final: bool = True) -> tuple[str | None, str]:
    """(reasoning_content, content) of a chat reply. While streaming (final=False) a tail that may be the start of
    a tag is held back, so that what a prefix of the text yields is a prefix of what the whole text yields."""
    reasoning = None
    rest = text
    if text.startswith(THINK):
        body = text[len(THINK):]
        j = body.find(END_THINK)
        if j < 0:
            return body[:len(body) - (0 if final else _held(body, (END_THINK,)))], ""
        reasoning, rest = body[:j], body[j + len(END_THINK):]
    elif not final and THINK.startswith(text):
        return None, ""
    if not final:
        rest = rest[:len(rest) - _held(rest, (ANSWER, END_ANSWER))]
    return reasoning, rest.replace(ANSWER, "").replace(END_ANSWER, "")


# --------------------------------------------------------------------------------------------------- parsing
def _field(body: dict, name: str, kinds, default=None, *, check=None, rule: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {rule or kinds}, got {value!r}", param=name)
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {rule}, got {value!r}", param=name)
    return value


class _Parsed:
    def __init__(self, prompts: list[list[int]], params: list[SamplingParams], n: int, stream: bool,
                 include_usage: bool):
        self.prompts, self.params, self.n, self.stream, self.include_usage = prompts, params, n, stream, include_usage


class Server:
    """The HTTP side: parses requests, launches engine requests, formats replies."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None):
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (text in, text out)")
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.created = int(time.time())

    # ------------------------------------------------------------------------------------------------ requests
    async def read_json(self, http: HTTPRequest) -> dict:
        raw = await http.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' is required (a string); GET /v1/models lists what is served", param="model")
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")
        for name in ("logprobs", "echo", "suffix", "tools", "functions"):
            if body.get(name):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name):
                raise APIError(400, f"'{name}' is not supported (only 0)", param=name)
        return body

    def sampling(self, body: dict, prompts: list[list[int]]) -> _Parsed:
        max_len = self.engine.max_len
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt has {longest} "
                                f"tokens, leaving none to generate", param="messages", code="context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _field(body, key, int, max_len - longest, check=lambda v: v >= 1, rule="a positive integer")
        if longest + max_tokens > max_len:
            raise APIError(400, f"This model's maximum context length is {max_len} tokens; the prompt ({longest}) "
                                f"plus {key} ({max_tokens}) exceeds it: ask for at most {max_len - longest}",
                           param=key, code="context_length_exceeded")
        n = _field(body, "n", int, 1, check=lambda v: 1 <= v <= MAX_N, rule=f"an integer in [1, {MAX_N}]")
        temperature = _field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2,
                             rule="a number in [0, 2]")
        top_p = _field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, rule="a number in (0, 1]")
        top_k = _field(body, "top_k", int, 0, check=lambda v: v >= 0, rule="an integer >= 0")
        seed = _field(body, "seed", int, None, rule="an integer")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not (isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop)):
            raise APIError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings",
                           param="stop")
        ignore_eos = _field(body, "ignore_eos", bool, False, rule="a boolean")
        stream = _field(body, "stream", bool, False, rule="a boolean")
        opts = _field(body, "stream_options", dict, {}, rule="an object")
        params = [SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=top_k,
                                 top_p=float(top_p), seed=None if seed is None else seed + i, stop=tuple(stop),
                                 ignore_eos=ignore_eos) for i in range(n)]
        return _Parsed(prompts, params, n, stream, bool(opts.get("include_usage")))

    def chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", param="messages")
            role, content = m.get("role"), m.get("content")
            role = "system" if role == "developer" else role
            if isinstance(content, list):  # OpenAI content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise APIError(400, f"messages[{i}] must have role system/user/assistant and string content, got "
                                    f"role={role!r}", param="messages")
            clean.append({"role": role, "content": content})
        return self.engine.tokenizer.render_chat(clean, add_generation_prompt=True)[0]

    def completion_prompts(self, body: dict) -> list[list[int]]:
        prompt = body.get("prompt")
        tok = self.engine.tokenizer
        V = self.engine.config.vocab_size
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            prompts = prompt
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
        if len(prompts) > MAX_N:
            raise APIError(400, f"at most {MAX_N} prompts per request", param="prompt")
        out = []
        for p in prompts:
            ids = tok.encode(p) if isinstance(p, str) else p
            if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
                raise APIError(400, f"each prompt must be non-empty text or token ids in [0, {V})", param="prompt")
            out.append(ids)
        return out

    # ------------------------------------------------------------------------------------------------ engine
    def launch(self, parsed: _Parsed) -> tuple[list[Request], asyncio.Queue]:
        """Engine requests for every (prompt, choice); events (index, text delta | None when finished) arrive on
        the returned queue, from the engine thread."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        reqs = []
        for pi, prompt in enumerate(parsed.prompts):
            for ci, params in enumerate(parsed.params):
                idx = pi * parsed.n + ci
                reqs.append(Request(prompt, params,
                                    on_delta=lambda r, d, i=idx: loop.call_soon_threadsafe(q.put_nowait, (i, d)),
                                    on_finish=lambda r, i=idx: loop.call_soon_threadsafe(q.put_nowait, (i, None))))
        try:
            self.engine.submit(*reqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e}. Retry shortly.", type_="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return reqs, q

    @staticmethod
    def check_failed(reqs: list[Request]) -> None:
        if any(r.finish_reason == "error" for r in reqs):
            raise APIError(500, "generation failed on the server (see its log)", type_="server_error")

    async def finish_all(self, http: HTTPRequest, reqs: list[Request], q: asyncio.Queue) -> bool:
        """A non-streamed response's wait: False if the client went away; the requests are cancelled either way
        (a no-op for finished ones, and frees the slots of the others); a failed generation raises a 500."""
        try:
            if not await self.wait_all(http, reqs, q):
                return False
        finally:
            for r in reqs:
                r.cancel()
        self.check_failed(reqs)
        return True

    async def wait_all(self, http: HTTPRequest, reqs: list[Request], q: asyncio.Queue) -> bool:
        """Until every request finished; False (and everything cancelled) if the client went away."""
        left, next_check = len(reqs), time.monotonic() + 0.25
        while left:
            try:
                _, delta = await asyncio.wait_for(q.get(), timeout=0.25)
                left -= delta is None
            except asyncio.TimeoutError:
                pass
            if time.monotonic() >= next_check:  # deltas may keep coming: check on a clock, not on silence
                if await http.is_disconnected():
                    return False
                next_check = time.monotonic() + 0.25
        return True

    def usage(self, reqs: list[Request], prompts: list[list[int]]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(r.output) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # ------------------------------------------------------------------------------------------------ endpoints
    async def chat(self, http: HTTPRequest):
        body = await self.read_json(http)
        parsed = self.sampling(body, [self.chat_prompt(body)])
        reqs, q = self.launch(parsed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return self._sse(self._chat_events(reqs, q, parsed, cid, created), reqs)
        if not await self.finish_all(http, reqs, q):
            return JSONResponse({}, 499)
        choices = []
        for i, r in enumerate(reqs):
            reasoning, content = split_reply(r.text)
            choices.append({"index": i, "message": {"role": "assistant", "content": content,
                                                    "reasoning_content": reasoning},
                            "logprobs": None, "finish_reason": r.finish_reason})
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage(reqs, parsed.prompts)}

    def chunker(self, obj: str, cid: str, created: int, include_usage: bool):
        """One SSE chunk of a streamed response: its choices, and usage when the client asked for it."""
        def chunk(choices, usage=None):
            out = {"id": cid, "object": obj, "created": created, "model": self.model_name, "choices": choices}
            if include_usage:
                out["usage"] = usage
            return out
        return chunk

    async def _chat_events(self, reqs, q, parsed, cid, created):
        chunk = self.chunker("chat.completion.chunk", cid, created, parsed.include_usage)

        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(len(reqs))])
        text = [""] * len(reqs)  # what each choice has streamed so far (deltas never include a stop string)
        sent = [[0, 0] for _ in reqs]  # chars of reasoning and of content already sent, per choice
        left = len(reqs)
        while left:
            i, delta = await q.get()
            text[i] += delta or ""
            reasoning, content = split_reply(text[i], final=delta is None)
            d = {}
            if reasoning is not None and len(reasoning) > sent[i][0]:
                d["reasoning_content"] = reasoning[sent[i][0]:]
                sent[i][0] = len(reasoning)
            if len(content) > sent[i][1]:
                d["content"] = content[sent[i][1]:]
                sent[i][1] = len(content)
            if d:
                yield chunk([{"index": i, "delta": d, "logprobs": None, "finish_reason": None}])
            if delta is None:
                left -= 1
                yield chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reqs[i].finish_reason}])
        if parsed.include_usage:
            yield chunk([], self.usage(reqs, parsed.prompts))

    async def completions(self, http: HTTPRequest):
        body = await self.read_json(http)
        parsed = self.sampling(body, self.completion_prompts(body))
        reqs, q = self.launch(parsed)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if parsed.stream:
            return self._sse(self._completion_events(reqs, q, parsed, cid, created), reqs)
        if not await self.finish_all(http, reqs, q):
            return JSONResponse({}, 499)
        choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                   for i, r in enumerate(reqs)]
        return {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self.usage(reqs, parsed.prompts)}

    async def _completion_events(self, reqs, q, parsed, cid, created):
        chunk = self.chunker("text_completion", cid, created, parsed.include_usage)

        left = len(reqs)
        while left:
            i, delta = await q.get()
            if delta is not None:
                yield chunk([{"index": i, "text": delta, "logprobs": None, "finish_reason": None}])
            else:
                left -= 1
                yield chunk([{"index": i, "text": "", "logprobs": None, "finish_reason": reqs[i].finish_reason}])
        if parsed.include_usage:
            yield chunk([], self.usage(reqs, parsed.prompts))

    def _sse(self, events, reqs: list[Request]) -> StreamingResponse:
        async def body():
            # Starlette cancels this generator when the client disconnects; `finally` then frees the slots.
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:
                    r.cancel()
        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "nanoseek"}]}

    def health(self) -> dict:
        e = self.engine
        return {"status": "ok", "model": self.model_name, "active": len(e.rows), "waiting": len(e.waiting),
                "max_batch": e.max_batch, "max_queue": e.max_queue, "max_len": e.max_len,
                "speculative": e.speculative, "stats": e.stats.as_dict(), "cache": e.cache_report()}


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine's scheduler thread and stops it on shutdown."""
    from contextlib import asynccontextmanager

    server = Server(engine, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.server, app.state.engine = server, engine

    def check_key(http: HTTPRequest) -> None:
        # A dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware wraps `receive` and would hide a
        # client's disconnect from the handlers (which cancel the generation when it happens).
        if api_key is not None and http.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(APIError)
    async def api_error(http, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(http, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal(http, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}", type_="server_error")

    @app.get("/health")
    def health() -> Any:
        return server.health()

    @v1.get("/models")
    def models() -> Any:
        return server.models()

    @v1.get("/models/{model_id}")
    def model(model_id: str) -> Any:
        if model_id != model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return server.models()["data"][0]

    v1.post("/chat/completions")(server.chat)
    v1.post("/completions")(server.completions)
    app.include_router(v1)
    return app
