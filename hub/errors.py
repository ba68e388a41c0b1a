"""The exception types for bad input: each message names the problem and the fix.

The CLI prints them as a single line (no traceback unless --debug) and exits non-zero; the server maps
the type (not the text) to an HTTP status. Anything else that escapes is a bug in kdlora and keeps its
traceback.
"""


class KdloraError(Exception):
    """A problem the user can fix; `str(err)` says what is wrong and what to do."""


class NotFoundError(KdloraError):
    """What was asked for does not exist (a repo, a revision, a local adapter directory)."""
