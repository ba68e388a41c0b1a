"""Does rank buy quality on a task the adapter carries? Scenario (b) of issue 13, KD-LoRA's setting:

- the teacher (embedded SmolLM2-135M-Instruct) is fine-tuned on the task first (BBC News topics, 5 classes:
  `kdlora distill --train full --kd-alpha 0 --data builtin:bbc-news`, every weight, labels only);
- the student is the quickstart's: the teacher pruned to 50% and healed on generic text (builtin:pydoc), so it
  knows language but not the task;
- ONE nested-rank adapter (QDyLoRA, NF4 base, rsLoRA) is distilled from the fine-tuned teacher on the task's
  training split (loss on the answer token: KL to the teacher's distribution + CE to the label), sandwich
  schedule, seeds 0 and 1 (run-to-run noise); the uniform schedule; separately trained LoRAs at the smallest
  and largest rank (what each rank could reach on its own).

Reports held-out accuracy per rank (and KL to the teacher on the answer token), the student alone and the
teacher, the share of the student-to-teacher accuracy gap each rank closes, seed noise, and AURAC.
Every stage is a `kdlora` subprocess, seeded; `--reuse` keeps finished runs made with the same command.
Writes benchmarks/results/task.json + task.png. Usage:

    .venv/bin/python benchmarks/task_bench.py [--steps 80] [--max-rank 64] [--reuse] [--only sandwich-seed-0]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="adapter steps")
    parser.add_argument("--teacher-steps", type=int, default=60, help="teacher fine-tuning steps")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=100)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs made with the same command")
    parser.add_argument(
        "--only",
        choices=["sandwich-seed-0"],
        help="train just this run (and the teacher and student it needs), report nothing: e.g. budget_bench's adapter",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.teacher import embedded_teacher

    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.max_rank]
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
        ],
        args.reuse,
    )
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
        args.lr,
        "--eval-samples",
        str(args.eval_samples),
        "--quantize",
        "nf4",
        "--rslora",
        "--steps",
        str(args.steps),
    ]
    nested = ["--train", "qdylora", "--max-rank", str(args.max_rank), "--eval-ranks", ",".join(map(str, ranks))]
    runs = {
        "sandwich seed 0": [*nested, "--rank-distribution", "sandwich", "--seed", "0"],
        "sandwich seed 1": [*nested, "--rank-distribution", "sandwich", "--seed", "1"],
        "uniform seed 0": [*nested, "--rank-distribution", "uniform", "--seed", "0"],
        f"lora r{ranks[0]} (separate)": ["--train", "lora", "--rank", str(ranks[0])],
        f"lora r{ranks[-1]} (separate)": ["--train", "lora", "--rank", str(ranks[-1])],
    }
    if args.only:
        runs = {name: flags for name, flags in runs.items() if name.replace(" ", "-") == args.only}
    results = {}
    for name, flags in runs.items():
        out, wall = run(name.split(" (")[0].replace(" ", "-"), [*common, *flags], args.reuse)
        report = json.loads((out / "distill_report.json").read_text())
        meta = json.loads((out / "kdlora.json").read_text())
        after = {
            int(k): {"accuracy": v["task_metrics"]["accuracy"], "kl_to_teacher": v["kl_to_teacher"]}
            for k, v in report["after"].items()
        }
        results[name] = {
            "wall_seconds": wall,
            "seconds_training": report["seconds_training"],
            "passes": sum(len(h["ranks"]) for h in report["history"]),
            "student_alone": report["before"]["task_metrics"]["accuracy"],
            "teacher": meta["teacher_quality"]["task_metrics"]["accuracy"],
            "after": after,
            "aurac_accuracy": aurac({k: v["accuracy"] for k, v in after.items()}) if len(after) > 1 else None,
        }
        print(
            f"{name}: {report['seconds_training']:.0f} s training; student alone {results[name]['student_alone']:.3f}, teacher "
            f"{results[name]['teacher']:.3f}; "
            + ", ".join(f"r{k} {v['accuracy']:.3f}" for k, v in sorted(after.items())),
            flush=True,
        )
    if args.only:
        return
    first = results["sandwich seed 0"]
    gap = first["teacher"] - first["student_alone"]
    summary = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "settings": vars(args) | {"data": DATA, "teacher": str(teacher), "student": str(student), "ranks": ranks},
        "runs": results,
        "gap_closed_by_rank": {r: (first["after"][r]["accuracy"] - first["student_alone"]) / gap for r in ranks}
        if gap > 0
        else None,
        "seed_noise_by_rank": {
            r: abs(first["after"][r]["accuracy"] - results["sandwich seed 1"]["after"][r]["accuracy"]) for r in ranks
        },
        "rank_range": {
            seed: max(v["accuracy"] for v in results[f"sandwich seed {seed}"]["after"].values())
            - min(v["accuracy"] for v in results[f"sandwich seed {seed}"]["after"].values())
            for seed in (0, 1)
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "task.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, ranks, RESULTS / "task.png")
    print(json.dumps({k: summary[k] for k in ("gap_closed_by_rank", "seed_noise_by_rank", "rank_range")}, indent=1))


def plot(summary: dict, ranks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, run_result in summary["runs"].items():
        points = sorted(run_result["after"].items())
        axis.plot(
            [k for k, _ in points],
            [v["accuracy"] for _, v in points],
            "s" if name.startswith("lora") else "o-",
            label=name,
        )
    first = summary["runs"]["sandwich seed 0"]
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
