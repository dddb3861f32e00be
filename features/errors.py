"""The base of every named error of nextbest: an error the user can act on.

It lives in ``features`` because features imports nothing of ours and training and serving import features, so
every module can inherit it. Each named error keeps its old base as well (``class SchemaError(NextbestError,
ValueError)``), so callers that catch ``ValueError`` or ``RuntimeError`` keep working.
"""

from __future__ import annotations


class NextbestError(Exception):
    """An error the user can act on; the command line prints its message in one line (exit 2).

    Anything else that reaches the command line is a bug: it exits 1 and says where it came from.
    """
