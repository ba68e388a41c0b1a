"""Distillation side by side, one run each, same student / data / steps:

- peak memory and mean step time of qdylora (NF4 base) vs lora (fp32 base) vs full;
- held-out KL to the teacher at each rank of ONE qdylora run vs a separately trained fixed-rank lora
  run at that rank (same NF4 base, so only the training method differs);
- wall time of the one qdylora run vs the sum of the separate lora runs.

Every run is a `kdlora distill` subprocess, so peak memory (max RSS, or CUDA max allocated) is that
run's alone; it includes the teacher, which every mode runs alongside. Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/distill_bench.py [--student DIR] [--steps 30] [--ranks 1,4,16]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / ".work"
RESULTS = ROOT / "benchmarks" / "results"


def kdlora(*args: str, env: dict | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(Path(sys.executable).parent / "kdlora"), *args],
        check=True,
        env=None if env is None else {**os.environ, **env},
    )
    return time.perf_counter() - started


def plot_side_by_side(medians: dict[str, dict[str, float]], labels: dict[str, str], title: str, path: Path) -> None:
    """Bars of median seconds per kind of work (x), one bar per alternative (`labels`: key -> legend), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works, width = list(medians), 0.8 / len(labels)
    fig, axis = plt.subplots(figsize=(6.5, 3.4), dpi=110)
    for i, (key, label) in enumerate(labels.items()):
        offset = (i - (len(labels) - 1) / 2) * width
        axis.bar([w + offset for w in range(len(works))], [medians[w][key] for w in works], width=width, label=label)
    axis.set_xticks(range(len(works)), works, fontsize=8)
    axis.set_ylabel("seconds (median)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_side_by_side(name: str, summary: dict, labels: dict[str, str], title: str) -> None:
    """results/<name>.json (`summary`) and results/<name>.png (its `median_seconds`, by `plot_side_by_side`)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_side_by_side(summary["median_seconds"], labels, title, RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--student", type=Path, help="student checkpoint (default: the embedded teacher pruned to 50%%)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--ranks", default="1,4,16", help="ranks compared; the qdylora run uses R = the largest")
    parser.add_argument("--lr", default="1e-3")
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    shutil.rmtree(WORK / "runs", ignore_errors=True)
    (WORK / "runs").mkdir(parents=True)
    student = args.student or WORK / "student"
    if not student.exists():
        kdlora("prune", "--out", str(student), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    common = [
        "--student",
        str(student),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--lr",
        args.lr,
        "--eval-samples",
        "16",
    ]
    runs = {
        "qdylora-nf4": [
            "--train",
            "qdylora",
            "--max-rank",
            str(max(ranks)),
            "--eval-ranks",
            args.ranks,
            "--quantize",
            "nf4",
        ]
    }
    runs.update({f"lora-nf4-r{r}": ["--train", "lora", "--rank", str(r), "--quantize", "nf4"] for r in ranks})
    runs[f"lora-fp32-r{max(ranks)}"] = ["--train", "lora", "--rank", str(max(ranks)), "--quantize", "none"]
    runs["full"] = ["--train", "full", "--quantize", "none", "--lr", "2e-5"]
    results = {}
    for name, flags in runs.items():
        out = WORK / "runs" / name
        wall = kdlora("distill", *common, *flags, "--out", str(out))
        report = json.loads((out / "distill_report.json").read_text())
        results[name] = {
            "wall_seconds": wall,
            "mean_step_seconds": report["mean_step_seconds"],
            "peak_memory_mb": report["peak_memory_mb"],
            "before": report["before"],
            "after": report["after"],
        }
        print(
            f"{name}: {wall:.0f} s, {report['mean_step_seconds']:.2f} s/step, {report['peak_memory_mb']:.0f} MB peak",
            flush=True,
        )

    quality = {
        r: {
            "qdylora": results["qdylora-nf4"]["after"][str(r)]["kl_to_teacher"],
            "lora": results[f"lora-nf4-r{r}"]["after"][str(r)]["kl_to_teacher"],
        }
        for r in ranks
    }
    separate = sum(results[f"lora-nf4-r{r}"]["wall_seconds"] for r in ranks)
    summary = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "settings": vars(args) | {"student": str(student)},
        "runs": results,
        "kl_by_rank": quality,
        "kl_before_training": results["qdylora-nf4"]["before"]["kl_to_teacher"],
        "one_qdylora_wall_seconds": results["qdylora-nf4"]["wall_seconds"],
        "separate_lora_wall_seconds": separate,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distill.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, ranks, RESULTS / "distill.png")
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("kl_by_rank", "kl_before_training", "one_qdylora_wall_seconds", "separate_lora_wall_seconds")
            },
            indent=1,
        )
    )


def plot(summary: dict, ranks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, cost) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    quality.plot(ranks, [summary["kl_by_rank"][r]["qdylora"] for r in ranks], "o-", label="ONE qdylora run, truncated")
    quality.plot(ranks, [summary["kl_by_rank"][r]["lora"] for r in ranks], "s--", label="separate lora run per rank")
    quality.axhline(summary["kl_before_training"], color="gray", linestyle=":", label="student before training")
    quality.set_xscale("log", base=2)
    quality.set_xticks(ranks, [str(r) for r in ranks])
    quality.set_xlabel("rank")
    quality.set_ylabel("held-out KL(teacher || student)")
    quality.set_title("quality per rank (lower is better)", fontsize=10)
    quality.legend(fontsize=8)
    names = list(summary["runs"])
    memory = [summary["runs"][n]["peak_memory_mb"] for n in names]
    step = [summary["runs"][n]["mean_step_seconds"] for n in names]
    cost.bar(range(len(names)), memory, color="tab:blue")
    cost.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    cost.set_ylabel("peak memory, MB (incl. teacher)", color="tab:blue")
    time_axis = cost.twinx()
    time_axis.plot(range(len(names)), step, "o", color="tab:red")
    time_axis.set_ylabel("mean step, s", color="tab:red")
    cost.set_title("training cost per run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
