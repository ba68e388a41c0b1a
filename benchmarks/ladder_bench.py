"""Does rank buy quality? Nested-rank schedules side by side on one scenario, one run each:

Scenario (a) of issue 13: the adapter IS the recovery after pruning (student = the embedded teacher
pruned to 50%, no healing, NF4 base), so every rank has something to recover. Runs, same data order:
- qdylora `uniform` (DyLoRA: one sampled rank per step), seeds 0 and 1 (the second measures run-to-run noise);
- qdylora `sandwich` (max + min + one sampled rank per step) for the same steps (same tokens, ~2.5x the passes)
  and for about the same number of forward/backward passes as uniform (same compute);
- separately trained fixed-rank LoRAs at the smallest and largest rank: the ceiling each rank could reach.

Reports held-out KL to the teacher and top-1 agreement per rank, and AURAC: the area under the
agreement-vs-rank curve over log2 rank, normalised to [0, 1] on the x axis (MatryoshkaLoRA's summary).
Every run is a `kdlora distill` subprocess. Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/ladder_bench.py [--steps 80] [--max-rank 16]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", default="1e-3")
    args = parser.parse_args()
    ranks = [r for r in (1, 2, 4, 8, 16, 32, 64) if r <= args.max_rank]
    student = WORK / "student"
    if not student.exists():
        kdlora("prune", "--out", str(student), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    shutil.rmtree(WORK / "ladder", ignore_errors=True)
    common = ["--student", str(student), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", args.lr,
              "--eval-samples", "16", "--quantize", "nf4"]
    nested = ["--train", "qdylora", "--max-rank", str(args.max_rank), "--eval-ranks", ",".join(map(str, ranks))]
    same_compute = max(1, round(args.steps / 2.5))  # sandwich: 3 passes per step, 2 when the sample hits an end
    runs = {
        "uniform seed 0": [*nested, "--steps", str(args.steps), "--seed", "0"],
        "uniform seed 1": [*nested, "--steps", str(args.steps), "--seed", "1"],
        "sandwich, same steps": [*nested, "--steps", str(args.steps), "--rank-distribution", "sandwich"],
        f"sandwich, same passes ({same_compute} steps)": [*nested, "--steps", str(same_compute), "--rank-distribution", "sandwich"],
        f"lora r{ranks[0]} (separate)": ["--train", "lora", "--rank", str(ranks[0]), "--steps", str(args.steps)],
        f"lora r{ranks[-1]} (separate)": ["--train", "lora", "--rank", str(ranks[-1]), "--steps", str(args.steps)],
    }
    results = {}
    for name, flags in runs.items():
        out = WORK / "ladder" / name.split(" (")[0].replace(" ", "-").replace(",", "")
        wall = kdlora("distill", *common, *flags, "--out", str(out))
        report = json.loads((out / "distill_report.json").read_text())
        after = {int(k): v for k, v in report["after"].items()}
        results[name] = {"wall_seconds": wall, "steps": report["steps"], "tokens": report["tokens"],
                         "passes": sum(len(h["ranks"]) for h in report["history"]),
                         "before": report["before"], "after": after,
                         "aurac_agreement": aurac({k: v["teacher_top1_agreement"] for k, v in after.items()}) if len(after) > 1 else None}
        print(f"{name}: {wall:.0f} s, " + ", ".join(f"r{k} KL {v['kl_to_teacher']:.3f}" for k, v in sorted(after.items())), flush=True)
    noise = {r: abs(results["uniform seed 0"]["after"][r]["kl_to_teacher"] - results["uniform seed 1"]["after"][r]["kl_to_teacher"])
             for r in ranks}
    summary = {"machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
               "settings": vars(args) | {"student": str(student), "ranks": ranks}, "runs": results,
               "kl_seed_noise_by_rank": noise}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ladder.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, ranks, RESULTS / "ladder.png")


def plot(summary: dict, ranks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_axis, agree_axis) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, run in summary["runs"].items():
        points = sorted(run["after"].items())
        style = "s" if name.startswith("lora") else "o-"
        kl_axis.plot([k for k, _ in points], [v["kl_to_teacher"] for _, v in points], style, label=name)
        agree_axis.plot([k for k, _ in points], [v["teacher_top1_agreement"] for _, v in points], style, label=name)
    before = next(iter(summary["runs"].values()))["before"]
    kl_axis.axhline(before["kl_to_teacher"], color="gray", linestyle=":", label="student alone (NF4)")
    agree_axis.axhline(before["teacher_top1_agreement"], color="gray", linestyle=":")
    for axis, label in ((kl_axis, "held-out KL(teacher || student), lower is better"), (agree_axis, "top-1 agreement with teacher")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ranks, [str(r) for r in ranks])
        axis.set_xlabel("rank")
        axis.set_ylabel(label, fontsize=9)
    kl_axis.legend(fontsize=7)
    fig.suptitle("quality per rank: nested-rank schedules vs separately trained LoRAs (pruned student, no healing)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
