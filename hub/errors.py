"""The one exception type for bad input: its message names the problem and the fix.

The CLI prints it as a single line (no traceback unless --debug) and exits non-zero. Anything else
that escapes is a bug in kdlora and keeps its traceback.
"""


class KdloraError(Exception):
    """A problem the user can fix; `str(err)` says what is wrong and what to do."""
