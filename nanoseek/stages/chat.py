"""`nanoseek chat`: talk to a model in the terminal, with the reply streamed as it is generated.

    nanoseek chat --model runs/speedrun                        # interactive; /reset, /quit
    nanoseek chat --model runs/speedrun --prompt "what is 2+3?" # one turn, for scripts

Reasoning (the text inside <think>...</think>) is shown apart from the answer: dimmed on a terminal; when output
is not a terminal, reasoning goes to stderr (prefixed "thinking: ") and only the answer to stdout, so that
`answer=$(nanoseek chat --model M --prompt Q)` captures the answer alone. <answer> tags are not shown.
The conversation keeps the model's raw replies (reasoning included, as it was trained on them).
"""

import argparse
import sys

from ..engine import Request, SamplingParams, add_engine_arguments, engine_from_args
from ..server import split_reply

DIM, RESET = "\033[2m", "\033[0m"


class ReplyPrinter:
    """Writes a streamed reply, reasoning apart from the answer."""

    def __init__(self, out, err, color: bool):
        self.out, self.err, self.color = out, err, color
        self.text, self.sent = "", [0, 0]

    def feed(self, delta: str, final: bool = False) -> None:
        self.text += delta
        reasoning, content = split_reply(self.text, final)
        if reasoning is not None and len(reasoning) > self.sent[0]:
            if self.sent[0] == 0:
                self._think(f"{DIM}thinking: " if self.color else "thinking: ")
            self._think(reasoning[self.sent[0]:])
            self.sent[0] = len(reasoning)
        if len(content) > self.sent[1]:
            if self.sent[1] == 0 and self.sent[0]:
                self._think(f"{RESET}\n" if self.color else "\n")
            self.out.write(content[self.sent[1]:])
            self.out.flush()
            self.sent[1] = len(content)
        if final:
            if self.color and self.sent[0] and not self.sent[1]:
                self._think(RESET)
            self.out.write("\n")
            self.out.flush()

    def _think(self, s: str) -> None:
        stream = self.out if self.color else self.err
        stream.write(s)
        stream.flush()


def reply(engine, messages: list[dict], params: SamplingParams, out, err, color: bool) -> str | None:
    """Streams one assistant turn; returns its raw text, or None when the conversation no longer fits."""
    prompt = engine.tokenizer.render_chat(messages, add_generation_prompt=True)[0]
    room = engine.max_len - len(prompt)
    if room < 1:
        err.write(f"the conversation ({len(prompt)} tokens) fills the context of {engine.max_len}; /reset to start "
                  f"over\n")
        return None
    req = Request(prompt, SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room)}))
    printer = ReplyPrinter(out, err, color)
    for delta in engine.stream(req):
        printer.feed(delta)
    printer.feed("", final=True)
    if req.finish_reason == "length":
        err.write(f"[stopped at {len(req.output)} tokens]\n")
    return req.text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p, batching=False)
    p.add_argument("--prompt", default=None, help="answer this one message and exit (non-interactive)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per reply at most (default 512)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible replies (default: random)")
    p.add_argument("--no-color", action="store_true", help="no ANSI dimming of the reasoning")
    args = p.parse_args(argv)
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed)
        engine = engine_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"nanoseek chat: {e}", file=sys.stderr)
        return 2
    out, err = sys.stdout, sys.stderr
    color = out.isatty() and not args.no_color
    start = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        text = reply(engine, start + [{"role": "user", "content": args.prompt}], params, out, err, color)
        return 0 if text is not None else 1
    messages = list(start)
    print("nanoseek chat: /reset starts over, /quit (or Ctrl-D) leaves", file=err)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return 0
        if line.strip() == "/quit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation reset)", file=err)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            text = reply(engine, messages, params, out, err, color)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print("\n[interrupted]", file=err)
            messages.pop()
            continue
        if text is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": text})
