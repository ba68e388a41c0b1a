"""Training memory and step time per mode, today's defaults side by side with the memory options (issue: training
that fits real models). One `kdlora distill` subprocess per run, same student / data / steps / seed; each reports
the peak of its training steps alone (`train_peak_memory_mb`: Linux's resident-set high-water mark, reset after
set-up and the first evaluation; CUDA max allocated on a GPU) and the whole run's. The teacher caches (top-k, RS-KD) are built once
(`kdlora teacher cache`) and its build time and size are reported. Writes JSON + PNG to benchmarks/results/.

    .venv/bin/python benchmarks/memory_bench.py [--student DIR] [--steps 20] [--batch-size 4] [--seq-len 256] [--only 'NAME;NAME']

"Dense" runs put the whole batch in one loss chunk (`--loss-chunk-tokens` = batch x seq-len), which holds the
batch's full-vocabulary logits as the loss did before chunking; every other run uses the default 256. One run sets
MALLOC_MMAP_THRESHOLD_ (glibc keeps freed activation memory otherwise; training/memory.py).
"""

import argparse
import json
import platform
import shutil
from pathlib import Path

from distill_bench import RESULTS, WORK, kdlora  # the same student and the same way of running kdlora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--student",
        type=Path,
        help="student checkpoint (default: the embedded teacher pruned to 50%%, as distill_bench)",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-rank", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument(
        "--only",
        help="run only these runs (names separated by ';'), keeping the other rows of results/memory.json "
        "and the teacher cache of the last full run",
    )
    args = parser.parse_args()
    runs_dir = WORK / "memory"
    previous = json.loads((RESULTS / "memory.json").read_text()) if args.only else None
    if previous is None:
        shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    student = args.student or WORK / "student"
    if not student.exists():
        kdlora("prune", "--out", str(student), "--target-params", "0.5", "--calib-samples", "64", "--seq-len", "128")
    cache = runs_dir / "teacher-cache"
    cache_seconds = (
        previous["cache"]["seconds"]
        if previous
        else kdlora("teacher", "cache", "--out", str(cache), "--seq-len", str(args.seq_len), "--top-k", str(args.top_k))
    )
    rs_cache = runs_dir / "teacher-cache-rs-kd"  # RS-KD: 64 ids drawn from the teacher per token instead of its top 64
    rs_seconds = (previous.get("rs_kd_cache", {}).get("seconds") if previous and rs_cache.exists() else None) or kdlora(
        "teacher",
        "cache",
        "--out",
        str(rs_cache),
        "--seq-len",
        str(args.seq_len),
        "--top-k",
        str(args.top_k),
        "--sampling",
        "rs-kd",
    )
    cache_settings = json.loads((cache / "cache.json").read_text())
    cache_bytes = sum(p.stat().st_size for p in cache.iterdir())
    from safetensors import safe_open

    cache_tokens = sum(
        safe_open(str(p), "pt").get_tensor("offsets")[-1].item() for p in cache.glob("rows-*.safetensors")
    )

    dense = ["--loss-chunk-tokens", str(args.batch_size * args.seq_len)]
    adapter = [
        "--train",
        "qdylora",
        "--max-rank",
        str(args.max_rank),
        "--eval-ranks",
        str(args.max_rank),
        "--quantize",
        "nf4",
        "--lr",
        "1e-3",
    ]
    full = ["--train", "full", "--quantize", "none", "--lr", "2e-5"]
    runs = {
        "full, dense loss (before)": full + dense,
        "full, chunked loss": full,
        "full, chunked + 8-bit AdamW": full + ["--optimizer", "adamw8bit"],
        "full, chunked + 8-bit AdamW + bf16 autocast + grad. checkpointing": full
        + ["--optimizer", "adamw8bit", "--dtype", "bf16", "--gradient-checkpointing"],
        "qdylora NF4, dense loss (before)": adapter + dense,
        "qdylora NF4, chunked loss": adapter,
        "qdylora NF4, chunked, NF4 teacher": adapter + ["--teacher-quantize", "nf4"],
        "qdylora NF4, chunked, cached teacher": adapter + ["--teacher-cache", str(cache)],
        "qdylora NF4, chunked, cached teacher, grad. checkpointing": adapter
        + ["--teacher-cache", str(cache), "--gradient-checkpointing"],
        "qdylora NF4, chunked, cached teacher, MALLOC_MMAP_THRESHOLD_": adapter + ["--teacher-cache", str(cache)],
        "qdylora NF4, chunked, cached teacher, grad. checkpointing, bf16": adapter
        + ["--teacher-cache", str(cache), "--gradient-checkpointing", "--dtype", "bf16"],
        "qdylora NF4, chunked, RS-KD cached teacher": adapter + ["--teacher-cache", str(rs_cache)],
        "qdylora NF4, chunked, RS-KD cached teacher, grad. checkpointing, bf16": adapter
        + ["--teacher-cache", str(rs_cache), "--gradient-checkpointing", "--dtype", "bf16"],
    }
    environments = {
        "qdylora NF4, chunked, cached teacher, MALLOC_MMAP_THRESHOLD_": {"MALLOC_MMAP_THRESHOLD_": "131072"}
    }
    common = [
        "--student",
        str(student),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--eval-samples",
        "16",
    ]
    results = previous["runs"] if previous else {}
    for number, (name, flags) in enumerate(runs.items()):
        if args.only and name not in args.only.split(";"):
            continue
        out = runs_dir / f"run{number}"
        shutil.rmtree(out, ignore_errors=True)
        wall = kdlora("distill", *common, *flags, "--out", str(out), env=environments.get(name))
        report = json.loads((out / "distill_report.json").read_text())
        setting = "None" if "full" in name else str(args.max_rank)
        results[name] = {
            "flags": flags,
            "env": environments.get(name),
            "wall_seconds": wall,
            "mean_step_seconds": report["mean_step_seconds"],
            "train_peak_memory_mb": report["train_peak_memory_mb"],
            "peak_memory_mb": report["peak_memory_mb"],
            "kl_before": report["before"]["kl_to_teacher"],
            "kl_after": report["after"][setting]["kl_to_teacher"],
        }
        print(
            f"{name}: train peak {report['train_peak_memory_mb']:.0f} MB, {report['mean_step_seconds']:.2f} s/step, "
            f"KL {results[name]['kl_after']:.3f}",
            flush=True,
        )
    full_peak = results["full, dense loss (before)"]["train_peak_memory_mb"]
    online, cached = results["qdylora NF4, chunked loss"], results["qdylora NF4, chunked, cached teacher"]
    results = {name: results[name] for name in runs if name in results}  # in the table's order
    summary = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "settings": vars(args) | {"student": str(student), "only": None},
        "cache": {
            "seconds": cache_seconds,
            "bytes": cache_bytes,
            "tokens": cache_tokens,
            "bytes_per_token": cache_bytes / cache_tokens,
            "top_k": cache_settings["top_k"],
            "rows": cache_settings["rows"],
        },
        "rs_kd_cache": {"seconds": rs_seconds, "bytes": sum(p.stat().st_size for p in rs_cache.iterdir())},
        "runs": results,
        "goals": {
            "cached_qdylora_peak_over_full_peak": cached["train_peak_memory_mb"] / full_peak,
            "cached_kl_over_online_kl": cached["kl_after"] / online["kl_after"],
        },
    }
    for suffix, name in (
        ("checkpointed", "qdylora NF4, chunked, cached teacher, grad. checkpointing"),
        ("checkpointed_bf16", "qdylora NF4, chunked, cached teacher, grad. checkpointing, bf16"),
        ("rs_kd", "qdylora NF4, chunked, RS-KD cached teacher"),
        ("rs_kd_checkpointed_bf16", "qdylora NF4, chunked, RS-KD cached teacher, grad. checkpointing, bf16"),
    ):
        if name in results:
            summary["goals"] |= {
                f"cached_{suffix}_qdylora_peak_over_full_peak": results[name]["train_peak_memory_mb"] / full_peak,
                f"cached_{suffix}_kl_over_online_kl": results[name]["kl_after"] / online["kl_after"],
            }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / "memory.png")
    print(json.dumps(summary["goals"]))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=110, sharey=True)
    for axis, key, label in (
        (axes[0], "train_peak_memory_mb", "peak memory of the training steps (MB)"),
        (axes[1], "mean_step_seconds", "mean step time (s)"),
    ):
        values = [summary["runs"][n][key] for n in names]
        axis.barh(range(len(names)), values, color=["#888" if "before" in n else "#3a7" for n in names])
        for y, v in enumerate(values):
            axis.text(v, y, f" {v:.0f}" if key.endswith("mb") else f" {v:.2f}", va="center", fontsize=8)
        axis.set_xlabel(label)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("kdlora distill: training memory per mode (grey: before this change's options)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
