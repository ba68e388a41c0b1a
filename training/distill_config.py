"""`kdlora distill`'s settings, each defined once: its default, help and choices are the field's, and the CLI
(training/options.py) and `validate` are built from them. No torch at import: `kdlora --help` reads this."""

from dataclasses import asdict, dataclass, field
from pathlib import Path

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype: torch's name for each
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
# the schedules nested_lora.step_ranks implements (tests/test_cli.py checks they agree), without importing torch
RANK_SCHEDULES = ("uniform", "pow2", "sandwich", "matryoshka")
DEFAULT_EVAL_RANKS = (1, 2, 4, 8, 16, 32, 64)
DATA_HELP = (
    "SPEC: a .txt/.md/.jsonl file or folder, hf:NAME[:CONFIG][:SPLIT] (needs `datasets`), "
    "or builtin:pydoc (Python's documentation; offline)"
)


@dataclass(frozen=True)
class Mode:
    """What differs between the --train modes: what trains, which ranks a step trains, what is evaluated."""

    name: str
    adapter: bool  # a LoRA on a frozen (optionally NF4) base; else every weight of the student
    nested: bool  # every rank 1..R from one run (QDyLoRA)

    def rank(self, cfg: "DistillConfig") -> int | None:
        """The adapter's rank as saved (R for qdylora), None for full training."""
        return (cfg.max_rank if self.nested else cfg.rank) if self.adapter else None

    def step_ranks(self, cfg: "DistillConfig", step: int) -> list:
        """The LoRA ranks trained at `step`, largest first ([None] for full training)."""
        from training.nested_lora import step_ranks  # torch

        return step_ranks(step, cfg.seed, cfg.max_rank, cfg.rank_distribution) if self.nested else [self.rank(cfg)]

    def eval_settings(self, cfg: "DistillConfig") -> list:
        if not self.nested:
            return [self.rank(cfg)]
        requested = cfg.eval_ranks or [r for r in DEFAULT_EVAL_RANKS if r <= cfg.max_rank]
        return sorted(set(requested) | {cfg.max_rank})

    @property
    def alone(self) -> int | None:
        """The setting that evaluates the student without what training adds (rank 0: adapter off)."""
        return 0 if self.adapter else None


MODES = {
    mode.name: mode
    for mode in (
        Mode("qdylora", adapter=True, nested=True),
        Mode("lora", adapter=True, nested=False),
        Mode("full", adapter=False, nested=False),
    )
}


@dataclass
class DistillConfig:
    student: str = field(metadata={"help": "student checkpoint directory (e.g. from kdlora prune) or Hub id"})
    out: Path = field(metadata={"help": "new or empty directory for the adapter (or the student, --train full)"})
    teacher: str | None = field(
        default=None,
        metadata={
            "help": "Hub id ORG/NAME[@REVISION] or checkpoint directory (default: the embedded SmolLM2-135M-Instruct)"
        },
    )
    data: str = field(default="builtin:pydoc", metadata={"help": DATA_HELP, "metavar": "SPEC"})
    train: str = field(
        default="qdylora",
        metadata={"help": "qdylora: nested ranks 1..R; lora: one rank; full: all weights", "choices": MODES},
    )
    max_rank: int = field(default=64, metadata={"help": "R for qdylora"})
    rank: int = field(default=16, metadata={"help": "r for --train lora"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha"})
    top_layers: int | None = field(
        default=None,
        metadata={
            "help": "--train full: train the last N decoder layers (and the final norm) only; the embeddings and the "
            "layers below stay frozen, so the backward stops above them (default: every weight)",
            "metavar": "N",
        },
    )
    # alpha / sqrt(b), not alpha / b: with alpha / b more rank learns no faster, and a fixed budget gives a flat
    # ladder (rsLoRA, arXiv 2312.03732; benchmarks/RESULTS.md, "Does rank buy quality?")
    rslora: bool = field(
        default=True,
        metadata={
            "help": "scale rank b by alpha/sqrt(b) (rsLoRA; PEFT's and vLLM's use_rslora) or, with --no-rslora, "
            "by alpha/b"
        },
    )
    rank_distribution: str = field(
        default="uniform",
        metadata={
            "help": "which ranks each qdylora step trains: one uniform or pow2 sample; sandwich: max + min + one "
            "sample; matryoshka: one pass of the mean of ranks 1, 2, 4, ..., R",
            "choices": RANK_SCHEDULES,
        },
    )
    rank_weighting: str = field(
        default="scale",
        metadata={
            "help": "how a sandwich step's per-rank losses add up: scale weighs rank b's loss by the inverse of its "
            "LoRA scale (sqrt(b) under rsLoRA, b under alpha/b), so every rank pulls the components it shares with "
            "the others as hard as they do; equal: the plain mean (rank 1's scale then dominates them)",
            "choices": ("scale", "equal"),
        },
    )
    inplace_kd: bool = field(
        default=False,
        metadata={
            "help": "sandwich: the step's smaller ranks distil the largest rank's outputs of that step instead of the "
            "teacher's (the sandwich rule's in-place distillation); the largest rank distils the teacher"
        },
    )
    batch_ranks: str = field(
        default="auto",
        metadata={
            "help": "sandwich: compute a step's ranks in one forward of the batch repeated once per rank, each copy at "
            "its own rank (the gradients of a pass per rank, to rounding; 3x the activations); auto: in bf16 and fp16, "
            "where it pays (a quickstart step 1.1x-1.3x faster on 2 CPU cores), not in fp32 (no faster there); never "
            "with --inplace-kd (its smaller ranks need the largest's outputs first)",
            "choices": ("auto", "on", "off"),
        },
    )
    quantize: str = field(
        default="nf4", metadata={"help": "frozen base of the adapter modes", "choices": ("nf4", "none")}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "compute dtype of teacher and student (auto: bf16 on GPUs that have it, else fp32); "
            "in bf16, fp32 weights (full training's, an adapter's) compute under bf16 autocast",
            "choices": ("auto", *DTYPES),
        },
    )
    teacher_quantize: str = field(
        default="none",
        metadata={"help": "load the frozen teacher through bitsandbytes", "choices": ("nf4", "int8", "none")},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "recompute the student's activations in backward (less memory, ~30% more time)"},
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "adamw (fp32 states) or bitsandbytes' 8-bit AdamW (states at 1/4 of the memory)",
            "choices": OPTIMIZERS,
        },
    )
    kd_temperature: float = field(default=2.0, metadata={"help": "T of the KL term"})
    kd_alpha: float = field(default=0.5, metadata={"help": "weight of KL vs next-token CE"})
    teacher_cache: Path | None = field(
        default=None,
        metadata={
            "help": "train from `kdlora teacher cache` output instead of a teacher in memory "
            "(the teacher is loaded only to evaluate)"
        },
    )
    loss_chunk_tokens: int = field(
        default=256,
        metadata={
            "help": "tokens whose full-vocabulary logits exist at once in the KD loss (memory only, same loss)",
            "min": 1,
        },
    )
    steps: int = field(default=200, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=4, metadata={"help": "blocks per step, over all processes", "min": 1})
    seq_len: int = field(default=256, metadata={"help": "tokens per block", "min": 1})
    lr: float | None = field(default=None, metadata={"help": "learning rate (default 2e-4 adapters, 2e-5 full)"})
    warmup_steps: int | None = None  # None: 5% of steps. Not a CLI option (no help)
    eval_ranks: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": f"ranks to evaluate (default {','.join(map(str, DEFAULT_EVAL_RANKS))}, capped at R)",
            "metavar": "K,K,...",
        },
    )
    eval_samples: int = field(default=32, metadata={"help": "held-out blocks to evaluate on"})
    evaluate_before: bool = field(
        default=True,
        metadata={
            "help": "evaluate the student before training too (the report's `before`); --no-evaluate-before skips "
            "it in --train full (an adapter always measures it: its card compares every rank with the student alone)"
        },
    )
    save_every: int = field(default=50, metadata={"help": "checkpoint interval in steps", "min": 1})
    resume: bool = field(default=False, metadata={"help": "continue from <out>.checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for data order and sampled ranks"})

    # what a checkpoint must agree on to be resumed (everything but bookkeeping)
    def fingerprint(self) -> dict:
        ignore = {"out", "resume", "save_every", "eval_ranks", "eval_samples", "evaluate_before", "loss_chunk_tokens"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in ignore}

    def ranks_per_forward(self, half_precision: bool) -> int:
        """How many of a step's ranks one forward computes: a sandwich's min(R, 3) where --batch-ranks says so, else 1.
        `half_precision`: the step computes in bf16 or fp16 (what `auto` asks)."""
        sandwich = self.train == "qdylora" and self.rank_distribution == "sandwich" and not self.inplace_kd
        batched = self.batch_ranks == "on" or (self.batch_ranks == "auto" and half_precision)
        return min(self.max_rank, 3) if sandwich and batched else 1

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if MODES[self.train].adapter else 2e-5)

    @property
    def eval_batch_size(self) -> int:
        """Twice the training batch: an evaluation forward keeps no activations for a backward, and its batches,
        sorted by length, pad little, so larger ones cost less per row (benchmarks/RESULTS.md, "Evaluation batches")."""
        return 2 * self.batch_size

    @property
    def compute_dtype(self):
        import torch  # here, not at import: the CLI reads this module

        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, DTYPES[self.dtype])

    @property
    def checkpoint_dir(self) -> Path:
        return Path(f"{self.out}.checkpoint")
