"""The OpenAI API's request and response shapes, without HTTP: parse a JSON body into what the
engine needs, and build the JSON objects (whole responses and stream chunks) the clients read.

A bad request raises `APIError(status, message, param, code)`; the app turns it into
`{"error": {"message", "type", "param", "code"}}` with that HTTP status:
400 a value the API does not accept, 404 an unknown model, 413 a body too large,
422 a field of the wrong JSON type or a required field missing.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from ..constrain import Constraint, json_object_constraint, json_schema_constraint
from ..errors import UserError
from ..sampling import SamplingParams

MAX_STOP_STRINGS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                500: "server_error", 503: "server_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    model: str  # the name the client asked for (the base or an adapter)
    prompt: Any  # chat messages (list of dicts) or the prompt text / token ids
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    response_format: Optional[dict] = None
    constraint: Optional[Constraint] = None  # the grammar response_format asks for
    tools: Optional[list] = None  # OpenAI tools; the app checks them against the tokenizer (tools.ToolSpec)
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    tool_spec: Any = None  # set by the app: tools.ToolSpec for this model
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def __post_init__(self):
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"


# ---- field readers: one line each, each failure names its field -----------------------------


def _typed(body: dict, name: str, kinds, default=None, what: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(422, f"'{name}' must be {what}, got {value!r}", name, "invalid_type")
    if not isinstance(value, kinds):
        raise APIError(422, f"'{name}' must be {what}, got {type(value).__name__} {value!r:.40}", name,
                       "invalid_type")
    return value


def _number(body, name, default):
    value = _typed(body, name, (int, float), default, "a number")
    if value is not None and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {value}", name, "invalid_value")
    return value


def _integer(body, name, default):
    return _typed(body, name, int, default, "an integer")


def _stop(body) -> tuple:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", "stop",
                           "invalid_value")
        return tuple(stop)
    raise APIError(422, "'stop' must be a string or a list of strings", "stop", "invalid_type")


def _messages(body) -> list:
    messages = body.get("messages")
    if messages is None:
        raise APIError(422, "'messages' is required", "messages", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise APIError(422, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_type")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def _message(m, where: str) -> dict:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(422, f"'{where}' must be an object with a 'role' string", where, "invalid_type")
    role, content = m["role"], m.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(400, f"'{where}.role' {role!r} is not supported; use system, user, assistant or tool",
                       f"{where}.role", "invalid_value")
    out = {"role": "system" if role == "developer" else role, "content": content}
    calls = m.get("tool_calls")
    if role == "assistant" and calls is not None:
        if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                                  for c in calls):
            raise APIError(422, f"'{where}.tool_calls' must be a list of {{id, type, function: {{name, arguments}}}}",
                           f"{where}.tool_calls", "invalid_type")
        out["tool_calls"] = calls
        if content is None:
            return out
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str):
            raise APIError(422, f"'{where}.tool_call_id' must be the id of the call this result answers",
                           f"{where}.tool_call_id", "invalid_type")
        out["tool_call_id"] = call_id
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise APIError(400, f"'{where}.content[{j}]' of type {kind!r} is not supported; this model "
                                    "reads text parts only", f"{where}.content", "invalid_value")
    elif not isinstance(content, str):
        raise APIError(422, f"'{where}.content' must be a string or a list of text parts", f"{where}.content",
                       "invalid_type")
    return out


def _tools(body, kind: str, constraint) -> dict:
    """tools / tool_choice / parallel_tool_calls, checked for shape (the app checks them against
    the model's tokenizer: mlx_gemma.tools.ToolSpec)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = _typed(body, "parallel_tool_calls", bool, True, "true or false")
    if tools is None:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice", "invalid_value")
        return {}
    if kind != "chat":
        raise APIError(400, "'tools' is a chat completions field", "tools", "invalid_value")
    if not isinstance(tools, list):
        raise APIError(422, "'tools' must be a list of {type: function, function: {...}} objects", "tools",
                       "invalid_type")
    if constraint is not None and choice != "none":
        raise APIError(400, "'response_format' and 'tools' cannot both shape one answer; use tool_choice: none "
                            "or drop one", "response_format", "invalid_value")
    return {"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel}


def _prompt(body):
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(422, "'prompt' is required", "prompt", "missing_field")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise APIError(422, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt",
                   "invalid_type")


def _constraint(response_format: Optional[dict]) -> Optional[Constraint]:
    """OpenAI's response_format -> a grammar: "text" (none), "json_object" (any JSON object), or
    "json_schema" with {"name", "schema", "strict"}; a schema feature the grammar engine lacks
    is a 400 that names it."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_constraint()
    if kind != "json_schema":
        raise APIError(400, f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
                       "response_format.type", "invalid_value")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise APIError(422, "'response_format.json_schema' must be an object with 'name' and 'schema'",
                       "response_format.json_schema", "invalid_type")
    name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
    if name is not None and not isinstance(name, str):
        raise APIError(422, "'response_format.json_schema.name' must be a string", "response_format.json_schema.name",
                       "invalid_type")
    if strict is not None and not isinstance(strict, bool):
        raise APIError(422, "'response_format.json_schema.strict' must be true or false",
                       "response_format.json_schema.strict", "invalid_type")
    if not isinstance(schema, dict):
        raise APIError(422, "'response_format.json_schema.schema' must be a JSON Schema object",
                       "response_format.json_schema.schema", "invalid_type")
    try:
        return json_schema_constraint(schema)
    except UserError as exc:
        message = str(exc).replace("json_schema", "response_format.json_schema.schema", 1)
        raise APIError(400, message, "response_format.json_schema.schema", "unsupported_schema") from None


def parse(kind: str, body: Any, default_max_tokens: int) -> ParsedRequest:
    """A chat ("chat") or completion ("completion") request body -> ParsedRequest."""
    if not isinstance(body, dict):
        raise APIError(422, "the request body must be a JSON object", None, "invalid_type")
    n = _integer(body, "n", 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one choice per request), got {n}", "n", "invalid_value")
    if kind == "chat":
        prompt = _messages(body)
        max_tokens = _integer(body, "max_completion_tokens", None)
        max_tokens = _integer(body, "max_tokens", max_tokens)
        want_logprobs = _typed(body, "logprobs", bool, False, "true or false")
        top = _integer(body, "top_logprobs", 0) if want_logprobs else 0
        if not want_logprobs and body.get("top_logprobs") is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    else:
        prompt = _prompt(body)
        max_tokens = _integer(body, "max_tokens", None)
        top = _integer(body, "logprobs", None)
        want_logprobs = top is not None
        top = top or 0
    stream_options = _typed(body, "stream_options", dict, {}, "an object")
    try:
        params = SamplingParams.of(
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temp=_number(body, "temperature", 1.0),  # the OpenAI default: sampling
            top_p=_number(body, "top_p", 1.0), top_k=_integer(body, "top_k", 0) or 0,
            min_p=_number(body, "min_p", 0.0),
            repetition_penalty=_number(body, "repetition_penalty", 1.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0),
            presence_penalty=_number(body, "presence_penalty", 0.0),
            seed=_integer(body, "seed", None), stop=_stop(body),
            logprobs=want_logprobs, top_logprobs=top)
    except UserError as exc:
        field_name = str(exc).split(" ", 1)[0]
        api_names = {"temp": "temperature", "top_logprobs": "top_logprobs" if kind == "chat" else "logprobs"}
        raise APIError(400, str(exc).replace(field_name, api_names.get(field_name, field_name), 1),
                       api_names.get(field_name, field_name), "invalid_value") from None
    response_format = _typed(body, "response_format", dict, None, "an object")
    constraint = _constraint(response_format)
    return ParsedRequest(kind=kind, model=_typed(body, "model", str, "", "a string"), prompt=prompt, params=params,
                         stream=_typed(body, "stream", bool, False, "true or false"),
                         include_usage=bool(_typed(stream_options, "include_usage", bool, False, "true or false")),
                         echo=bool(_typed(body, "echo", bool, False, "true or false")) if kind == "completion" else False,
                         response_format=response_format, constraint=constraint, **_tools(body, kind, constraint))


# ---- responses -----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: the prompt tokens the prefix cache supplied."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _head(req: ParsedRequest, obj: str) -> dict:
    return {"id": req.id, "object": obj, "created": req.created, "model": req.model}


def chat_logprob_entries(items: list) -> dict:
    """[(token text, token bytes, logprob, [(text, bytes, logprob)])] -> the chat `logprobs` object."""
    return {"content": [{"token": text, "logprob": lp, "bytes": list(raw),
                         "top_logprobs": [{"token": t, "logprob": l, "bytes": list(b)} for t, b, l in alts]}
                        for text, raw, lp, alts in items]}


def completion_logprobs(items: list, offset0: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    at = offset0
    for text, _, lp, alts in items:
        tokens.append(text)
        lps.append(lp)
        tops.append({t: l for t, _, l in alts})
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def full_response(req: ParsedRequest, text: Optional[str], finish: str, n_prompt: int, n_out: int,
                  logprobs: Optional[list], tool_calls: Optional[list] = None, n_cached: int = 0) -> dict:
    if req.kind == "chat":
        message = {"role": "assistant", "content": text, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        choice = {"index": 0, "message": message,
                  "logprobs": chat_logprob_entries(logprobs) if logprobs is not None else None,
                  "finish_reason": finish}
        out = _head(req, "chat.completion")
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish,
                  "logprobs": completion_logprobs(logprobs, 0) if logprobs is not None else None}
        out = _head(req, "text_completion")
    out["choices"] = [choice]
    out["usage"] = usage(n_prompt, n_out, n_cached)
    return out


def chunk(req: ParsedRequest, text: Optional[str] = None, finish: Optional[str] = None, first: bool = False,
          logprobs: Optional[list] = None, text_offset: int = 0, tool_calls: Optional[list] = None) -> dict:
    """One stream chunk. Chat: the first carries delta.role, later ones delta.content or
    delta.tool_calls (OpenAI's items: index, id and name first, then argument fragments), the last
    an empty delta with finish_reason. Completions: the text and, on the last, finish_reason."""
    if req.kind == "chat":
        delta: dict = {}
        if first:
            delta = {"role": "assistant", "content": ""}
        elif tool_calls is not None:
            delta = {"tool_calls": tool_calls}
        elif text is not None:
            delta = {"content": text}
        lp = chat_logprob_entries(logprobs) if logprobs else None
        choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        out = _head(req, "chat.completion.chunk")
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish,
                  "logprobs": completion_logprobs(logprobs, text_offset) if logprobs else None}
        out = _head(req, "text_completion")
    out["choices"] = [choice]
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: ParsedRequest, n_prompt: int, n_out: int, n_cached: int = 0) -> dict:
    out = _head(req, "chat.completion.chunk" if req.kind == "chat" else "text_completion")
    out["choices"] = []
    out["usage"] = usage(n_prompt, n_out, n_cached)
    return out
