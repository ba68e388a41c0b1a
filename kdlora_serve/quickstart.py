"""`kdlora quickstart`: the whole system on the embedded default, offline, the way a new user meets it.

teacher (SmolLM2-135M-Instruct) -> prune to ~half -> full-parameter KD (healing) -> QDyLoRA KD (one
adapter, max rank 64) -> push to a local directory hub (and to $HF_ENDPOINT if set) -> kdlora serve ->
every evaluated rank and budget requests through the `openai` client -> a table and plots.

Every stage writes its result atomically under --out and is skipped when that result exists; the two
distillation stages resume from their checkpoints, so an interrupted quickstart continues where it was.
"""

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PROMPT = "Explain what a Python list comprehension is."
TOKENS = 32  # generated per throughput probe (ignore_eos: every rank generates the same length)


@dataclass(frozen=True)
class Plan:
    calib_samples: int
    heal_steps: int
    adapter_steps: int
    seq_len: int
    eval_samples: int
    eval_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


PLANS = {
    "smoke": Plan(calib_samples=16, heal_steps=2, adapter_steps=2, seq_len=64, eval_samples=4, eval_ranks=(1, 8, 64)),  # tests only
    "fast": Plan(calib_samples=64, heal_steps=30, adapter_steps=60, seq_len=128, eval_samples=16),  # <= 20 min on 2 cores
    # ~75 min on 2 cores (estimated; 50 min measured before the sandwich schedule; builtin:pydoc: ~2 passes over its ~100k tokens)
    "full": Plan(calib_samples=256, heal_steps=250, adapter_steps=400, seq_len=128, eval_samples=64),
}


def _stage(number: int, title: str) -> None:
    print(f"\n[{number}/6] {title}", file=sys.stderr, flush=True)


def run_quickstart(out: Path, mode: str = "fast") -> int:
    from hub.remote import push
    from training.distill import DistillConfig, run_distill
    from training.prune import run_prune
    from training.teacher import embedded_teacher

    plan, out = PLANS[mode], Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _stage(1, "embedded teacher (exported once into the cache)")
    teacher = embedded_teacher()

    _stage(2, "prune the teacher to ~50% of its parameters")
    pruned = out / "student-pruned"
    if not (pruned / "pruning_report.json").exists():
        run_prune(pruned, target_params="0.5", calib_samples=plan.calib_samples, seq_len=plan.seq_len)
    _stage(3, f"heal the pruned student: full-parameter distillation, {plan.heal_steps} steps")
    student = out / "student"
    if not (student / "distill_report.json").exists():
        # lr: healing a half-pruned student wants far more than fine-tuning's 2e-5 (benchmarks/student_bench.py:
        # after 50 steps KL 1.43 at 1e-3, 1.71 at 1e-4; distill_bench: 2.71 at 2e-5 after 30)
        run_distill(DistillConfig(student=str(pruned), out=student, train="full", quantize="none", steps=plan.heal_steps,
                                  seq_len=plan.seq_len, lr=5e-4, eval_samples=plan.eval_samples, resume=True))
    _stage(4, f"distil ONE nested-rank adapter (QDyLoRA, NF4 base, max rank 64, sandwich ranks), {plan.adapter_steps} steps")
    adapter = out / "adapter"
    if not (adapter / "distill_report.json").exists():
        # sandwich: ranks 64 and 1 train every step, so the top of the ladder is not starved in a short run
        # (benchmarks/RESULTS.md, "Does rank buy quality?": the only strictly increasing ladder measured)
        run_distill(DistillConfig(student=str(student), out=adapter, train="qdylora", max_rank=64, quantize="nf4", rank_distribution="sandwich",
                                  steps=plan.adapter_steps, seq_len=plan.seq_len, lr=1e-3, eval_ranks=plan.eval_ranks,
                                  eval_samples=plan.eval_samples, resume=True))

    _stage(5, "publish student + adapter to the local directory hub" + (" and $HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else ""))
    hub = out / "hub" / "kdlora"
    published = hub / "smollm2-half-qdylora"
    for where in push(adapter, str(published), student=student, student_repo=str(hub / "smollm2-half"), materialize_ranks=[8]):
        print(f"      {where}", file=sys.stderr)
    if os.environ.get("HF_ENDPOINT"):
        namespace = os.environ.get("KDLORA_QUICKSTART_NAMESPACE", "kdlora")
        for where in push(adapter, f"{namespace}/smollm2-half-qdylora", student=student, student_repo=f"{namespace}/smollm2-half"):
            print(f"      {where}", file=sys.stderr)

    _stage(6, "serve with vLLM (kdlora serve) and query every evaluated rank through the openai client")
    rows, budgets = _serve_and_query(published, out)
    print("\n" + _table(published, rows))
    for budget in budgets:
        print(f"budget request {budget['asked']} -> served at rank {budget['rank']} (budget met: {budget['met']})")
    _plot(rows, out / "quickstart.png")
    print(f"\nplots: {published / 'quality_vs_rank.png'}, {out / 'quickstart.png'}\nadapter: {published}")
    return 0


def _serve_and_query(adapter: Path, out: Path):
    from openai import OpenAI

    from hub.schema import load_metadata
    from kdlora_serve.serve import start_background

    meta = load_metadata(adapter)
    server, url = start_background(["--adapter", str(adapter), "--", "--served-model-name", "student", "--max-model-len", "1024"],
                                   out / "serve.log", env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
    try:
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        rows = [{"rank": 0, "quality": meta.base_quality, "tok_s": _tok_s(client, "student")}]
        for result in meta.ranks:
            rows.append({"rank": result.rank, "quality": result, "tok_s": _tok_s(client, f"{adapter.name}@r{result.rank}"),
                         "mb": (result.adapter_bytes or 0) / 1e6})
        # quality floors alone (the smallest rank meeting each: the lowest rank's quality, the best), then a
        # floor with a cost bound (the largest rank within it); floored to 3 digits so the rank that set a floor meets it
        agreement = [r.teacher_top1_agreement for r in meta.ranks]
        low, high = (math.floor(value * 1000) / 1000 for value in (agreement[0], max(agreement)))
        asked = [{"min_quality": low}, {"min_quality": high}, {"max_rank": 16, "min_quality": low}]
        budgets = []
        for budget in asked:
            raw = client.chat.completions.with_raw_response.create(
                model=adapter.name, messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0.0,
                extra_body={"kdlora": budget})
            budgets.append({"asked": budget, "rank": int(raw.headers["x-kdlora-rank"]), "met": raw.headers["x-kdlora-budget-met"]})
        return rows, budgets
    finally:
        server.terminate()
        server.wait(timeout=120)


def _tok_s(client, model: str) -> float:
    """Warm throughput: the rank is loaded first (its cold start is not decode cost)."""
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=1)
    started = time.perf_counter()
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=TOKENS,
                                           temperature=0.0, extra_body={"ignore_eos": True})
    return reply.usage.completion_tokens / (time.perf_counter() - started)


def _table(adapter: Path, rows) -> str:
    lines = [f"{adapter.name}: held-out quality per rank, served throughput (1 request, {TOKENS} tokens)",
             "| rank | KL to teacher | top-1 agreement | greedy token F1 | tok/s | adapter MB |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        q = row["quality"]
        name = "0 (student alone)" if row["rank"] == 0 else str(row["rank"])
        f1 = q.task_metrics.get("greedy_token_f1")
        lines.append(f"| {name} | {q.kl_to_teacher:.3f} | {q.teacher_top1_agreement:.3f} | {'–' if f1 is None else f'{f1:.3f}'} | "
                     f"{row['tok_s']:.1f} | {row.get('mb', 0):.2f} |")
    return "\n".join(lines)


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [r for r in rows if r["rank"] > 0]
    fig, kl_axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    ranks = [r["rank"] for r in ranked]
    kl_axis.plot(ranks, [r["quality"].kl_to_teacher for r in ranked], "o-", color="tab:red", label="held-out KL to teacher")
    kl_axis.set_xscale("log", base=2)
    kl_axis.set_xticks(ranks, [str(r) for r in ranks])
    kl_axis.set_xlabel("rank served (one nested adapter)")
    kl_axis.set_ylabel("KL(teacher || student)", color="tab:red")
    speed = kl_axis.twinx()
    speed.plot(ranks, [r["tok_s"] for r in ranked], "s--", color="tab:blue", label="served tok/s")
    speed.set_ylabel("tok/s (1 request)", color="tab:blue")
    # the student alone is named, not drawn: a line far outside the ranks' range sits on the frame and flattens them
    alone = rows[0]
    kl_axis.set_title(f"quickstart: quality and cost per rank\nstudent alone: KL {alone['quality'].kl_to_teacher:.3f}, "
                      f"{alone['tok_s']:.1f} tok/s", fontsize=9)
    fig.legend(loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
