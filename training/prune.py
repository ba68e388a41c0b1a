"""Minitron-style structured pruning of a Llama-family teacher into a smaller student.

Recipe: load the teacher -> calibration data -> activation importance (training.importance) -> choose
the student shape -> keep the most important heads / neurons / channels / layers -> a normal
transformers checkpoint + tokenizer + pruning report + student card, written atomically.

The student computes exactly what the teacher computes with the removed units zeroed: removing heads,
neurons and layers is plain slicing; removing hidden channels also changes every RMSNorm's mean over
the hidden size, which is undone by scaling the norm weights by sqrt(H/H') and eps by H/H'. Qwen3's per-head q/k
norms share that eps, so there it stays: the hidden norms then differ by eps * (1 - H'/H) in a mean square near 1
(~1e-6 relative; tests/test_prune_families.py checks every family).
"""

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import torch

from hub.atomic import atomic_dir, require_empty_out
from hub.card import student_card
from hub.errors import KdloraError
from hub.remote import PRUNING_REPORT
from training.memory import peak_memory_mb
from training.processes import process_state

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
FLAGS = {
    "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-heads",
    "num_key_value_heads": "--num-kv-heads",
    "intermediate_size": "--intermediate-size",
    "num_hidden_layers": "--num-layers",
}


@dataclasses.dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(*(getattr(config, f.name) for f in dataclasses.fields(cls)))

    def __str__(self) -> str:
        return (
            f"hidden {self.hidden_size}, heads {self.num_attention_heads} (kv {self.num_key_value_heads}), "
            f"mlp {self.intermediate_size}, layers {self.num_hidden_layers}"
        )


def check_supported(config) -> None:
    if config.model_type not in SUPPORTED:
        raise KdloraError(
            f"pruning {config.model_type} models is not supported yet; supported: {', '.join(SUPPORTED)} (Llama-family decoders)"
        )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def student_config(teacher_config, shape: Shape):
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    for field, value in dataclasses.asdict(shape).items():
        setattr(config, field, value)
    config.head_dim = head_dim(teacher_config)  # heads keep their width when the hidden size shrinks
    if not _has_head_norms(teacher_config):  # Qwen3's per-head norms share the eps, so it must stay (the hidden norms
        # then add eps * H'/H instead of eps to a mean square near 1: off by ~1e-6 relative, not exactly 0)
        config.rms_norm_eps = teacher_config.rms_norm_eps * teacher_config.hidden_size / shape.hidden_size
    return config


def _has_head_norms(config) -> bool:
    return config.model_type == "qwen3"


def count_params(config) -> int:
    """Exact parameter count of a config, built on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def parse_param_count(text: str, teacher_params: int) -> int:
    """`70M`, `1.5B`, `70000000`, or a fraction of the teacher like `0.5`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not match:
        raise KdloraError(f"--target-params '{text}' is not a number: use e.g. 70M, 1.5B or a fraction like 0.5")
    value, unit = float(match[1]), match[2].upper()
    if not unit and value <= 1:
        return int(value * teacher_params)
    return int(value * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[unit])


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


HARDWARE_MULTIPLES = (64, 32, 16, 8)  # widths tried, friendliest first: 64 fits GPU tensor-core tiles and
# bitsandbytes' packed NF4 CPU inference format (in_features % 64, out_features % 32)
TARGET_SLACK = 0.05  # a friendlier width may land the student up to 5% under the parameter target


def choose_shape(teacher_config, target_params: int | None = None, **explicit) -> tuple[Shape, dict]:
    """(the student's shape, how its widths were rounded and why). Explicit dims stand as given; with a
    parameter target, hidden and MLP width shrink by one common factor (Minitron's best width-pruning
    result) until the count fits, the other axes as given. Widths are rounded to the friendliest multiple
    in HARDWARE_MULTIPLES that keeps the student within TARGET_SLACK of the target; each coarser multiple
    given up is named in the report."""
    teacher = Shape.of(teacher_config)
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if teacher_config.model_type == "qwen2":  # its hidden size follows its heads (validate_shape says why)
        heads = explicit.get("num_attention_heads", teacher.num_attention_heads)
        explicit.setdefault("hidden_size", heads * head_dim(teacher_config))
    if target_params is None:
        shape = dataclasses.replace(teacher, **explicit)
        validate_shape(teacher_config, shape)
        return shape, {}
    total = count_params(teacher_config)
    if target_params >= total:
        raise KdloraError(
            f"--target-params {target_params:,} is not below the teacher's {total:,} parameters; give a smaller target"
        )
    base = dataclasses.replace(teacher, **explicit)
    validate_shape(teacher_config, base)
    width_axes = [a for a in ("hidden_size", "intermediate_size") if a not in explicit]
    counted: dict[Shape, int] = {}

    def params(shape: Shape) -> int:
        if shape not in counted:
            counted[shape] = count_params(student_config(teacher_config, shape))
        return counted[shape]

    if params(base) <= target_params:
        return base, {}
    if not width_axes:
        raise KdloraError(
            f"--target-params {target_params:,} is below the student these dims give ({params(base):,}); "
            "raise the target or shrink other axes (--num-layers, --num-heads)"
        )
    notes = {a: [] for a in width_axes}
    multiples = {a: _width_multiples(teacher_config, base, a, notes[a]) for a in width_axes}
    choice = {a: 0 for a in width_axes}  # index into multiples[a]
    while True:
        steps = {a: multiples[a][choice[a]] for a in width_axes}
        shape = _fit_width(base, steps, target_params, params)
        coarser = [a for a in width_axes if choice[a] + 1 < len(multiples[a])]
        if shape is not None and (params(shape) >= (1 - TARGET_SLACK) * target_params or not coarser):
            break
        if not coarser:
            raise KdloraError(
                f"--target-params {target_params:,} is below the smallest student these dims allow "
                f"({params(dataclasses.replace(base, **steps)):,}); raise the target or shrink other axes (--num-layers, --num-heads)"
            )
        axis = max(coarser, key=lambda a: steps[a])  # give up the coarsest rounding first
        got = (
            "no width fits"
            if shape is None
            else f"{params(shape) / 1e6:.1f}M params, more than {TARGET_SLACK:.0%} under the target"
        )
        notes[axis].append(f"multiples of {steps[axis]}: {got}")
        choice[axis] += 1
    rounding = {
        a: {"multiple": steps[a], "why": "; ".join(notes[a]) or "the friendliest width that fits the target"}
        for a in width_axes
    }
    return shape, rounding


def _width_multiples(teacher_config, base: Shape, axis: str, notes: list) -> list[int]:
    """The multiples `axis` may be rounded to, friendliest first; those leaving no width below the base's go to `notes`.
    A Llama hidden size must also be a multiple of the head count (transformers refuses it otherwise, even
    with an explicit head_dim), so its candidates are lcm(multiple, heads)."""
    heads = base.num_attention_heads if axis == "hidden_size" and teacher_config.model_type == "llama" else 1
    candidates = sorted({math.lcm(m, heads) for m in HARDWARE_MULTIPLES}, reverse=True)
    usable = [m for m in candidates if m < getattr(base, axis)] or candidates[-1:]
    lcm_note = f" (lcm with the {heads} heads, which transformers requires)" if heads > 1 else ""
    notes += [f"multiples of {m}{lcm_note}: none below {getattr(base, axis)}" for m in candidates if m > usable[0]]
    return usable


def _fit_width(base: Shape, steps: dict, target_params: int, params) -> Shape | None:
    """The widest `base` scaled by one factor s (each width rounded to its step) within `target_params`."""

    def scaled(s: float) -> Shape:
        return dataclasses.replace(
            base, **{a: min(getattr(base, a), _round_to(getattr(base, a) * s, step)) for a, step in steps.items()}
        )

    if params(scaled(0.0)) > target_params:
        return None
    low, high = 0.0, 1.0  # params(scaled(low)) <= target < params(scaled(high))
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if params(scaled(mid)) <= target_params else (low, mid)
    return scaled(low)


def validate_shape(teacher_config, shape: Shape) -> None:
    teacher = Shape.of(teacher_config)
    for field in dataclasses.fields(Shape):
        value, limit = getattr(shape, field.name), getattr(teacher, field.name)
        flag = FLAGS[field.name]
        if not 1 <= value <= limit:
            raise KdloraError(f"{flag} {value} must be between 1 and the teacher's {limit}")
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    if heads % kv:
        raise KdloraError(
            f"--num-heads {heads} must be a multiple of --num-kv-heads {kv} (grouped-query attention); "
            f"nearest valid --num-heads: {_nearest_multiples(heads, kv, teacher.num_attention_heads)}"
        )
    teacher_group = teacher.num_attention_heads // teacher.num_key_value_heads
    if heads // kv > teacher_group:
        raise KdloraError(
            f"--num-heads {heads} with --num-kv-heads {kv} needs {heads // kv} query heads per KV group but the teacher has "
            f"{teacher_group}; use --num-heads <= {kv * teacher_group} or more --num-kv-heads"
        )
    width = heads * head_dim(teacher_config)
    if teacher_config.model_type == "qwen2" and shape.hidden_size != width:
        raise KdloraError(
            f"--hidden-size {shape.hidden_size} with --num-heads {heads}: a Qwen2 student needs hidden size = heads x "
            f"head_dim ({width}), because vLLM's Qwen2 ignores config.head_dim; give --hidden-size {width} or leave "
            "it out (it follows --num-heads)"
        )
    if teacher_config.model_type == "llama" and shape.hidden_size % heads:
        raise KdloraError(
            f"--hidden-size {shape.hidden_size} must be a multiple of --num-heads {heads} for Llama models "
            f"(transformers requires it); nearest valid --hidden-size: {_nearest_multiples(shape.hidden_size, heads, teacher.hidden_size)}"
        )


def _nearest_multiples(value: int, step: int, limit: int) -> str:
    below, above = value // step * step, (value // step + 1) * step
    return " or ".join(str(v) for v in (below, above) if 1 <= v <= limit)


@dataclasses.dataclass
class Selection:
    """The teacher's units the student keeps (sorted indices)."""

    layers: list[int]
    channels: torch.Tensor
    kv_groups: dict[int, list[int]]  # teacher layer -> kept KV heads
    q_heads: dict[int, list[int]]  # teacher layer -> kept query heads
    neurons: dict[int, torch.Tensor]  # teacher layer -> kept MLP neurons


def select_units(teacher_config, importance, shape: Shape) -> Selection:
    def top(scores: torch.Tensor, k: int) -> torch.Tensor:
        return torch.sort(torch.topk(scores, k).indices).values

    layers = top(importance.layers, shape.num_hidden_layers).tolist()
    group = teacher_config.num_attention_heads // teacher_config.num_key_value_heads
    q_per_group = shape.num_attention_heads // shape.num_key_value_heads
    kv_groups, q_heads, neurons = {}, {}, {}
    for layer in layers:
        per_head = importance.heads[layer].view(teacher_config.num_key_value_heads, group)
        kv_groups[layer] = top(per_head.sum(dim=1), shape.num_key_value_heads).tolist()
        q_heads[layer] = [g * group + int(j) for g in kv_groups[layer] for j in top(per_head[g], q_per_group)]
        neurons[layer] = top(importance.neurons[layer], shape.intermediate_size)
    return Selection(layers, top(importance.channels, shape.hidden_size), kv_groups, q_heads, neurons)


def prune_state_dict(teacher, selection: Selection) -> dict[str, torch.Tensor]:
    """The student's weights: the selected rows/columns of the teacher's, renumbered layers."""
    config = teacher.config
    d = head_dim(config)
    hidden = selection.channels
    norm_scale = math.sqrt(config.hidden_size / len(hidden))  # every family: the hidden norms' mean lost H - H' zeros

    def rows_of(heads: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * d, (h + 1) * d) for h in heads])

    state = teacher.state_dict()
    out = {
        "model.embed_tokens.weight": state["model.embed_tokens.weight"][:, hidden],
        "model.norm.weight": state["model.norm.weight"][hidden] * norm_scale,
    }
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"][:, hidden]
    for new, old in enumerate(selection.layers):
        src, dst = f"model.layers.{old}.", f"model.layers.{new}."
        q_rows, kv_rows, neurons = (
            rows_of(selection.q_heads[old]),
            rows_of(selection.kv_groups[old]),
            selection.neurons[old],
        )
        sliced = {
            "self_attn.q_proj.weight": state[src + "self_attn.q_proj.weight"][q_rows][:, hidden],
            "self_attn.k_proj.weight": state[src + "self_attn.k_proj.weight"][kv_rows][:, hidden],
            "self_attn.v_proj.weight": state[src + "self_attn.v_proj.weight"][kv_rows][:, hidden],
            "self_attn.o_proj.weight": state[src + "self_attn.o_proj.weight"][hidden][:, q_rows],
            "mlp.gate_proj.weight": state[src + "mlp.gate_proj.weight"][neurons][:, hidden],
            "mlp.up_proj.weight": state[src + "mlp.up_proj.weight"][neurons][:, hidden],
            "mlp.down_proj.weight": state[src + "mlp.down_proj.weight"][hidden][:, neurons],
            "input_layernorm.weight": state[src + "input_layernorm.weight"][hidden] * norm_scale,
            "post_attention_layernorm.weight": state[src + "post_attention_layernorm.weight"][hidden] * norm_scale,
        }
        for bias, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):  # Qwen2 has q/k/v biases
            if src + f"self_attn.{bias}.bias" in state:
                sliced[f"self_attn.{bias}.bias"] = state[src + f"self_attn.{bias}.bias"][rows]
        if src + "self_attn.o_proj.bias" in state:
            sliced["self_attn.o_proj.bias"] = state[src + "self_attn.o_proj.bias"][hidden]
        for norm in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):  # Qwen3: per head, width head_dim
            if src + norm in state:
                sliced[norm] = state[src + norm]
        out.update({dst + name: tensor.contiguous() for name, tensor in sliced.items()})
    return out


def build_student(teacher, importance, shape: Shape):
    """The pruned model (same class as the teacher) and what was kept."""
    from transformers import AutoModelForCausalLM

    selection = select_units(teacher.config, importance, shape)
    config = student_config(teacher.config, shape)
    if getattr(config, "layer_types", None):
        config.layer_types = [teacher.config.layer_types[i] for i in selection.layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    missing, unexpected = student.load_state_dict(prune_state_dict(teacher, selection), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        student.tie_weights()
    student.generation_config = teacher.generation_config
    return student.eval(), selection


def removed_units(teacher_config, selection: Selection) -> dict:
    """What the report says was removed, per axis (teacher indices)."""
    all_layers = range(teacher_config.num_hidden_layers)
    return {
        "layers": [i for i in all_layers if i not in selection.layers],
        "hidden_channels": sorted(set(range(teacher_config.hidden_size)) - set(selection.channels.tolist())),
        "kv_heads": {
            str(i): sorted(set(range(teacher_config.num_key_value_heads)) - set(selection.kv_groups[i]))
            for i in selection.layers
        },
        "query_heads": {
            str(i): sorted(set(range(teacher_config.num_attention_heads)) - set(selection.q_heads[i]))
            for i in selection.layers
        },
        "mlp_neurons_removed_per_layer": {
            str(i): teacher_config.intermediate_size - len(selection.neurons[i]) for i in selection.layers
        },
    }


def plan_prune(
    teacher: str | None = None,
    target_params: str | None = None,
    batch_size: int = 8,
    seq_len: int = 256,
    device_gb: float | None = None,
    cuda: bool | None = None,
    **dims,
) -> str:
    """`kdlora prune --plan`: peak memory per process from the teacher's config alone (no weights are read)."""
    from transformers import AutoConfig

    from training.plan import prune_plan
    from training.teacher import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(teacher, files=["config.json"])[0])
    check_supported(config)
    target = parse_param_count(target_params, count_params(config)) if target_params is not None else None
    shape, _ = choose_shape(config, target, **dims)
    return prune_plan(config, student_config(config, shape), batch_size, seq_len, device_gb, cuda)


def run_prune(
    out: Path,
    teacher: str | None = None,
    target_params: str | None = None,
    calib_data: str = "builtin:pydoc",
    calib_samples: int = 1024,
    seq_len: int = 256,
    batch_size: int = 8,
    **dims,
) -> dict | None:
    """`kdlora prune`: read top to bottom. Returns the pruning report (None on the other processes of a launch)."""
    from training.data import load_token_data
    from training.evaluate import perplexity
    from training.importance import activation_importance, gathered
    from training.teacher import load_causal_lm

    out = Path(out)
    require_empty_out(out)
    if calib_samples < 1:
        raise KdloraError(f"--calib-samples must be at least 1, got {calib_samples}")
    processes = process_state()  # several under `accelerate launch`: they share the calibration blocks
    device = processes.device
    model, tokenizer, teacher_ref = load_causal_lm(teacher, device=device, check_config=check_supported)
    teacher_params = count_params(model.config)
    target = parse_param_count(target_params, teacher_params) if target_params is not None else None
    shape, rounding = choose_shape(model.config, target, **dims)
    student_params = count_params(student_config(model.config, shape))
    _say(f"teacher  {teacher_ref}: {Shape.of(model.config)} = {teacher_params / 1e6:.1f}M params")
    _say(f"student  {shape} = {student_params / 1e6:.1f}M params ({student_params / teacher_params:.0%})")
    for axis, rounded in rounding.items():
        _say(f"         {axis} rounded to a multiple of {rounded['multiple']}: {rounded['why']}")

    data = load_token_data(calib_data, tokenizer, seq_len)
    calib = data.train[:calib_samples]
    if len(calib) < calib_samples:
        _say(
            f"calibration: {calib_data} has {len(calib)} training blocks of {seq_len} tokens; using all of them (asked for {calib_samples})"
        )
    mine = calib[processes.process_index :: processes.num_processes]
    importance = gathered(activation_importance(model, mine, batch_size))
    if not processes.is_main_process:
        return None  # the main process builds, measures and writes the student
    student, selection = build_student(model, importance, shape)

    report = {
        "teacher": teacher_ref.id,
        "teacher_revision": teacher_ref.revision,  # the Hub commit pruned (None for a local directory)
        "teacher_shape": dataclasses.asdict(Shape.of(model.config)),
        "student_shape": dataclasses.asdict(shape),
        "width_rounding": rounding,
        "params_before": teacher_params,
        "params_after": student_params,
        "removed": removed_units(model.config, selection),
        "importance": "activation-based (Minitron): head output norm, MLP activation, RMSNorm output per channel; layers by block importance",
        "calibration": {"data": calib_data, "samples": len(calib), "seq_len": seq_len, "fingerprint": data.fingerprint},
        "heldout_perplexity": {
            "teacher": perplexity(model, data.heldout, batch_size, desc="held-out perplexity (teacher)"),
            "student": perplexity(student, data.heldout, batch_size, desc="held-out perplexity (student)"),
            "blocks": len(data.heldout),
        },
    }
    report["peak_memory_mb"] = peak_memory_mb()  # this process's, teacher and student included (kdlora prune --plan)
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / PRUNING_REPORT).write_text(json.dumps(report, indent=2) + "\n")
        student_card(out.name, teacher_ref.id, report).save(tmp / "README.md")
    ppl = report["heldout_perplexity"]
    _say(
        f"held-out perplexity: teacher {ppl['teacher']:.2f}, student {ppl['student']:.2f} (distillation recovers this)"
    )
    return report


def _say(message: str) -> None:
    if process_state().is_main_process:
        print(message, file=sys.stderr, flush=True)
