"""Evaluation batches: the held-out rows in their own order vs sorted by length (training.evaluate.batches_by_length),
at 8, 16 and 32 rows a batch. The work is `predicted_choices` (each example's answer scored from its prompt, as the
quickstart's unseen-wording accuracy is) on the quickstart's held-out BBC News prompts (64-113 tokens), by the
embedded SmolLM2-135M on an NF4 base with an all-linear rank-64 LoRA, in the dtype the quickstart picks on this CPU.
The ways alternate --runs times in one run (the machine is shared: compare the columns, not the digits).
Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/eval_batch_bench.py [--runs 3] [--rows 96]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from distill_bench import write_side_by_side

WAYS = {"own order, 8": (False, 8), "by length, 8": (True, 8), "by length, 16": (True, 16), "by length, 32": (True, 32)}


def in_order(lengths: list[int], batch_size: int) -> list[list[int]]:
    """The batches before sorting: consecutive rows."""
    return [list(range(start, min(start + batch_size, len(lengths)))) for start in range(0, len(lengths), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=96)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from peft import LoraConfig, get_peft_model

    import training.evaluate as evaluate
    from kdlora_serve.engine import native_bf16
    from kdlora_serve.quickstart import TASK, training_dtype
    from training.data import load_token_data
    from training.nf4 import keep_trainable
    from training.teacher import load_causal_lm

    dtype = training_dtype()
    nf4, tokenizer, _ = load_causal_lm(None, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, quantize="nf4")
    keep_trainable(nf4)  # the generic path, as distill evaluates a base it trains
    model = get_peft_model(nf4, LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules="all-linear")).eval()
    examples = load_token_data(TASK, tokenizer, 128).heldout_examples
    examples = examples[: args.rows]
    sorted_batches = evaluate.batches_by_length

    def run(by_length: bool, batch_size: int) -> int:
        """Scores the examples; returns the columns computed (rows x the longest row of each batch)."""
        evaluate.batches_by_length = sorted_batches if by_length else in_order
        lengths = [len(e.prompt) for e in examples]
        columns = sum(len(b) * max(lengths[i] for i in b) for b in evaluate.batches_by_length(lengths, batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            evaluate.predicted_choices(model, examples, batch_size)
        return columns

    columns = {way: run(*setting) for way, setting in WAYS.items()}  # warm-up: oneDNN picks its kernels
    seconds = {"evaluation": {way: [] for way in WAYS}}
    for _ in range(args.runs):
        for way, setting in WAYS.items():
            started = time.perf_counter()
            run(*setting)
            seconds["evaluation"][way].append(time.perf_counter() - started)
    evaluate.batches_by_length = sorted_batches
    median = {way: statistics.median(times) for way, times in seconds["evaluation"].items()}
    summary = {
        "machine": {"platform": platform.platform(), "native_bf16": native_bf16(), "torch": torch.__version__},
        "dtype": dtype,
        "runs": args.runs,
        "rows": len(examples),
        "columns": columns,
        "seconds": seconds,
        "median_seconds": {"evaluation": median},
        "speedup_over_own_order_8": {way: median["own order, 8"] / m for way, m in median.items()},
    }
    write_side_by_side(
        f"eval-batches-{dtype}",
        summary,
        {way: way for way in WAYS},
        f"{len(examples)} held-out prompts, NF4 + LoRA r64, {dtype}: median of {args.runs}",
    )
    print({k: summary[k] for k in ("dtype", "columns", "median_seconds", "speedup_over_own_order_8")})


if __name__ == "__main__":
    main()
