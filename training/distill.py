"""`kdlora distill`: knowledge distillation of a student, read top to bottom.

Modes: `qdylora` (default) trains ONE nested-rank LoRA on a frozen (NF4) student, a rank b ~ 1..R per
step (QDyLoRA, arXiv 2402.10462) against the teacher's logits (KD-LoRA, arXiv 2410.20777); `lora`
trains a plain fixed-rank adapter (the baseline); `full` trains every student weight (Minitron's
recovery step after pruning) and writes a student checkpoint; each is a `Mode` (what trains, which ranks a
step trains, what is evaluated).

Memory: the KD loss is taken from hidden states chunk by chunk (training/losses.py ChunkedKDLoss); the
targets come from the teacher's forward or from a `kdlora teacher cache` (then no teacher is in memory while
training); --dtype, --teacher-quantize, --gradient-checkpointing and --optimizer adamw8bit trade precision or
time for memory; `kdlora distill --plan` estimates the peak (training/plan.py).

Long runs: a progress bar, a checkpoint every `save_every` steps (and on Ctrl-C) in `<out>.checkpoint/`,
`--resume` continues from it with the same result as an uninterrupted run (data order and sampled ranks
are pure functions of seed and step). Runs under `accelerate launch` with configs/ddp.yaml or configs/fsdp.yaml
(training/processes.py); checkpoints hold whole tensors by name, whichever of them wrote them.
"""

import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hub.atomic import atomic_dir, require_empty_out
from hub.errors import KdloraError
from hub.remote import PRUNING_REPORT
from training.distill_config import MODES, DistillConfig, Mode  # the settings, defined once (no torch there)
from training.memory import peak_memory_mb, reset_peak_memory
from training.options import check_options
from training.processes import gather_training_state, is_sharded, make_accelerator, restore_training_state


@dataclass
class TrainState:
    """What a checkpoint holds besides weights, optimizer and scheduler (state.json); resuming restores it."""

    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    data_fingerprint: str | None = None  # the data trained on (a resume refuses other data)
    before: dict | None = None  # the student alone, evaluated before the first step
    # the teacher's task metrics and per-example scores (labelled data): what the student is measured against
    teacher: dict | None = None
    before_samples: int | None = None  # the --eval-samples `before` and `teacher` were measured on


def validate(cfg: DistillConfig) -> None:
    check_options(cfg)  # each field's choices and minimum (its metadata)
    mode = MODES[cfg.train]
    if cfg.max_rank < 1 or cfg.rank < 1:
        raise KdloraError(f"ranks must be positive: --max-rank {cfg.max_rank}, --rank {cfg.rank}")
    if mode.nested and cfg.eval_ranks:
        above = [r for r in cfg.eval_ranks if r > cfg.max_rank]
        if above:
            raise KdloraError(
                f"--eval-ranks {','.join(map(str, above))} above --max-rank {cfg.max_rank}; list ranks <= {cfg.max_rank}"
            )
    if any(r < 1 for r in cfg.eval_ranks or ()):
        raise KdloraError(f"--eval-ranks must be positive, got {','.join(map(str, cfg.eval_ranks))}")
    if cfg.dtype == "fp16" and not torch.cuda.is_available():
        raise KdloraError(
            "--dtype fp16 needs a CUDA GPU (CPUs compute fp16 slowly and autocast does not support it there); use bf16 or fp32"
        )
    if cfg.dtype == "fp16" and not mode.adapter:
        raise KdloraError("--train full in fp16 would need loss scaling, which kdlora does not do; use --dtype bf16")
    if cfg.inplace_kd and not (mode.nested and cfg.rank_distribution == "sandwich" and cfg.kd_alpha > 0):
        raise KdloraError(
            "--inplace-kd distils a step's smaller ranks from its largest; it needs --train qdylora "
            "--rank-distribution sandwich and a --kd-alpha above 0"
        )
    if mode.adapter and not cfg.evaluate_before:
        raise KdloraError(
            "--no-evaluate-before: an adapter's card compares every rank with the student alone, measured before "
            "training; drop the option (it is for --train full)"
        )
    if cfg.top_layers is not None and (mode.adapter or cfg.top_layers < 1):
        raise KdloraError(
            f"--top-layers {cfg.top_layers}: it trains the last N >= 1 decoder layers of a --train full run "
            "(an adapter's base is frozen whole); give N >= 1 with --train full, or drop it"
        )
    if not mode.adapter and cfg.quantize == "nf4":
        raise KdloraError("--train full updates every weight, which a 4-bit base cannot hold; add --quantize none")
    if not cfg.resume and cfg.checkpoint_dir.exists():
        raise KdloraError(
            f"{cfg.checkpoint_dir} holds an unfinished run for this --out; add --resume to continue it, or delete it"
        )
    require_empty_out(cfg.out)  # the result appears there only when the run is done


def run_distill(cfg: DistillConfig) -> dict:
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from training.data import trimmed
    from training.losses import ChunkedKDLoss, TeacherLogits, check_head_split, final_hidden_states

    validate(cfg)
    mode = MODES[cfg.train]
    accelerator = make_accelerator()
    say = _printer(accelerator)
    teacher, teacher_tokenizer, teacher_ref = load_teacher(cfg, accelerator.device)
    student, tokenizer, nested = build_student(cfg, accelerator.device)
    check_same_vocabulary(teacher, teacher_tokenizer, student, tokenizer)
    data = load_data(cfg, tokenizer, accelerator.num_processes)
    cache = open_cache(cfg, data, teacher, teacher_ref)

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, trainable, cfg.learning_rate)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, cfg.steps // 20)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.steps)
    state = TrainState(data_fingerprint=data.fingerprint)
    if cfg.resume and cfg.checkpoint_dir.exists():
        state = read_checkpoint_state(cfg, data)
        say(f"resuming from step {state.step} ({cfg.checkpoint_dir})")
    # not measured yet: the weights are still the initial ones
    if cfg.evaluate_before and (state.before is None or state.before_samples != cfg.eval_samples):
        state.before, state.teacher = _quality_before(cfg, mode, student, nested, teacher, data, tokenizer)
        state.before_samples = cfg.eval_samples
    for lm in (student, teacher):  # in the precision the steps compute in
        with mixed_precision(cfg, accelerator.device):
            check_head_split(lm, data.train[:1, :8].to(accelerator.device))
    model, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP puts sharded parameters in their place
    if state.step:
        restore_checkpoint(cfg, accelerator, model, optimizer, scheduler)
    loss_fn = ChunkedKDLoss(cfg.kd_alpha, cfg.kd_temperature, cfg.loss_chunk_tokens)
    if cache is not None:  # the cache stands in for the teacher while training; it is loaded again to evaluate
        teacher = None
        gc.collect()
    targets = target_source(cfg, teacher, cache, accelerator.device)
    facts = {
        "processes": accelerator.num_processes,
        "sharded": is_sharded(accelerator),
        "setup_peak_memory_mb": peak_memory_mb(),
    }
    reset_peak_memory()  # from here the peak is the training steps' own

    say(
        f"distilling {teacher_ref} -> {cfg.student} ({cfg.train}, {len(trainable)} trainable tensors, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M params) on {cfg.data}: {len(data.train)} blocks x {cfg.seq_len} tokens"
    )
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc=f"distill ({cfg.train})", disable=not accelerator.is_main_process
    )
    together = cfg.ranks_per_forward(half_precision=cfg.compute_dtype != torch.float32)  # ranks a forward computes
    model.train()
    try:
        while state.step < cfg.steps:
            started = time.perf_counter()
            rows = rows_for_step(len(data.train), state.step, cfg.batch_size, cfg.seed)
            batch, mask = trimmed(*data.train_rows(rows, state.step, cfg.seed))
            mine = slice(
                accelerator.process_index, None, accelerator.num_processes
            )  # this process's share of the batch
            batch, learned = batch[mine].to(accelerator.device), mask[mine, 1:].to(accelerator.device)
            labels = batch[:, 1:][
                learned
            ]  # the loss is on these tokens only (every one of a block, an example's answer)
            target = targets(batch, learned, rows[mine])
            ranks, losses = mode.step_ranks(cfg, state.step), []
            weights = nested.loss_weights(ranks, cfg.rank_weighting) if nested is not None else [1.0]
            for first in range(0, len(ranks), together):  # a pass per `together` ranks; their gradients add up
                group = ranks[first : first + together]
                if nested is not None:  # the batch repeated once per rank of the group, each copy at its rank
                    nested.set_copies(tuple(group), len(batch))
                with mixed_precision(cfg, accelerator.device):
                    with final_hidden_states(student) as head:
                        copies = len(group)
                        hidden = model(batch.repeat(copies, 1)).logits[:, :-1][learned.repeat(copies, 1)]
                    # learned tokens are taken row by row, so each copy's are one contiguous chunk
                    results = [loss_fn(chunk, head, labels, target) for chunk in hidden.chunk(copies)]
                accelerator.backward(sum(loss * w for (loss, _), w in zip(results, weights[first:])))
                losses += [loss.item() for loss, _ in results]
                parts = results[-1][1]
                if cfg.inplace_kd and first == 0:  # ranks run largest first: it teaches the rest of the step
                    target = TeacherLogits(hidden.detach(), head)
            loss = sum(losses) / len(losses)  # parts: of the step's last (smallest) rank
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
            state.seconds += seconds
            state.step += 1
            state.history.append({"step": state.step, "loss": loss, **parts, "ranks": ranks, "seconds": seconds})
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss:.3f}",
                **{k: f"{v:.3f}" for k, v in parts.items()},
                **({"rank": "/".join(map(str, ranks))} if mode.adapter else {}),
                tok_s=f"{batch.numel() * accelerator.num_processes / seconds:.0f}",
            )
            if state.step % cfg.save_every == 0 and state.step < cfg.steps:
                save_checkpoint(cfg, accelerator, model, optimizer, scheduler, state)
    except KeyboardInterrupt:
        save_checkpoint(cfg, accelerator, model, optimizer, scheduler, state)
        say(
            f"\ninterrupted at step {state.step}: checkpoint saved in {cfg.checkpoint_dir}; rerun with --resume to continue"
        )
        raise
    finally:
        bar.close()

    facts["train_peak_memory_mb"] = peak_memory_mb()
    model.eval()
    report = None
    student, nested = whole_student(cfg, accelerator, model, nested)
    if accelerator.is_main_process:
        if teacher is None:
            teacher = load_teacher(cfg, accelerator.device, pinned=teacher_ref)[0]
        after = _evaluate(cfg, student, nested, teacher, data, tokenizer, mode.eval_settings(cfg))
        report = write_result(cfg, mode, student, nested, tokenizer, teacher_ref, data, state, after, facts)
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def load_data(cfg: DistillConfig, tokenizer, processes: int):
    from training.data import load_token_data

    data = load_token_data(cfg.data, tokenizer, cfg.seq_len)
    if len(data.train) < cfg.batch_size:
        raise KdloraError(
            f"data {cfg.data} gives {len(data.train)} training blocks of {cfg.seq_len} tokens, fewer than one batch "
            f"(--batch-size {cfg.batch_size}); give more data or lower --batch-size / --seq-len"
        )
    if cfg.batch_size % processes:
        raise KdloraError(f"--batch-size {cfg.batch_size} must divide evenly over {processes} processes")
    return data


def open_cache(cfg: DistillConfig, data, teacher, teacher_ref):
    """The --teacher-cache, checked against this run (None without one)."""
    if cfg.teacher_cache is None:
        return None
    from training.teacher_cache import TeacherCache, refuse_rewordings

    refuse_rewordings(data)

    cache = TeacherCache(
        Path(cfg.teacher_cache), data, cfg.kd_temperature, teacher.get_output_embeddings().weight.shape[0]
    )
    if cache.teacher != teacher_ref:  # a revision too: a cache from `main` is stale once main moves
        raise KdloraError(
            f"--teacher-cache {cfg.teacher_cache} was made from teacher {cache.teacher}, this run's teacher is "
            f"{teacher_ref}; give the same --teacher (it evaluates), or rebuild the cache"
        )
    return cache


def target_source(cfg: DistillConfig, teacher, cache, device):
    """Where each step's KD targets come from, as `targets(batch, learned, rows)`: the cache, the teacher's forward
    (its final hidden states at the learned tokens; ChunkedKDLoss applies its head chunk by chunk), or nowhere
    (--kd-alpha 0: plain fine-tuning on the labels, no teacher forward)."""
    from training.losses import TeacherLogits, final_hidden_states

    if cache is not None:
        return lambda batch, learned, rows: cache.targets(rows, device)
    if cfg.kd_alpha == 0:
        return lambda batch, learned, rows: None

    def online(batch, learned, rows):
        with torch.no_grad(), final_hidden_states(teacher) as head:
            return TeacherLogits(teacher(batch).logits[:, :-1][learned], head)

    return online


def _quality_before(cfg, mode: Mode, student, nested, teacher, data, tokenizer) -> tuple[dict, dict | None]:
    """(the student alone, the teacher's own task metrics on labelled data or None), before training. The teacher's
    are an adapter card's row (kdlora.json); a full run's report has no place for them, so they are not measured."""
    from training.evaluate import choice_accuracy

    alone = _evaluate(cfg, student, nested, teacher, data, tokenizer, [mode.alone])[mode.alone]
    labelled = _labelled_examples(cfg, data)
    if not (labelled and mode.adapter):
        return alone, None
    measured = _teacher_measured_there(cfg, data)
    if measured is not None:
        return alone, measured
    own = choice_accuracy(teacher, labelled, [None], lambda _: None, cfg.eval_batch_size)
    _add_unseen_wording(cfg, data, teacher, [None], lambda _: None, own)
    return alone, own[None]


def _teacher_measured_there(cfg, data) -> dict | None:
    """The teacher's task metrics from its own distill_report.json, when the run that made it (e.g. the quickstart's
    task teacher) ended by evaluating these very articles: the same data (fingerprint), count, length and seed.
    Measuring them again cost ~30 s of a quickstart. None: measure (a teacher from the Hub, or other articles)."""
    report_path = Path(cfg.teacher) / "distill_report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    made, after = report.get("config", {}), report.get("after", {}).get("None", {})
    same_articles = (
        report.get("mode") == "full"
        and report.get("data_fingerprint") == data.fingerprint
        and report.get("heldout_blocks_evaluated") == min(cfg.eval_samples, len(data.heldout))
        and (made.get("seq_len"), made.get("seed")) == (cfg.seq_len, cfg.seed)
    )
    if not (same_articles and "task_outcomes" in after):
        return None
    return {"task_metrics": after["task_metrics"], "task_outcomes": after["task_outcomes"]}


def mixed_precision(cfg: DistillConfig, device):
    """In bf16, fp32 weights compute in bf16 (autocast; checkpointed chunks recompute under the same state), as
    transformers' Trainer does with bf16=True: full training's weights, and an adapter's, which PEFT keeps in fp32
    on a base loaded in bf16 (without it the LoRA matmuls ran in fp32: ~28% of a pass on an AVX512-BF16 CPU,
    benchmarks/RESULTS.md). fp16 is never autocast: its small gradients would need loss scaling."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.compute_dtype == torch.bfloat16)


def load_teacher(cfg: DistillConfig, device, pinned=None):
    """`pinned`: the teacher this run loaded first, loaded again at the same Hub commit (`main` may have moved since)."""
    from training.teacher import load_causal_lm

    spec = str(pinned) if pinned is not None and pinned.revision else cfg.teacher
    teacher, tokenizer, teacher_ref = load_causal_lm(
        spec, dtype=cfg.compute_dtype, device=device, quantize=cfg.teacher_quantize
    )
    return teacher.requires_grad_(False), tokenizer, teacher_ref


def make_optimizer(name: str, params: list, lr: float):
    if name == "adamw":
        # fused: one kernel a tensor for weight, gradient and both states (transformers' Trainer default,
        # adamw_torch_fused) where PyTorch has it; the CPU default loops ~10 elementwise passes over each tensor
        # (135M parameters on a 2-core CPU: 0.22 s a step vs 0.07 s fused, benchmarks/optimizer_bench.py)
        fused = {p.device.type for p in params} <= {"cpu", "cuda"}
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)
    import bitsandbytes as bnb  # 8-bit states for tensors of >= 4096 elements, 32-bit for smaller ones

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name](
        params, lr=lr, weight_decay=0.0
    )


def build_student(cfg: DistillConfig, device):
    """(model to train, tokenizer, NestedRank or None). Adapters sit on a frozen base, NF4 if asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.nf4 import quantization_config
    from training.teacher import attention_kernel

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.student)
        adapters = MODES[cfg.train].adapter
        quantization = quantization_config(cfg.quantize if adapters else "none", cfg.compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.student,
            dtype=cfg.compute_dtype if adapters else torch.float32,
            quantization_config=quantization,
            use_safetensors=True,
            device_map={"": device} if quantization else None,
            attn_implementation=attention_kernel(device, cfg.compute_dtype),
        )
    except OSError as err:
        raise KdloraError(
            f"cannot load student '{cfg.student}' ({str(err).splitlines()[0]}); give the checkpoint directory "
            "`kdlora prune` wrote, or a Hub id"
        ) from err
    if quantization is None:
        model.to(device)
    else:
        from training.nf4 import keep_trainable

        keep_trainable(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not adapters:
        if cfg.top_layers is not None:
            train_top_layers(model, cfg.top_layers)
        return model, tokenizer, None
    from peft import LoraConfig, get_peft_model

    from training.nested_lora import NestedRank

    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # LoRA's A is randomly initialised: the same seed, the same run
    rank = MODES[cfg.train].rank(cfg)
    model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.rslora,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    return model, tokenizer, NestedRank(model)


def train_top_layers(model, n: int) -> None:
    """Leave only the last `n` decoder layers, the final norm and an untied head trainable. Nothing below the
    lowest trained layer needs a gradient, so the backward stops there: the quickstart's task teacher, its top 15
    of 30 layers at 3x the learning rate, took 2.2 s a step against 3.8 s and reached the same accuracy
    (benchmarks/RESULTS.md, "The task teacher's top layers")."""
    layers = model.get_decoder().layers
    if not 1 <= n <= len(layers):
        raise KdloraError(f"--top-layers {n}: the student has {len(layers)} decoder layers; give 1 to {len(layers)}")
    model.get_input_embeddings().requires_grad_(False)  # and a head tied to them
    for layer in layers[: len(layers) - n]:
        layer.requires_grad_(False)


def check_same_vocabulary(teacher, teacher_tokenizer, student, tokenizer) -> None:
    """KD compares distributions token by token: both models must share one vocabulary."""
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise KdloraError(
            "teacher and student tokenizers differ: distillation compares next-token distributions position by position, "
            "so both must use the same vocabulary; prune the student from this teacher (kdlora prune) or pick a matching teacher"
        )
    t_vocab, s_vocab = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if t_vocab != s_vocab:
        raise KdloraError(
            f"teacher has {t_vocab} output logits but the student {s_vocab}; they must match for distillation"
        )


def rows_for_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The training rows of `step`'s global batch: epochs are seeded permutations, so any step can be rebuilt on resume."""
    first = step * batch_size
    indices = []
    while len(indices) < batch_size:
        position = first + len(indices)
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch_size - len(indices), n - offset)
        indices += order[offset : offset + take].tolist()
    return indices


def _evaluate(cfg, model, nested, teacher, data, tokenizer, settings) -> dict:
    """Per setting, on the first `eval_samples` held-out rows: KL / top-1 agreement / perplexity on the tokens the
    loss covers, and `task_metrics` with their per-example scores (`task_outcomes`): accuracy for labelled
    examples (and in their unseen wording, if they have one); otherwise how well greedy answers match the teacher's
    (examples: to each prompt; blocks: to each block's first half, seq_len / 4 tokens)."""
    was_training = model.training
    model.eval()
    with mixed_precision(cfg, next(model.parameters()).device):  # evaluated in the dtype it trains in
        results = _evaluate_settings(cfg, model, nested, teacher, data, tokenizer, settings)
    model.train(was_training)
    return results


def _evaluate_settings(cfg, model, nested, teacher, data, tokenizer, settings) -> dict:
    from training.evaluate import choice_accuracy, greedy_agreement, quality_against_teacher, single_token_choices

    configure = nested.set if nested is not None else (lambda setting: None)
    rows, masks = data.heldout[: cfg.eval_samples], data.heldout_mask[: cfg.eval_samples]
    examples = (data.heldout_examples or [])[: cfg.eval_samples]
    labelled = _labelled_examples(cfg, data)
    one_forward = bool(labelled) and single_token_choices(labelled)  # accuracy from the KL forward: no second one
    results = quality_against_teacher(
        model,
        teacher,
        rows,
        masks,
        settings,
        configure,
        cfg.eval_batch_size,
        examples=labelled if one_forward else None,
    )
    if one_forward:
        task = {}
    elif labelled:
        task = choice_accuracy(model, labelled, settings, configure, batch_size=cfg.eval_batch_size)
    elif examples:
        task = greedy_agreement(
            model,
            teacher,
            [e.prompt for e in examples],
            settings,
            configure,
            new_tokens=max(len(e.answer) for e in examples),
            eos_token_id=tokenizer.eos_token_id,
        )
    else:
        task = greedy_agreement(
            model,
            teacher,
            rows[:, : cfg.seq_len // 2].tolist(),
            settings,
            configure,
            new_tokens=max(1, cfg.seq_len // 4),
            eos_token_id=tokenizer.eos_token_id,
        )
    for setting, metrics in task.items():
        results[setting].update(metrics)
    _add_unseen_wording(cfg, data, model, settings, configure, results)
    return results


def _add_unseen_wording(cfg, data, model, settings, configure, results) -> None:
    """Labelled data with an unseen wording: each setting's accuracy on the held-out examples asked in it, as task
    metric UNSEEN_WORDING_ACCURACY beside `accuracy` (the same examples, in the wording training used)."""
    from training.evaluate import UNSEEN_WORDING_ACCURACY, choice_accuracy

    unseen = (data.unseen_examples or [])[: cfg.eval_samples]
    if not (unseen and unseen[0].choices):
        return
    for setting, task in choice_accuracy(model, unseen, settings, configure, cfg.eval_batch_size).items():
        results[setting].setdefault("task_metrics", {})[UNSEEN_WORDING_ACCURACY] = task["task_metrics"]["accuracy"]
        results[setting].setdefault("task_outcomes", {})[UNSEEN_WORDING_ACCURACY] = task["task_outcomes"]["accuracy"]


def _labelled_examples(cfg, data) -> list:
    examples = (data.heldout_examples or [])[: cfg.eval_samples]
    return examples if examples and examples[0].choices else []


# --- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(cfg, accelerator, model, optimizer, scheduler, state) -> None:
    from safetensors.torch import save_file

    weights, optimizer_state = gather_training_state(model, optimizer)  # every process takes part (FSDP: shards)
    if accelerator.is_main_process:
        with atomic_dir(cfg.checkpoint_dir, replace=True) as tmp:
            names = {
                name for name, _ in accelerator.unwrap_model(model).named_parameters()
            }  # tied weights once, as parameters list them
            save_file(
                {name: t.contiguous() for name, t in weights.items() if name in names}, tmp / "trainable.safetensors"
            )
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({**asdict(state), "config": cfg.fingerprint()}, indent=1))
    accelerator.wait_for_everyone()


def read_checkpoint_state(cfg, data) -> TrainState:
    """The checkpoint's TrainState, refused when it was made with other settings or data (weights:
    restore_checkpoint)."""
    state = json.loads((cfg.checkpoint_dir / "state.json").read_text())
    saved, now = state.pop("config"), cfg.fingerprint()
    changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise KdloraError(
            f"--resume: the checkpoint in {cfg.checkpoint_dir} was made with other settings ({details}); "
            "rerun with the original settings, or delete the checkpoint to start over"
        )
    if state.get("data_fingerprint") != data.fingerprint:
        raise KdloraError(
            f"--resume: the checkpoint in {cfg.checkpoint_dir} was made from other data than {cfg.data} gives now (or "
            "by a kdlora that did not record it); delete the checkpoint to start over"
        )
    return TrainState(**state)


def restore_checkpoint(cfg, accelerator, model, optimizer, scheduler) -> None:
    """Weights, optimizer and scheduler from the checkpoint, into the prepared (possibly sharded) model."""
    from safetensors.torch import load_file

    # our own file (never one from a hub), and weights_only refuses anything but tensors and containers
    saved = torch.load(cfg.checkpoint_dir / "optimizer.pt", weights_only=True)
    if any(
        isinstance(key, int) for key in saved["optimizer"].get("state", {})
    ):  # torch's own form: parameters by position
        raise KdloraError(
            f"--resume: {cfg.checkpoint_dir} was written by an older kdlora (optimizer state by parameter position, "
            "not by name); delete it to start over, or finish the run with that version"
        )
    weights, optimizer_state = ({}, {})
    if accelerator.is_main_process:  # read once, sent to the other processes
        weights, optimizer_state = load_file(cfg.checkpoint_dir / "trainable.safetensors"), saved["optimizer"]
    restore_training_state(model, optimizer, weights, optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])


def whole_student(cfg, accelerator, model, nested):
    """(trained student, its NestedRank) whole on the main process, to evaluate and write; every process calls it.
    Under FSDP each process holds a shard and the sharded model runs only with all of them, so the main process
    builds a fresh student and loads the gathered trainable weights into it."""
    if not is_sharded(accelerator):
        return accelerator.unwrap_model(model), nested
    weights, _ = gather_training_state(model)
    if not accelerator.is_main_process:
        return None, None
    student, _, nested = build_student(cfg, accelerator.device)
    missing = {n for n, p in student.named_parameters() if p.requires_grad} - weights.keys()
    assert not missing, f"the gathered state lacks {sorted(missing)[:3]}"
    student.load_state_dict(weights, strict=False)
    return student, nested


# --- the result ------------------------------------------------------------------------------------


def write_result(
    cfg, mode: Mode, student, nested, tokenizer, teacher_ref, data, state: TrainState, after, facts
) -> dict:
    steps = state.history
    report = {
        "mode": mode.name,
        "teacher": teacher_ref.id,
        "teacher_revision": teacher_ref.revision,
        "student": str(cfg.student),
        "config": cfg.fingerprint(),
        "data_fingerprint": data.fingerprint,
        "train_blocks": len(data.train),
        "heldout_blocks_evaluated": min(cfg.eval_samples, len(data.heldout)),
        "steps": state.step,
        "tokens": state.step * cfg.batch_size * cfg.seq_len,
        "seconds_training": state.seconds,
        "mean_step_seconds": state.seconds / max(1, state.step),
        # whole run (teacher, evaluation included) and training steps alone (this session's, on a resumed run)
        "peak_memory_mb": max(peak_memory_mb(), facts["setup_peak_memory_mb"]),
        "train_peak_memory_mb": facts["train_peak_memory_mb"],
        "processes": facts["processes"],
        "sharded": facts["sharded"],  # DDP or FSDP; the peaks are the main process's
        "before": state.before,
        "after": {str(k): v for k, v in after.items()},
        "final_loss": steps[-1]["loss"] if steps else None,
        "history": steps,
    }
    with atomic_dir(cfg.out) as tmp:
        if not mode.adapter:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if (Path(cfg.student) / PRUNING_REPORT).is_file():  # lineage: a healed student keeps its pruning report
                shutil.copy2(Path(cfg.student) / PRUNING_REPORT, tmp / PRUNING_REPORT)
        else:
            nested.remove()
            student.save_pretrained(tmp)
            _write_metadata(cfg, mode, tmp, teacher_ref, data, state, after)
        (tmp / "distill_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _write_metadata(cfg, mode: Mode, out: Path, teacher_ref, data, state: TrainState, after) -> None:
    from hub.adapter import adapter_bytes, read_adapter
    from hub.card import PLOT_FILE, adapter_card, plot_quality_vs_rank
    from hub.schema import ModelRef, Quality, RankMetadata, RankResult, TrainingRecipe, UsageExample

    metadata = RankMetadata(
        max_rank=mode.rank(cfg),
        default_rank=_default_rank(cfg, mode, after),
        nested=mode.nested,
        base_model=ModelRef(id=str(cfg.student)),
        teacher=teacher_ref,
        base_quality=Quality(**state.before),
        teacher_quality=Quality(**state.teacher) if state.teacher else None,
        recipe=TrainingRecipe(
            method="kd-qdylora" if mode.nested else "kd-lora",
            quantization=cfg.quantize,
            kd_temperature=cfg.kd_temperature,
            kd_alpha=cfg.kd_alpha,
            rank_distribution=cfg.rank_distribution if mode.nested else None,
            rank_weighting=cfg.rank_weighting if mode.nested and cfg.rank_distribution == "sandwich" else None,
            steps=state.step,
            tokens=state.step * cfg.batch_size * cfg.seq_len,
            learning_rate=cfg.learning_rate,
            seed=cfg.seed,
            data=cfg.data,
            data_fingerprint=data.fingerprint,
        ),
        usage_example=UsageExample(prompt=data.heldout_text.prompt, completion=data.heldout_text.completion)
        if data.heldout_text
        else None,
    )
    metadata.save(out)  # written first so read_adapter can check the tensors against it
    adapter = read_adapter(out)
    metadata.ranks = [RankResult(rank=k, adapter_bytes=adapter_bytes(adapter, k), **after[k]) for k in sorted(after)]
    metadata.save(out)
    plot = plot_quality_vs_rank(metadata, out / PLOT_FILE)
    adapter_card(metadata, Path(cfg.out).name, str(cfg.student), plot=PLOT_FILE if plot else None).save(
        out / "README.md"
    )


def _default_rank(cfg, mode: Mode, after) -> int:
    """The smallest evaluated rank within 10% of the best held-out KL: most of the quality, least cost."""
    if not mode.nested:
        return mode.rank(cfg)
    best = min(v["kl_to_teacher"] for v in after.values())
    # abs: a student that matches its teacher measures a KL of 0 or a rounding error below it
    return min(k for k, v in after.items() if v["kl_to_teacher"] - best <= 0.1 * abs(best))


def _printer(accelerator):
    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)

    return say
