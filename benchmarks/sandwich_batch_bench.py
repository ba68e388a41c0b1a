"""The sandwich step's ranks (64, 16, 1) as three forward/backward passes (`kdlora distill --no-batch-ranks`) vs as
ONE pass of the batch repeated per rank, each copy's LoRA components masked to its rank and scaled by it
(`--batch-ranks`, the default: `NestedRank.set_copies`). NF4 base + all-linear LoRA r64 as the quickstart builds it
(`training.distill.build_student`), 8 rows, the loss on each row's last token through the LM head, in the dtype the
quickstart picks on this CPU (--dtype to choose). Also reports how far the two ways' gradients differ. The ways
alternate --runs times in one run (the machine is shared: compare the columns, not the digits). Writes JSON + PNG to
benchmarks/results/. Usage:

    .venv/bin/python benchmarks/sandwich_batch_bench.py [--student DIR] [--runs 4] [--tokens 110] [--dtype fp32]
"""

import argparse
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from distill_bench import write_side_by_side

RANKS = (64, 16, 1)
ROWS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, help="student checkpoint (default: the embedded teacher)")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=110)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="default: what the quickstart picks on this CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    from transformers import AutoConfig

    from kdlora_serve.quickstart import training_dtype
    from training.distill import DistillConfig, build_student
    from training.losses import final_hidden_states
    from training.teacher import embedded_teacher

    dtype = args.dtype or training_dtype()
    student = args.student or embedded_teacher()
    torch.manual_seed(0)
    batch = torch.randint(0, AutoConfig.from_pretrained(student).vocab_size, (ROWS, args.tokens))

    def build(dtype):
        """(the two ways of one step, the trainable parameters) on a fresh NF4 + LoRA r64 student in `dtype`."""
        cfg = DistillConfig(  # what build_student reads; nothing is written to `out`
            student=str(student), out=Path("unused"), train="qdylora", max_rank=max(RANKS), quantize="nf4", dtype=dtype
        )
        model, _, nested = build_student(cfg, torch.device("cpu"))
        model.train()
        autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

        def loss_of(hidden, head):
            return head(hidden).float().logsumexp(-1).mean()

        def sequential():
            for rank in RANKS:
                nested.set(rank)
                with autocast(), final_hidden_states(model) as head:
                    loss = loss_of(model(batch).logits[:, -1], head)
                loss.backward()

        def batched():
            nested.set_copies(RANKS, ROWS)
            with autocast(), final_hidden_states(model) as head:
                hidden = model(batch.repeat(len(RANKS), 1)).logits[:, -1]
                loss = sum(loss_of(group, head) for group in hidden.split(ROWS))
            loss.backward()

        return {"three passes": sequential, "one batched pass": batched}, [
            p for p in model.parameters() if p.requires_grad
        ]

    def gradients(step, params):
        for p in params:
            p.grad = None
        step()
        return [p.grad.float().clone() for p in params]

    def distance(reference, other) -> dict:
        """Relative distance per LoRA tensor (those with gradient: B alone at B = 0): median and max."""
        found = [((a - b).norm() / a.norm()).item() for a, b in zip(reference, other) if a.norm() > 0]
        return {"median": statistics.median(found), "max": max(found)}

    ways, params = build(dtype)
    grads = {way: gradients(step, params) for way, step in ways.items()}  # also the warm-up
    differences = {"batched vs three passes": distance(grads["three passes"], grads["one batched pass"])}
    if dtype != "fp32":  # rounding's own size: how far each way is from the same step in fp32
        fp32_ways, fp32_params = build("fp32")
        exact = gradients(fp32_ways["three passes"], fp32_params)
        differences |= {f"{way} vs fp32": distance(exact, found) for way, found in grads.items()}
        del fp32_ways, fp32_params
    seconds = {"step": {way: [] for way in ways}}
    for _ in range(args.runs):
        for way, step in ways.items():
            for p in params:
                p.grad = None
            started = time.perf_counter()
            step()
            seconds["step"][way].append(time.perf_counter() - started)
    median = {way: statistics.median(times) for way, times in seconds["step"].items()}
    summary = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "dtype": dtype,
        "student": str(student),
        "ranks": RANKS,
        "rows": ROWS,
        "tokens": args.tokens,
        "runs": args.runs,
        "seconds": seconds,
        "median_seconds": {"step": median},
        "speedup": median["three passes"] / median["one batched pass"],
        "gradient_relative_difference": differences,
    }
    write_side_by_side(
        f"sandwich-batch-{dtype}",
        summary,
        {way: way for way in ways},
        f"ranks {RANKS}, {ROWS} rows x {args.tokens} tokens, NF4 + LoRA r64, {dtype}: median of {args.runs}",
    )
    print({k: summary[k] for k in ("dtype", "median_seconds", "speedup", "gradient_relative_difference")})


if __name__ == "__main__":
    main()
