"""`mlx-gemma serve`: an OpenAI-compatible HTTP server with continuous batching.

    from mlx_gemma.serve import serve
    serve("gemma-3-270m", adapters={"zh": "adapters/gemma-3-270m-zh"}, port=8080)

`create_server(...)` returns the ASGI app and its engine without running them (for embedding
in another ASGI stack, or tests). The layers: protocol.py (OpenAI request/response shapes),
engine.py (the one thread that runs MLX), app.py (Starlette routes), chat.html (the page at /).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..errors import UserError
from .app import DEFAULT_MAX_BODY, DEFAULT_MAX_TOKENS, build_app
from .engine import Engine

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PROMPT_CACHE_MB = 512
DEFAULT_PORT = 8080
API_KEY_ENV = "MLX_GEMMA_API_KEY"


def model_name_for(spec: str) -> str:
    """The id clients send as `model`: an alias or repo id as given, a path's final name."""
    path = Path(str(spec)).expanduser()
    return path.name if path.exists() else str(spec)


def create_server(model: str, adapters: Optional[dict] = None, api_key: Optional[str] = None,
                  model_name: Optional[str] = None, dtype: Optional[str] = None, prefill_step: int = 256,
                  max_body: int = DEFAULT_MAX_BODY, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                  prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB):
    """Load `model` (any spec `load` takes) and the named adapter dirs; return (app, engine) with
    the engine thread started. prompt_cache_mb: the most MB of served prompts' KV kept for reuse
    by later prompts that start the same way (0: none)."""
    from ..adapters import load_adapters
    from ..loading import load

    adapters = dict(adapters or {})
    name = model_name or model_name_for(model)
    clash = [a for a in adapters if a == name]
    if clash:
        raise UserError(f"adapter name {clash[0]!r} is the base model's name; give the adapter another name")
    if max_body < 1024:
        raise UserError(f"max_body must be at least 1024 bytes, got {max_body}")
    if default_max_tokens < 1:
        raise UserError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
    if prefill_step < 1:
        raise UserError(f"prefill_step must be >= 1, got {prefill_step}")
    if not prompt_cache_mb >= 0:
        raise UserError(f"prompt_cache_mb must be >= 0, got {prompt_cache_mb}")
    net, tokenizer = load(model, dtype=dtype)
    index = load_adapters(net, adapters) if adapters else {}
    # Weights may still be lazy (a load on this thread's stream): materialise them here, since the
    # engine thread runs on a stream of its own.
    mx.eval(net.parameters())
    _warm_grammar_tables(tokenizer)
    engine = Engine(net, tokenizer, index, prefill_step=prefill_step, prompt_cache_bytes=int(prompt_cache_mb * (1 << 20)))
    engine.start()
    app = build_app(engine, name, api_key=api_key, max_body=max_body, default_max_tokens=default_max_tokens)
    return app, engine


def _warm_grammar_tables(tokenizer) -> None:
    """Build the grammar engine's vocabulary tables now, before requests are served: llguidance
    builds them in native code that holds the GIL for seconds, which would stall the event loop
    (every stream, /health) at the first response_format request."""
    try:
        from ..constrain import grammar_tokenizer

        grammar_tokenizer(tokenizer)
    except ImportError:  # llguidance not installed: response_format requests say so themselves
        pass


def serve(model: str, adapters: Optional[dict] = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          api_key: Optional[str] = None, model_name: Optional[str] = None, dtype: Optional[str] = None,
          prefill_step: int = 256, max_body: int = DEFAULT_MAX_BODY,
          default_max_tokens: int = DEFAULT_MAX_TOKENS, log_level: str = "info",
          prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB) -> None:
    """Serve `model` (and adapters {name: dir}) on http://host:port until interrupted.

    api_key (default: $MLX_GEMMA_API_KEY): required as `Authorization: Bearer KEY` on every
    endpoint but /health and the page at /.
    """
    import uvicorn

    if not 0 < int(port) < 65536:
        raise UserError(f"port must be in 1..65535, got {port}")
    api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app, engine = create_server(model, adapters, api_key, model_name, dtype, prefill_step, max_body,
                                default_max_tokens, prompt_cache_mb)
    logging.getLogger("mlx_gemma.serve").info(
        "serving %s%s on http://%s:%d (API key %s)", model_name or model_name_for(model),
        f" with adapters {', '.join(adapters)}" if adapters else "", host, port, "required" if api_key else "off")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level=log_level,
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
    try:
        _run_until_signal(server, app)
    finally:
        signals = getattr(server, "_captured_signals", [])
        stop_engine(engine, 128 + signals[0] if signals else 1)


SHUTDOWN_GRACE_S = 5  # for answers already sent to reach their clients after SIGTERM / Ctrl-C
ENGINE_STOP_S = 15  # how long the way out waits for the engine's current step


def _run_until_signal(server, app) -> None:
    """uvicorn's run, where the first SIGTERM / Ctrl-C also answers every request in flight with a
    503 at once (ServerState.shut_down, on the event loop), so uvicorn's graceful wait ends as
    soon as those answers are written, instead of cancelling handlers mid-request."""
    import asyncio

    on_exit = server.handle_exit

    def handle_exit(sig, frame):
        on_exit(sig, frame)
        loop = getattr(app.state, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(app.state.server.shut_down)  # signal-safe: a write to the loop's pipe

    server.handle_exit = handle_exit

    async def main():
        app.state.loop = asyncio.get_running_loop()
        await server.serve()

    asyncio.run(main())


def stop_engine(engine: Engine, exit_code: int) -> None:
    """Stop the engine thread and wait for its current step. A process that exits while MLX still
    runs in that thread aborts ("terminate called without an active exception", status 134), so
    when the step outlasts ENGINE_STOP_S (a long prefill on a slow machine), the process ends at
    once with `exit_code` instead, skipping the interpreter's teardown; every client has its
    answer by then, and the server writes no files."""
    engine.stop()
    engine.thread.join(timeout=ENGINE_STOP_S)
    if engine.thread.is_alive():
        logging.getLogger("mlx_gemma.serve").warning(
            "the engine is still inside a step after %d s; exiting without waiting for it", ENGINE_STOP_S)
        logging.shutdown()
        os._exit(exit_code)
