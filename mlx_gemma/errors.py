"""The one exception type for mistakes a user can fix (bad path, bad value, bad file).

The CLI prints `error: <message>` on one line and exits with status 1 for these;
anything else is a bug and keeps its traceback.

The library words its messages in its own terms: a message names the caller's parameters as
`{name}` fields, with their values as keyword arguments,

    UserError("unsupported {bits}; use one of 4, 8", bits=3)

which reads `unsupported bits=3; ...` to a Python caller (str(error)), while the CLI, which
knows its options, renders the same error as `unsupported --bits 3; ...` (`error.render`).
"""

from __future__ import annotations

from typing import Any, Callable

# A parameter named without a value: `{force}` with force=NAME_ONLY reads `force` / `--force`.
NAME_ONLY = ...


def python_spelling(name: str, value: Any) -> str:
    """How a Python caller writes the argument: `bits=3`, `calibration='none'`, or the bare name."""
    if value is NAME_ONLY:
        return name
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


class UserError(Exception):
    """A problem with the user's input; the message names the file/value and the fix."""

    def __init__(self, message: str, **params: Any):
        self.template, self.params = message, params
        super().__init__(self.render(python_spelling))

    def render(self, spell: Callable[[str, Any], str]) -> str:
        """The message with each `{name}` field spelled by spell(name, value)."""
        message = self.template  # str.replace, not str.format: paths in messages may hold braces
        for name, value in self.params.items():
            message = message.replace("{" + name + "}", spell(name, value))
        return message
