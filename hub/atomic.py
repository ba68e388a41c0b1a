"""Write-then-rename for output directories: an interrupted job never leaves a half artifact.

Everything kdlora writes (exported teachers, students, adapters, pulled repos) is built in a hidden
sibling directory and renamed into place only when complete. A reader that finds the final path can
trust it; a crash leaves at most a `.<name>.tmp-*` directory, which the next run removes.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hub.errors import KdloraError


def require_empty_out(out: Path) -> None:
    """Refuse to write into a directory that already holds something (it may be someone's work)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KdloraError(f"--out {out} exists and is not empty; choose a new directory or remove it first")


def refuse_other_settings(partial: Path, settings_file: Path, settings: dict, holds: str) -> None:
    """An interrupted job resumes only with the settings it started with (`settings_file`): continuing with others
    would mix two results in one output."""
    saved = json.loads(settings_file.read_text()) if settings_file.exists() else {}
    changed = sorted(k for k in settings if saved.get(k) != settings[k])
    if changed:
        raise KdloraError(
            f"{partial} holds {holds} made with other settings ({', '.join(changed)}); rerun with the original "
            "settings to continue it, or delete it to start over"
        )


@contextlib.contextmanager
def atomic_dir(out: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success rename it to `out`, on error delete it.

    `replace=True` swaps out an existing `out` (used for caches and checkpoints); otherwise `out` must
    be absent or empty.
    """
    out = Path(out)
    if not replace:
        require_empty_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like a plain mkdir
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.tmp-{os.getpid()}-old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_orphans(out: Path) -> None:
    """Delete temp dirs left by crashed writers of `out` (their pid is gone); never a live one's."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        remove_if_dead(tmp, tmp.name.removeprefix(f".{out.name}.tmp-").split("-")[0])


def remove_if_dead(folder: Path, pid: str) -> None:
    """Delete `folder`, written by process `pid`, if that process is gone; never a live one's."""
    if pid.isdigit() and not _alive(int(pid)):
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
