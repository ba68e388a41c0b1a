"""`kdlora distill --plan` (and `kdlora prune --plan`, at the end): peak memory per device, from the configs alone.

Teacher and student are built on the meta device (config.json only: no weights are read), their parameters counted
by kind, and the run's resident memory added up per device, each term a line of the printout:
- runtime: the CUDA context (an assumed 0.5 GiB), or on CPU this process's own resident size after importing
  torch, transformers, peft and bitsandbytes (measured now: what every kdlora process starts from);
- teacher weights (none with --teacher-cache; 4-bit NF4 = 0.5625 B/param with its block scales, int8 = 1 B);
- student weights: fp32 master weights for --train full; for adapters the frozen base (NF4 or the compute dtype)
  plus the fp32 LoRA at rank R; gradients (4 B) and AdamW states (8 B, or 2 B 8-bit) of what trains, divided over
  the devices under FSDP, replicated (plus DDP's gradient buckets) under DDP;
- activations kept for backward: per token and layer, the tensors a Llama-style layer saves (10 h + 2 kv + 4 i
  values; SDPA keeps no attention matrix), or one hidden state per layer plus one layer's with
  --gradient-checkpointing; times the ranks one forward computes (a sandwich step's 3, --batch-ranks);
- the KD loss's chunk: LOSS_COPIES x chunk tokens x vocabulary x 4 B (logits, log-softmaxes, teacher, gradient);
- the teacher's forward (no grad): one layer's widest intermediate and its final hidden states.
Then, when the total exceeds the device, the flags that would bring it under, in the order they cost least.

Checked against measured training peaks on this machine (benchmarks/RESULTS.md, tests/test_plan.py).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30
CUDA_CONTEXT = 0.5 * GIB  # an assumption for GPUs: the CUDA context and cuBLAS workspaces
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights + one fp32 absmax per block of 64
LOSS_COPIES = 6  # chunk logits, their log-softmax, the teacher's log-probs and exp, the product, the logits' gradient
ADAMW_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2}


@dataclass
class Shapes:
    """What memory depends on, counted from a config on the meta device."""

    params: int
    linear_params: int  # in the decoder layers (what NF4 quantizes and LoRA targets)
    lora_params_per_rank: int  # sum of (in + out) over those linears
    largest_linear: int
    layers: int
    hidden: int
    intermediate: int
    kv: int
    vocab: int

    @classmethod
    def of(cls, path_or_config) -> "Shapes":
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        config = (
            path_or_config
            if isinstance(path_or_config, PretrainedConfig)
            else AutoConfig.from_pretrained(path_or_config)
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = config.num_key_value_heads * head_dim
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            linear_params=sum(m.weight.numel() for m in linears),
            lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
            largest_linear=max(m.weight.numel() for m in linears),
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            kv=kv,
            vocab=config.vocab_size,
        )


def planned_dtype(cfg, cuda: bool) -> torch.dtype:
    """The compute dtype the run would use on the planned device (auto: bf16 on GPUs, fp32 on CPUs)."""
    return cfg.compute_dtype if cfg.dtype != "auto" else torch.bfloat16 if cuda else torch.float32


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def runtime_bytes(cuda: bool) -> float:
    if cuda:
        return CUDA_CONTEXT
    import accelerate  # noqa: F401  (what a training process has imported before it loads anything)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def estimate(
    cfg, teacher: Shapes | None, student: Shapes, devices: int = 1, sharding: str = "ddp", cuda: bool | None = None
) -> list[tuple[str, float]]:
    """[(what, bytes per device)] for DistillConfig `cfg` over `devices` (sharding: ddp | fsdp); teacher None = cached."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    compute = planned_dtype(cfg, cuda)
    width = _bytes(compute)
    full = cfg.train == "full"
    rank = cfg.max_rank if cfg.train == "qdylora" else cfg.rank
    tokens = cfg.batch_size * cfg.seq_len // devices
    items = [("runtime", runtime_bytes(cuda))]
    if teacher is not None:
        quant = {"nf4": NF4_BYTES, "int8": 1}.get(cfg.teacher_quantize)
        weights = (
            teacher.params * width
            if quant is None
            else teacher.linear_params * quant + (teacher.params - teacher.linear_params) * width
        )
        items.append(("teacher weights", weights))
    if full:
        trainable, base = student.params, 0
        items.append(("student weights (fp32 master)", student.params * 4 / (devices if sharding == "fsdp" else 1)))
    else:
        trainable = student.lora_params_per_rank * rank
        base_linear = NF4_BYTES if cfg.quantize == "nf4" else width
        base = student.linear_params * base_linear + (student.params - student.linear_params) * width
        items += [("student base (frozen)", base), (f"LoRA at rank {rank} (fp32)", trainable * 4)]
    shard = devices if sharding == "fsdp" else 1
    items.append(
        ("gradients (fp32)", trainable * 4 / shard * (2 if sharding == "ddp" and devices > 1 else 1))
    )  # DDP: + buckets
    items.append((f"optimizer ({cfg.optimizer})", trainable * ADAMW_BYTES[cfg.optimizer] / shard))
    per_layer = (
        student.hidden
        if cfg.gradient_checkpointing
        else 10 * student.hidden + 2 * student.kv + 4 * student.intermediate
    )
    one_layer = (10 * student.hidden + 2 * student.kv + 4 * student.intermediate) if cfg.gradient_checkpointing else 0
    copies = cfg.ranks_per_forward(compute != torch.float32)  # the batch repeated once per rank a forward computes
    items.append(
        (
            "activations"
            + (" (checkpointed)" if cfg.gradient_checkpointing else "")
            + (f" x {copies} ranks a forward" if copies > 1 else ""),
            copies * tokens * (student.layers * per_layer + one_layer) * width,
        )
    )
    if not full and cfg.quantize == "nf4":
        items.append(("NF4 dequantized weight (transient)", student.largest_linear * width * 2))
    items.append(("KD loss chunk", LOSS_COPIES * min(cfg.loss_chunk_tokens, tokens) * student.vocab * 4))
    if teacher is not None:
        items.append(("teacher forward (no grad)", tokens * (2 * teacher.intermediate + teacher.hidden) * width))
    return items


def suggestions(cfg, items: list[tuple[str, float]], device_bytes: float, compute: torch.dtype) -> list[str]:
    """Flags that would lower this plan, most useful first (only those not already given)."""
    total = sum(b for _, b in items)
    if total <= device_bytes:
        return []
    size = dict(items)
    options = []
    if cfg.teacher_cache is None and "teacher weights" in size:
        options.append(
            f"--teacher-cache DIR (kdlora teacher cache): -{_gib(size['teacher weights'] + size['teacher forward (no grad)'])}"
        )
    if cfg.optimizer == "adamw" and cfg.train == "full":
        options.append(f"--optimizer adamw8bit: -{_gib(size['optimizer (adamw)'] * 3 / 4)}")
    copies = cfg.ranks_per_forward(compute != torch.float32)
    if copies > 1:
        options.append(f"--batch-ranks off: 1/{copies} of the activations (a forward per rank)")
    if not cfg.gradient_checkpointing:
        options.append("--gradient-checkpointing: most of the activations")
    if compute == torch.float32:
        options.append("--dtype bf16 (on GPUs with bf16): halves teacher, base and activations")
    if cfg.train == "full":
        options.append(
            "FSDP over more GPUs divides weights, gradients and optimizer (--devices N --sharding fsdp; launch with configs/fsdp.yaml)"
        )
    options.append("a smaller --batch-size or --seq-len: activations and the loss chunk shrink with tokens")
    return options


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def format_plan(cfg, items, devices: int, sharding: str, device_bytes: float | None, cuda: bool) -> str:
    compute = planned_dtype(cfg, cuda)
    title = (
        f"kdlora distill --plan: {cfg.train}, {devices} {'GPU' if cuda else 'CPU process'}(s), {sharding}, compute "
        f"{str(compute).removeprefix('torch.')}, batch {cfg.batch_size} x {cfg.seq_len} tokens per step"
    )
    return _table(title, items, device_bytes, lambda: suggestions(cfg, items, device_bytes, compute))


def _table(title: str, items, device_bytes: float | None, options) -> str:
    total = sum(b for _, b in items)
    lines = [title] + [f"  {name:<40} {_gib(size):>10}" for name, size in items]
    lines.append(f"  {'peak per device (estimate)':<40} {_gib(total):>10}")
    if device_bytes is not None:
        lines.append(f"  {'fits in ' + _gib(device_bytes):<40} {'yes' if total <= device_bytes else 'NO':>10}")
        lines += ["  to fit, try: " + option for option in (options() if total > device_bytes else [])]
    return "\n".join(lines)


def plan(cfg, devices: int = 1, sharding: str = "ddp", device_gb: float | None = None, cuda: bool | None = None) -> str:
    from training.teacher import resolve_model

    cuda = torch.cuda.is_available() if cuda is None else cuda
    teacher = None if cfg.teacher_cache is not None else Shapes.of(resolve_model(cfg.teacher, ["config.json"])[0])
    items = estimate(cfg, teacher, Shapes.of(cfg.student), devices, sharding, cuda)
    return format_plan(cfg, items, devices, sharding, device_gb * GIB if device_gb else None, cuda)


# --- kdlora prune --plan ----------------------------------------------------------------------------

PERPLEXITY_COPIES = 3  # the held-out logits, their flattened copy and cross-entropy's log-softmax


def estimate_prune(
    teacher: Shapes, student: Shapes, batch_size: int, seq_len: int, cuda: bool
) -> list[tuple[str, float]]:
    """[(what, bytes per process)] at the peak of `kdlora prune`: the held-out perplexity after the student is built
    (the calibration forward before it holds no logits and one layer's activations, less on any real model).
    Every process of a launch holds the whole teacher (the calibration blocks are what is divided)."""
    return [
        ("runtime", runtime_bytes(cuda)),
        ("teacher weights (fp32)", teacher.params * 4),
        ("student weights (fp32)", student.params * 4),
        (
            "held-out perplexity logits (fp32)",
            PERPLEXITY_COPIES * batch_size * seq_len * max(teacher.vocab, student.vocab) * 4,
        ),
    ]


def prune_plan(
    teacher_config,
    student_config,
    batch_size: int,
    seq_len: int,
    device_gb: float | None = None,
    cuda: bool | None = None,
) -> str:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    teacher, student = Shapes.of(teacher_config), Shapes.of(student_config)
    items = estimate_prune(teacher, student, batch_size, seq_len, cuda)
    title = (
        f"kdlora prune --plan: {teacher.params / 1e6:.1f}M -> {student.params / 1e6:.1f}M params, per "
        f"{'GPU' if cuda else 'CPU process'}, batch {batch_size} x {seq_len} tokens"
    )

    def options() -> list[str]:
        return [
            f"a smaller --batch-size: the perplexity logits are {_gib(items[-1][1])}",
            "more memory per process: each holds the whole fp32 teacher (processes divide the calibration, not the model)",
        ]

    return _table(title, items, device_gb * GIB if device_gb else None, options)
