"""The one exception type for mistakes a user can fix (bad path, bad value, bad file).

The CLI prints `error: <message>` on one line and exits with status 1 for these;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file/value and the fix."""
