"""Push and pull adapters (and students) through `huggingface_hub`, or a local directory hub; download a teacher.

A repo spec is either a Hub repo id `ORG/NAME[@REVISION]` (endpoint from `--endpoint`, else
`HF_ENDPOINT`; token from `HF_TOKEN` or the saved login), or a local directory hub: a path or
`file:///path`, same layout, no network. Each push is ONE commit per repo; a pull resolves the
revision to a commit sha first, downloads only the files it needs (never pickles) and validates
everything before the output directory appears.
"""

import contextlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx2

from hub.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_adapter, refuse_pickles, truncate_adapter
from hub.atomic import atomic_dir, require_empty_out
from hub.card import PLOT_FILE, adapter_card, plot_quality_vs_rank, student_card
from hub.errors import KdloraError, NotFoundError
from hub.schema import METADATA_FILE, ModelRef, RankMetadata

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE)
CARD_FILES = ("README.md", PLOT_FILE)
PRUNING_REPORT = "pruning_report.json"  # written by `kdlora prune` into the student directory
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model")  # config, tokenizer, weights: never pickles
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_MATERIALIZED = re.compile(r"^r\d+/")
MAX_SPEC_CHARS = 4096  # PATH_MAX on Linux; Hub repo ids are far shorter


@dataclass(frozen=True)
class RepoRef:
    """Where an artifact lives: a Hub repo (`repo_id`, optional `revision`) or a local directory (`path`)."""

    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"file://{self.path}"
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo(spec: str, allow_local: bool = True) -> RepoRef:
    """`ORG/NAME[@REV]` -> Hub repo; a path or `file://PATH` -> local directory hub (if allowed)."""
    spec = str(spec)
    if len(spec) > MAX_SPEC_CHARS:
        raise KdloraError(
            f"'{spec[:40]}...' ({len(spec)} characters) is too long for a repo id or path (at most {MAX_SPEC_CHARS})"
        )
    looks_local = spec.startswith(("file://", "/", "./", "../", "~")) or _exists(spec)
    if looks_local:
        if not allow_local:
            raise KdloraError(f"'{spec}' is a local path, not a repo id; use ORG/NAME[@REVISION]")
        return RepoRef(path=Path(spec.removeprefix("file://")).expanduser().resolve())
    repo_id, _, revision = spec.partition("@")
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise KdloraError(
            f"'{spec}' is not a valid repo: use ORG/NAME[@REVISION] (letters, digits, '-', '_', '.'; no '..'), "
            "a local directory path, or file:///PATH"
        )
    return RepoRef(repo_id=repo_id, revision=revision or None)


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the filesystem, or with a NUL byte, is no local path
        return False


# --- pull ------------------------------------------------------------------------------------------


def fetch_adapter(ref: RepoRef, staging: Path, files=ADAPTER_FILES + CARD_FILES, endpoint=None, token=None) -> Path:
    """A local directory holding the adapter's files: the local hub dir itself, or a download into `staging`."""
    if ref.path is not None:
        if not ref.path.is_dir():
            raise NotFoundError(f"local adapter directory {ref.path} does not exist")
        return ref.path
    with _hub_errors(ref, endpoint):
        api = _api(endpoint, token)
        info = api.model_info(ref.repo_id, revision=ref.revision)  # pin one commit: `main` may move mid-pull
        present = {sibling.rfilename for sibling in info.siblings}
        required = [name for name in ADAPTER_FILES if name in files]
        if ADAPTER_WEIGHTS in required and ADAPTER_WEIGHTS not in present:
            refuse_pickles(name for name in present if "/" not in name)
        missing = [name for name in required if name not in present]
        if missing:
            raise KdloraError(f"repo {ref} has no {', '.join(missing)} (missing file): it is not a kdlora adapter repo")
        from huggingface_hub import hf_hub_download

        for name in files:
            if name in present:
                hf_hub_download(
                    ref.repo_id, name, revision=info.sha, local_dir=staging, endpoint=api.endpoint, token=token
                )
    return Path(staging)


def pull_adapter(spec: str, out: Path, rank: int | None = None, endpoint=None, token=None) -> Path:
    """Download (or copy from a local hub) an adapter into `out`, validated; truncated if `rank` is given."""
    out = Path(out)
    require_empty_out(out)
    ref = parse_repo(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kdlora-pull-", dir=out.parent) as staging:
        src = fetch_adapter(ref, Path(staging), endpoint=endpoint, token=token)
        read_adapter(src)  # schema and tensor shapes, before anything reaches `out`
        if rank is not None:
            return truncate_adapter(src, rank, out)
        with atomic_dir(out) as tmp:
            for name in ADAPTER_FILES + CARD_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
    return out


def snapshot_model(ref: RepoRef, files=MODEL_FILES, endpoint=None, token=None) -> tuple[Path, str]:
    """A Hub model's `files`, all at the one commit `ref.revision` (default main) resolves to, so that config,
    tokenizer and weights agree: (the snapshot directory in the HF cache, that commit's sha)."""
    from huggingface_hub import snapshot_download

    with _hub_errors(ref, endpoint):
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, allow_patterns=list(files), endpoint=endpoint, token=token
        )
    return Path(folder), Path(folder).name  # the HF cache names a snapshot by its commit sha


def read_remote_metadata(spec: str, endpoint=None, token=None) -> tuple[RankMetadata, dict]:
    """`kdlora.json` and `adapter_config.json` of a local or Hub adapter, without its weights."""
    import json

    from hub.schema import load_metadata

    with tempfile.TemporaryDirectory() as staging:
        src = fetch_adapter(
            parse_repo(spec), Path(staging), files=(ADAPTER_CONFIG, METADATA_FILE), endpoint=endpoint, token=token
        )
        return load_metadata(src), json.loads((src / ADAPTER_CONFIG).read_text())


# --- push ------------------------------------------------------------------------------------------


def push(
    src: Path,
    repo: str,
    student: Path | None = None,
    student_repo: str | None = None,
    materialize_ranks=(),
    private: bool = False,
    endpoint=None,
    token=None,
) -> list[str]:
    """Publish an adapter (and optionally its student first); returns where each landed."""
    if (student is None) != (student_repo is None):
        raise KdloraError("--student and --student-repo go together: give both to publish the student, or neither")
    adapter = read_adapter(src)
    for rank in materialize_ranks:
        adapter.metadata.check_rank(rank)
    adapter_ref = parse_repo(repo)
    student_ref = parse_repo(student_repo) if student_repo else None
    metadata = adapter.metadata
    landed = []
    with tempfile.TemporaryDirectory(prefix="kdlora-push-") as staging:
        staging = Path(staging)
        if student is not None:
            teacher = metadata.teacher.id if metadata.teacher else None
            _stage_student(Path(student), staging / "student", _name(student_ref), teacher)
            where, revision = _upload(student_ref, staging / "student", private, endpoint, token, "student")
            landed.append(where)
            # lineage: the adapter's base is now the published student, pinned to the commit just made
            metadata = metadata.model_copy(
                update={"base_model": ModelRef(id=_model_id(student_ref), revision=revision)}
            )
        _stage_adapter(adapter.path, metadata, staging / "adapter", _name(adapter_ref), materialize_ranks)
        where, _ = _upload(adapter_ref, staging / "adapter", private, endpoint, token, "adapter")
        landed.append(where)
    return landed


def _name(ref: RepoRef) -> str:
    """What a card calls the repo."""
    return ref.repo_id if ref.repo_id else ref.path.name


def _model_id(ref: RepoRef) -> str:
    """What transformers / vLLM load the repo by: a repo id, or a local hub's absolute path."""
    return ref.repo_id if ref.repo_id else str(ref.path)


def _stage_adapter(src: Path, metadata: RankMetadata, stage: Path, name: str, materialize_ranks) -> None:
    stage.mkdir()
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(src / file, stage / file)
    metadata.save(stage)
    plot = plot_quality_vs_rank(metadata, stage / PLOT_FILE)
    adapter_card(metadata, name, metadata.base_model.id, plot=PLOT_FILE if plot else None).save(stage / "README.md")
    for rank in sorted(set(materialize_ranks)):
        truncate_adapter(stage, rank, stage / f"r{rank}")


def _stage_student(student: Path, stage: Path, name: str, teacher: str | None) -> None:
    import json

    if not (student / "config.json").is_file() or not any(student.glob("*.safetensors")):
        raise KdloraError(
            f"student directory {student} is not a transformers checkpoint with safetensors weights (config.json + *.safetensors)"
        )
    refuse_pickles(p.name for p in student.iterdir())
    report = json.loads((student / PRUNING_REPORT).read_text()) if (student / PRUNING_REPORT).is_file() else None
    teacher = (report or {}).get("teacher") or teacher or "unknown"
    shutil.copytree(student, stage, ignore=shutil.ignore_patterns("README.md", ".*"))
    student_card(name, teacher, report).save(stage / "README.md")


def _upload(ref: RepoRef, folder: Path, private: bool, endpoint, token, what: str) -> tuple[str, str | None]:
    """Land `folder` as the whole new content of `ref`, in one step; (where it landed, commit sha)."""
    if ref.path is not None:
        with atomic_dir(ref.path, replace=True) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        return f"file://{ref.path}", None
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    with _hub_errors(ref, endpoint):
        api = _api(endpoint, token)
        existed = api.repo_exists(ref.repo_id)
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        try:
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            stale = (
                [f for f in api.list_repo_files(ref.repo_id) if _MATERIALIZED.match(f) and f not in files]
                if existed
                else []
            )
            operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
            operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
            commit = api.create_commit(
                ref.repo_id, operations, commit_message=f"kdlora: push {what}", revision=ref.revision
            )
        except BaseException:
            if not existed:  # a push that fails leaves no empty repo behind
                api.delete_repo(ref.repo_id, missing_ok=True)
            raise
    return commit.commit_url, commit.oid


# --- errors ----------------------------------------------------------------------------------------


def _api(endpoint, token):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


@contextlib.contextmanager
def _hub_errors(ref: RepoRef, endpoint):
    """Turn `huggingface_hub` and network exceptions into one-line KdloraErrors that name the fix."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = endpoint or constants.ENDPOINT
    try:
        yield
    except RevisionNotFoundError as err:  # the Hub errors subclass HfHubHTTPError: most specific first
        raise NotFoundError(f"repo {ref.repo_id} has no revision '{ref.revision}' on {endpoint}") from err
    except RepositoryNotFoundError as err:
        raise NotFoundError(f"repo {ref.repo_id} not found on {endpoint} (if it is private, set HF_TOKEN)") from err
    except LocalEntryNotFoundError as err:  # a download found neither the Hub nor a cached copy
        raise KdloraError(
            f"cannot reach the Hub at {endpoint} ({str(err).splitlines()[0]}) and {ref} is not in the local cache; "
            "check --endpoint / HF_ENDPOINT and the network"
        ) from err
    except EntryNotFoundError as err:
        raise KdloraError(f"repo {ref} is missing a file ({err}); it is incomplete or not a kdlora repo") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = "check HF_TOKEN (it needs write access to push)" if status in (401, 403) else "retry later"
        raise KdloraError(
            f"the Hub at {endpoint} answered HTTP {status} for {ref}: {str(err).splitlines()[0]}; {hint}"
        ) from err
    except (httpx2.TransportError, ConnectionError) as err:
        raise KdloraError(
            f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {err}); check --endpoint / HF_ENDPOINT and the "
            "network, or use a local directory hub (a path or file:///PATH)"
        ) from err
