"""Does rank buy quality? Nested-rank schedules side by side on one scenario, one run each:

Scenario (a) of issue 13: the adapter IS the recovery after pruning (student = the embedded teacher
pruned to 50%, no healing, NF4 base), so every rank has something to recover. Runs, same data order:
- qdylora `uniform` (DyLoRA: one sampled rank per step), seeds 0 and 1 (the second measures run-to-run noise);
- qdylora `sandwich` (max + min + one sampled rank per step) for the same steps (same tokens, ~2.5x the passes)
  and for about the same number of forward/backward passes as uniform (same compute);
- qdylora `matryoshka` (one pass of the mean of ranks 1, 2, 4, ..., R: MatryoshkaLoRA's fixed diagonal),
  seeds 0 and 1: same steps, same passes as uniform;
- separately trained fixed-rank LoRAs at the smallest and largest rank: the ceiling each rank could reach;
- uniform, matryoshka, sandwich and the separate LoRAs again with rsLoRA's scale alpha/sqrt(b) instead of alpha/b
  (arXiv 2312.03732: with alpha/b, higher ranks learn no faster, so a fixed budget gives a flat ladder).

Reports per rank held-out KL to the teacher, top-1 agreement and the token F1 of greedy answers against
the teacher's, and AURAC: the area under the quality-vs-rank curve over log2 rank, normalised to [0, 1]
on the x axis (MatryoshkaLoRA's summary), for agreement and F1.
Every run is a `kdlora distill` subprocess (seeded: a rerun gives the same numbers but for wall time);
`--reuse` keeps the finished runs of an earlier invocation with the same flags. Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/ladder_bench.py [--steps 80] [--max-rank 16] [--reuse]
"""

import argparse
import json
import math
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_bench import RESULTS, WORK, kdlora  # noqa: E402  (one way to run kdlora and find the pruned student)


def aurac(points: dict[int, float]) -> float:
    """Trapezoid area under quality(rank) over x = log2(rank) / log2(max rank), so a flat curve at q scores q."""
    ranks = sorted(points)
    xs = [math.log2(r) / math.log2(ranks[-1]) for r in ranks]
    return sum((xs[i + 1] - xs[i]) * (points[ranks[i]] + points[ranks[i + 1]]) / 2 for i in range(len(ranks) - 1))


def f1(quality: dict) -> float:
    return quality["task_metrics"]["greedy_token_f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs made with the same flags")
    args = parser.parse_args()
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.max_rank]
    student = WORK / "student"
    if not student.exists():
        kdlora("prune", "--out", str(student), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    if not args.reuse:
        shutil.rmtree(WORK / "ladder", ignore_errors=True)
    common = [
        "--student",
        str(student),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--lr",
        args.lr,
        "--eval-samples",
        "16",
        "--quantize",
        "nf4",
    ]
    nested = ["--train", "qdylora", "--max-rank", str(args.max_rank), "--eval-ranks", ",".join(map(str, ranks))]
    alpha_b = ["--no-rslora"]  # scale alpha / b, DyLoRA's; the runs named "rslora" scale alpha / sqrt(b)
    same_compute = max(1, round(args.steps / 2.5))  # sandwich: 3 passes per step, 2 when the sample hits an end
    runs = {
        "uniform seed 0": [*nested, "--steps", str(args.steps), "--seed", "0", *alpha_b],
        "uniform seed 1": [*nested, "--steps", str(args.steps), "--seed", "1", *alpha_b],
        "sandwich, same steps": [*nested, "--steps", str(args.steps), "--rank-distribution", "sandwich", *alpha_b],
        f"sandwich, same passes ({same_compute} steps)": [
            *nested,
            "--steps",
            str(same_compute),
            "--rank-distribution",
            "sandwich",
            *alpha_b,
        ],
        "matryoshka seed 0": [
            *nested,
            "--steps",
            str(args.steps),
            "--seed",
            "0",
            "--rank-distribution",
            "matryoshka",
            *alpha_b,
        ],
        "matryoshka seed 1": [
            *nested,
            "--steps",
            str(args.steps),
            "--seed",
            "1",
            "--rank-distribution",
            "matryoshka",
            *alpha_b,
        ],
        f"lora r{ranks[0]} (separate)": [
            "--train",
            "lora",
            "--rank",
            str(ranks[0]),
            "--steps",
            str(args.steps),
            *alpha_b,
        ],
        f"lora r{ranks[-1]} (separate)": [
            "--train",
            "lora",
            "--rank",
            str(ranks[-1]),
            "--steps",
            str(args.steps),
            *alpha_b,
        ],
        "uniform rslora": [*nested, "--steps", str(args.steps), "--seed", "0", "--rslora"],
        "matryoshka rslora": [
            *nested,
            "--steps",
            str(args.steps),
            "--seed",
            "0",
            "--rank-distribution",
            "matryoshka",
            "--rslora",
        ],
        "sandwich rslora, same steps": [
            *nested,
            "--steps",
            str(args.steps),
            "--rank-distribution",
            "sandwich",
            "--rslora",
        ],
        f"lora r{ranks[0]} rslora (separate)": [
            "--train",
            "lora",
            "--rank",
            str(ranks[0]),
            "--steps",
            str(args.steps),
            "--rslora",
        ],
        f"lora r{ranks[-1]} rslora (separate)": [
            "--train",
            "lora",
            "--rank",
            str(ranks[-1]),
            "--steps",
            str(args.steps),
            "--rslora",
        ],
    }
    results = {}
    for name, flags in runs.items():
        out = WORK / "ladder" / name.split(" (")[0].replace(" ", "-").replace(",", "")
        command = ["distill", *common, *flags, "--out", str(out)]
        recorded = out.with_suffix(".command.json")
        if (
            args.reuse
            and (out / "distill_report.json").exists()
            and recorded.exists()
            and json.loads(recorded.read_text()) == command
        ):
            wall = None  # made by an earlier invocation: its quality is what a rerun would give, its time is not comparable
        else:
            shutil.rmtree(out, ignore_errors=True)
            wall = kdlora(*command)
            recorded.write_text(json.dumps(command))
        report = json.loads((out / "distill_report.json").read_text())
        after = {int(k): v for k, v in report["after"].items()}
        results[name] = {
            "wall_seconds": wall,
            "seconds_training": report["seconds_training"],
            "steps": report["steps"],
            "tokens": report["tokens"],
            "passes": sum(len(h["ranks"]) for h in report["history"]),
            "before": report["before"],
            "after": after,
            "aurac_agreement": aurac({k: v["teacher_top1_agreement"] for k, v in after.items()})
            if len(after) > 1
            else None,
            "aurac_greedy_f1": aurac({k: f1(v) for k, v in after.items()}) if len(after) > 1 else None,
        }
        print(
            f"{name}: {report['seconds_training']:.0f} s training, "
            + ", ".join(f"r{k} KL {v['kl_to_teacher']:.3f} F1 {f1(v):.3f}" for k, v in sorted(after.items())),
            flush=True,
        )
    noise = {
        schedule: {
            r: {
                metric: abs(
                    read(results[f"{schedule} seed 0"]["after"][r]) - read(results[f"{schedule} seed 1"]["after"][r])
                )
                for metric, read in (
                    ("kl", lambda v: v["kl_to_teacher"]),
                    ("agreement", lambda v: v["teacher_top1_agreement"]),
                    ("greedy_f1", f1),
                )
            }
            for r in ranks
        }
        for schedule in ("uniform", "matryoshka")
    }
    summary = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "settings": vars(args) | {"student": str(student), "ranks": ranks},
        "runs": results,
        "seed_noise_by_rank": noise,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ladder.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, ranks, RESULTS / "ladder.png")


def plot(summary: dict, ranks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("held-out KL(teacher || student), lower is better", lambda v: v["kl_to_teacher"]),
        ("top-1 agreement with teacher", lambda v: v["teacher_top1_agreement"]),
        ("token F1 of greedy answers vs teacher's", f1),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.5), dpi=110)
    for name, run in summary["runs"].items():
        points = sorted(run["after"].items())
        style = "s" if name.startswith("lora") else "o-"
        for axis, (_, read) in zip(axes, panels):
            axis.plot([k for k, _ in points], [read(v) for _, v in points], style, label=name)
    before = next(iter(summary["runs"].values()))["before"]  # far below the adapters: in each title, not drawn
    for axis, (label, read) in zip(axes, panels):
        axis.set_title(f"student alone (NF4): {read(before):.3f}", fontsize=8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ranks, [str(r) for r in ranks])
        axis.set_xlabel("rank")
        axis.set_ylabel(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "quality per rank: nested-rank schedules vs separately trained LoRAs (pruned student, no healing)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
