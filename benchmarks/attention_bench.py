"""Attention kernel for training and evaluation on this CPU: PyTorch's SDPA (transformers' default; on CPU its
flash-attention kernel) vs transformers' eager attention (two matmuls and a softmax), on the embedded SmolLM2-135M
with the quickstart's shapes: a full fine-tuning step (16 rows x 100 tokens: the task teacher, the heal), a step of
an NF4 base with an all-linear rank-64 LoRA (8 rows x 100 tokens: the adapter stage, three of these per step) and
an evaluation forward (8 rows x 100 tokens). Both kernels alternate --runs times in one run, in the dtype the
quickstart picks on this CPU or --dtype (the machine is shared: compare the columns, not the digits).
Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/attention_bench.py [--runs 5] [--dtype fp32|bf16]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from distill_bench import RESULTS, plot_side_by_side

KERNELS = ("sdpa", "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), help="default: the quickstart's pick on this CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.nf4 import keep_trainable, quantization_config, quiet_kernels_note

    quiet_kernels_note()
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdlora_serve.engine import native_bf16
    from kdlora_serve.quickstart import training_dtype
    from training.teacher import embedded_teacher

    dtype = args.dtype or training_dtype()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_pretrained(embedded_teacher(), dtype=torch.float32)
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    nf4 = AutoModelForCausalLM.from_pretrained(
        embedded_teacher(),
        dtype=compute,
        quantization_config=quantization_config("nf4", compute),
        device_map={"": "cpu"},
    )
    keep_trainable(nf4)
    nf4.requires_grad_(False)
    lora = get_peft_model(nf4, LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    rows = torch.randint(0, full.config.vocab_size, (16, 100))

    def train_step(model, batch) -> None:
        with autocast:
            loss = model(batch).logits[:, -2:].float().logsumexp(-1).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_forward(model, batch) -> None:
        with autocast:
            model(batch)

    works = {
        "full fine-tuning step": (full, lambda: train_step(full, rows)),
        "NF4 + LoRA r64 step": (lora, lambda: train_step(lora, rows[:8])),
        "eval forward": (full.eval(), lambda: eval_forward(full, rows[:8])),
    }
    seconds = {work: {kernel: [] for kernel in KERNELS} for work in works}
    for work, (model, call) in works.items():
        model.train(work != "eval forward")
        for kernel in KERNELS:
            model.set_attn_implementation(kernel)
            call()  # warm-up: oneDNN picks its kernels on the first call
        for _ in range(args.runs):
            for kernel in KERNELS:
                model.set_attn_implementation(kernel)
                started = time.perf_counter()
                call()
                seconds[work][kernel].append(time.perf_counter() - started)
    summary = {
        "machine": {"platform": platform.platform(), "native_bf16": native_bf16(), "torch": torch.__version__},
        "dtype": dtype,
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": {w: {k: statistics.median(v) for k, v in by.items()} for w, by in seconds.items()},
        "sdpa_over_eager": {
            w: statistics.median(by["sdpa"]) / statistics.median(by["eager"]) for w, by in seconds.items()
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"attention-{dtype}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary, RESULTS / f"attention-{dtype}.png")
    print(json.dumps({k: summary[k] for k in ("machine", "dtype", "median_seconds", "sdpa_over_eager")}, indent=1))


def plot(summary: dict, path: Path) -> None:
    plot_side_by_side(
        summary["median_seconds"],
        {"sdpa": "SDPA (flash, CPU)", "eager": "eager"},
        f"SmolLM2-135M attention kernels, {summary['dtype']}, median of {summary['runs']}",
        path,
    )


if __name__ == "__main__":
    main()
