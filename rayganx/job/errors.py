"""The one kind of failure the user is shown as a message rather than a traceback.

Bad input, an unreachable store, a diverged run, a refused manifest: each module raises its own
subclass, phrased for the user (what, where, what to do). The CLI prints the message, one line
per problem, and exits 1; `failures.root_cause` finds the first of them inside Ray's layers of
wrapping, including those that crossed a process boundary as text.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on; its message is all they need to see."""


def user_error_names() -> tuple[str, ...]:
    """The class names of every UserError, for finding them in text Ray re-raised."""
    seen, stack = [], list(UserError.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls.__name__ not in seen:
            seen.append(cls.__name__)
            stack += cls.__subclasses__()
    return tuple(seen)
