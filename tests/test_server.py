"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn on loopback; and
`nanoseek chat --prompt`. The model is the tiny chat model of test_engine (memorised replies with reasoning)."""

import json
import socket
import threading
import time

import httpx
import pytest

from nanoseek.engine import Engine, Request, SamplingParams
from nanoseek.server import create_app, split_reply
# The engine tests' fixtures (one torch thread, the tokenizer, the trained chat model), one definition.
from test_engine import CHATS, chat_model, chat_prompt, one_thread, tok  # noqa: F401

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sekrit"
NAME = "tiny-chat"


class ServerThread:
    """uvicorn in a thread on a port the OS picked; stopped by stop()."""

    def __init__(self, app):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(chat_model, tok):
    engine = Engine(chat_model, tok, max_batch=4, max_len=256, speculative=True, max_queue=8)
    s = ServerThread(create_app(engine, NAME, api_key=KEY))
    s.engine = engine
    yield s
    s.stop()


@pytest.fixture(scope="module")
def small_server(chat_model, tok):
    # One slot, one queue place, a long context: for 429 and for clients that leave mid-generation.
    engine = Engine(chat_model, tok, max_batch=1, max_len=4096, max_queue=1)
    s = ServerThread(create_app(engine, NAME))
    s.engine = engine
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=30, max_retries=0)


def msgs(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = httpx.get(server.url + "/health", timeout=10).json()
    assert h["status"] == "ok" and h["max_batch"] == 4 and h["cache"]["ratio"] > 1


def test_chat_separates_reasoning_and_counts_usage(client, tok):
    r = client.chat.completions.create(model=NAME, messages=msgs("hi"), temperature=0)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content) == ("say hello back", "hello there")
    assert r.choices[0].finish_reason == "stop"
    full = tok.encode(CHATS[0][1])
    assert r.usage.prompt_tokens == len(chat_prompt(tok, "hi"))
    assert r.usage.completion_tokens == len(full)  # the closing EOS is not counted
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed(client):
    stream = client.chat.completions.create(model=NAME, messages=msgs("count"), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finish, usage, chunks = "", "", None, None, 0
    for chunk in stream:
        chunks += 1
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert reasoning == "count up to ten"
    assert content == "one two three four five six seven eight nine ten"
    assert finish == "stop" and usage.completion_tokens > 10 and chunks > 8


def test_n_seed_and_stop(client):
    r = client.chat.completions.create(model=NAME, messages=msgs("count"), n=3, temperature=1.5, seed=7,
                                       max_tokens=30)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=NAME, messages=msgs("count"), n=3, temperature=1.5, seed=7,
                                           max_tokens=30)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in r.choices}) > 1  # temperature 1.5: the three choices differ
    assert r.usage.completion_tokens >= 3
    s = client.chat.completions.create(model=NAME, messages=msgs("count"), temperature=0, stop=["five", "nine"])
    assert s.choices[0].message.content == "one two three four "
    assert s.choices[0].finish_reason == "stop"


def test_completions_plain_and_streamed(client, tok):
    prompt = tok.decode(chat_prompt(tok, "what is 2+2?"))
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=200, temperature=0)
    assert r.choices[0].text == CHATS[1][1] and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=NAME, prompt=[prompt, prompt], max_tokens=3, temperature=0)
    assert [c.finish_reason for c in r.choices] == ["length"] * 2 and r.usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=200, temperature=0, stream=True) if c.choices)
    assert text == CHATS[1][1]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(client, server):
    def post(body, path="/v1/chat/completions", key=KEY):
        h = {"authorization": f"Bearer {key}", "content-type": "application/json"}
        return httpx.post(server.url + path, content=body, headers=h, timeout=10)

    r = post(b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert post(json.dumps([1, 2])).status_code == 400
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs("hi"))
    assert e.value.body["code"] == "model_not_found"
    for bad in ({"max_tokens": -1}, {"max_tokens": 10**9}, {"n": 0}, {"temperature": 7}, {"top_p": 0},
                {"stop": 5}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]}):
        body = {"model": NAME, "messages": msgs("hi"), **bad}
        r = post(json.dumps(body))
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=msgs("hi " * 400))
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=[10**6])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/v1/nope", headers={"authorization": f"Bearer {KEY}"}).json()["error"]
    assert client.chat.completions.create(model=NAME, messages=msgs("hi"), temperature=0).choices[0].message.content \
        == "hello there"
    assert wait_idle(server.engine)


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)
    return not engine.busy


def test_queue_full_is_429(small_server, tok):
    engine = small_server.engine
    hold = [Request(chat_prompt(tok, "hi"), SamplingParams(max_tokens=3000, ignore_eos=True)) for _ in range(2)]
    engine.submit(*hold)  # one runs, one waits: the queue (1) is full
    try:
        c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="x", timeout=30, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=NAME, messages=msgs("hi"))
    finally:
        for r in hold:
            r.cancel()
    assert wait_idle(engine)
    assert c.chat.completions.create(model=NAME, messages=msgs("hi"), temperature=0).choices[0].message.content \
        == "hello there"


def test_client_leaving_mid_stream_frees_its_slot(small_server):
    engine = small_server.engine
    before = engine.stats.finished["cancelled"]
    body = {"model": NAME, "messages": msgs("count"), "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=10) as h:
        with h.stream("POST", small_server.url + "/v1/chat/completions", json=body) as r:
            events = (line for line in r.iter_lines() if line.startswith("data: "))
            assert "reasoning_content" in [next(events) for _ in range(3)][-1]
            assert engine.rows  # generating
    # the connection is closed here, long before 4000 tokens
    assert wait_idle(engine), "the slot of a disconnected stream was not freed"
    assert engine.stats.finished["cancelled"] == before + 1
    # a plain (non-streamed) request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(small_server.url + "/v1/chat/completions", timeout=0.5,
                   json={**body, "stream": False})
    assert wait_idle(engine)
    assert engine.stats.finished["cancelled"] == before + 2


def test_split_reply_is_prefix_consistent():
    text = "<think>a </think> b</think><answer>42</answer>"
    assert split_reply(text) == ("a ", " b</think>42")
    assert split_reply("no tags <answer>x</answer>") == (None, "no tags x")
    assert split_reply("<think>unfinished") == ("unfinished", "")
    for k in range(len(text) + 1):  # every streamed prefix yields a prefix of the final split
        r, c = split_reply(text[:k], final=False)
        assert ("a ".startswith(r or "")) and " b</think>42".startswith(c), (k, r, c)


def test_chat_stage_one_prompt(chat_model, tok, tmp_path, capsys):
    from nanoseek.stages import chat

    run = tmp_path / "run"
    chat_model.save_pretrained(run / "checkpoints" / "step_000001" / "model")
    (run / "checkpoints" / "latest").write_text("step_000001\n")
    tok.save(run / "tokenizer")
    assert chat.main(["--model", str(run), "--prompt", "what is 2+2?", "--temperature", "0", "--speculative"]) == 0
    out, err = capsys.readouterr()
    assert out == "4\n" and "thinking: 2 plus 2 is 4" in err
    assert chat.main(["--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2


def test_a_failing_step_fails_its_requests_not_the_server(small_server, monkeypatch, capsys):
    engine = small_server.engine

    def boom():
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine, "_decode", boom)
    c = openai.OpenAI(base_url=small_server.url + "/v1", api_key="x", timeout=30, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model=NAME, messages=msgs("count"), temperature=0)
    monkeypatch.undo()
    assert "simulated failure" in capsys.readouterr().err
    assert c.chat.completions.create(model=NAME, messages=msgs("hi"), temperature=0).choices[0].message.content \
        == "hello there"
