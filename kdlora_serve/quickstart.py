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


# fast = benchmarks/task_bench.py's settings, so its two seeds are this run's run-to-run noise
PLANS = {
    "smoke": Plan(
        calib_samples=16, teacher_steps=2, heal_steps=2, adapter_steps=2, eval_samples=8, eval_ranks=(1, 8, 64)
    ),  # tests only
    "fast": Plan(
        calib_samples=64, teacher_steps=60, heal_steps=30, adapter_steps=80, eval_samples=100
    ),  # 52 min measured on 2 AVX2-only cores (README "Times")
    "full": Plan(
        calib_samples=256, teacher_steps=120, heal_steps=250, adapter_steps=400, eval_samples=222
    ),  # never run as it is now: no measured time
}
STAGES = 7


def _stage(number: int, title: str) -> None:
    print(f"\n[{number}/{STAGES}] {title}", file=sys.stderr, flush=True)


def run_quickstart(out: Path, mode: str = "fast") -> int:
    from hub.remote import push
    from hub.schema import load_metadata
    from training.distill import DistillConfig, run_distill
    from training.prune import run_prune
    from training.teacher import embedded_teacher

    plan, out = PLANS[mode], Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _stage(1, "embedded teacher (exported once into the cache)")
    teacher = embedded_teacher()

    _stage(
        2, f"the task teacher: fine-tune it on BBC News topics (every weight, labels only), {plan.teacher_steps} steps"
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
                batch_size=16,
                seq_len=128,
                lr=1e-4,
                eval_samples=plan.eval_samples,
                resume=True,
            )
        )
    _stage(3, "prune the (original) teacher to ~50% of its parameters")
    pruned = out / "student-pruned"
    if not (pruned / "pruning_report.json").exists():
        run_prune(pruned, target_params="0.5", calib_samples=plan.calib_samples, seq_len=128)
    _stage(
        4,
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
                resume=True,
            )
        )
    _stage(
        5,
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
                resume=True,
            )
        )

    _stage(
        6,
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

    _stage(7, "serve with vLLM (kdlora serve) and query every evaluated rank through the openai client")
    meta = load_metadata(published)
    rows, budgets = _serve_and_query(published, meta, out)
    teacher_quality = meta.teacher_quality
    teacher_accuracy = teacher_quality.task_metrics.get("accuracy") if teacher_quality else None
    print("\n" + _table(published, rows, teacher_accuracy))
    for budget in budgets:
        print(
            f"budget request {budget['asked']} -> served at rank {budget['rank']} (budget met: {budget['met']}), "
            f"answer {budget['answer']!r} (label {budget['label']!r})"
        )
    _plot(rows, teacher_accuracy, out / "quickstart.png")
    numbers = out / "quickstart.json.partial"  # written whole, then renamed: never half a file
    numbers.write_text(json.dumps(_table_json(rows, teacher_accuracy, budgets), indent=1, default=str))
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


def _table_json(rows, teacher_accuracy: float | None, budgets) -> dict:
    """The printed table's numbers (tok/s included, which the plot alone showed before) and the budget answers."""
    return {
        "ranks": [
            {
                "rank": row["rank"],
                "accuracy": row["quality"].task_metrics["accuracy"],
                "kl_to_teacher": row["quality"].kl_to_teacher,
                "tok_s": row["tok_s"],
                "adapter_mb": row.get("mb", 0),
            }
            for row in rows
        ],
        "task_teacher_accuracy": teacher_accuracy,
        "budgets": budgets,
    }


def _table(adapter: Path, rows, teacher_accuracy: float | None) -> str:
    lines = [
        f"{adapter.name}: held-out BBC News topic accuracy and KL to the task teacher (answer token) per rank, "
        f"served throughput (1 request, {TOKENS} tokens)",
        "| rank | accuracy | KL to teacher | tok/s | adapter MB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        q = row["quality"]
        name = "0 (student alone)" if row["rank"] == 0 else str(row["rank"])
        lines.append(
            f"| {name} | {q.task_metrics['accuracy']:.3f} | {q.kl_to_teacher:.3f} | {row['tok_s']:.1f} | {row.get('mb', 0):.2f} |"
        )
    lines.append(
        f"| task teacher (135M) | {'–' if teacher_accuracy is None else f'{teacher_accuracy:.3f}'} | 0 | – | – |"
    )
    return "\n".join(lines)


def _plot(rows, teacher_accuracy: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [r for r in rows if r["rank"] > 0]
    fig, quality_axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    ranks = [r["rank"] for r in ranked]
    quality_axis.plot(
        ranks,
        [r["quality"].task_metrics["accuracy"] for r in ranked],
        "o-",
        color="tab:green",
        label="held-out accuracy",
    )
    quality_axis.set_xscale("log", base=2)
    quality_axis.set_xticks(ranks, [str(r) for r in ranks])
    quality_axis.set_xlabel("rank served (one nested adapter)")
    quality_axis.set_ylabel("BBC News topic accuracy", color="tab:green")
    speed = quality_axis.twinx()
    speed.plot(ranks, [r["tok_s"] for r in ranked], "s--", color="tab:blue", label="served tok/s")
    speed.set_ylabel("tok/s (1 request)", color="tab:blue")
    # the student alone and the teacher are named, not drawn: lines far outside the ranks' range flatten them
    alone = rows[0]
    quality_axis.set_title(
        f"quickstart: quality and cost per rank\nstudent alone: accuracy {alone['quality'].task_metrics['accuracy']:.3f}, "
        f"{alone['tok_s']:.1f} tok/s; task teacher: accuracy {teacher_accuracy or float('nan'):.3f}",
        fontsize=9,
    )
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
