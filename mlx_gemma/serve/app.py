"""The HTTP side of the server: a Starlette (ASGI) app run by uvicorn.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics
(Prometheus text, serve/metrics.py), GET / (the chat page). Every request is parsed by serve/protocol.py, tokenized off the event loop, and
handed to the engine thread; answers stream back as server-sent events (`data: {json}` lines,
ending with `data: [DONE]`) or as one JSON object.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from functools import partial
from importlib import resources
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.middleware import Middleware
from starlette.routing import Route

from .. import tools
from ..constrain import GrammarMask, grammar_error
from ..errors import UserError
from ..generation import Event
from . import protocol
from .engine import Engine, Job
from .metrics import ServerMetrics, StatusMiddleware
from .protocol import APIError, ParsedRequest

log = logging.getLogger("mlx_gemma.serve")

DEFAULT_MAX_BODY = 4 << 20  # bytes
DEFAULT_MAX_TOKENS = 2048  # per answer, when the request gives no max_tokens
MAX_BODY_DEPTH = 100  # JSON nesting of a request body (a response_format schema sits 3 levels down)


class ServerState:
    def __init__(self, engine: Engine, model_name: str, api_key: Optional[str], max_body: int,
                 default_max_tokens: int):
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.max_body, self.default_max_tokens = max_body, default_max_tokens
        self.created = int(time.time())
        self.jobs: dict = {}  # id(job) -> job: requests in flight, answered with a 503 when the server shuts down
        self.closing = False
        self.metrics = ServerMetrics(engine)  # GET /metrics, fed by the routes and the status middleware

    def shut_down(self) -> None:
        """SIGTERM / Ctrl-C (on the event loop): every request in flight ends now with a 503 (a
        stream with an error event) and frees its row; later requests get a 503 too."""
        self.closing = True
        for job in list(self.jobs.values()):
            job.events.put_nowait(_shutting_down())
            self.engine.cancel(job)

    def adapter_index(self, name: str) -> int:
        if not name or name == self.model_name:
            return 0
        if name in self.engine.adapters:
            return self.engine.adapters[name]
        known = ", ".join([self.model_name, *self.engine.adapters])
        raise APIError(404, f"the model {name!r} does not exist; this server has: {known}", "model",
                       "model_not_found")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry against a running server", None, "server_shutting_down")


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server takes at most {limit}", None,
                       "body_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds {limit} bytes", None, "body_too_large")
    return await run_in_threadpool(_parse_body, bytes(body))


def _parse_body(body: bytes):
    """The JSON of a request body, checked for what the readers below cannot take: nesting past
    MAX_BODY_DEPTH, strings that are not Unicode text (lone surrogates, which JSON's \\ud800
    escapes can carry) and integers beyond 64 bits. Runs off the event loop (4 MiB parse)."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise APIError(400, f"the request body nests deeper than {MAX_BODY_DEPTH} levels", None,
                       "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({str(exc)[:200]})", None, "invalid_json") from None
    stack = [(value, (), 0)]
    while stack:
        node, path, depth = stack.pop()
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".") or "the body"
        if depth > MAX_BODY_DEPTH:
            raise APIError(400, f"the request body nests deeper than {MAX_BODY_DEPTH} levels (at '{where[:80]}')",
                           None, "invalid_json")
        if isinstance(node, dict):
            for key, item in node.items():
                _check_text(key, where)
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(node, list):
            stack.extend((item, path + (i,), depth + 1) for i, item in enumerate(node))
        elif isinstance(node, str):
            _check_text(node, where)
        elif type(node) is int and not -2 ** 63 <= node < 2 ** 64:
            raise APIError(400, f"'{where}' is a {len(str(abs(node)))}-digit number; numbers must fit in 64 bits",
                           where, "invalid_value")
    return value


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"'{where}' holds a lone surrogate (\\u{ord(text[exc.start]):04x} at character "
                            f"{exc.start + 1}), which is not text; send valid Unicode", where, "invalid_value") from None


async def _until_disconnect(request: Request) -> None:
    """Return when the client has closed the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_done(*coroutines) -> int:
    """Run the coroutines until one ends; cancel the others; the index of the one that ended
    (its exception, if it raised)."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
    first = next(i for i, t in enumerate(tasks) if t in done)
    tasks[first].result()
    return first


def _authorized(state: ServerState, request: Request) -> bool:
    if state.api_key is None:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), state.api_key.encode())


def _unauthorized(state: ServerState, request: Request) -> Optional[APIError]:
    """The 401 of a request without the server's API key, or None."""
    if _authorized(state, request):
        return None
    return APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", None, "invalid_api_key")


def _grammar(state: ServerState, req: ParsedRequest) -> list:
    """The row's logits processors for req.constraint or its tool calls: a fresh grammar matcher
    (built here, off the engine thread: the first one also builds the vocabulary's grammar tables, seconds)."""
    if req.tool_spec is not None:
        mask = tools.call_mask(state.engine.tokenizer, req.tool_spec)
        return [mask] if mask is not None else []
    return [GrammarMask(req.constraint, state.engine.tokenizer)] if req.constraint is not None else []


def _tool_spec(tok, req: ParsedRequest) -> Optional[tools.ToolSpec]:
    """The request's tools checked against the model's format (None without tools)."""
    if req.tools is None:
        return None
    try:
        return tools.ToolSpec.of(tok, req.tools, req.tool_choice, req.parallel_tool_calls)
    except UserError as exc:
        param = "tool_choice" if str(exc).startswith("tool_choice") else "tools"
        raise APIError(400, str(exc), param, "invalid_value") from None


def _prompt_ids(state: ServerState, req: ParsedRequest) -> list:
    tok = state.engine.tokenizer
    req.tool_spec = _tool_spec(tok, req)
    uses_tools = req.kind == "chat" and (req.tool_spec is not None or any(
        m.get("tool_calls") or m["role"] == "tool" for m in req.prompt))
    if uses_tools:
        ids = tools.render_prompt(tok, req.prompt, req.tool_spec)
    elif req.kind == "chat":
        ids = tok.apply_chat_template(req.prompt, add_generation_prompt=True, tokenize=True)
    elif isinstance(req.prompt, str):
        if not req.prompt:
            raise UserError("the prompt is empty")
        ids = tok.encode(req.prompt)
    else:
        ids = list(req.prompt)
    state.engine.check(ids)
    return ids


class _Answer:
    """Collects one job's events: text, token ids (read for tool calls), token count, logprob
    entries, finish reason."""

    def __init__(self, tokenizer, want_logprobs: bool):
        self.tok, self.want = tokenizer, want_logprobs
        self.text, self.ids, self.n_out, self.finish = [], [], 0, None
        self.logprobs: Optional[list] = [] if want_logprobs else None

    def _entry(self, token_id: int):
        raw = self.tok.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), raw

    def add(self, event: Event) -> list:
        """Record an event; returns its logprob entries (empty without logprobs)."""
        self.n_out += event.token is not None
        self.text.append(event.text)
        self.ids.append(event.token)
        if event.finish_reason:
            self.finish = event.finish_reason
        if not self.want or event.logprob is None:
            return []
        text, raw = self._entry(event.token)
        alts = [(*self._entry(t), lp) for t, lp in (event.top_logprobs or [])]
        entry = [(text, raw, event.logprob, alts)]
        self.logprobs += entry
        return entry


def build_app(engine: Engine, model_name: str, api_key: Optional[str] = None, max_body: int = DEFAULT_MAX_BODY,
              default_max_tokens: int = DEFAULT_MAX_TOKENS) -> Starlette:
    """The ASGI app over a started Engine."""
    state = ServerState(engine, model_name, api_key, max_body, default_max_tokens)
    routes = [
        Route("/v1/chat/completions", partial(_completions, state, "chat"), methods=["POST"]),
        Route("/v1/completions", partial(_completions, state, "completion"), methods=["POST"]),
        Route("/v1/models", partial(_models, state), methods=["GET"]),
        Route("/health", partial(_health, state), methods=["GET"]),
        Route("/metrics", partial(_metrics, state), methods=["GET"]),
        Route("/", _page, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, Exception: _server_error},
                    middleware=[Middleware(StatusMiddleware, metrics=state.metrics)])
    app.state.server = state  # serve() answers in-flight requests through it on SIGTERM
    return app


# The completion routes: admit a request, hand it to the engine, answer whole or streamed.

async def _completions(state: ServerState, kind: str, request: Request) -> Response:
    """POST /v1/chat/completions (kind "chat") and /v1/completions ("completion")."""
    refused = _unauthorized(state, request)
    if refused is None and state.closing:
        refused = _shutting_down()
    if refused is None and not state.engine.alive:
        refused = APIError(503, f"the engine stopped: {state.engine.error}", None, "engine_stopped")
    if refused is not None:
        return _error(refused)
    try:
        req, adapter, ids, processors = await _admit(state, request, kind)
    except APIError as exc:
        return _error(exc)
    if state.closing:
        return _error(_shutting_down())
    job = state.engine.submit(ids, req.params, adapter, loop=asyncio.get_running_loop(), processors=processors)
    job.request_id = req.id
    state.jobs[id(job)] = job
    if req.stream:
        return StreamingResponse(_stream(state, req, job, len(ids)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _whole(state, req, job, len(ids), request)


async def _admit(state: ServerState, request: Request, kind: str) -> tuple:
    """(parsed request, adapter index, prompt ids, logits processors) of a completion request;
    every failure is an APIError (a user's mistake a 400, a bug a logged 500)."""
    try:
        body = await _read_json(request, state.max_body)
        # Off the event loop: a response_format schema is compiled here (up to a second).
        req = await run_in_threadpool(protocol.parse, kind, body, state.default_max_tokens)
        adapter = state.adapter_index(req.model)
        req.model = req.model or state.model_name
        ids = await run_in_threadpool(_prompt_ids, state, req)
        processors = await run_in_threadpool(_grammar, state, req)
    except APIError:
        raise
    except UserError as exc:
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_value"
        param = "response_format" if _grammar_refused(exc) else "messages" if kind == "chat" else "prompt"
        raise APIError(400, str(exc), param, code) from None
    except Exception as exc:  # a bug: one log line with its traceback, a 500, the server goes on
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        raise APIError(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", None,
                       "server_error") from None
    return req, adapter, ids, processors


async def _collect(job: Job, answer: _Answer) -> None:
    async for event in job:
        answer.add(event)
        if event.finish_reason:
            break


async def _whole(state: ServerState, req: ParsedRequest, job: Job, n_prompt: int, request: Request) -> Response:
    """The answer as one JSON object, once the job has finished."""
    engine = state.engine
    answer = _Answer(engine.tokenizer, req.params.logprobs)
    try:
        # A client that closes its connection frees its row at once, as a stream's does
        # (nothing else would notice before the answer is complete).
        if await _first_done(_collect(job, answer), _until_disconnect(request)) == 1:
            return Response(status_code=499)  # nobody reads it
    except APIError as exc:  # the server is shutting down
        return _error(exc)
    except UserError as exc:
        return _error(APIError(400, str(exc), None, "invalid_value"))
    except RuntimeError as exc:
        return _error(APIError(500, str(exc), None, "engine_error"))
    finally:
        state.jobs.pop(id(job), None)
        if job.finished is None:  # the client went away while we waited
            engine.cancel(job)
    failed = _grammar_failure(job)
    if failed is not None:
        return _error(failed)
    text = "".join(answer.text)
    if req.echo and isinstance(req.prompt, str):
        text = req.prompt + text
    _log_done(req, job, n_prompt, answer, state.metrics)
    if _parses_calls(req):
        read = tools.parse_answer(engine.tokenizer, req.tool_spec, answer.ids, answer.finish)
        return JSONResponse(protocol.full_response(req, read.content, read.finish_reason, n_prompt,
                                                   answer.n_out, answer.logprobs, read.tool_calls,
                                                   n_cached=job.cached))
    return JSONResponse(protocol.full_response(req, text, answer.finish, n_prompt, answer.n_out,
                                               answer.logprobs, n_cached=job.cached))


async def _stream(state: ServerState, req: ParsedRequest, job: Job, n_prompt: int):
    """The answer as server-sent events, one per decoded piece, ending with `data: [DONE]`."""
    answer = _Answer(state.engine.tokenizer, req.params.logprobs)
    offset = 0
    # With tools, the parser turns tokens into content and tool_calls deltas.
    parser = tools.StreamParser(state.engine.tokenizer, req.tool_spec) if _parses_calls(req) else None
    try:
        if req.kind == "chat":
            yield _sse(protocol.chunk(req, first=True))
        elif req.echo and isinstance(req.prompt, str):
            yield _sse(protocol.chunk(req, text=req.prompt))
            offset = len(req.prompt)
        pending: list = []  # logprob entries of tokens whose text is still held back
        async for event in job:
            pending += answer.add(event)
            if parser is not None:
                for d in parser.feed(event.token) + (parser.finish() if event.finish_reason else []):
                    yield _sse(protocol.chunk(req, text=d.get("content"), tool_calls=d.get("tool_calls")))
            elif event.text or (pending and event.finish_reason):
                yield _sse(protocol.chunk(req, text=event.text, logprobs=pending, text_offset=offset))
                offset += len(event.text)
                pending = []
            if event.finish_reason:
                failed = _grammar_failure(job)
                if failed is not None:  # never a "stop" on a value that does not parse
                    yield _sse(failed.body())
                    return
                called = parser is not None and parser.calls and event.finish_reason == "stop"
                yield _sse(protocol.chunk(req, finish="tool_calls" if called else event.finish_reason))
                if req.include_usage:
                    yield _sse(protocol.usage_chunk(req, n_prompt, answer.n_out, n_cached=job.cached))
                break
        yield "data: [DONE]\n\n"
        _log_done(req, job, n_prompt, answer, state.metrics)
    except APIError as exc:  # the server is shutting down
        yield _sse(exc.body())
    except (UserError, RuntimeError) as exc:
        yield _sse(APIError(500, str(exc), None, "engine_error").body())
    finally:
        state.jobs.pop(id(job), None)
        if job.finished is None:  # client disconnected mid-stream: free its row now
            state.engine.cancel(job)


# The information routes: what the server serves, whether it is alive, its metrics, the chat page.

async def _models(state: ServerState, request: Request) -> Response:
    refused = _unauthorized(state, request)
    if refused is not None:
        return _error(refused)
    data = [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "mlx-gemma"}]
    data += [{"id": name, "object": "model", "created": state.created, "owned_by": "mlx-gemma",
              "parent": state.model_name} for name in state.engine.adapters]
    return JSONResponse({"object": "list", "data": data})


async def _health(state: ServerState, request: Request) -> Response:
    engine = state.engine
    gen = engine.generator
    body = {"status": "ok" if engine.alive else "error", "model": state.model_name,
            "running": len(gen.active), "waiting": len(gen.waiting)}
    if not engine.alive:
        body["error"] = engine.error or "the engine thread is not running"
    return JSONResponse(body, status_code=200 if engine.alive else 503)


async def _metrics(state: ServerState, request: Request) -> Response:
    refused = _unauthorized(state, request)
    if refused is not None:
        return _error(refused)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def _page(request: Request) -> Response:
    html = resources.files("mlx_gemma.serve").joinpath("chat.html").read_text(encoding="utf-8")
    return HTMLResponse(html)


# The app's exception handlers: every failure outside the routes' own handling is a JSON error.

async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                           "not_found" if exc.status_code == 404 else "invalid_request"))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error"))


def _grammar_refused(exc: UserError) -> bool:
    """Whether a UserError came from building the row's grammar (GrammarMask)."""
    return str(exc).startswith(("json_schema ", "regex "))


def _grammar_failure(job: Job) -> Optional[APIError]:
    """The 400 of a row whose grammar failed while generating (its text does not parse), or None."""
    error = grammar_error(job.processors)
    if error is None:
        return None
    return APIError(400, f"the response_format grammar failed while generating ({error}); simplify the schema",
                    "response_format", "unsupported_schema")


def _parses_calls(req: ParsedRequest) -> bool:
    """True when the answer is read for tool calls (tools given and tool_choice is not "none")."""
    return req.tool_spec is not None and req.tool_spec.choice != "none"


def _log_done(req: ParsedRequest, job: Job, n_prompt: int, answer: _Answer, metrics: ServerMetrics) -> None:
    end = job.finished or time.perf_counter()
    metrics.finished(n_prompt, job.cached, answer.n_out, job.submitted, job.first_token, end)
    ttft = (job.first_token or end) - job.submitted
    rate = (answer.n_out - 1) / (end - job.first_token) if job.first_token and answer.n_out > 1 and end > job.first_token else 0.0
    log.info("%s model=%s prompt=%d out=%d ttft=%.3fs %.1f tok/s finish=%s", req.id, req.model, n_prompt,
             answer.n_out, ttft, rate, answer.finish)
