"""AdamW's step on this CPU: PyTorch's fused kernel (`kdlora distill` since b6aa5e6, transformers' Trainer default
`adamw_torch_fused`) vs its default for-loop (kdlora before) and its foreach variant, on the parameters the
quickstart trains: every weight of the embedded SmolLM2-135M (the task teacher; the healed student is half of it)
and an all-linear LoRA of rank 64 on it (the adapter stage). Random gradients; the three alternate --runs times in
one run (the machine is shared: compare the columns, not the digits). Also the largest difference between the fused
and the looped weights after those steps. Writes JSON + PNG to benchmarks/results/. Usage:

    .venv/bin/python benchmarks/optimizer_bench.py [--runs 5]
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from distill_bench import write_side_by_side

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.teacher import embedded_teacher

    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_pretrained(embedded_teacher(), dtype=torch.float32)
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(embedded_teacher(), dtype=torch.float32),
        LoraConfig(r=64, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
    )
    trained = {
        "every weight (135M)": [p for p in full.parameters()],
        "LoRA r64, all-linear": [p for p in lora.parameters() if p.requires_grad],
    }
    seconds = {work: {kind: [] for kind in KINDS} for work in trained}
    max_difference = {}
    for work, params in trained.items():
        copies = {kind: [p.detach().clone().requires_grad_() for p in params] for kind in KINDS}
        optimizers = {
            kind: torch.optim.AdamW(copies[kind], lr=1e-4, weight_decay=0.0, **options)
            for kind, options in KINDS.items()
        }
        for step in range(args.runs + 1):  # the first: warm-up (the states are allocated)
            grads = [torch.randn_like(p) for p in params]
            for kind, optimizer in optimizers.items():
                for p, grad in zip(copies[kind], grads):
                    p.grad = grad.clone()
                started = time.perf_counter()
                optimizer.step()
                if step:
                    seconds[work][kind].append(time.perf_counter() - started)
        max_difference[work] = max(
            (fused - looped).abs().max().item() for fused, looped in zip(copies["fused"], copies["loop"])
        )
        print(work, {kind: round(statistics.median(s), 3) for kind, s in seconds[work].items()}, flush=True)
    medians = {w: {kind: statistics.median(v) for kind, v in by.items()} for w, by in seconds.items()}
    summary = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "parameters": {work: sum(p.numel() for p in params) for work, params in trained.items()},
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": medians,
        "loop_over_fused": {w: m["loop"] / m["fused"] for w, m in medians.items()},
        "max_abs_difference_fused_vs_loop": max_difference,
    }
    write_side_by_side(
        "optimizer",
        summary,
        {"loop": "for-loop (PyTorch's CPU default)", "foreach": "foreach", "fused": "fused"},
        f"AdamW step, fp32 weights, on this CPU, median of {args.runs}",
    )
    print(json.dumps({k: summary[k] for k in ("parameters", "loop_over_fused", "max_abs_difference_fused_vs_loop")}))


if __name__ == "__main__":
    main()
