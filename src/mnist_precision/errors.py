"""Errors the user can fix: reported as one message and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn


class UserError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""


class TrainingDiverged(UserError):
    """The loss became inf or NaN; training stopped before the optimizer used it."""


def exit_with(error: UserError) -> NoReturn:
    """`error: <message>` on stderr, exit status 1."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a `UserError` raised inside into `error: <message>` on stderr and exit status 1."""
    try:
        yield
    except UserError as error:
        exit_with(error)
