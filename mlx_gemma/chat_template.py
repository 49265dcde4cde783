"""A model dir's own chat template (Jinja), rendered as transformers' `apply_chat_template` does.

A checkpoint's template is the truth about its chat format: Gemma 4 checkpoints ship one with tool
declarations, tool calls and a thinking channel that no hand-written renderer keeps up with. It
comes from `chat_template.jinja` (what transformers 5 saves), else the `chat_template` of
tokenizer_config.json (a string, or a list of {"name", "template"}: "default" is used), else
chat_template.json (processor dirs).

The environment is transformers' own, so a template renders to the same text: jinja2's
ImmutableSandboxedEnvironment (templates from the Hub are untrusted code), trim_blocks and
lstrip_blocks, the loopcontrols extension, `tojson` without HTML escaping, `raise_exception`,
`strftime_now`, and the `{% generation %}` … `{% endgeneration %}` tag that marks assistant
text for loss masks. Messages pass with their None-valued keys dropped, as transformers does.

`answer_spans` finds the characters of every assistant turn (its end marker included) in a
rendered conversation: from `{% generation %}` blocks when the template has them, otherwise by
rendering each conversation prefix and taking what an assistant message adds to it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime
from typing import Optional

from .errors import UserError

TEMPLATE_FILE = "chat_template.jinja"

# Private-use characters that bracket a {% generation %} block's output while spans are tracked.
_OPEN, _CLOSE = "\ue000", "\ue001"
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def read_chat_template(directory: str) -> Optional[str]:
    """The chat template a model dir ships, or None."""
    jinja = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                template = json.load(f).get("chat_template")
        except (ValueError, AttributeError) as exc:
            raise UserError(f"{path}: invalid JSON ({exc}); re-save the tokenizer") from None
        if isinstance(template, list):  # named templates: transformers uses "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template.strip():
            return template
    return None


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached by its text). UserError on a syntax error."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}`: the body's text, bracketed by private markers
        when the renderer asks for spans (the `_track_generation` variable)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark", [jinja2.nodes.Name("_track_generation", "load")])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, track, caller):
            text = caller()
            return f"{_OPEN}{text}{_CLOSE}" if track is True else text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise UserError(f"the model's chat template has a syntax error at line {exc.lineno}: {exc.message}; "
                        "fix chat_template.jinja (or tokenizer_config.json's chat_template)") from None


def render(source: str, messages: list, special_tokens: dict, add_generation_prompt: bool = False,
           tools: Optional[list] = None, track: bool = False, **kwargs) -> str:
    """The template's text for `messages` (and `tools`), as transformers renders it.

    special_tokens: {"bos_token": "<bos>", ...} (the template variables transformers passes).
    track=True brackets each {% generation %} block's output with private markers (answer_spans).
    A template's raise_exception (or any rendering error) becomes a UserError with its message.
    """
    import jinja2

    template = compile_template(source)
    plain = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
    try:
        return template.render(**special_tokens, **kwargs, messages=plain, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, _track_generation=track)
    except jinja2.exceptions.TemplateError as exc:
        raise UserError(f"the model's chat template refused the conversation: {exc}") from None
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise UserError(f"the model's chat template failed on this conversation ({type(exc).__name__}: {exc}); "
                        "check the messages' roles and content") from None


def answer_spans(source: str, messages: list, special_tokens: dict, tools: Optional[list] = None,
                 add_generation_prompt: bool = False, **kwargs) -> tuple[str, list]:
    """(text, [(start, end)]) for a conversation: the rendered text and the character spans of
    every assistant turn in it (each answer with its end-of-turn marker; not the whitespace after).
    """
    if _GENERATION_TAG.search(source):
        marked = render(source, messages, special_tokens, add_generation_prompt, tools, track=True, **kwargs)
        return _unmark(marked)
    text = render(source, messages, special_tokens, add_generation_prompt, tools, **kwargs)
    spans = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        # What the template writes before the model speaks, and the conversation through this answer.
        before = render(source, messages[:i], special_tokens, True, tools, **kwargs) if i else ""
        through = render(source, messages[:i + 1], special_tokens, False, tools, **kwargs)
        if not text.startswith(through):
            raise UserError("the model's chat template renders earlier turns differently as the conversation "
                            "grows and has no {% generation %} markers, so the assistant turns cannot be "
                            "found for the loss mask; add {% generation %} blocks to the template")
        start = len(os.path.commonprefix([before, through]))
        end = len(through.rstrip())
        if end > start:
            spans.append((start, end))
    return text, spans


def _unmark(marked: str) -> tuple[str, list]:
    """Remove the generation markers; return the clean text and the spans they bracketed."""
    out, spans, pos, start = [], [], 0, None
    for m in re.finditer(f"[{_OPEN}{_CLOSE}]", marked):
        out.append(marked[pos:m.start()])
        pos = m.end()
        at = sum(len(p) for p in out)
        if m.group() == _OPEN:
            start = at
        elif start is not None:
            if at > start:
                spans.append((start, at))
            start = None
    out.append(marked[pos:])
    return "".join(out), spans
