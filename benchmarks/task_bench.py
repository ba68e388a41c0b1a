"""Does rank buy quality on a task the adapter carries? Scenario (b) of issue 13, KD-LoRA's setting:

- the teacher (embedded SmolLM2-135M-Instruct) is fine-tuned on the task first (BBC News topics, 5 classes:
  `kdlora distill --train full --kd-alpha 0 --data builtin:bbc-news`, every weight, labels only);
- the student is the quickstart's: the teacher pruned to 50% and healed on generic text (builtin:pydoc), so it
  knows language but not the task;
- ONE nested-rank adapter (QDyLoRA, NF4 base, rsLoRA) is distilled from the fine-tuned teacher on the task's
  training split (loss on the answer token: KL to the teacher's distribution + CE to the label), sandwich
  schedule, seeds 0 and 1 (run-to-run noise); sandwich with its ranks' losses summed equally (`--rank-weighting
  equal`, the default before it weighed each by 1 / its LoRA scale); sandwich with in-place KD (`--inplace-kd`:
  the smaller ranks of a step distil its largest rank's outputs); the uniform schedule; a separately trained KD-LoRA at each of
  ranks 1, 4, 16, 64, same steps (what each rank could reach on its own).

Reports held-out accuracy per rank (and KL to the teacher on the answer token), the student alone and the
teacher, the share of the student-to-teacher gap each rank closes, seed noise, and AURAC (area under accuracy
over log2 rank, MatryoshkaLoRA's measure) of the nested adapter vs the separate LoRAs at ranks 1, 4, 16, 64, with
the paired difference per rank (same held-out articles). Training runs in the dtype the quickstart picks on this
machine (`--dtype`). `--from-quickstart DIR` takes a finished quickstart's task teacher, student and adapter as
the teacher, student and "sandwich seed 0" run (or "sandwich-equal seed 0", for an adapter trained with equal
weights), and trains the others with that adapter's settings.
Every stage is a `kdlora` subprocess, seeded; `--reuse` keeps finished runs made with the same command.
Writes benchmarks/results/task.json + task.png. Usage:

    .venv/bin/python benchmarks/task_bench.py [--steps 80] [--max-rank 64] [--reuse] [--runs NAME ...]
        [--from-quickstart DIR] [--only sandwich-seed-0]
"""

import argparse
import json
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_bench import RESULTS, WORK, kdlora  # noqa: E402
from ladder_bench import aurac  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hub.intervals import paired_difference  # noqa: E402
from training.evaluate import UNSEEN_WORDING_ACCURACY  # noqa: E402

DATA = "builtin:bbc-news"


def run(name: str, command: list[str], reuse: bool) -> tuple[Path, float | None]:
    """Run `kdlora COMMAND --out WORK/task/NAME` unless --reuse finds it finished with the same command."""
    out = WORK / "task" / name
    command = [*command, "--out", str(out)]
    recorded = out.with_suffix(".command.json")
    if (
        reuse
        and (out / "distill_report.json").exists()
        and recorded.exists()
        and json.loads(recorded.read_text()) == command
    ):
        return out, None
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = kdlora(*command)
    recorded.write_text(json.dumps(command))
    return out, wall


SEPARATE_RANKS = (1, 4, 16, 64)  # the AURAC comparison: a separately trained KD-LoRA at each
NESTED = ("sandwich-seed-0", "sandwich-seed-1", "sandwich-equal-seed-0", "sandwich-inplace-seed-0")  # vs separate
RUNS = (*NESTED, "uniform-seed-0", *(f"lora-r{k}" for k in SEPARATE_RANKS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="adapter steps")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher fine-tuning steps")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=222, help="held-out articles (222: all of them)")
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--dtype", help="training dtype (default: the one the quickstart picks on this machine)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs made with the same command")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="which adapter runs to train")
    parser.add_argument(
        "--from-quickstart",
        type=Path,
        help="a finished `kdlora quickstart --out DIR`: its teacher-bbc, student and adapter are this bench's "
        "teacher, student and sandwich-seed-0; the other runs take that adapter's steps, batch, lr, dtype, articles",
    )
    parser.add_argument(
        "--only",
        choices=["sandwich-seed-0"],
        help="train just this run (and the teacher and student it needs), report nothing: e.g. budget_bench's adapter",
    )
    args = parser.parse_args()
    if "sandwich-seed-0" not in args.runs:
        parser.error("--runs must include sandwich-seed-0: every other run is compared with it")
    from kdlora_serve.quickstart import training_dtype

    args.dtype = args.dtype or training_dtype()
    given = {}  # run name -> a finished adapter directory this bench does not train
    if args.from_quickstart:
        quickstart = args.from_quickstart.resolve()
        report = json.loads((quickstart / "adapter" / "distill_report.json").read_text())
        for option in ("steps", "batch_size", "lr", "dtype", "max_rank"):
            setattr(args, option, report["config"][option])
        args.eval_samples = report["heldout_blocks_evaluated"]
        teacher, student = quickstart / "teacher-bbc", quickstart / "student"
        # a quickstart from before --rank-weighting existed summed its ranks' losses equally
        weighting = report["config"].get("rank_weighting", "equal")
        given["sandwich-seed-0" if weighting == "scale" else "sandwich-equal-seed-0"] = quickstart / "adapter"
    else:
        teacher, student = train_teacher_and_student(args)
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.max_rank]
    common = [
        "distill",
        "--student",
        str(student),
        "--teacher",
        str(teacher),
        "--data",
        DATA,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        "128",
        "--lr",
        str(args.lr),
        "--eval-samples",
        str(args.eval_samples),
        "--quantize",
        "nf4",
        "--rslora",
        "--steps",
        str(args.steps),
        "--dtype",
        args.dtype,
    ]
    nested = ["--train", "qdylora", "--max-rank", str(args.max_rank), "--eval-ranks", ",".join(map(str, ranks))]
    flags = {
        "sandwich-seed-0": [*nested, "--rank-distribution", "sandwich", "--seed", "0"],
        "sandwich-seed-1": [*nested, "--rank-distribution", "sandwich", "--seed", "1"],
        "sandwich-equal-seed-0": [
            *nested,
            "--rank-distribution",
            "sandwich",
            "--rank-weighting",
            "equal",
            "--seed",
            "0",
        ],
        "sandwich-inplace-seed-0": [*nested, "--rank-distribution", "sandwich", "--inplace-kd", "--seed", "0"],
        "uniform-seed-0": [*nested, "--rank-distribution", "uniform", "--seed", "0"],
        **{f"lora-r{k}": ["--train", "lora", "--rank", str(k)] for k in SEPARATE_RANKS if k <= args.max_rank},
    }
    names = ["sandwich-seed-0"] if args.only else [n for n in args.runs if n in flags]
    results = {}
    for name in names:
        out, wall = (given[name], None) if name in given else run(name, [*common, *flags[name]], args.reuse)
        results[name] = summarize(out, wall)
        print(
            f"{name}: {results[name]['seconds_training']:.0f} s training; student alone "
            f"{results[name]['student_alone']:.3f}, teacher {results[name]['teacher']:.3f}; "
            + ", ".join(f"r{k} {v['accuracy']:.3f}" for k, v in sorted(results[name]["after"].items())),
            flush=True,
        )
    if args.only:
        return
    first = results["sandwich-seed-0"]
    gap = first["teacher"] - first["student_alone"]
    summary = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"data": DATA, "teacher": str(teacher), "student": str(student), "ranks": ranks},
        "runs": {name: {k: v for k, v in r.items() if k != "outcomes"} for name, r in results.items()},
        "gap_closed_by_rank": {r: (first["after"][r]["accuracy"] - first["student_alone"]) / gap for r in ranks}
        if gap > 0
        else None,
        "nested_vs_separate": {name: nested_vs_separate(results, name) for name in NESTED if name in results},
    }
    if "sandwich-seed-1" in results:
        second = results["sandwich-seed-1"]
        summary["seed_noise_by_rank"] = {
            r: abs(first["after"][r]["accuracy"] - second["after"][r]["accuracy"]) for r in ranks
        }
    if "sandwich-equal-seed-0" in results:  # what weighing the ranks' losses by 1 / scale changed, same articles
        equal = results["sandwich-equal-seed-0"]
        summary["scale_minus_equal_weighting"] = {
            r: vars(paired_difference(first["outcomes"][r], equal["outcomes"][r])) for r in ranks
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "task.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, ranks, RESULTS / "task.png")
    print(
        json.dumps(
            {
                k: summary.get(k)
                for k in (
                    "gap_closed_by_rank",
                    "seed_noise_by_rank",
                    "scale_minus_equal_weighting",
                    "nested_vs_separate",
                )
            },
            indent=1,
        )
    )


def train_teacher_and_student(args) -> tuple[Path, Path]:
    """The task teacher and the healed student, as the quickstart's fast plan makes them."""
    from training.teacher import embedded_teacher

    base = str(embedded_teacher())
    teacher, _ = run(
        "teacher-bbc",
        [
            "distill",
            "--student",
            base,
            "--teacher",
            base,
            "--train",
            "full",
            "--quantize",
            "none",
            "--kd-alpha",
            "0",
            "--data",
            DATA,
            "--steps",
            str(args.teacher_steps),
            "--batch-size",
            "16",
            "--seq-len",
            "128",
            "--lr",
            "1e-4",
            "--eval-samples",
            "222",
            "--dtype",
            args.dtype,
        ],
        args.reuse,
    )
    pruned = WORK / "student"  # distill_bench's: the embedded teacher pruned to 50%
    if not pruned.exists():
        kdlora("prune", "--out", str(pruned), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    # healed on generic text as the quickstart's fast plan does (30 steps, lr 5e-4)
    student, _ = run(
        "student-healed",
        [
            "distill",
            "--student",
            str(pruned),
            "--train",
            "full",
            "--quantize",
            "none",
            "--steps",
            "30",
            "--seq-len",
            "128",
            "--lr",
            "5e-4",
            "--eval-samples",
            "16",
            "--dtype",
            args.dtype,
        ],
        args.reuse,
    )
    return teacher, student


def summarize(out: Path, wall: float | None) -> dict:
    """One adapter run's numbers from its distill_report.json and kdlora.json (per-article outcomes kept for pairs)."""
    report = json.loads((out / "distill_report.json").read_text())
    meta = json.loads((out / "kdlora.json").read_text())
    after = {
        int(k): {
            "accuracy": v["task_metrics"]["accuracy"],
            "accuracy_unseen_wording": v["task_metrics"].get(UNSEEN_WORDING_ACCURACY),
            "kl_to_teacher": v["kl_to_teacher"],
        }
        for k, v in report["after"].items()
    }
    return {
        "wall_seconds": wall,
        "seconds_training": report["seconds_training"],
        "passes": sum(len(h["ranks"]) for h in report["history"]),
        "student_alone": report["before"]["task_metrics"]["accuracy"],
        "teacher": meta["teacher_quality"]["task_metrics"]["accuracy"],
        "after": after,
        "aurac_accuracy": aurac({k: v["accuracy"] for k, v in after.items()}) if len(after) > 1 else None,
        "outcomes": {int(k): v["task_outcomes"]["accuracy"] for k, v in report["after"].items()},
    }


def nested_vs_separate(results: dict, name: str) -> dict | None:
    """A nested adapter against a separate KD-LoRA at each rank both have: accuracy ratio, the paired difference over
    the same held-out articles, and AURAC over those ranks (goal: >= 95% at every rank, AURAC within 2%)."""
    nested = results[name]
    separate = {k: results[f"lora-r{k}"] for k in SEPARATE_RANKS if f"lora-r{k}" in results}
    if len(separate) < 2:
        return None
    per_rank = {
        k: {
            "nested": nested["after"][k]["accuracy"],
            "separate": lora["after"][k]["accuracy"],
            "ratio": nested["after"][k]["accuracy"] / lora["after"][k]["accuracy"],
            "paired_difference": vars(paired_difference(nested["outcomes"][k], lora["outcomes"][k])),
        }
        for k, lora in separate.items()
    }
    nested_area = aurac({k: row["nested"] for k, row in per_rank.items()})
    separate_area = aurac({k: row["separate"] for k, row in per_rank.items()})
    return {
        "ranks": per_rank,
        "aurac_nested": nested_area,
        "aurac_separate": separate_area,
        "aurac_ratio": nested_area / separate_area,
        "goal_met": min(row["ratio"] for row in per_rank.values()) >= 0.95 and nested_area / separate_area >= 0.98,
    }


def plot(summary: dict, ranks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    separate = []  # (rank, accuracy) of each separately trained LoRA: one series
    for name, run_result in summary["runs"].items():
        points = sorted(run_result["after"].items())
        if name.startswith("lora"):
            separate += [(k, v["accuracy"]) for k, v in points]
        else:
            axis.plot([k for k, _ in points], [v["accuracy"] for _, v in points], "o-", label=name)
    if separate:
        axis.plot(*zip(*sorted(separate)), "s--", color="black", label="separate KD-LoRA, one per rank")
    first = summary["runs"]["sandwich-seed-0"]
    axis.axhline(first["teacher"], color="black", linestyle=":", label=f"fine-tuned teacher {first['teacher']:.3f}")
    axis.set_title(
        f"BBC News topic accuracy per rank (held-out); student alone {first['student_alone']:.3f}", fontsize=9
    )
    axis.set_xscale("log", base=2)
    axis.set_xticks(ranks, [str(r) for r in ranks])
    axis.set_xlabel("adapter rank (one nested adapter, truncated)")
    axis.set_ylabel("accuracy")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
