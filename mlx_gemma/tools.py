"""Tool calling: OpenAI `tools` in the prompt, calls constrained to their schemas, calls parsed back.

    spec = ToolSpec.of(tokenizer, tools, tool_choice="auto", parallel_tool_calls=True)
    ids = render_prompt(tokenizer, messages, spec)            # declarations, calls and results
    processor = call_mask(tokenizer, spec)                    # a GrammarMask (llguidance)
    answer = parse_answer(tokenizer, spec, generated_ids)     # content + OpenAI tool_calls

Two formats, chosen by the vocabulary:

- **Gemma 4, native** (the tokenizer has `<|tool_call>`): declarations `<|tool>declaration:…<tool|>`
  in the system turn, calls `<|tool_call>call:name{key:<|"|>text<|"|>,n:3}<tool_call|>`, and the
  model stops on `<|tool_response>`; results come back inside the same model turn as
  `<|tool_response>response:name{value:…}<tool_response|>`. A model dir's own template renders
  the prompt when it has one (Google's does all of this); ours otherwise.
- **Gemma 1/2/3, a prompt format** (they have no tool tokens): the declarations go in the system
  text (`JsonFormat.declarations`), a call is a fenced block holding one JSON object,

      ```tool_call
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      ```

  several calls are several blocks, and results come back as the next user turn in
  ```` ```tool_response ```` blocks. This follows the shape of Google's function-calling guide for
  Gemma (a function list and a fixed call syntax in the prompt, calls parsed from the answer).

Arguments always validate against the function's `parameters`: the answer is generated under an
llguidance grammar. With tool_choice "required" or a named function the whole answer is calls;
with "auto" it is free text, or free text then calls (the grammar takes over at the call's opener);
with "none" nothing is constrained and no call is parsed. For the JSON format the arguments are
the schema itself (llguidance's JSON Schema support); Gemma 4's syntax is not JSON, so its grammar
is built here from the schema (`_NativeGrammar`: type, properties, required, items, enum, const,
anyOf/oneOf, minLength/maxLength; a keyword that would constrain further, such as pattern or
minimum, is refused with a UserError rather than left unenforced).

`StreamParser` turns generated ids into OpenAI deltas: content, then per call the index, id and
function name first, then argument fragments (JSON text; Gemma 4's syntax is transcoded as it
streams). `parse_answer` is the same parser run over the whole answer, so the two agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from .constrain import GrammarMask, lark_constraint
from .errors import UserError
from .tokenizer import StreamingDetokenizer

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(tools: Any) -> list:
    """OpenAI `tools` ([{"type": "function", "function": {name, description, parameters}}]) ->
    [Function]. UserError names the first bad entry."""
    if not isinstance(tools, list) or not tools:
        raise UserError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise UserError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"tools[{i}].function.name must be letters, digits, _ . - (at most 64), got {name!r}")
        if name in seen:
            raise UserError(f"tools[{i}].function.name {name!r} is declared twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise UserError(f"tools[{i}].function.parameters must be a JSON Schema of type object")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise UserError(f"tools[{i}].function.description must be a string")
        out.append(Function(name, description, {"type": "object", "properties": {}, **params}))
    return out


@dataclass(frozen=True)
class ToolSpec:
    """What a request asks of tools: the functions, the choice, parallel calls, and the format."""

    functions: tuple
    choice: str  # "auto", "none", "required", or a function's name
    parallel: bool
    format: Any  # Gemma4Format or JsonFormat

    @classmethod
    def of(cls, tokenizer, tools, tool_choice: Any = "auto", parallel_tool_calls: bool = True) -> "ToolSpec":
        """Check OpenAI's `tools` / `tool_choice` / `parallel_tool_calls` (UserError naming the value)."""
        functions = parse_tools(tools)
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            choice = fn.get("name") if isinstance(fn, dict) else None
            if not isinstance(choice, str) or choice not in {f.name for f in functions}:
                raise UserError(f"tool_choice names function {choice!r}, which is not in tools "
                                f"({', '.join(f.name for f in functions)})")
        elif choice not in _CHOICES:
            raise UserError(f"tool_choice must be 'auto', 'none', 'required' or "
                            f"{{'type': 'function', 'function': {{'name': ...}}}}, got {tool_choice!r}")
        if not isinstance(parallel_tool_calls, bool):
            raise UserError(f"parallel_tool_calls must be true or false, got {parallel_tool_calls!r}")
        spec = cls(tuple(functions), choice, parallel_tool_calls, _format_of(tokenizer))
        grammar = spec.grammar()  # a schema the grammar cannot express fails here, before any model work
        if grammar is not None:
            lark_constraint(grammar, "the tools' parameter schemas")
        return spec

    @property
    def callable(self) -> tuple:
        """The functions the model may call under this choice."""
        if self.choice in _CHOICES:
            return () if self.choice == "none" else self.functions
        return tuple(f for f in self.functions if f.name == self.choice)

    def grammar(self) -> Optional[str]:
        """The llguidance grammar of the whole answer (None: unconstrained, for "none")."""
        if self.choice == "none":
            return None
        return self.format.grammar(self.callable, self.parallel, forced=self.choice != "auto")


# ---- the two formats --------------------------------------------------------------------------


def _arguments(call: dict, where: str) -> dict:
    """A history call's arguments as a dict (OpenAI sends them as JSON text); UserError when the
    call is not {"function": {"name": str, "arguments": JSON object or its text}}."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise UserError(f"{where} must be {{'id': ..., 'type': 'function', 'function': {{'name', 'arguments'}}}}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError as exc:
            raise UserError(f"{where}.function.arguments is not valid JSON ({exc})") from None
    if not isinstance(args, dict):
        raise UserError(f"{where}.function.arguments must be a JSON object")
    return args


def _result_text(message: dict) -> str:
    content = message.get("content")
    return _text(content) if isinstance(content, (str, list)) else json.dumps(content, ensure_ascii=False)


def _result_names(calls: list, results: list) -> list:
    """The function name of each tool result: by tool_call_id, else by position."""
    by_id = {c.get("id"): c.get("function", {}).get("name") for c in calls if isinstance(c, dict)}
    names = []
    for i, r in enumerate(results):
        name = by_id.get(r.get("tool_call_id")) or r.get("name")
        if name is None and i < len(calls):
            name = calls[i].get("function", {}).get("name")
        names.append(name or "unknown")
    return names


class JsonFormat:
    """Gemma 1/2/3: a JSON call in a ```tool_call fenced block (see the module doc)."""

    opener, closer, separator = "```tool_call\n", "\n```", "\n"
    call_end = ""
    results_in_model_turn = False
    _JSON = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}

    def declarations(self, tools: list) -> str:
        listing = json.dumps([f.openai()["function"] for f in parse_tools(tools)], ensure_ascii=False, indent=1)
        return ("You can call the functions below. To call one, answer with only a fenced block:\n"
                '```tool_call\n{"name": "<function name>", "arguments": {<the arguments as JSON>}}\n```\n'
                "Write one block per call. The results come back in ```tool_response blocks.\n"
                f"Functions:\n{listing}")

    def calls(self, tool_calls: list) -> str:
        blocks = []
        for i, c in enumerate(tool_calls):
            args = _arguments(c, f"tool_calls[{i}]")
            blocks.append(json.dumps({"name": c["function"]["name"], "arguments": args}, ensure_ascii=False))
        return self.separator.join(f"{self.opener}{b}{self.closer}" for b in blocks)

    def results(self, calls: list, results: list) -> str:
        return "\n".join(f"```tool_response\n{json.dumps({'name': n, 'content': _result_text(r)}, ensure_ascii=False)}\n```"
                         for n, r in zip(_result_names(calls, results), results))

    def grammar(self, functions: tuple, parallel: bool, forced: bool) -> str:
        bodies = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": _closed(f.parameters)},
                   "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
        schema = dict(bodies[0]) if len(bodies) == 1 else {"anyOf": bodies}
        schema["x-guidance"] = self._JSON
        more = ' ("\\n" call)*' if parallel else ""
        lines = [f"body: %json {json.dumps(schema, ensure_ascii=False)}",
                 'call: "```tool_call\\n" body "\\n```"']
        if forced:
            lines.insert(0, f"start: call{more}")
        else:  # free text, or free text up to the opener and then calls
            lines[:0] = [f'start: plain | free body "\\n```"{more}', "plain: /(?s:.*)/",
                         "free[lazy]: /(?s:.*)```tool_call\\n/"]
        return "\n".join(lines) + "\n"

    def split_call(self, body: str) -> tuple:
        """(name or None, arguments JSON text so far) of a call body being generated."""
        m = re.match(r'\{"name": "((?:[^"\\]|\\.)*)"(, "arguments": )?', body)
        if m is None or m.group(2) is None:
            return None, ""
        return json.loads(f'"{m.group(1)}"'), body[m.end():]

    def arguments(self, text: str, final: bool) -> str:
        # One character behind: the body's last "}" closes the call object, not the arguments.
        return text[:-1]


def _closed(schema):
    """The schema with `additionalProperties: false` on every object that does not say otherwise:
    a call holds the declared arguments only (as Gemma 4's grammar and OpenAI's strict mode do);
    an open object would let a model write keys of its own until max_tokens."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k in ("items", "anyOf", "oneOf", "allOf") else v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


class Gemma4Format:
    """Gemma 4's native tool tokens (see the module doc). Ids come from the tokenizer."""

    opener, closer, separator = "<|tool_call>", "<tool_call|>", ""
    call_end = "<|tool_response>"
    results_in_model_turn = True
    Q = '<|"|>'

    def __init__(self, tokenizer):
        ids = {p: tokenizer.piece_to_id(p) for p in (self.opener, self.closer, self.Q, self.call_end)}
        missing = [p for p, i in ids.items() if i is None]
        if missing:
            raise UserError(f"this Gemma 4 tokenizer lacks the tool tokens {', '.join(missing)}")
        self.ids = ids

    def declarations(self, tools: list) -> str:
        return "".join(f"<|tool>{_declaration(f)}<tool|>" for f in parse_tools(tools))

    def calls(self, tool_calls: list) -> str:
        out = []
        for i, c in enumerate(tool_calls):
            args = _arguments(c, f"tool_calls[{i}]")
            out.append(f"<|tool_call>call:{c['function']['name']}{_native(args)}<tool_call|>")
        return "".join(out)

    def results(self, calls: list, results: list) -> str:
        return "".join(f"<|tool_response>response:{n}{{value:{_native(_result_text(r))}}}<tool_response|>"
                       for n, r in zip(_result_names(calls, results), results))

    def grammar(self, functions: tuple, parallel: bool, forced: bool) -> str:
        return _NativeGrammar(self.ids).build(functions, parallel, forced)

    def split_call(self, body: str) -> tuple:
        m = re.match(r"call:([^{]*)\{", body)
        return (m.group(1), body[m.end() - 1:]) if m else (None, "")

    def arguments(self, text: str, final: bool) -> str:
        return native_to_json(text, final)


# ---- Gemma 4's syntax: write, read, constrain ---------------------------------------------------


def _native(value, keys_quoted: bool = False) -> str:
    """A value in Gemma 4's argument syntax, as Google's template writes it (keys sorted)."""
    if isinstance(value, str):
        return f'<|"|>{value}<|"|>'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        key = (lambda k: f'<|"|>{k}<|"|>') if keys_quoted else str
        return "{" + ",".join(f"{key(k)}:{_native(v, keys_quoted)}"
                              for k, v in sorted(value.items(), key=lambda kv: str(kv[0]).lower())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_native(v, keys_quoted) for v in value) + "]"
    return "null" if value is None else json.dumps(value)


def _declaration(f: Function) -> str:
    """`declaration:name{description:…,parameters:{properties:{…},required:[…],type:<|"|>OBJECT<|"|>}}`."""
    q = '<|"|>'
    params = f.parameters
    parts = [f"description:{q}{f.description}{q}"]
    inner = []
    if params.get("properties"):
        inner.append("properties:{" + _declared_properties(params["properties"]) + "}")
    if params.get("required"):
        inner.append("required:[" + ",".join(f"{q}{r}{q}" for r in params["required"]) + "]")
    inner.append(f"type:{q}OBJECT{q}")
    parts.append("parameters:{" + ",".join(inner) + "}")
    return f"declaration:{f.name}{{" + ",".join(parts) + "}"


def _declared_properties(properties: dict) -> str:
    q = '<|"|>'
    out = []
    for key, value in sorted(properties.items(), key=lambda kv: kv[0].lower()):
        fields = []
        if value.get("description"):
            fields.append(f"description:{q}{value['description']}{q}")
        kind = str(value.get("type", "")).upper()
        if kind == "STRING" and value.get("enum"):
            fields.append(f"enum:{_native(value['enum'])}")
        if kind == "ARRAY" and isinstance(value.get("items"), dict) and value["items"]:
            items = value["items"]
            item_fields = []
            for k, v in sorted(items.items(), key=lambda kv: kv[0].lower()):
                if k == "properties" and isinstance(v, dict):
                    item_fields.append("properties:{" + _declared_properties(v) + "}")
                elif k == "required":
                    item_fields.append("required:[" + ",".join(f"{q}{r}{q}" for r in v) + "]")
                elif k == "type":
                    item_fields.append(f"type:{_native(v.upper() if isinstance(v, str) else [t.upper() for t in v])}")
                elif v is not None:
                    item_fields.append(f"{k}:{_native(v, keys_quoted=True)}")
            fields.append("items:{" + ",".join(item_fields) + "}")
        if kind == "OBJECT" and isinstance(value.get("properties"), dict):
            fields.append("properties:{" + _declared_properties(value["properties"]) + "}")
            if value.get("required"):
                fields.append("required:[" + ",".join(f"{q}{r}{q}" for r in value["required"]) + "]")
        fields.append(f"type:{q}{kind}{q}")
        out.append(f"{key}:{{" + ",".join(fields) + "}")
    return ",".join(out)


_LITERALS = {"true": "true", "false": "false", "null": "null", "None": "null", "True": "true", "False": "false"}
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$")


def native_to_json(text: str, final: bool = True) -> str:
    """Gemma 4's argument syntax (`{key:<|"|>text<|"|>,n:[1,2]}`) as JSON text.

    Prefix-stable: for a prefix of a call's text (final=False) it returns a prefix of the JSON of
    the whole, holding back a key or literal that may still grow, so streamed fragments concatenate
    to the final arguments. Strings may hold anything (quotes, braces, any Unicode): they end only
    at the `<|"|>` token."""
    q, out, stack, expect_key, i = '<|"|>', [], [], False, 0
    while i < len(text):
        c = text[i]
        if text.startswith(q, i):
            end = text.find(q, i + len(q))
            if end < 0:
                if not expect_key:  # an open string value streams as it grows
                    out.append('"' + json.dumps(text[i + len(q):], ensure_ascii=False)[1:-1])
                break
            out.append(json.dumps(text[i + len(q):end], ensure_ascii=False))
            i = end + len(q)
        elif c in "{[":
            out.append(c)
            stack.append(c)
            expect_key, i = c == "{", i + 1
        elif c in "}]":
            out.append(c)
            if stack:
                stack.pop()
            expect_key, i = False, i + 1
        elif c in ",:":
            out.append(c)
            expect_key, i = c == "," and bool(stack) and stack[-1] == "{", i + 1
        elif c.isspace():
            i += 1
        else:
            m = re.match(r"[^,:{}\[\]]+", text[i:])
            word, i = m.group().strip(), i + m.end()
            if i >= len(text) and not final:
                break  # may still grow
            if expect_key:
                out.append(json.dumps(word, ensure_ascii=False))
            else:
                out.append(_LITERALS.get(word) or (word if _NUMBER.match(word) else json.dumps(word, ensure_ascii=False)))
    return "".join(out)


_REFUSED = ("pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "allOf", "not",
            "if", "then", "else", "$ref", "patternProperties", "prefixItems", "contains", "dependentRequired")


class _NativeGrammar:
    """A Lark grammar (llguidance) for Gemma 4 calls whose arguments follow their JSON Schemas."""

    def __init__(self, ids: dict):
        self.q = f"<[{ids[Gemma4Format.Q]}]>"
        self.open, self.close = f"<[{ids[Gemma4Format.opener]}]>", f"<[{ids[Gemma4Format.closer]}]>"
        self.rules: dict = {}

    def build(self, functions: tuple, parallel: bool, forced: bool) -> str:
        alts = " | ".join(f'"{f.name}" {self.value(f.parameters, f"fn{i}")}' for i, f in enumerate(functions))
        head = ["start: calls"] if forced else ["start: TEXT calls?", "TEXT: /(?s:.*)/"]
        lines = head + ["calls: call+" if parallel else "calls: call",
                        f'call: {self.open} "call:" fn {self.close}', f"fn: {alts}",
                        # Up to 17 significant digits: what a double (JSON's number) holds.
                        "STR: /(?s:.*)/", "INT: /-?(0|[1-9][0-9]{0,16})/",
                        "NUM: /-?(0|[1-9][0-9]{0,16})(\\.[0-9]{1,17})?([eE][+-]?[0-9]{1,3})?/"]
        lines += [f"{name}: {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"

    def value(self, schema: Any, name: str) -> str:
        """The rule name for values of `schema` (rules are added as needed)."""
        if schema is True or schema == {} or schema is None:
            return self._any()
        if not isinstance(schema, dict):
            raise UserError(f"a tool parameter schema must be an object, got {schema!r:.60}")
        refused = [k for k in _REFUSED if k in schema]
        if refused:
            raise UserError(f"tool parameters use {refused[0]!r}, which Gemma 4's call grammar does not "
                            "enforce; drop it from the schema (type, properties, required, items, enum, "
                            "const, anyOf, minLength and maxLength are enforced)")
        if "const" in schema or "enum" in schema:
            options = [schema["const"]] if "const" in schema else schema["enum"]
            return self._rule(name, " | ".join(self._literal(v) for v in options))
        if "anyOf" in schema or "oneOf" in schema:
            subs = schema.get("anyOf") or schema.get("oneOf")
            return self._rule(name, " | ".join(self.value(s, f"{name}_{k}") for k, s in enumerate(subs)))
        kinds = schema.get("type")
        if isinstance(kinds, list):
            return self._rule(name, " | ".join(self.value({**schema, "type": t}, f"{name}_{t}") for t in kinds))
        if kinds == "string" and ("minLength" in schema or "maxLength" in schema):
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            length = f"{{{low},{'' if high is None else int(high)}}}"
            return self._rule(name, f"{self.q} /(?s:.{length})/ {self.q}")
        body = {"string": f"{self.q} STR {self.q}", "integer": "INT", "number": "NUM",
                "boolean": '"true" | "false"', "null": '"null"'}.get(kinds)
        if body is not None:
            return self._rule(name, body)
        if kinds == "array":
            item = self.value(schema.get("items"), f"{name}_item")
            return self._rule(name, f'"[" ({item} ("," {item})*)? "]"')
        if kinds == "object" or "properties" in schema:
            return self._object(schema, name)
        return self._any()

    def _object(self, schema: dict, name: str) -> str:
        """Properties in sorted order (as Google's template writes them), each required one present,
        commas only between the ones written."""
        props = sorted((schema.get("properties") or {}).items(), key=lambda kv: kv[0].lower())
        required = set(schema.get("required") or ())
        if not props:
            return self._rule(name, '"{" "}"')
        items = [f'{json.dumps(k + ":", ensure_ascii=False)} {self.value(v, f"{name}_{k}")}' for k, v in props]
        # first_i: properties i.. when none is written yet; rest_i: the same after one was written.
        first = rest = None
        for i in reversed(range(len(props))):
            optional = props[i][0] not in required
            tail = f" {rest}" if rest else ""
            first_alts = [f"{items[i]}{tail}"] + ([first] if optional and first else [])
            rest = self._rule(f"{name}_r{i}", f'("," {items[i]})?{tail}' if optional else f'"," {items[i]}{tail}')
            first = self._rule(f"{name}_f{i}", " | ".join(first_alts))
        return self._rule(name, f'"{{" {first}{"" if required else "?"} "}}"')

    def _literal(self, value) -> str:
        text = _native(value)
        parts = text.split(Gemma4Format.Q)
        pieces = []
        for k, part in enumerate(parts):
            if k:
                pieces.append(self.q)
            if part:
                pieces.append(json.dumps(part, ensure_ascii=False))
        return " ".join(pieces) if pieces else '""'

    def _any(self) -> str:
        if "any" not in self.rules:
            self.rules["any"] = (f'{self.q} STR {self.q} | NUM | "true" | "false" | "null" | "[" (any ("," any)*)? "]" '
                                 f'| "{{" (KEY ":" any ("," KEY ":" any)*)? "}}"')
            self.rules["KEY"] = "/[A-Za-z_][A-Za-z0-9_]*/"
        return "any"

    def _rule(self, name: str, body: str) -> str:
        name = re.sub(r"[^a-z0-9_]", "_", name.lower())
        self.rules[name] = body
        return name


# ---- the prompt ---------------------------------------------------------------------------------


def _plain_messages(messages: list, spec: Optional[ToolSpec]) -> list:
    """Messages for the JSON format as plain chat: declarations in the system text, calls in the
    assistant text, results as a user turn."""
    fmt = JsonFormat()
    out: list = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):  # the tokenizer words the error
            out.append(m)
            continue
        prev = out[-1] if out and isinstance(out[-1], dict) else {}
        if m.get("role") == "tool":
            calls = next((p["_calls"] for p in reversed(out) if isinstance(p, dict) and p.get("_calls")), [])
            if not (prev.get("_calls") or prev.get("_results")):
                raise UserError(f"message {k} is a tool result with no assistant tool_calls before it")
            text = fmt.results(calls, [m])
            if prev.get("_results"):
                prev["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "_results": True})
            continue
        m = dict(m)
        if m.get("tool_calls"):
            text = _text(m.get("content"))
            m["content"] = (text.strip() + "\n" if text.strip() else "") + fmt.calls(m["tool_calls"])
            m["_calls"] = m.pop("tool_calls")
        out.append(m)
    if spec is not None and spec.choice != "none":
        declared = fmt.declarations([f.openai() for f in spec.functions])
        if out and isinstance(out[0], dict) and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": f"{_text(out[0].get('content'))}\n\n{declared}"}
        else:
            out.insert(0, {"role": "system", "content": declared})
    return [{k: v for k, v in m.items() if not k.startswith("_")} if isinstance(m, dict) else m for m in out]


def _text(content) -> str:
    """A message's text: a string, or the text of a list of {"type": "text"} parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _native_messages(messages: list) -> list:
    """History calls with their arguments as objects (Google's template writes them key by key)."""
    out = []
    for k, m in enumerate(messages):
        if isinstance(m, dict) and m.get("tool_calls"):
            calls = []
            for i, c in enumerate(m["tool_calls"]):
                args = _arguments(c, f"messages[{k}].tool_calls[{i}]")
                calls.append({**c, "function": {"name": c["function"]["name"], "arguments": args}})
            m = dict(m, tool_calls=calls)
        out.append(m)
    return out


def render_prompt(tokenizer, messages: list, spec: Optional[ToolSpec], add_generation_prompt: bool = True,
                  tokenize: bool = True):
    """The prompt (ids, or text) for a conversation that may hold tool calls and results, with the
    tools of `spec` declared (none for tool_choice "none" in the JSON format; Gemma 4 still sees
    them, as its template declares whatever it is given)."""
    fmt = spec.format if spec is not None else _format_of(tokenizer)
    if isinstance(fmt, JsonFormat):
        return tokenizer.apply_chat_template(_plain_messages(messages, spec), add_generation_prompt, tokenize)
    tools = [f.openai() for f in spec.functions] if spec is not None else None
    return tokenizer.apply_chat_template(_native_messages(messages), add_generation_prompt, tokenize,
                                         tools=tools, tool_format=fmt)


def encode_conversation(tokenizer, messages: list, tools: Optional[list] = None) -> tuple:
    """(ids, loss_mask) of a training conversation that may declare tools and hold calls and
    results: every assistant turn (its calls, its text, its end marker) carries loss."""
    spec = ToolSpec.of(tokenizer, tools) if tools else None
    has_calls = isinstance(messages, list) and any(
        isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)
    if spec is None and not has_calls:
        return tokenizer.encode_chat(messages)
    fmt = spec.format if spec is not None else _format_of(tokenizer)
    if isinstance(fmt, JsonFormat):
        return tokenizer.encode_chat(_plain_messages(messages, spec))
    declared = [f.openai() for f in spec.functions] if spec is not None else None
    return tokenizer.encode_chat(_native_messages(messages), tools=declared, tool_format=fmt)


def _format_of(tokenizer):
    """Gemma 4's native format when the vocabulary has its tool tokens, else the JSON prompt format."""
    return Gemma4Format(tokenizer) if tokenizer.piece_to_id("<|tool_call>") is not None else JsonFormat()


def call_mask(tokenizer, spec: Optional[ToolSpec]) -> Optional[GrammarMask]:
    """A fresh grammar mask for one answer under `spec` (None when nothing is constrained)."""
    grammar = spec.grammar() if spec is not None else None
    return GrammarMask(lark_constraint(grammar, "the tools' parameter schemas"), tokenizer) if grammar else None


# ---- reading the answer -------------------------------------------------------------------------


@dataclass
class ToolAnswer:
    """An answer read for tool calls: the text outside calls, and the calls as OpenAI objects."""

    content: Optional[str]
    tool_calls: list = field(default_factory=list)
    finish_reason: Optional[str] = None


class StreamParser:
    """Generated ids -> OpenAI chat deltas (dicts): {"content": …} and {"tool_calls": [item]},
    where a call's first item has index, id, type and the function name (arguments ""), and later
    items carry only its index and an arguments fragment."""

    def __init__(self, tokenizer, spec: Optional[ToolSpec]):
        self.spec, self.fmt = spec, spec.format if spec is not None else None
        self.detok = StreamingDetokenizer(tokenizer, skip_special=False)
        self.stop_ids = set(tokenizer.stop_ids)
        self.text = ""  # generated text not yet given out as content, or the call being generated
        self.in_call = False
        self.calls: list = []  # [{"id", "name", "sent"}] per call started
        self.parsing = spec is not None and spec.choice != "none"

    def feed(self, token: Optional[int]) -> list:
        if token is None or token in self.stop_ids:
            return []
        self.text += self.detok.add_token(token)
        return self._advance(final=False)

    def finish(self) -> list:
        self.text += self.detok.finalize()
        return self._advance(final=True)

    def _advance(self, final: bool) -> list:
        if not self.parsing:
            out, self.text = self.text, ""
            return [{"content": out}] if out else []
        deltas: list = []
        while True:
            if self.in_call:
                end = self.text.find(self.fmt.closer)
                held = _partial_suffix(self.text, self.fmt.closer) if end < 0 and not final else 0
                body = self.text[:len(self.text) - held] if end < 0 else self.text[:end]
                deltas += self._call_deltas(body, done=end >= 0)
                if end < 0:
                    return deltas
                self.text, self.in_call = self.text[end + len(self.fmt.closer):], False
                continue
            start = self.text.find(self.fmt.opener)
            if start >= 0:
                deltas += self._content(self.text[:start])
                self.text, self.in_call = self.text[start + len(self.fmt.opener):], True
                self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": None, "sent": ""})
                continue
            keep = 0 if final else _partial_suffix(self.text, self.fmt.opener)
            deltas += self._content(self.text[:len(self.text) - keep])
            self.text = self.text[len(self.text) - keep:]
            return deltas

    def _content(self, text: str) -> list:
        if self.calls and not text.strip():  # separators between and after calls
            return []
        return [{"content": text}] if text else []

    def _call_deltas(self, body: str, done: bool) -> list:
        call, index = self.calls[-1], len(self.calls) - 1
        out = []
        name, args = self.fmt.split_call(body)
        if name is None:
            return out
        if call["name"] is None:
            call["name"] = name
            out.append({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                        "function": {"name": name, "arguments": ""}}]})
        text = self.fmt.arguments(args, final=done)
        if text.startswith(call["sent"]) and len(text) > len(call["sent"]):
            out.append({"tool_calls": [{"index": index, "function": {"arguments": text[len(call["sent"]):]}}]})
            call["sent"] = text
        return out


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of text that is a proper prefix of marker (held back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def parse_answer(tokenizer, spec: Optional[ToolSpec], ids: list, finish_reason: Optional[str] = None) -> ToolAnswer:
    """The answer in generated `ids` (stop token included or not): content and tool calls, with
    finish_reason "tool_calls" when there are calls and the answer ended by itself."""
    parser = StreamParser(tokenizer, spec)
    deltas = [d for t in ids for d in parser.feed(t)] + parser.finish()
    return collect(deltas, finish_reason)


def collect(deltas: list, finish_reason: Optional[str] = None) -> ToolAnswer:
    """StreamParser deltas folded into one ToolAnswer."""
    content, calls = [], []
    for d in deltas:
        content.append(d.get("content", ""))
        for item in d.get("tool_calls", ()):
            if "id" in item:
                calls.append({"id": item["id"], "type": "function",
                              "function": {"name": item["function"]["name"], "arguments": ""}})
            else:
                calls[item["index"]]["function"]["arguments"] += item["function"]["arguments"]
    text = "".join(content)
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ToolAnswer(text if text or not calls else None, calls, finish_reason)
