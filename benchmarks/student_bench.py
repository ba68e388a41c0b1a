"""Does pruning pay? The pruned teacher vs a same-size student from random init, same tokens, same training.

Both students have exactly the same architecture (the pruned checkpoint's config; the random one is
`from_config` with seed 0) and get the same `kdlora distill --train full` run: same data order, steps,
batch and KD loss to the same teacher. Each is trained at every learning rate in --lrs and reported
at its best (a random init wants a larger step than a pruned one; one shared lr would favour one side).
Held-out KL to the teacher, top-1 agreement and perplexity, before and after. Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/student_bench.py [--steps 50] [--lrs 1e-4,1e-3]
"""

import argparse
import json
import platform
import shutil
from pathlib import Path

from distill_bench import RESULTS, WORK, kdlora


def random_twin(pruned: Path, out: Path) -> Path:
    """The pruned student's architecture and tokenizer with freshly initialised weights."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pruned), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(pruned).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lrs", default="1e-4,1e-3")
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    pruned = WORK / "student"  # the same pruned student as distill_bench.py
    if not pruned.exists():
        kdlora("prune", "--out", str(pruned), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    students = {"pruned": pruned, "random-init": random_twin(pruned, WORK / "student-random")}
    shutil.rmtree(WORK / "student-runs", ignore_errors=True)
    runs = {}
    for name, student in students.items():
        for lr in args.lrs.split(","):
            out = WORK / "student-runs" / f"{name}-lr{lr}"
            wall = kdlora(
                "distill",
                "--student",
                str(student),
                "--train",
                "full",
                "--quantize",
                "none",
                "--steps",
                str(args.steps),
                "--seq-len",
                str(args.seq_len),
                "--lr",
                lr,
                "--eval-samples",
                "16",
                "--out",
                str(out),
            )
            report = json.loads((out / "distill_report.json").read_text())
            runs[f"{name}-lr{lr}"] = {
                "student": name,
                "lr": float(lr),
                "wall_seconds": wall,
                "before": report["before"],
                "after": report["after"]["None"],
                "loss": [h["loss"] for h in report["history"]],
            }
            print(
                f"{name} lr {lr}: KL {report['before']['kl_to_teacher']:.3f} -> {report['after']['None']['kl_to_teacher']:.3f}",
                flush=True,
            )
    best = {
        name: min((r for r in runs.values() if r["student"] == name), key=lambda r: r["after"]["kl_to_teacher"])
        for name in students
    }
    params = json.loads((pruned / "pruning_report.json").read_text())["params_after"]
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": vars(args),
        "student_params": params,
        "runs": runs,
        "best": best,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "student.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / "student.png")
    print(
        json.dumps(
            {name: {"lr": r["lr"], "before": r["before"], "after": r["after"]} for name, r in best.items()}, indent=1
        )
    )


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for name, run in summary["runs"].items():
        curves.plot(
            range(1, len(run["loss"]) + 1), run["loss"], "-" if run["student"] == "pruned" else "--", label=name
        )
    curves.set_xlabel("step")
    curves.set_ylabel("training loss (KD + next token)")
    curves.set_yscale("log")
    curves.set_title(f"same architecture ({summary['student_params'] / 1e6:.1f}M params), same tokens", fontsize=10)
    curves.legend(fontsize=8)
    names = list(summary["best"])
    for offset, (when, label) in enumerate(
        (("before", "before"), ("after", f"after {summary['settings']['steps']} steps"))
    ):
        bars.bar(
            [i + 0.4 * offset for i in range(len(names))],
            [summary["best"][n][when]["kl_to_teacher"] for n in names],
            0.4,
            label=label,
        )
    bars.set_xticks(
        [i + 0.2 for i in range(len(names))], [f"{n}\n(best lr {summary['best'][n]['lr']:g})" for n in names]
    )
    bars.set_ylabel("held-out KL(teacher || student)")
    bars.set_title("quality (lower is better)", fontsize=10)
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
