"""`kdlora.json`: the rank metadata of a nested-rank adapter (versioned; the contract both sides read).

The adapter beside it is a plain PEFT LoRA at `max_rank`. `nested=True` with `truncation="prefix"`
promises that rank k is `lora_A[:k, :]`, `lora_B[:, :k]`, `r=k`, the same `lora_alpha` (scale
alpha/k): the rule DyLoRA/QDyLoRA train for, which PEFT and vLLM then evaluate exactly.
"""

import json
import re
import types
import typing
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hub.errors import KdloraError

METADATA_FILE = "kdlora.json"
# "MAJOR.MINOR". A new optional field is a minor change: readers of the same major ignore fields they do
# not know, so older kdlora keeps reading newer files. A major change (a field's meaning or a required
# field) makes older readers refuse the file and say "upgrade". Files from kdlora <= 0.1 say 1 (= "1.0").
SCHEMA_VERSION = "1.4"  # 1.2: teacher_quality; 1.3: usage_example; 1.4: task_outcomes
_VERSION = re.compile(r"^(\d+)\.(\d+)$")


class _Strict(BaseModel):
    # Writers are strict: a typo in kdlora's own code must not silently drop a number. Readers drop the
    # fields they do not know before validating (`parse_metadata`), so newer files still load.
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Strict):
    id: str = Field(description="Hub repo id or local path of the model")
    revision: str | None = Field(None, description="commit sha or branch the adapter was trained against")

    def __str__(self) -> str:  # as the CLI takes it: ORG/NAME[@REVISION]
        return self.id + (f"@{self.revision}" if self.revision else "")


class ServingCost(_Strict):
    """Measured by a server, on its hardware, under its load; advisory for other machines."""

    ms_per_token: float = Field(gt=0)
    tokens_per_s: float | None = Field(None, gt=0)
    device: str | None = None


class Quality(_Strict):
    kl_to_teacher: float | None = Field(
        None, ge=0, description="mean forward KL(teacher || student), nats/token, held-out"
    )
    teacher_top1_agreement: float | None = Field(None, ge=0, le=1)
    perplexity: float | None = Field(None, gt=0)
    task_metrics: dict[str, float] = Field(default_factory=dict, description="e.g. {'bbc_accuracy': 0.91}")
    task_outcomes: dict[str, list[float]] | None = Field(
        None,
        description="each task metric's score per held-out example (accuracy: 1 or 0), in one order shared by every "
        "rank, the base and the teacher: what intervals and paired differences are computed from (hub/intervals.py)",
    )

    @model_validator(mode="after")
    def _outcomes_match_metrics(self):
        for name, scores in (self.task_outcomes or {}).items():
            if name not in self.task_metrics:
                raise ValueError(f"task_outcomes has '{name}' but task_metrics does not")
            if not scores or abs(sum(scores) / len(scores) - self.task_metrics[name]) > 1e-6:
                raise ValueError(
                    f"task_outcomes['{name}'] ({len(scores)} scores) does not average to task_metrics['{name}'] "
                    f"= {self.task_metrics[name]}"
                )
        return self

    def scores(self, metric: str) -> list[float] | None:
        """`metric`'s score per held-out example; None where they were not kept."""
        return (self.task_outcomes or {}).get(metric)

    def interval(self, metric: str):
        """`metric`'s mean and 95% bootstrap interval over the held-out examples; None without per-example scores."""
        from hub.intervals import interval

        scores = self.scores(metric)
        return interval(scores) if scores else None

    def quality_metrics(self) -> dict[str, float]:
        """The higher-is-better numbers in [0, 1] a `min_quality` budget can name: top-1 agreement and the task metrics."""
        common = {} if self.teacher_top1_agreement is None else {"teacher_top1_agreement": self.teacher_top1_agreement}
        return common | self.task_metrics


class RankResult(Quality):
    rank: int = Field(ge=1)
    adapter_bytes: int | None = Field(None, ge=0, description="size of the rank-k adapter's tensors")
    serving: ServingCost | None = None


class TrainingRecipe(_Strict):
    method: str = Field("kd-qdylora", description="kd-qdylora | kd-lora | lora")
    quantization: Literal["nf4", "none"] = "nf4"
    kd_temperature: float | None = Field(None, gt=0)
    kd_alpha: float | None = Field(None, ge=0, le=1, description="weight of the KD loss; 1-alpha on next-token CE")
    rank_distribution: str | None = Field(None, description="how each step sampled its rank, e.g. 'uniform'")
    rank_weighting: str | None = Field(
        None,
        description="how a step's per-rank losses added up (sandwich): 'scale' (by 1 / each rank's scale) or 'equal'",
    )
    steps: int | None = Field(None, ge=0)
    tokens: int | None = Field(None, ge=0)
    learning_rate: float | None = Field(None, gt=0)
    seed: int | None = None
    data: str | None = Field(None, description="data SPEC as given to `kdlora distill`")
    data_fingerprint: str | None = Field(
        None, description="sha256 of the data's rows and masks (training and held-out, in every wording)"
    )


class UsageExample(_Strict):
    """One held-out example as the adapter was trained on it: the prompt format, and the answer expected."""

    prompt: str
    completion: str


class RankMetadata(_Strict):
    schema_version: str = SCHEMA_VERSION
    nested: bool = Field(True, description="every prefix rank 1..max_rank is a valid adapter")
    truncation: Literal["prefix"] = "prefix"
    max_rank: int = Field(ge=1)
    default_rank: int = Field(ge=1, description="the rank served when a request names none")
    ranks: list[RankResult] = Field(default_factory=list, description="evaluated ranks, ascending")
    base_quality: Quality | None = Field(None, description="the base model without the adapter, same evaluation")
    teacher_quality: Quality | None = Field(
        None, description="the teacher's own task metrics on the same data (what 'closing the gap' is measured against)"
    )
    base_model: ModelRef
    teacher: ModelRef | None = None
    recipe: TrainingRecipe | None = None
    truncated_from: int | None = Field(None, ge=1, description="max_rank of the adapter this one was cut from")
    usage_example: UsageExample | None = Field(
        None, description="one held-out example (examples data): how to prompt the adapter, and its answer"
    )

    @model_validator(mode="after")
    def _ranks_consistent(self):
        if self.default_rank > self.max_rank:
            raise ValueError(f"default_rank {self.default_rank} is above max_rank {self.max_rank}")
        ranks = [r.rank for r in self.ranks]
        if ranks != sorted(set(ranks)):
            raise ValueError(f"ranks must be ascending and unique, got {ranks}")
        if ranks and ranks[-1] > self.max_rank:
            raise ValueError(f"evaluated rank {ranks[-1]} is above max_rank {self.max_rank}")
        scored = [q for q in (*self.ranks, self.base_quality, self.teacher_quality) if q and q.task_outcomes]
        for metric in {m for q in scored for m in q.task_outcomes}:
            counts = sorted({len(q.task_outcomes[metric]) for q in scored if metric in q.task_outcomes})
            if len(counts) > 1:  # paired differences need one set of examples
                raise ValueError(f"task_outcomes['{metric}'] covers different numbers of examples: {counts}")
        return self

    def result(self, rank: int) -> RankResult | None:
        return next((r for r in self.ranks if r.rank == rank), None)

    def check_rank(self, rank: int) -> int:
        """Return `rank` if this adapter serves it, else raise naming the valid range."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.max_rank:
            raise KdloraError(f"rank {rank!r} is out of range: this adapter has ranks 1..{self.max_rank}")
        if rank < self.max_rank and not self.nested:
            raise KdloraError(f"this adapter is not nested: only rank {self.max_rank} is valid")
        return rank

    def save(self, directory: Path) -> Path:
        path = Path(directory) / METADATA_FILE
        written = self.model_copy(update={"schema_version": SCHEMA_VERSION})  # what this kdlora writes: its own fields
        path.write_text(written.model_dump_json(indent=2, exclude_none=True) + "\n")
        return path


def load_metadata(directory: Path) -> RankMetadata:
    """Read and validate `kdlora.json`; every failure names the file, the field and the fix."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise KdloraError(
            f"{directory} has no {METADATA_FILE}: it is not a kdlora nested-rank adapter (a plain PEFT adapter "
            f"is exact only at its own rank); train one with `kdlora distill --train qdylora`, or write {METADATA_FILE} "
            "only if the adapter really was trained with nested ranks"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KdloraError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); fix or regenerate it"
        ) from err
    return parse_metadata(raw, source=str(path))


def parse_metadata(raw: object, source: str = METADATA_FILE) -> RankMetadata:
    if not isinstance(raw, dict):
        raise KdloraError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version", SCHEMA_VERSION)
    version = f"{version}.0" if isinstance(version, int) and not isinstance(version, bool) else version
    match = _VERSION.match(version) if isinstance(version, str) else None
    if match is None:
        raise KdloraError(
            f"{source}: field 'schema_version' is {version!r}, not a version like \"{SCHEMA_VERSION}\"; fix or regenerate the file"
        )
    if int(match[1]) > int(SCHEMA_VERSION.split(".")[0]):
        raise KdloraError(
            f"{source}: field 'schema_version' is {version}, a newer major version than this kdlora understands ({SCHEMA_VERSION}); "
            "upgrade kdlora: pip install -U kdlora"
        )
    try:
        return RankMetadata.model_validate({**_known_fields(RankMetadata, raw), "schema_version": version})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        where = f"field '{field}': " if field else ""
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {err.error_count() - 1} more problem(s))" if err.error_count() > 1 else ""
        raise KdloraError(f"{source}: {where}{message}{more}; fix or regenerate the file") from err


def _known_fields(model: type[BaseModel], raw):
    """`raw` without the keys `model` (and the models nested in it) does not define: what a newer minor adds."""
    if not isinstance(raw, dict):
        return raw
    known = {}
    for key, value in raw.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        nested = _model_in(field.annotation)
        if nested is not None:
            value = (
                [_known_fields(nested, v) for v in value] if isinstance(value, list) else _known_fields(nested, value)
            )
        known[key] = value
    return known


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside a field's type (`M`, `M | None`, `list[M]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        return next((m for arg in typing.get_args(annotation) if (m := _model_in(arg)) is not None), None)
    return None
