"""Where kdlora keeps what it can rebuild: the exported teacher, pulled and truncated adapters."""

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """`$KDLORA_CACHE` if set, else the user cache dir (~/.cache/kdlora on Linux), joined with parts."""
    root = os.environ.get("KDLORA_CACHE") or platformdirs.user_cache_dir("kdlora")
    return Path(root, *parts)
