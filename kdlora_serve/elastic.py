"""Elastic requests (`"kdlora": {"elastic": true}`): the channel between the API server, which lowers their rank, and
the engine's worker, which serves it and counts what it served. Imported by both processes, like kdlora_serve.rank.

A request's rank reaches the worker in its LoRA name, fixed at admission. An elastic request may be lowered later,
so the API server holds it a row of a small table in shared memory (a file under /dev/shm named by KDLORA_ELASTIC,
which the plugin sets in the first vLLM process, so the engine's processes inherit it) and tells the worker which
row through the request's `vllm_xargs` (vLLM's per-request extra args): `"<row>:<key>"`.

- API server: `claim` a row at admission (cap = the rank chosen), `lower` its cap while it runs, read `served` when
  it is done, `release` it.
- Worker (kdlora_serve.worker.lora_slots, every step): `rank_for` = the cap once the request decodes (its prompt
  is computed at the rank it was admitted with, so a lowering never splits a prompt), `count` each generated
  token at the rank that computed it. Ranks only go down, so the counts in order say which rank produced which
  token position.

The key guards a row against a late write for a request that already ended (an abort the engine has not yet seen).
"""

import atexit
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np

ENV = "KDLORA_ELASTIC"
XARG = "kdlora_elastic"  # the vllm_xargs key
ROWS = 1024  # elastic requests in flight at once; more are served at one rank (the middleware says so)
SEGMENTS = 8  # ranks a request can pass through (evaluated ranks 1..64 are 7)
ROW = np.dtype(
    [("key", "<i8"), ("cap", "<i4"), ("segments", "<i4"), ("rank", "<i4", SEGMENTS), ("tokens", "<i4", SEGMENTS)]
)


def _new_path() -> str:
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return str(Path(folder) / f"kdlora-elastic-{os.getpid()}-{secrets.token_hex(4)}")


def set_path() -> None:
    """Name this server's table for this process and the processes it starts (idempotent; the plugin calls it)."""
    os.environ.setdefault(ENV, _new_path())


class Table:
    def __init__(self, path: str):
        with open(path, "a+b") as file:  # whichever process comes first creates it, zeroed
            if os.fstat(file.fileno()).st_size < ROWS * ROW.itemsize:
                file.truncate(ROWS * ROW.itemsize)
        self.rows = np.memmap(path, ROW, mode="r+", shape=(ROWS,))
        self._next = 0

    # --- API server ---------------------------------------------------------------------------------------------
    def claim(self, rank: int) -> str | None:
        """A free row for a request admitted at `rank`: its handle "<row>:<key>" (None: the table is full). Rows are
        taken round-robin so a released row is reused as late as possible."""
        for offset in range(ROWS):
            row = (self._next + offset) % ROWS
            if self.rows["key"][row] == 0:
                key = secrets.randbits(62) + 1
                self.rows[row] = (key, rank, 0, 0, 0)
                self._next = row + 1
                return f"{row}:{key}"
        return None

    def lower(self, handle: str, rank: int) -> None:
        row, key = _parse(handle)
        if self.rows["key"][row] == key:
            self.rows["cap"][row] = rank

    def served(self, handle: str) -> list[tuple[int, int]]:
        """[(rank, generated tokens)] in the order served."""
        row, key = _parse(handle)
        found = self.rows[row]
        if found["key"] != key:
            return []
        return [
            (int(r), int(t)) for r, t in zip(found["rank"][: found["segments"]], found["tokens"][: found["segments"]])
        ]

    def release(self, handle: str) -> None:
        row, key = _parse(handle)
        if self.rows["key"][row] == key:
            self.rows["key"][row] = 0

    # --- worker -------------------------------------------------------------------------------------------------
    def rank_for(self, handle: str, rank: int, decoding: bool) -> int:
        """The rank to compute this step at: the row's cap once the request decodes, never above `rank`."""
        row, key = _parse(handle)
        if not decoding or self.rows["key"][row] != key:
            return rank
        return min(rank, int(self.rows["cap"][row]) or rank)

    def count(self, handle: str, rank: int, tokens: int) -> None:
        row, key = _parse(handle)
        found = self.rows[row : row + 1]
        if found["key"][0] != key:
            return
        used = int(found["segments"][0])
        if used and found["rank"][0, used - 1] == rank:
            found["tokens"][0, used - 1] += tokens
        elif used < SEGMENTS:
            found["rank"][0, used], found["tokens"][0, used] = rank, tokens
            found["segments"][0] = used + 1
        else:
            found["tokens"][0, used - 1] += tokens  # never with evaluated ranks (they are fewer); counted, not lost


_HANDLE = re.compile(r"[0-9]{1,4}:[0-9]{1,19}")


def is_handle(value) -> bool:
    """Whether a request's extra arg is a handle the API server wrote (anything else is served as if not elastic)."""
    return isinstance(value, str) and bool(_HANDLE.fullmatch(value))


def _parse(handle: str) -> tuple[int, int]:
    row, key = handle.split(":")
    return int(row) % ROWS, int(key)


_table: list[Table] = []


def table() -> Table:
    """This process's view of the server's table (opened on first use; the API server's creator removes it at exit)."""
    if not _table:
        path = os.environ.get(ENV) or _new_path()  # no name set (no vLLM plugin here): this process's own
        created = not os.path.exists(path)
        _table.append(Table(path))
        if created:
            atexit.register(lambda: Path(path).unlink(missing_ok=True))
    return _table[0]
