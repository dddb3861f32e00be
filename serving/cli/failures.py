"""How the command line reports a failure: a named error the user can act on in one line (exit 2); anything
else as an internal error that says where in our code it came from (exit 1)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

# The folder holding features/, training/ and serving/: the repository, or site-packages/nextbest installed.
_ROOT = Path(__file__).resolve().parents[2]
_OURS = tuple(_ROOT / name for name in ("features", "training", "serving"))

USER_ERROR = 2
INTERNAL_ERROR = 1


def report_failure(exc: Exception) -> int:
    """Print ``exc`` on standard error as the command line's last words; its exit status.

    A :class:`~nextbest.features.errors.NextbestError` or a pydantic ``ValidationError`` (a config file or flag
    out of range) is the user's to fix: one line, exit 2. Anything else is a bug: exit 1, its type and message
    and the innermost frame of our code.
    """
    from pydantic import ValidationError

    from nextbest.features.errors import NextbestError

    if isinstance(exc, NextbestError | ValidationError):
        print(f"nextbest: error: {_one_line(exc)}", file=sys.stderr)
        return USER_ERROR
    message = _one_line(exc)
    print(
        f"nextbest: internal error (a bug, please report it): {type(exc).__name__}"
        + (f": {message}" if message else ""),
        file=sys.stderr,
    )
    where = _innermost_frame_of_ours(exc)
    if where is not None:
        print(f"  at {where}", file=sys.stderr)
    print("  (NEXTBEST_DEBUG=1 shows the whole traceback)", file=sys.stderr)
    return INTERNAL_ERROR


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return f"invalid {exc.title}: " + "; ".join(parts)
    return " ".join(str(exc).split())


def _innermost_frame_of_ours(exc: BaseException) -> str | None:
    """``serving/foo.py:123 in func`` for the innermost frame of ``exc``'s traceback in features/, training/
    or serving/ (not a library's), or None when none is ours."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if any(path.is_relative_to(folder) for folder in _OURS):
            return f"{path.relative_to(_ROOT).as_posix()}:{frame.lineno} in {frame.name}"
    return None
