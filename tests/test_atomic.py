"""Write-then-rename output directories: finished or absent, never half."""

import os
import subprocess

import pytest

from hub.atomic import atomic_dir
from hub.errors import KdloraError


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_success_renames_into_place(tmp_path):
    out = tmp_path / "artifact"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("w")
        assert not out.exists()  # invisible until complete
    assert (out / "weights").read_text() == "w"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_interruption_leaves_nothing(tmp_path, interruption):
    out = tmp_path / "artifact"
    with pytest.raises(interruption):
        with atomic_dir(out) as tmp:
            (tmp / "half").write_text("h")
            raise interruption()
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_refuses_non_empty_out_and_keeps_it(tmp_path):
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "mine").write_text("m")
    with pytest.raises(KdloraError, match="exists and is not empty"):
        with atomic_dir(tmp_path / "artifact"):
            pass
    assert (tmp_path / "artifact" / "mine").read_text() == "m"


def test_replace_swaps_existing(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "old").write_text("o")
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in out.iterdir()) == ["new"]
    assert _leftovers(tmp_path) == []


def test_removes_orphans_of_dead_writers_only(tmp_path):
    dead = _dead_pid()
    orphan = tmp_path / f".artifact.tmp-{dead}-abc"
    live = tmp_path / f".artifact.tmp-{os.getpid()}-xyz"
    orphan.mkdir()
    live.mkdir()
    with atomic_dir(tmp_path / "artifact"):
        pass
    assert not orphan.exists()
    assert live.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
