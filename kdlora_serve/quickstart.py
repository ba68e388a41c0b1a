"""`kdlora quickstart`: the whole system on the embedded default, offline, the way a new user meets it.

KD-LoRA's setting on a task users can check (BBC News topics, 5 classes). From the teacher
(SmolLM2-135M-Instruct): a task teacher (the teacher fine-tuned on the labels), and a student (the
teacher pruned to ~half, healed on generic text: it knows language, not the task). Then ONE QDyLoRA
adapter (max rank 64) distilled from the task teacher into the student -> push to a local directory hub
(and to $HF_ENDPOINT if set) -> kdlora serve -> every evaluated rank and budget requests through the
`openai` client -> a table (accuracy and cost per rank) and plots.

Every stage writes its result atomically under --out and is skipped when that result exists; the two
distillation stages resume from their checkpoints, so an interrupted quickstart continues where it was.
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TASK = "builtin:bbc-news"
PROMPT = "Explain what a Python list comprehension is."
TOKENS = 32  # generated per throughput probe (ignore_eos: every rank generates the same length)


@dataclass(frozen=True)
class Plan:
    calib_samples: int
    teacher_steps: int  # task teacher: batch 16, labels only
    heal_steps: int
    adapter_steps: int  # batch 8, sandwich ranks
    eval_samples: int  # held-out task examples per evaluation
    eval_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


# fast: benchmarks/task_bench.py's settings but 120 adapter steps, not 80: +0.04 to +0.13 accuracy at every rank
# (paired, same articles), unseen wording at rank 64 90.0% / 93.8% of the teacher on two seeds, for ~3 min
# (benchmarks/RESULTS.md, "The first run": 120 adapter steps)
PLANS = {
    "smoke": Plan(
        calib_samples=16, teacher_steps=2, heal_steps=2, adapter_steps=2, eval_samples=8, eval_ranks=(1, 8, 64)
    ),  # tests only
    # eval_samples 222: every held-out article (a tenth of 2,225); one article moves accuracy by 0.0045
    "fast": Plan(
        calib_samples=64, teacher_steps=60, heal_steps=30, adapter_steps=120, eval_samples=222
    ),  # 52 min measured on 2 AVX2-only cores with 100 articles (README "Times")
    "full": Plan(
        calib_samples=256, teacher_steps=120, heal_steps=250, adapter_steps=400, eval_samples=222
    ),  # never run as it is now: no measured time
}
STAGES = 7
# The task teacher trains the top half of SmolLM2's 30 layers at 3e-4: the accuracy of every weight at 1e-4 (0.941 on
# the 222 articles, both wordings alike), 2.2 s a step against 3.8 (benchmarks/RESULTS.md, "The task teacher's top
# layers"). At 1e-4 the top half reached 0.905.
TEACHER_TOP_LAYERS = 15


DTYPE_REASONS = {
    "bf16": "this CPU computes bf16 natively: 1.7-2.9x fp32's speed, benchmarks/dtype_bench.py",
    "auto": "a GPU: bf16 where it has it",
    "fp32": "this CPU emulates bf16, slower than fp32",
}


def training_dtype() -> str:
    """The distillation stages' --dtype: bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16 / AMX),
    fp32 on one that emulates it (AVX2-only); on a GPU, distill's own auto (bf16 where the GPU has it). The
    ladder therefore differs, within its noise, between the two kinds of CPU."""
    import torch

    from kdlora_serve.engine import native_bf16

    if torch.cuda.is_available():
        return "auto"
    return "bf16" if native_bf16() else "fp32"


class _StageClock:
    """Prints each stage's header, and the time the last stage took when the next begins (quickstart.json keeps
    them: where a first run's time goes). A stage whose result was already there takes ~0 s."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._running: tuple[str, float] | None = None

    def start(self, number: int, name: str, title: str) -> None:
        self.stop()
        print(f"\n[{number}/{STAGES}] {title}", file=sys.stderr, flush=True)
        self._running = (name, time.perf_counter())

    def stop(self) -> None:
        if self._running:
            name, started = self._running
            self.seconds[name] = round(time.perf_counter() - started, 1)
            print(f"      {name}: {self.seconds[name] / 60:.1f} min", file=sys.stderr, flush=True)
            self._running = None


def run_quickstart(out: Path, mode: str = "fast") -> int:
    from hub.card import rank_gain
    from hub.remote import push
    from hub.schema import load_metadata
    from training.distill import DistillConfig, run_distill
    from training.prune import run_prune
    from training.teacher import embedded_teacher

    plan, out, clock, dtype = PLANS[mode], Path(out).resolve(), _StageClock(), training_dtype()
    out.mkdir(parents=True, exist_ok=True)
    print(f"training and evaluating in {dtype} ({DTYPE_REASONS[dtype]})", file=sys.stderr)
    clock.start(1, "teacher export", "embedded teacher (exported once into the cache)")
    teacher = embedded_teacher()

    clock.start(
        2,
        "task teacher",
        f"the task teacher: fine-tune its top {TEACHER_TOP_LAYERS} layers on BBC News topics (labels only), "
        f"{plan.teacher_steps} steps",
    )
    task_teacher = out / "teacher-bbc"
    if not (task_teacher / "distill_report.json").exists():
        run_distill(
            DistillConfig(
                student=str(teacher),
                teacher=str(teacher),
                out=task_teacher,
                data=TASK,
                train="full",
                quantize="none",
                kd_alpha=0.0,
                steps=plan.teacher_steps,
                top_layers=TEACHER_TOP_LAYERS,
                batch_size=16,
                seq_len=128,
                lr=3e-4,
                eval_samples=plan.eval_samples,
                evaluate_before=False,  # the teacher zero-shot: nothing here reads it (~45 s)
                dtype=dtype,
                resume=True,
            )
        )
    clock.start(3, "prune", "prune the (original) teacher to ~50% of its parameters")
    pruned = out / "student-pruned"
    if not (pruned / "pruning_report.json").exists():
        run_prune(pruned, target_params="0.5", calib_samples=plan.calib_samples, seq_len=128)
    clock.start(
        4,
        "heal",
        f"heal the pruned student on generic text (builtin:pydoc): full-parameter distillation, {plan.heal_steps} steps",
    )
    student = out / "student"
    if not (student / "distill_report.json").exists():
        # lr: healing a half-pruned student wants far more than fine-tuning's 2e-5 (benchmarks/student_bench.py:
        # after 50 steps KL 1.43 at 1e-3, 1.71 at 1e-4; distill_bench: 2.71 at 2e-5 after 30)
        run_distill(
            DistillConfig(
                student=str(pruned),
                out=student,
                train="full",
                quantize="none",
                steps=plan.heal_steps,
                seq_len=128,
                lr=5e-4,
                eval_samples=16,
                dtype=dtype,
                resume=True,
            )
        )
    clock.start(
        5,
        "adapter",
        f"distil the task into ONE nested-rank adapter (QDyLoRA, NF4 base, max rank 64, sandwich ranks), {plan.adapter_steps} steps",
    )
    adapter = out / "adapter"
    if not (adapter / "distill_report.json").exists():
        # sandwich: ranks 64 and 1 train every step, so neither end of the ladder is starved in a short run
        # (benchmarks/RESULTS.md, BBC section: uniform sampling gave 0.22-0.61 across ranks, sandwich 0.67-0.79)
        run_distill(
            DistillConfig(
                student=str(student),
                teacher=str(task_teacher),
                out=adapter,
                data=TASK,
                train="qdylora",
                max_rank=64,
                quantize="nf4",
                rank_distribution="sandwich",
                steps=plan.adapter_steps,
                batch_size=8,
                seq_len=128,
                lr=1e-3,
                eval_ranks=plan.eval_ranks,
                eval_samples=plan.eval_samples,
                dtype=dtype,
                resume=True,
            )
        )

    clock.start(
        6,
        "publish",
        "publish student + adapter to the local directory hub"
        + (" and $HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else ""),
    )
    hub = out / "hub" / "kdlora"
    published = hub / "smollm2-half-qdylora"
    for where in push(
        adapter, str(published), student=student, student_repo=str(hub / "smollm2-half"), materialize_ranks=[8]
    ):
        print(f"      {where}", file=sys.stderr)
    if os.environ.get("HF_ENDPOINT"):
        namespace = os.environ.get("KDLORA_QUICKSTART_NAMESPACE", "kdlora")
        for where in push(
            adapter, f"{namespace}/smollm2-half-qdylora", student=student, student_repo=f"{namespace}/smollm2-half"
        ):
            print(f"      {where}", file=sys.stderr)

    clock.start(
        7, "serve and query", "serve with vLLM (kdlora serve) and query every evaluated rank through the openai client"
    )
    meta = load_metadata(published)
    rows, budgets = _serve_and_query(published, meta, out)
    clock.stop()
    if meta.teacher_quality:  # the task teacher: its accuracy on the same articles, not served
        rows.append({"rank": None, "quality": meta.teacher_quality})
    for row in rows:
        row["evidence"] = _accuracy_evidence(row["quality"], rank_1=meta.ranks[0], alone=meta.base_quality)
    print("\n" + _table(published, rows))
    gain = rank_gain(meta, "accuracy")
    print(gain or "no per-article scores in this adapter's kdlora.json: retrain it to see intervals")
    print(_unseen_wording_line(rows))
    for budget in budgets:
        print(
            f"budget request {budget['asked']} -> served at rank {budget['rank']} (budget met: {budget['met']}), "
            f"answer {budget['answer']!r} (label {budget['label']!r})"
        )
    _plot(rows, out / "quickstart.png")
    numbers = out / "quickstart.json.partial"  # written whole, then renamed: never half a file
    numbers.write_text(json.dumps(_table_json(rows, gain, budgets, clock.seconds), indent=1, default=str))
    os.replace(numbers, out / "quickstart.json")
    print(
        f"\nplots: {published / 'quality_vs_rank.png'}, {out / 'quickstart.png'} (numbers: {out / 'quickstart.json'})"
    )
    print(f"adapter: {published}")
    return 0


def _serve_and_query(adapter: Path, meta, out: Path):
    from openai import OpenAI

    from kdlora_serve.serve import start_background

    server, url = start_background(
        ["--adapter", str(adapter), "--", "--served-model-name", "student", "--max-model-len", "1024"],
        out / "serve.log",
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    )
    try:
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        rows = [{"rank": 0, "quality": meta.base_quality, "tok_s": _tok_s(client, "student")}]
        for result in meta.ranks:
            rows.append(
                {
                    "rank": result.rank,
                    "quality": result,
                    "tok_s": _tok_s(client, f"{adapter.name}@r{result.rank}"),
                    "mb": (result.adapter_bytes or 0) / 1e6,
                }
            )
        # accuracy floors alone (the smallest rank meeting each: the lowest rank's accuracy, the best), then a
        # floor with a cost bound (the largest rank within it); floored to 3 digits so the rank that set a floor meets it
        accuracy = [r.task_metrics["accuracy"] for r in meta.ranks]
        low, high = (math.floor(value * 1000) / 1000 for value in (accuracy[0], max(accuracy)))
        asked = [
            {"min_quality": low, "quality_metric": "accuracy"},
            {"min_quality": high, "quality_metric": "accuracy"},
            {"max_rank": 16, "min_quality": low, "quality_metric": "accuracy"},
        ]
        example = _task_example()
        budgets = []
        for budget in asked:
            raw = client.completions.with_raw_response.create(
                model=adapter.name, prompt=example.prompt, max_tokens=3, temperature=0.0, extra_body={"kdlora": budget}
            )
            budgets.append(
                {
                    "asked": budget,
                    "rank": int(raw.headers["x-kdlora-rank"]),
                    "met": raw.headers["x-kdlora-budget-met"],
                    "answer": raw.parse().choices[0].text,
                    "label": example.completion,
                }
            )
        return rows, budgets
    finally:
        server.terminate()
        server.wait(timeout=120)


def _task_example():
    """A BBC News article the adapter never trained on (the held-out split's first), as its prompt and label."""
    from training.data import load_records, split_rows

    records = load_records(TASK)
    return records[int(split_rows(len(records))[0][0])]


def _tok_s(client, model: str) -> float:
    """Warm throughput: the rank is loaded first (its cold start is not decode cost)."""
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=1)
    started = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    return reply.usage.completion_tokens / (time.perf_counter() - started)


def _accuracy_evidence(quality, rank_1, alone) -> dict:
    """Accuracy with its 95% interval, its paired differences to rank 1 and to the student alone (the same
    held-out articles, so the noise they share cancels: hub/intervals.py), and the accuracy on those articles asked
    in a wording training never used. None where scores per article are missing (an adapter from before kdlora kept
    them)."""
    from hub.intervals import paired_difference
    from training.evaluate import UNSEEN_WORDING_ACCURACY

    def scores(q):
        return q.scores("accuracy") if q else None

    mine = scores(quality)
    return {
        "interval": quality.interval("accuracy"),
        "unseen_wording": quality.interval(UNSEEN_WORDING_ACCURACY),
        **{
            name: paired_difference(mine, scores(other)) if mine and scores(other) and other is not quality else None
            for name, other in (("vs_rank_1", rank_1), ("vs_student_alone", alone))
        },
    }


def _unseen_wording_line(rows) -> str:
    """The top rank's accuracy in the unseen wording as a share of the task teacher's in that same wording."""
    top = max((row for row in rows if row["rank"]), key=lambda row: row["rank"])
    teacher = next((row for row in rows if row["rank"] is None), None)
    mine, theirs = (r["evidence"]["unseen_wording"] if r else None for r in (top, teacher))
    if mine is None:
        return "unseen wording: not evaluated (data without one, or an adapter trained before kdlora asked it)"
    share = f": {mine.mean / theirs.mean:.1%} of the teacher's accuracy" if theirs and theirs.mean > 0 else ""
    teacher_part = f"the task teacher {theirs.mean:.3f}" if theirs else "the task teacher was not asked it"
    return f"unseen wording (never trained on): rank {top['rank']} {mine.mean:.3f}, {teacher_part}{share}"


def _table_json(rows, gain: str | None, budgets, stage_seconds: dict[str, float]) -> dict:
    """The printed table's numbers (tok/s included, which the plot alone showed before), the budget answers and
    each stage's seconds (this run's: a reused stage's are ~0)."""
    from dataclasses import asdict

    def evidence(row):
        return {name: asdict(e) if e else None for name, e in row["evidence"].items()}

    served = [row for row in rows if row["rank"] is not None]
    teacher = next((row for row in rows if row["rank"] is None), None)
    return {
        "ranks": [
            {
                "rank": row["rank"],
                "accuracy": row["quality"].task_metrics["accuracy"],
                **evidence(row),
                "articles": len((row["quality"].task_outcomes or {}).get("accuracy", [])),
                "kl_to_teacher": row["quality"].kl_to_teacher,
                "tok_s": row["tok_s"],
                "adapter_mb": row.get("mb", 0),
            }
            for row in served
        ],
        "task_teacher_accuracy": teacher["quality"].task_metrics.get("accuracy") if teacher else None,
        "task_teacher": evidence(teacher) if teacher else None,
        "rank_gain": gain,
        "budgets": budgets,
        "stage_seconds": stage_seconds,
    }


def _table(adapter: Path, rows) -> str:
    lines = [
        f"{adapter.name}: held-out BBC News topic accuracy [95% interval, bootstrap over articles], its paired "
        "differences, accuracy on the same articles asked in a wording training never used, KL to the task teacher "
        f"(answer token) per rank, served throughput (1 request, {TOKENS} tokens)",
        "| rank | accuracy | vs rank 1 (paired) | vs student alone (paired) | unseen wording | KL to teacher | tok/s "
        "| adapter MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        q, evidence = row["quality"], row["evidence"]
        name = {None: "task teacher (135M)", 0: "0 (student alone)"}.get(row["rank"], str(row["rank"]))
        accuracy = evidence["interval"] or f"{q.task_metrics['accuracy']:.3f}"
        differences = [e.signed() if e else "–" for e in (evidence["vs_rank_1"], evidence["vs_student_alone"])]
        kl = "0" if row["rank"] is None else f"{q.kl_to_teacher:.3f}"
        speed = "–" if row["rank"] is None else f"{row['tok_s']:.1f}"
        size = "–" if row["rank"] is None else f"{row.get('mb', 0):.2f}"
        unseen = evidence["unseen_wording"] or "–"
        lines.append(f"| {name} | {accuracy} | {' | '.join(differences)} | {unseen} | {kl} | {speed} | {size} |")
    return "\n".join(lines)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hub.card import error_bars

    ranked = [r for r in rows if r["rank"]]
    fig, quality_axis = plt.subplots(figsize=(6, 4.0), dpi=120)
    ranks = [r["rank"] for r in ranked]
    nan = float("nan")
    for key, title, style, color in (
        ("interval", "held-out accuracy", "o-", "tab:green"),
        ("unseen_wording", "in a wording never trained on", "^:", "tab:orange"),
    ):
        intervals = [r["evidence"][key] for r in ranked]
        if key == "interval":
            means = [r["quality"].task_metrics["accuracy"] for r in ranked]
        elif any(intervals):
            means = [nan if e is None else e.mean for e in intervals]
        else:
            continue  # no unseen wording: no line
        quality_axis.errorbar(
            ranks,
            means,
            yerr=error_bars(means, intervals),
            fmt=style,
            color=color,
            capsize=3,
            label=f"{title}, 95% interval",
        )
    quality_axis.set_xscale("log", base=2)
    quality_axis.set_xticks(ranks, [str(r) for r in ranks])
    quality_axis.set_xlabel("rank served (one nested adapter)")
    quality_axis.set_ylabel("BBC News topic accuracy", color="tab:green")
    speed = quality_axis.twinx()
    speed.plot(ranks, [r["tok_s"] for r in ranked], "s--", color="tab:blue", label="served tok/s")
    speed.set_ylabel("tok/s (1 request)", color="tab:blue")
    # the student alone and the teacher are named, not drawn: lines far outside the ranks' range flatten them
    named = {r["rank"]: r for r in rows if not r["rank"]}
    alone, teacher = named[0], named.get(None)
    teacher_accuracy = teacher["quality"].task_metrics.get("accuracy", nan) if teacher else nan
    quality_axis.set_title(
        f"quickstart: quality and cost per rank\nstudent alone: accuracy {alone['quality'].task_metrics['accuracy']:.3f}, "
        f"{alone['tok_s']:.1f} tok/s\ntask teacher: accuracy {teacher_accuracy:.3f}"
        + (
            f" ({unseen.mean:.3f} unseen wording)"
            if teacher and (unseen := teacher["evidence"]["unseen_wording"])
            else ""
        ),
        fontsize=9,
    )
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    plt.close(fig)
