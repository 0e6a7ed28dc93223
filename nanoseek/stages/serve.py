"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batching engine.

    nanoseek serve --model runs/speedrun --port 8000
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "speedrun", "messages": [{"role": "user", "content": "what is 2+3?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streamed or not), GET /health.
Reasoning (<think>...</think>) comes back as `reasoning_content`, the answer as `content` (see nanoseek/server.py).
"""

import argparse
import os
from pathlib import Path

from ..engine import add_engine_arguments, engine_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NANOSEEK_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients pass (default: the --model folder's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = p.parse_args(argv)

    import uvicorn

    from ..server import create_app

    engine = engine_from_args(args, max_queue=args.max_queue)
    name = args.served_model_name or Path(args.model).resolve().name
    rep = engine.cache_report()
    print(f"nanoseek serve: model '{name}', {args.max_batch} slots x {engine.max_len} tokens, "
          f"latent cache {rep['latent_bytes_per_token']} B/token ({rep['ratio']:.1f}x smaller than per-head K/V)"
          + (", MTP speculation on" if engine.speculative else ""), flush=True)
    uvicorn.run(create_app(engine, name, api_key=args.api_key), host=args.host, port=args.port,
                log_level=args.log_level)
    return 0
