"""fp32 vs bf16 autocast on this CPU, for the quickstart's kinds of work on the embedded SmolLM2-135M: a full
fine-tuning step (forward + backward, 16 rows x 100 tokens, the task teacher's), an evaluation forward (8 rows x
100 tokens), and one pass of the adapter stage (NF4 base computing in bf16, all-linear rank-64 LoRA with fp32
weights, 8 rows x 100 tokens; three a step): there "fp32" is the LoRA computed in fp32, as kdlora did before
1812d0c, "bf16" under autocast. The two alternate --runs times in one run (the machine is shared: compare the
columns, not the digits). On CPUs without native bf16 (AVX2-only) bf16 is emulated and slower; the quickstart then
stays fp32. Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/dtype_bench.py [--runs 3]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from distill_bench import RESULTS, plot_side_by_side

DTYPES = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.nf4 import keep_trainable, quantization_config, quiet_kernels_note

    quiet_kernels_note()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdlora_serve.engine import native_bf16
    from training.teacher import embedded_teacher

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(embedded_teacher(), dtype=torch.float32)
    nf4 = AutoModelForCausalLM.from_pretrained(
        embedded_teacher(),
        dtype=torch.bfloat16,
        quantization_config=quantization_config("nf4", torch.bfloat16),
        device_map={"": "cpu"},
    )
    keep_trainable(nf4)
    nf4.requires_grad_(False)
    lora = get_peft_model(nf4, LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    rows = torch.randint(0, model.config.vocab_size, (16, 100))

    def train_step(dtype: str, trained=model, batch=rows) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = trained(batch).logits[:, -2:].float().logsumexp(-1).mean()
        loss.backward()
        trained.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward(dtype: str) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            model(rows[:8])

    works = {
        "train step": train_step,
        "eval forward": eval_forward,
        "NF4 + LoRA r64 pass": lambda dtype: train_step(dtype, lora, rows[:8]),
    }
    seconds = {work: {dtype: [] for dtype in DTYPES} for work in works}
    for work, call in works.items():
        for dtype in DTYPES:
            call(dtype)  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(args.runs):
            for dtype in DTYPES:
                started = time.perf_counter()
                call(dtype)
                seconds[work][dtype].append(time.perf_counter() - started)
    summary = {
        "machine": {"platform": platform.platform(), "native_bf16": native_bf16(), "torch": torch.__version__},
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": {w: {d: statistics.median(v) for d, v in by.items()} for w, by in seconds.items()},
        "fp32_over_bf16": {
            w: statistics.median(by["fp32"]) / statistics.median(by["bf16"]) for w, by in seconds.items()
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dtype.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / "dtype.png")
    print(json.dumps({k: summary[k] for k in ("machine", "median_seconds", "fp32_over_bf16")}, indent=1))


def plot(summary: dict, path: Path) -> None:
    native = "native bf16" if summary["machine"]["native_bf16"] else "bf16 emulated"
    plot_side_by_side(
        summary["median_seconds"],
        {"fp32": "fp32", "bf16": "bf16 autocast"},
        f"SmolLM2-135M on this CPU ({native}), median of {summary['runs']}",
        path,
    )


if __name__ == "__main__":
    main()
