"""A sandwich step (ranks R, one between, 1) as three forward/backward passes (`kdlora distill --batch-ranks off`) vs
as one forward of the batch repeated per rank (`--batch-ranks on`: `NestedRank.set_copies`), measured on
the quickstart's own adapter stage: its student, its task teacher, BBC News, NF4 base + LoRA r64, 8 articles a
step, lr 1e-3, in the dtype given (default: what the quickstart picks on this CPU). Each run is a `kdlora distill`
process of --steps steps; the step times are its report's (the first step, a warm-up, left out). The ways
alternate --runs times (the machine is shared: compare the columns, not the digits). Writes JSON + PNG to
benchmarks/results/. As an AVX2-only CPU: with benchmarks/as_avx2_only.py's environment variables (RESULTS.md
"A sandwich step in one forward" has the command). Needs a quickstart's output (`scripts/kdlora quickstart`). Usage:

    .venv/bin/python benchmarks/sandwich_batch_bench.py --quickstart kdlora-quickstart [--steps 12] [--runs 2]
        [--dtype fp32] [--tag amd]
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

from distill_bench import WORK, kdlora, write_side_by_side

WAYS = {"three passes": ("--batch-ranks", "off"), "one batched pass": ("--batch-ranks", "on")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quickstart", type=Path, required=True, help="a `kdlora quickstart --out` directory")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: what the quickstart picks on this CPU")
    parser.add_argument("--tag", help="appended to the results' name: another host's run beside this one's")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kdlora_serve.quickstart import TASK, training_dtype

    dtype = args.dtype or training_dtype()
    common = [
        *("--student", str(args.quickstart / "student"), "--teacher", str(args.quickstart / "teacher-bbc")),
        *("--data", TASK, "--train", "qdylora", "--max-rank", "64", "--quantize", "nf4"),
        *("--rank-distribution", "sandwich", "--batch-size", "8", "--seq-len", "128", "--lr", "1e-3"),
        *("--steps", str(args.steps), "--eval-ranks", "1", "--eval-samples", "8", "--dtype", dtype),
    ]
    seconds = {way: [] for way in WAYS}  # every measured step of every run
    losses = {way: [] for way in WAYS}
    for run in range(args.runs):
        for way, flag in WAYS.items():
            out = WORK / "sandwich" / f"{way.replace(' ', '-')}-{run}"
            shutil.rmtree(out, ignore_errors=True)
            kdlora("distill", *common, *flag, "--out", str(out))
            history = json.loads((out / "distill_report.json").read_text())["history"]
            seconds[way] += [step["seconds"] for step in history[1:]]
            losses[way].append([step["loss"] for step in history])
    median = {way: statistics.median(times) for way, times in seconds.items()}
    summary = {
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "dtype": dtype,
        "quickstart": str(args.quickstart),
        "steps": args.steps,
        "runs": args.runs,
        "step_seconds": seconds,
        "median_seconds": {"step": median},
        "speedup": median["three passes"] / median["one batched pass"],
        "losses": losses,  # per run and step: the ways should track each other (equal in fp32, to rounding)
    }
    isa = os.environ.get("ATEN_CPU_CAPABILITY")  # benchmarks/as_avx2_only.py's environment: named apart
    summary["aten_cpu_capability"] = isa
    write_side_by_side(
        f"sandwich-batch-{dtype}" + (f"-as-{isa}" if isa else "") + (f"-{args.tag}" if args.tag else ""),
        summary,
        {way: f"{way} ({' '.join(flag)})" for way, flag in WAYS.items()},
        f"quickstart adapter step (ranks 64 / r / 1, 8 articles), {dtype}: median of {len(seconds['three passes'])}",
    )
    print({k: summary[k] for k in ("dtype", "median_seconds", "speedup")})


if __name__ == "__main__":
    main()
